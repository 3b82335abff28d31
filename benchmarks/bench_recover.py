"""peakllm recover on a real compressed model: perplexity before and after on wiki, shakespeare and bible, and
LOMO's peak memory against AdamW's on the same model and batch. Each run is its own `peakllm recover` process
(its peak RSS is its own), one results line per run in docs/results/recover.jsonl.

  python benchmarks/bench_recover.py --compressed DIR [--methods lora,lomo] [--minutes 5] [--memory-steps 3]

DIR is a compressed model peakllm wrote (e.g. `peakllm prune --model default --sparsity 0.5 --output DIR`); its
teacher is the model it records. --memory-steps N > 0 adds a LOMO and an AdamW run of N steps each without
evaluation, for the peak-RSS comparison (row kind "memory").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_line import REPO, append

RESULTS = REPO / "docs" / "results" / "recover.jsonl"


def recover(args: list[str]) -> tuple[dict, float, list[str]]:
    cmd = [sys.executable, "-m", "peakllm", "recover", *args, "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    load = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout), "loadavg_start": load}, seconds, ["peakllm", *cmd[3:]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compressed", required=True, help="the compressed model (folder peakllm wrote)")
    ap.add_argument("--compression", default="", help="how it was compressed, recorded in the row")
    ap.add_argument("--methods", default="lora,lomo")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--extra", default="", help="more `peakllm recover` arguments, one string")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    extra = args.extra.split()
    with tempfile.TemporaryDirectory(prefix="bench-recover-") as work:
        rows = []
        for method in args.methods.split(","):
            result, seconds, cmd = recover(["--model", args.compressed, "--method", method, "--minutes",
                                            str(args.minutes), "--eval-tokens", str(args.eval_tokens),
                                            "--output", str(Path(work) / method), *extra])
            result.pop("losses", None)
            rows.append({"kind": "recovery", "compression": args.compression, "recover_command": " ".join(cmd),
                         "wall_seconds": seconds, **result})
            print(json.dumps(rows[-1]), flush=True)
        if args.memory_steps > 0:
            peaks = {}
            for method in ("lomo", "adamw"):
                result, seconds, cmd = recover(["--model", args.compressed, "--method", method, "--steps",
                                                str(args.memory_steps), "--eval-tokens", "0", "--warmup-steps", "0",
                                                "--output", str(Path(work) / f"mem-{method}"), *extra])
                peaks[method] = result["peak_rss_bytes"]
                result.pop("losses", None)
                rows.append({"kind": "memory", "compression": args.compression, "recover_command": " ".join(cmd),
                             "wall_seconds": seconds, **result})
            rows[-1]["lomo_over_adamw_peak_rss"] = rows[-2]["lomo_over_adamw_peak_rss"] = peaks["lomo"] / peaks["adamw"]
            print(json.dumps({"lomo_over_adamw_peak_rss": peaks["lomo"] / peaks["adamw"], **peaks}), flush=True)
    if not args.no_append:
        threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
        for row in rows:
            append(RESULTS, row, threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
