"""Decode speed of two or more peakllm checkouts on one folder, alternated in fresh processes.

    python benchmarks/bench_decode_trees.py --model FOLDER --tree OLD-CHECKOUT --tree . --rounds 4 \\
        [--gguf GGUF --llama-bench .../llama-bench] [--new-tokens 32] [--threads 2] [--log OUT.jsonl]

For A/B of a change: check the tree before it out as a git worktree and pass both. Each round runs `peakllm
bench --json` (16-token prompt, --new-tokens, --repeats 1) once per tree, with that tree's package
(bench_decode_vs_llamacpp.peakllm_tok_s), then, with --gguf, one `llama-bench -p 0 -n N -r 1` of it, so all
see the same machine state. Prints each one's tok/s per round and median; --log appends one JSON line per run
(round, tree, 1-minute load average, and the bench result or llama.cpp's tok/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from bench_decode_vs_llamacpp import llama_tok_s, peakllm_tok_s

from results_line import append as append_result  # benchmarks/results_line.py: commit, machine, command


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="packed folder every tree decodes")
    ap.add_argument("--tree", action="append", required=True, help="a peakllm checkout (repeat)")
    ap.add_argument("--gguf", default=None, help="a GGUF for llama-bench after each round")
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    for tree in args.tree:
        if not (Path(tree) / "peakllm" / "__init__.py").is_file():
            raise SystemExit(f"{tree} is not a peakllm checkout (no peakllm/__init__.py)")
    if args.gguf and not (args.llama_bench and Path(args.llama_bench).is_file()):
        raise SystemExit("--gguf needs --llama-bench pointing at llama.cpp's llama-bench")
    runs: dict[str, list[float]] = {}
    for r in range(args.rounds):
        rows = []
        for tree in args.tree:
            res = peakllm_tok_s(args.model, args, [], tree=tree)
            rows.append({"round": r, "tree": tree, "load": os.getloadavg()[0], "bench": res})
            runs.setdefault(tree, []).append(res["decode_tok_s"])
        if args.gguf:
            tok = llama_tok_s(args.gguf, args)
            rows.append({"round": r, "tree": "llama.cpp", "load": os.getloadavg()[0], "tok_s": tok})
            runs.setdefault("llama.cpp", []).append(tok)
        print(f"round {r}: " + ", ".join(f"{name} {v[-1]:.3g}" for name, v in runs.items()) + " tok/s",
              file=sys.stderr, flush=True)
        if args.log:
            for row in rows:
                append_result(args.log, row, threads=args.threads)
    for name, v in runs.items():
        print(f"{name}: median {statistics.median(v):.2f} tok/s over {len(v)} runs ({', '.join(f'{x:.2f}' for x in v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
