"""`peakllm plan`'s predictions against the runs they describe: output size, compression peak RSS and minutes,
decode tok/s.

  python benchmarks/bench_plan.py --model default --plans rtn4,gptq4,rtn8 [--memory 8GB] \
      [--workdir DIR] [--log docs/results/plan.jsonl] [--bench-tokens 64]

Runs `peakllm plan --json` once (the probe is cached), then for each named plan (METHODbits) its own command
line in a fresh process (peak RSS is the run's VmHWM, minutes its wall time), the output's weight tensor bytes
read from the safetensors headers, and `peakllm bench --json` on the output for decode tok/s. One results
line per plan, predicted beside measured, with the machine's load before and after each step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

from results_line import append as append_result  # benchmarks/results_line.py: commit, machine, command

REPO = Path(__file__).resolve().parent.parent


def peakllm(*args: str) -> tuple[dict, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "peakllm", *args]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def tensor_bytes(folder: Path) -> int:
    """Sum of the tensors' data in every safetensors file (from each header's offsets)."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--plans", default="rtn4,gptq4")
    ap.add_argument("--memory", default=None)
    ap.add_argument("--calib-samples", default="32")
    ap.add_argument("--eval-tokens", default="4096")
    ap.add_argument("--bench-tokens", default="64")
    ap.add_argument("--workdir", default="out/plan-bench")
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    limits = ["--memory", args.memory] if args.memory else []
    plan, plan_seconds = peakllm("plan", "--model", args.model, *limits, "--calib-samples", args.calib_samples,
                                 "--eval-tokens", args.eval_tokens, "--json")
    by_name = {f"{p['method']}{p['bits']}": p for p in plan["plans"]}
    for name in args.plans.split(","):
        p = by_name[name]
        out = work / name
        argv = [a if a != "OUT" else str(out) for a in plan["command_line"][1:]]
        argv[argv.index("--method") + 1], argv[argv.index("--bits") + 1] = p["method"], str(p["bits"])
        before = load()
        result, wall = peakllm(*argv, "--overwrite", "--json")
        bench, _ = peakllm("bench", "--model", str(out), "--new-tokens", args.bench_tokens, "--json")
        row = {"bench": "plan", "model": args.model, "plan": name, "plan_seconds": plan_seconds,
               "command_line": ["peakllm", *argv],
               "predicted": {k: p[k] for k in ("weight_bytes", "output_bytes", "compression_peak_bytes",
                                               "compression_streamed", "compression_minutes", "decode_tok_s")},
               "measured": {"weight_bytes": tensor_bytes(out), "output_bytes": result.get("size_bytes"),
                            "compression_peak_bytes": result.get("peak_rss_bytes"),
                            "compression_streamed": result.get("streamed"), "compression_minutes": wall / 60,
                            "decode_tok_s": bench.get("decode_tok_s")},
               "run_predicted_peak_rss_bytes": result.get("predicted_peak_rss_bytes"),
               "probe": plan["probe"], "loadavg_before": before, "loadavg_after": load()}
        row["ratios"] = {k: row["measured"][k] / v for k, v in row["predicted"].items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and v and row["measured"].get(k)}
        print(json.dumps(row), flush=True)
        if args.log:
            append_result(args.log, row)
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
