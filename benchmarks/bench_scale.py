"""Streamed compression at growing model sizes under one memory budget: peak RSS and time vs parameters.

  python benchmarks/bench_scale.py --shapes default,llama-3.2-1b,llama-2-7b --max-memory 4GB \
      [--method gptq --bits 4 --group-size 128 | --prune-sparsity 0.5] [--calib-samples 4 --calib-seqlen 512]
      [--workdir DIR] [--log docs/results/scale.jsonl] [--keep]

For each shape: writes the model with `peakllm synth` unless it is already in --workdir (the real default
model needs nothing), runs `peakllm quantize` (or `prune --method sparsegpt`) with --stream on in its own
process, and prints the row (params, bytes on disk, predicted and measured peak RSS, seconds per layer,
total) with the machine's load average before and after. Synthesized shapes are RANDOM WEIGHTS: their
rows say everything about memory and time and nothing about quality. Outputs (and, without --keep, the
synthesized inputs) are deleted afterwards: a 7B shape is 13.8 GB in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from results_line import append as append_result  # benchmarks/results_line.py: commit, machine, command


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def run(cmd: list[str]) -> dict:
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="default,llama-3.2-1b,llama-2-7b")
    ap.add_argument("--max-memory", default="4GB")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group-size", default="128")
    ap.add_argument("--prune-sparsity", type=float, default=None, help="SparseGPT at this sparsity instead of GPTQ")
    ap.add_argument("--calib-samples", default="4")
    ap.add_argument("--calib-seqlen", default="512")
    ap.add_argument("--batch-size", default="4")
    ap.add_argument("--threads", default=None)
    ap.add_argument("--workdir", default="out/scale")
    ap.add_argument("--log", default=None, help="append each row's JSON here (for `peakllm report`)")
    ap.add_argument("--keep", action="store_true", help="keep synthesized inputs")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        model = "default" if shape == "default" else str(work / shape)
        made = False
        if shape != "default" and not Path(model).exists():
            run([sys.executable, "-m", "peakllm", "synth", "--shape", shape, "--output", model, "--json"])
            made = True
        out = work / f"{shape}-out"
        shutil.rmtree(out, ignore_errors=True)
        if args.prune_sparsity is not None:
            task = ["prune", "--method", "sparsegpt", "--sparsity", str(args.prune_sparsity), "--format", "hf"]
        else:
            task = ["quantize", "--method", args.method, "--bits", args.bits, "--group-size", args.group_size]
        cmd = [sys.executable, "-m", "peakllm", *task, "--model", model, "--stream", "on",
               "--max-memory", args.max_memory, "--calib-samples", args.calib_samples,
               "--calib-seqlen", args.calib_seqlen, "--batch-size", args.batch_size, "--eval-tokens", "0",
               "--output", str(out), "--json"]
        if args.threads:
            cmd += ["--threads", args.threads]
        before = load()
        result = run(cmd)
        result.update(shape=shape, load_before=before, load_after=load(), command="scale")
        rows.append(result)
        if args.log:
            append_result(args.log, result, threads=int(args.threads) if args.threads else None)
        shutil.rmtree(out, ignore_errors=True)
        if made and not args.keep:
            shutil.rmtree(model, ignore_errors=True)
        print(json.dumps({k: result[k] for k in ("shape", "params", "peak_rss_bytes", "predicted_peak_rss_bytes",
                                                  "seconds", "seconds_per_layer")}), flush=True)
    print("\n| shape | weights | params | bytes on disk | peak RSS predicted / measured GB | s per layer | total s | load before / after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kind = "random" if r.get("random_weights") else "real"
        print(f"| {r['shape']} | {kind} | {r['params'] / 1e9:.3f} B | {r['input_bytes'] / 1e9:.2f} GB | "
              f"{r['predicted_peak_rss_bytes'] / 2**30:.2f} / {r['peak_rss_bytes'] / 2**30:.2f} | "
              f"{r['seconds_per_layer']:.1f} | {r['seconds']:.0f} | {r['load_before']} — {r['load_after']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
