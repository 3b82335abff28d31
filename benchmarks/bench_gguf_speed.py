"""llama-bench on two GGUF files of the same model and types, alternating: peakllm's file against llama-quantize's.

Issue 27's speed target: a peakllm GGUF runs in llama.cpp at the speed of llama-quantize's file of the same
types. The files come from benchmarks/bench_gguf_quality.py (its --out folder); this runs `llama-bench -t 2 -p
PP -n TG -r 1` on each in turn, swapping the order every round, and records the per-round ratios
(bench_gguf_scale.llama_bench), the load, and both files' tensor types.

  python benchmarks/bench_gguf_speed.py --ours /work/peers/out/gguf/peakllm-Q4_K_M-seed0.gguf \
      --theirs /work/peers/out/gguf/Q4_K_M-imatrix.gguf --label Q4_K_M --rounds 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench_gguf_scale import llama_bench
from results_line import REPO, append


def tensor_types(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", type=Path, required=True)
    ap.add_argument("--theirs", type=Path, required=True)
    ap.add_argument("--label", required=True, help="the preset both files were made with")
    ap.add_argument("--peers", type=Path, default=Path("/work/peers"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pp", type=int, default=64)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--repack", type=int, choices=(0, 1), default=1)
    ap.add_argument("--results", default=str(REPO / "docs/results/gguf-speed.jsonl"))
    args = ap.parse_args()
    if not (args.peers / "build/bin/llama-bench").exists() and (args.peers / "llama.cpp").exists():
        args.peers = args.peers / "llama.cpp"
    types = {"ours": tensor_types(args.ours), "theirs": tensor_types(args.theirs)}
    if types["ours"] != types["theirs"]:
        print(f"warning: the files' tensor types differ: {types}", file=sys.stderr)
    row = {"bench": "gguf-speed", "preset": args.label, "ours": str(args.ours), "theirs": str(args.theirs),
           "file_bytes": {"ours": args.ours.stat().st_size, "theirs": args.theirs.stat().st_size},
           "tensor_types": types, **llama_bench(args, args.peers, args.ours, args.theirs)}
    append(args.results, row, threads=2)
    print({k: row[k] for k in ("preset", "tg") if k in row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
