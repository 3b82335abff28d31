"""A compression's predicted peak RSS against its measured one, in memory and streamed, under --max-memory.

  python benchmarks/bench_memory_plan.py --model /work/scratch-plan/llama-3.2-1b \
      --case "rtn4 memory 10GB:quantize --method rtn --bits 4 --group-size 128 --max-memory 10GB" \
      [--case "NAME:ARGS" ...] [--workdir DIR] [--log docs/results/memory-plan.jsonl]

Each case runs `peakllm <ARGS> --model M --output DIR --overwrite --json` in its own process, one at a time,
and appends a results line: the run's own predicted and measured peak (VmHWM), the phase predicted to peak,
whether it streamed, the budget, seconds, and the machine's load before and after. A run refused by the plan
(exit 2) is recorded with its message. Outputs are deleted afterwards. Synthesized models (`peakllm synth`)
are RANDOM WEIGHTS: memory and time only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from results_line import append as append_result  # benchmarks/results_line.py: commit, machine, command


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--case", action="append", required=True, help="NAME:peakllm arguments (without --model/--output)")
    ap.add_argument("--workdir", default="out/memory-plan")
    ap.add_argument("--log", default=None, help="append each row's JSON here")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for case in args.case:
        name, _, rest = case.partition(":")
        out = work / "out"
        cmd = [sys.executable, "-m", "peakllm", *shlex.split(rest), "--model", args.model, "--output", str(out),
               "--overwrite", "--json"]
        print("$", shlex.join(cmd), flush=True)
        before = [round(x, 2) for x in os.getloadavg()]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        row = {"bench": "memory-plan", "case": name, "args": rest, "model": args.model, "exit_code": proc.returncode,
               "loadavg_before": before, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        if proc.returncode == 0:
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            keep = ("streamed", "max_memory_bytes", "memory_limit_bytes", "predicted_peak_rss_bytes",
                    "predicted_peak_phase", "peak_rss_bytes", "in_memory_predicted_peak_rss_bytes", "seconds",
                    "size_bytes", "random_weights")
            row.update({k: r.get(k) for k in keep})
            if r.get("predicted_peak_rss_bytes") and r.get("peak_rss_bytes"):
                row["measured_over_predicted"] = r["peak_rss_bytes"] / r["predicted_peak_rss_bytes"]
        else:
            row["refusal"] = proc.stderr.strip()[-2000:]
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(row), flush=True)
        if args.log:
            append_result(args.log, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
