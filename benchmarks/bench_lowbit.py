"""Below 4 bits in peakllm's own format: plain GPTQ at one width against the per-matrix allocation with rotations.

Issue 27's target: at 3.0 bits/param over the decoder's linear matrices, perplexity at least 25% lower than
plain GPTQ at 3.0 bits; at 2.5 bits, at least 50% lower; several calibration seeds. Each config is one
`peakllm quantize --format peakllm` run (wiki perplexity by the run's own evaluator, `--eval-tokens`); the
bits per parameter are recomputed here from the written folder's manifest over the decoder's matrices only
(embedding and lm_head excluded: they are stored the same way, 8-bit, in every config).

Configs (--configs, comma-separated):
  plain3     GPTQ W3, one scale and zero per row (3.04 bits over the default model's matrices)
  plain2.5   GPTQ W2 g64 asymmetric (2.375 bits)
  ours3      --target-bits 3.0 --rotate --sink-weight 10 (per-matrix grids from --grids)
  ours2.5    --target-bits 2.5 --rotate --sink-weight 10
  ours3m / ours2.5m   the same with every candidate's clipping range searched (--mse's search)
  alloc3 / alloc2.5   the allocation without rotation (what the rotation adds)
  rot3m / rot2.5m     plain3m / plain2.5m with --rotate --sink-weight 10, one grid for every matrix
  mix2.5m             rot2.5m with down_proj at 3 bits (--matrix-grid: a fixed rule, no allocation)
  plainmix2.5m        mix2.5m without --rotate and --sink-weight (plain GPTQ --mse at the same bits)

  HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/bench_lowbit.py --configs plain3,ours3 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from results_line import REPO, append

GRIDS = "2g32s,2g64s,2g128s,3g64s,3g128s,4g128s"
GRIDS_MSE = ",".join(g + "m" for g in GRIDS.split(","))  # the same grids with the clipping range searched
CONFIGS = {
    "plain3": ["--bits", "3", "--group-size", "-1"],
    "plain2.5": ["--bits", "2", "--group-size", "64"],
    # the same plain GPTQ with each row's (group's) clipping range searched: the baseline for the *m configs
    "plain3m": ["--bits", "3", "--group-size", "-1", "--mse"],
    "plain2.5m": ["--bits", "2", "--group-size", "64", "--mse"],
    # ablation: plain3m with the rotation and the sink weight, no allocation (one grid for every matrix)
    "rot3m": ["--bits", "3", "--group-size", "-1", "--mse", "--rotate", "--sink-weight", "10"],
    # plain2.5m with the rotation and the sink weight, no allocation: the same 2.375 bits as plain2.5m
    "rot2.5m": ["--bits", "2", "--group-size", "64", "--mse", "--rotate", "--sink-weight", "10"],
    # rot2.5m with one fixed rule instead of a measured allocation: every down_proj on rot3m's grid (3 bits,
    # one scale and zero per row), the rest on W2 g64 (2.54 bits on the default model: down_proj is 1/4 of it)
    "mix2.5m": ["--bits", "2", "--group-size", "64", "--mse", "--rotate", "--sink-weight", "10",
                "--matrix-grid", "down_proj=3g-1m"],
    # mix2.5m without the rotation and the sink weight: plain GPTQ --mse at mix2.5m's bits (its equal-size baseline)
    "plainmix2.5m": ["--bits", "2", "--group-size", "64", "--mse", "--matrix-grid", "down_proj=3g-1m"],
    "ours3": ["--target-bits", "3.0", "--rotate", "--sink-weight", "10", "--target-grids", GRIDS],
    "ours2.5": ["--target-bits", "2.5", "--rotate", "--sink-weight", "10", "--target-grids", GRIDS],
    "ours3m": ["--target-bits", "3.0", "--rotate", "--sink-weight", "10", "--target-grids", GRIDS_MSE],
    "ours2.5m": ["--target-bits", "2.5", "--rotate", "--sink-weight", "10", "--target-grids", GRIDS_MSE],
    "alloc3": ["--target-bits", "3.0", "--target-grids", GRIDS],
    "alloc2.5": ["--target-bits", "2.5", "--target-grids", GRIDS],
}


def linear_bits(folder: Path) -> float:
    """Bits/param over the decoder's packed matrices, from the folder's manifest (formats/intk.py's bytes)."""
    sys.path.insert(0, str(REPO))
    from peakllm.calibrate.intk_plan import intk_bytes
    from peakllm.solvers import Grid

    modules = json.loads((folder / "peakllm.json").read_text())["modules"]
    nbytes = params = 0
    for name, entry in modules.items():
        if "embed_tokens" in name or "lm_head" in name:
            continue
        m = entry["metadata"]
        shape = (m["out_features"], m["in_features"])
        nbytes += intk_bytes(Grid("affine", m["bits"], m["group_size"], sym=m["sym"]), shape, "rotate_block" in m)
        params += math.prod(shape)
    return 8 * nbytes / params


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--configs", default="plain3,ours3,plain2.5,ours2.5")
    p.add_argument("--seeds", default="0")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/peakllm-lowbit", help="folder for the quantized models")
    p.add_argument("--results", default=str(REPO / "docs/results/lowbit.jsonl"))
    args = p.parse_args()
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.configs.split(","):
            out = Path(args.out) / f"{args.model.replace('/', '_')}-{name}-s{seed}"
            cmd = [sys.executable, "-m", "peakllm", "quantize", "--model", args.model, "--output", str(out),
                   "--overwrite", "--seed", str(seed), "--calib-samples", str(args.calib_samples),
                   "--eval-tokens", str(args.eval_tokens), "--threads", str(args.threads), "--json",
                   *CONFIGS[name]]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return proc.returncode
            res = json.loads(proc.stdout)
            row = {"bench": "lowbit", "model": args.model, "config": name, "seed": seed,
                   "args": CONFIGS[name], "calib_samples": args.calib_samples, "eval_tokens": args.eval_tokens,
                   "ppl": res["ppl"], "dense_ppl": res["dense_ppl"], "linear_bits": linear_bits(out),
                   "seconds": round(time.time() - t0, 1),
                   **{k: res[k] for k in ("allocation_counts", "allocation_bits", "allocation_seconds")
                      if k in res}}
            print(json.dumps(append(args.results, row, threads=args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
