"""Decode under a memory budget: `peakllm bench --max-memory` at several budgets, interleaved with the all-in-memory
run, each in its own process, over several rounds.

  python benchmarks/bench_offload.py --model OUT/int4 --fractions 1,0.75,0.5 --rounds 3 --log FILE
  python benchmarks/bench_offload.py --model OUT/moe-int4 --experts 0,8,32,96 --rounds 2 --log FILE

--fractions: budgets as fractions of the folder's weight bytes (1 = no budget: the plain mapped run), plus the
KV cache. --experts (MoE): budgets that leave room for that many cached experts (from the plan `bench` prints
with a huge budget). Rows: median decode tok/s per budget, its ratio to the in-memory run of the same rounds,
what the plan reads from disk per token, what /proc/self/io counted, the expert hit rate, peak RSS, and the
load average. Append them with --log to a jsonl that `peakllm report` plots (offload.png).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from results_line import append as append_result  # benchmarks/results_line.py: commit, machine, command


def bench(args, budget: int | None) -> dict:
    cmd = [sys.executable, "-m", "peakllm", "bench", "--model", args.model, "--json", "--prompt-tokens",
           str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--threads", str(args.threads), *args.extra.split()]
    if budget is not None:
        cmd += ["--max-memory", str(budget)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip()[-800:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["load_avg"] = os.getloadavg()[0]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a peakllm folder")
    ap.add_argument("--fractions", default="1,0.75,0.5")
    ap.add_argument("--experts", default=None, help="MoE: expert-cache sizes to budget for, e.g. 0,8,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="more `peakllm bench` arguments, e.g. --int8-act")
    ap.add_argument("--log", default=None)
    args = ap.parse_args()

    plan = bench(argparse.Namespace(**{**vars(args), "repeats": 1}), 1 << 50)["offload"]  # sizes, KV cache included
    if args.experts:
        base = plan["resident_bytes"] + plan["layer_bytes"]  # everything but the experts stays resident
        budgets = {f"{n} experts": base + (int(n) + 1) * plan["expert_bytes"] for n in args.experts.split(",")}
        budgets = {"in memory": None, **budgets}
    else:
        weights = plan["layer_bytes"]
        budgets = {("in memory" if float(f) >= 1 else f"{float(f):g} x weights"):
                   (None if float(f) >= 1 else int(plan["resident_bytes"] + float(f) * weights))
                   for f in args.fractions.split(",")}
    rows: dict[str, list[dict]] = {name: [] for name in budgets}
    for r in range(args.rounds):
        for name, budget in budgets.items():
            row = bench(args, budget)
            rows[name].append(row)
            print(f"round {r + 1} {name}: {row['decode_tok_s']:.2f} tok/s (load {row['load_avg']:.1f})", flush=True)
    base_tok_s = statistics.median(x["decode_tok_s"] for x in rows["in memory"]) if "in memory" in rows else None
    print(f"\n{'budget':>18} {'tok/s':>8} {'vs mem':>7} {'plan MiB/tok':>13} {'disk MiB/tok':>13} {'hit':>6} "
          f"{'peak RSS GiB':>13}")
    for name, rs in rows.items():
        tok_s = statistics.median(x["decode_tok_s"] for x in rs)
        last = rs[-1]
        plan_mib = last.get("offload_bytes_read_per_step", 0) / 2**20
        disk = [x.get("disk_read_bytes_per_token") for x in rs if x.get("disk_read_bytes_per_token") is not None]
        disk_mib = statistics.median(disk) / 2**20 if disk else 0.0
        hit = last.get("expert_hit_rate")
        print(f"{name:>18} {tok_s:8.2f} {tok_s / base_tok_s if base_tok_s else float('nan'):7.2f} {plan_mib:13.1f} "
              f"{disk_mib:13.1f} {'' if hit is None else f'{hit:.2f}':>6} {last['peak_rss_bytes'] / 2**30:13.2f}")
        if args.log:
            summary = {"command": "bench", "budget": name, "model": args.model, "decode_tok_s": tok_s,
                       "decode_tok_s_rounds": [x["decode_tok_s"] for x in rs], "vs_in_memory": tok_s / base_tok_s
                       if base_tok_s else None, "load_avg": [x["load_avg"] for x in rs],
                       **{k: last.get(k) for k in ("offload", "offload_bytes_read_per_step", "expert_hit_rate",
                                                   "peak_rss_bytes", "peak_rss_decode_bytes", "base_rss_bytes",
                                                   "weight_bytes", "intk_act", "threads")},
                       "disk_read_bytes_per_token": statistics.median(disk) if disk else None}
            if summary["offload"] is None:  # the in-memory row: the same plan fields for the plot's x axis
                summary["offload"] = {**plan, "budget_bytes": plan["resident_bytes"] + plan["layer_bytes"]
                                      + plan.get("experts", 0) * plan.get("expert_bytes", 0), "all_resident": True}
            append_result(args.log, summary, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
