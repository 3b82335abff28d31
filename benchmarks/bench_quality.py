"""Quality at equal whole-file size, over several calibration seeds: `peakllm quantize` runs, one JSON row each.

  python benchmarks/bench_quality.py --preset lead --seeds 0 1 2 --log docs/results/quality.jsonl
  python benchmarks/bench_quality.py --table docs/results/quality.jsonl      # mean ± spread per configuration

Every run is the CLI itself (`peakllm quantize ... --json`), so a row is exactly what a user gets: the
same calibration segments for a seed, the same evaluation windows (the first --eval-tokens held-out wiki
tokens, seqlen 512), the whole output folder written. At 2-4 bits the perplexity of the 135M default model
moves by several percent with the calibration sample alone, hence seeds; the table shows the mean and the
spread (max - min) / 2 over them. Output folders are deleted after each run unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_line import append as append_result  # benchmarks/results_line.py: commit, machine, command

# name -> quantize arguments (besides model, seed, calibration and evaluation budget)
CONFIGS = {
    "w4g64-sym-static-e8": ["--bits", "4", "--group-size", "64", "--sym", "--act-order", "static", "--embed-bits", "8"],
    "w4g64-sym-none-e8": ["--bits", "4", "--group-size", "64", "--sym", "--act-order", "none", "--embed-bits", "8"],
    "w4g64-sym-static-keep": ["--bits", "4", "--group-size", "64", "--sym", "--act-order", "static", "--embed-bits",
                              "keep"],
    "w4g64-sym-static-e4": ["--bits", "4", "--group-size", "64", "--sym", "--act-order", "static", "--embed-bits", "4"],
    "w4g32-static-e8": ["--bits", "4", "--group-size", "32", "--act-order", "static", "--embed-bits", "8"],
    "w4g32-static-e4": ["--bits", "4", "--group-size", "32", "--act-order", "static", "--embed-bits", "4",
                        "--embed-group-size", "32"],
    "w4g32-static-mse-e8": ["--bits", "4", "--group-size", "32", "--act-order", "static", "--mse", "--embed-bits", "8"],
    "w4g32-static-mse-e4": ["--bits", "4", "--group-size", "32", "--act-order", "static", "--mse", "--embed-bits", "4",
                            "--embed-group-size", "32"],
    "w4g128-static-e8": ["--bits", "4", "--group-size", "128", "--act-order", "static", "--embed-bits", "8"],
    "w4g64-static-e4": ["--bits", "4", "--group-size", "64", "--act-order", "static", "--embed-bits", "4",
                        "--embed-group-size", "32"],
    "w3g64-static-e8": ["--bits", "3", "--group-size", "64", "--act-order", "static", "--embed-bits", "8"],
    "w3g64-static-e4": ["--bits", "3", "--group-size", "64", "--act-order", "static", "--embed-bits", "4",
                        "--embed-group-size", "32"],
    "w3g128-none-e8": ["--bits", "3", "--group-size", "128", "--act-order", "none", "--embed-bits", "8"],
    "w3g128-group-e8": ["--bits", "3", "--group-size", "128", "--act-order", "group", "--embed-bits", "8"],
    "w3g128-static-e8": ["--bits", "3", "--group-size", "128", "--act-order", "static", "--embed-bits", "8"],
    "w2g64-static-e4": ["--bits", "2", "--group-size", "64", "--act-order", "static", "--embed-bits", "4",
                        "--embed-group-size", "32"],
}
PRESETS = {
    "lead": ["w4g64-sym-static-e8", "w4g64-sym-none-e8"],
    "embed": ["w4g64-sym-static-keep", "w4g64-sym-static-e4"],
    "actorder": ["w3g128-none-e8", "w3g128-group-e8", "w3g128-static-e8"],
    "size": ["w4g32-static-e8", "w4g32-static-e4", "w4g128-static-e8", "w4g64-static-e4", "w3g64-static-e8", "w3g64-static-e4", "w2g64-static-e4"],
}


def load_average() -> float:
    return os.getloadavg()[0]


def run_one(name: str, seed: int, args) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"q-{name}-{seed}-", dir=args.workdir))
    cmd = [sys.executable, "-m", "peakllm", "quantize", "--model", args.model, "--method", "gptq", *CONFIGS[name],
           "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen), "--seed", str(seed),
           "--eval-tokens", str(args.eval_tokens), "--output", str(out), "--overwrite", "--json"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    load = load_average()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise SystemExit(f"{name} seed {seed} failed:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout)
    row.update(bench="quality", config=name, seed=seed, wall_seconds=time.perf_counter() - t0,
               load_average_start=load, load_average_end=load_average(),
               command=" ".join(["peakllm"] + [c if c != str(out) else "OUT" for c in cmd[3:]]))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    lines = ["| configuration | bits/param (linears) | bits/param (whole file) | wiki ppl, mean ± spread | seeds | "
             "dense ppl |", "|---|---|---|---|---|---|"]
    for name, rs in by.items():
        ppl = [r["ppl"] for r in rs]
        spread = (max(ppl) - min(ppl)) / 2
        lines.append(f"| {name} | {statistics.mean(r['bits_per_param'] for r in rs):.3f} | "
                     f"{statistics.mean(r['bits_per_param_total'] for r in rs):.3f} | "
                     f"{statistics.mean(ppl):.2f} ± {spread:.2f} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{rs[0]['dense_ppl']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), action="append", default=[])
    ap.add_argument("--config", choices=sorted(CONFIGS), action="append", default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--model", default="default")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="where output folders go while a run measures them")
    ap.add_argument("--keep", action="store_true", help="keep the output folders")
    ap.add_argument("--log", default=None, help="append one JSON line per run")
    ap.add_argument("--table", metavar="LOG", default=None, help="only print the table of LOG")
    args = ap.parse_args()
    if args.table:
        rows = [json.loads(line) for line in open(args.table) if line.strip()]
        print(table([r for r in rows if r.get("bench") == "quality"]))
        return 0
    names = [n for p in args.preset for n in PRESETS[p]] + args.config
    if not names:
        ap.error("give --preset or --config")
    rows = []
    for seed in args.seeds:  # seeds outermost: every configuration gets its first seed early
        for name in names:
            row = run_one(name, seed, args)
            print(json.dumps({k: row[k] for k in ("config", "seed", "ppl", "bits_per_param_total", "wall_seconds")}),
                  file=sys.stderr, flush=True)
            if args.log:
                append_result(args.log, row, threads=getattr(args, "threads", None))
            rows.append(row)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
