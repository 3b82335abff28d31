"""`peakllm bench --max-memory` as a promise about the whole process: for each budget, one bench process; its
plan's predicted peak against the process's measured peak (VmHWM, loading included), layers streamed, decode
tok/s; a budget the plan refuses is recorded with its error.

  python benchmarks/bench_runtime_memory.py --model /path/int4-folder --budgets 520MB,505MB,470MB
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from results_line import REPO, append


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a peakllm folder (weights memory-mapped)")
    p.add_argument("--label", default=None, help="what the folder is, for the table (default: --model)")
    p.add_argument("--budgets", required=True, help="comma-separated --max-memory values")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default=str(REPO / "docs/results/runtime-memory.jsonl"))
    args = p.parse_args()
    for budget in args.budgets.split(","):
        cmd = [sys.executable, "-m", "peakllm", "bench", "--model", args.model, "--max-memory", budget,
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--repeats", "1",
               "--threads", str(args.threads), "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        row = {"bench": "runtime-memory", "model": args.label or args.model, "max_memory": budget,
               "command": "peakllm " + " ".join(cmd[3:])}
        if proc.returncode:
            row["refused"] = proc.stderr.strip().splitlines()[-1]
        else:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            plan = res["offload"]
            row.update(budget_bytes=plan["budget_bytes"], predicted_peak_bytes=plan["predicted_peak_bytes"],
                       peak_rss_bytes=res["peak_rss_bytes"], peak_rss_decode_bytes=res.get("peak_rss_decode_bytes"),
                       process_bytes=plan.get("process_bytes"), workspace_bytes=plan.get("workspace_bytes"),
                       streamed_layers=plan.get("streamed_layers"), pinned_layers=plan.get("pinned_layers"),
                       decode_tok_s=res["decode_tok_s"], within_budget=res["peak_rss_bytes"] <= plan["budget_bytes"])
        print(json.dumps(append(args.results, row, threads=args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
