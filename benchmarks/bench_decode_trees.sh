#!/bin/bash
# Decode speed of two or more peakllm checkouts (e.g. a git worktree of the tree before a change, and this
# one) on one folder, alternated in fresh processes, with one llama-bench run of a GGUF after each round.
#
#   benchmarks/bench_decode_trees.sh FOLDER GGUF ROUNDS OUT.jsonl LLAMA_BENCH TREE [TREE ...]
#
# Each round runs `peakllm bench --json --new-tokens 32 --prompt-tokens 16 --repeats 1 --threads 2` once per
# tree (PYTHONPATH=TREE), then `llama-bench -p 0 -n 32 -r 1 -t 2` (skipped when GGUF is "-"); every result
# is one JSON line in OUT with the round, the tree and the 1-minute load average. The summary prints the
# median decode tok/s of each.
set -euo pipefail
[ $# -ge 6 ] || { sed -n 2,10p "$0"; exit 2; }
FOLDER=$1 GGUF=$2 ROUNDS=$3 OUT=$4 LLAMA_BENCH=$5
shift 5
for r in $(seq "$ROUNDS"); do
  for tree in "$@"; do
    res=$(cd /tmp && PYTHONPATH="$tree" python -m peakllm bench --model "$FOLDER" --json --new-tokens 32 \
          --prompt-tokens 16 --repeats 1 --threads 2 | tail -1)
    echo "{\"round\": $r, \"tree\": \"$tree\", \"load\": $(cut -d' ' -f1 /proc/loadavg), \"bench\": $res}" >> "$OUT"
  done
  if [ "$GGUF" != "-" ]; then
    tok=$("$LLAMA_BENCH" -m "$GGUF" -p 0 -n 32 -r 1 -t 2 -o json 2>/dev/null |
          python -c "import json, sys; print(next(r for r in json.load(sys.stdin) if r.get('n_gen'))['avg_ts'])")
    echo "{\"round\": $r, \"tree\": \"llama.cpp\", \"load\": $(cut -d' ' -f1 /proc/loadavg), \"tok_s\": $tok}" >> "$OUT"
  fi
done
python - "$OUT" <<'PY'
import collections, json, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    j = json.loads(line)
    runs[j["tree"]].append(j["tok_s"] if "tok_s" in j else j["bench"]["decode_tok_s"])
for tree, v in runs.items():
    print(f"{tree}: median {statistics.median(v):.2f} tok/s over {len(v)} runs ({', '.join(f'{x:.2f}' for x in v)})")
PY
