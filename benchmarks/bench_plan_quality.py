"""`peakllm plan`'s predicted quality against the runs it describes: does the cheap probe rank the plans as the
real compressions' perplexities do?

  python benchmarks/bench_plan_quality.py --model default [--calib-samples 16] [--eval-tokens 4096] \
      [--workdir DIR] [--log docs/results/plan-quality.jsonl] [--measure-only]

Runs `peakllm plan --json` (its quality probe: each candidate's layer-wise objective on a few calibration
segments, combined into a predicted change of log perplexity), then every candidate plan's own command line
(`peakllm quantize ... --json`, in a fresh process) for its measured perplexity, and the Spearman rank
correlation between predicted and measured. A run's result is kept in WORKDIR/NAME.json and reused when the
same command line is asked again (so `--measure-only` can run the compressions first, and `--plan-only` the
plan); the results lines say which commit each run and the plan came from. One line per plan (predicted
beside measured) and one ranking line.

`--runs-from LOG` reruns the plan alone (fresh, never from WORKDIR) and takes each plan's measured perplexity
and compression seconds from LOG's last line for the same model and command line (its --output aside): for
changing the probe without running the 8 compressions again. `--retime NAME[,NAME]` runs those plans'
compressions again in this session, so that the probe's seconds can be set beside compressions timed under
the same load (the ranking line's `same_session`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

from scipy.stats import rankdata, spearmanr

from bench_plan import peakllm  # one peakllm subprocess, its JSON and seconds
from results_line import append as append_result  # benchmarks/results_line.py: commit, machine, command
from results_line import commit as head_commit

REPO = Path(__file__).resolve().parent.parent
PLANS = [(m, b) for b in (8, 4, 3, 2) for m in ("gptq", "rtn")]  # plan's candidates when --measure-only


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measured(name: str, argv: list[str], work: Path) -> dict:
    """The run of one command line, from WORKDIR/NAME.json when that holds the same command line."""
    record = work / f"{name}.json"
    if record.exists():
        kept = json.loads(record.read_text())
        if kept["argv"] == argv:
            return kept
    before = load()
    result, wall = peakllm(*argv, *(["--overwrite"] if "--output" in argv else []), "--json")
    kept = {"argv": argv, "result": result, "seconds": wall, "loadavg_before": before, "loadavg_after": load(),
            **head_commit()}
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(kept))
    tmp.rename(record)
    if "--output" in argv:
        shutil.rmtree(argv[argv.index("--output") + 1], ignore_errors=True)
    return kept


def without_output(argv: list[str]) -> list[str]:
    return [a for i, a in enumerate(argv) if a != "--output" and (i == 0 or argv[i - 1] != "--output")]


def logged_runs(log: str, model: str) -> dict[tuple, dict]:
    """The last results line of each plan of ``model`` in ``log``, by its command line without --output."""
    runs = {}
    for line in Path(log).read_text().splitlines():
        r = json.loads(line)
        if r.get("bench") == "plan-quality" and r.get("model") == model and r.get("kind") != "ranking":
            runs[tuple(without_output(r["command_line"][1:]))] = r
    return runs


def plan_name(p: dict) -> str:
    return f"{p['method']}{p['bits']}g{p['group_size']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--calib-samples", default="16")
    ap.add_argument("--calib-seqlen", default="512")
    ap.add_argument("--eval-tokens", default="4096")
    ap.add_argument("--workdir", default="out/plan-quality")
    ap.add_argument("--log", default=None)
    ap.add_argument("--measure-only", action="store_true", help="run the compressions only (no plan, no line)")
    ap.add_argument("--plan-only", action="store_true", help="run (and keep) the plan only")
    ap.add_argument("--only", default=None, help="with --measure-only: these plans (e.g. rtn4g128,gptq4g128)")
    ap.add_argument("--runs-from", default=None, metavar="LOG", help="a fresh plan; the runs' perplexities and "
                    "seconds from LOG's lines")
    ap.add_argument("--retime", default="", metavar="NAMES", help="with --runs-from: run these plans' "
                    "compressions again here (e.g. gptq8g128)")
    args = ap.parse_args()
    work = Path(args.workdir) / args.model.replace("/", "_")
    work.mkdir(parents=True, exist_ok=True)
    common = ["--calib-samples", args.calib_samples, "--calib-seqlen", args.calib_seqlen,
              "--eval-tokens", args.eval_tokens]
    if args.measure_only:
        plans = [{"method": m, "bits": b, "group_size": 128,
                  "command_line": ["peakllm", "quantize", "--model", args.model, "--method", m, "--bits", str(b),
                                   "--group-size", "128", "--format", "peakllm", "--embed-bits", "8", *common,
                                   "--output", "OUT"]} for m, b in PLANS]
        if args.only:
            plans = [p for p in plans if plan_name(p) in args.only.split(",")]
        plan, plan_seconds = {}, None
    else:
        if args.runs_from:
            (work / "plan.json").unlink(missing_ok=True)  # the probe is what is measured again
        planned = measured("plan", ["plan", "--model", args.model, *common], work)
        plan, plan_seconds, plan_commit = planned["result"], planned["seconds"], planned.get("commit")
        plans = plan["plans"]
        if args.plan_only:
            return 0
    logged = logged_runs(args.runs_from, args.model) if args.runs_from else None
    retime = [n for n in args.retime.split(",") if n]
    rows, same_session = [], {}
    for p in plans:
        name = plan_name(p)
        argv = [a if a != "OUT" else str(work / name) for a in p["command_line"][1:]]
        if logged is not None:
            kept = logged.get(tuple(without_output(argv)))
            if kept is None:
                raise SystemExit(f"{args.runs_from} has no run of {name} with this command line")
            res = {"ppl": kept["measured_ppl"], "dense_ppl": kept["dense_ppl"]}
            run = {"seconds": kept["compression_seconds"], "commit": kept["run_commit"],
                   "loadavg_before": kept["run_loadavg"]}
            if name in retime:
                again = measured(name, argv, work)
                same_session[name] = {"seconds": again["seconds"], "loadavg_before": again["loadavg_before"],
                                      "loadavg_after": again["loadavg_after"], "ppl": again["result"]["ppl"]}
        else:
            run = measured(name, argv, work)
            res = run["result"]
        rows.append({"bench": "plan-quality", "model": args.model, "plan": name, "method": p["method"],
                     "bits": p["bits"], "group_size": p["group_size"], "command_line": ["peakllm", *argv],
                     "predicted_dlog_ppl": p.get("predicted_dlog_ppl"),
                     "predicted_ppl_ratio": p.get("predicted_ppl_ratio"),
                     "probe_score": p.get("quality_score"),
                     "measured_ppl": res["ppl"], "dense_ppl": res["dense_ppl"],
                     "measured_dlog_ppl": math.log(res["ppl"] / res["dense_ppl"]),
                     "compression_seconds": run["seconds"], "run_commit": run.get("commit"),
                     "run_loadavg": run["loadavg_before"], "runs_from": args.runs_from})
        print(json.dumps(rows[-1]), flush=True)
    if args.measure_only:
        return 0
    predicted = [r["predicted_dlog_ppl"] for r in rows]
    actual = [r["measured_dlog_ppl"] for r in rows]
    rho = float(spearmanr(predicted, actual).statistic)
    for r, rp, rm in zip(rows, rankdata(predicted), rankdata(actual)):
        r["predicted_rank"], r["measured_rank"] = float(rp), float(rm)
    probe = plan.get("quality_probe") or {}
    seconds = sorted(r["compression_seconds"] for r in rows)
    ranking = {"bench": "plan-quality", "kind": "ranking", "model": args.model, "plans": len(rows),
               "spearman": rho, "plan_seconds": plan_seconds, "plan_commit": plan_commit, "probe_seconds": probe.get("seconds"),
               "probe": probe, "compression_seconds_median": seconds[len(seconds) // 2],
               "compression_seconds_min": seconds[0], "calib_samples": int(args.calib_samples),
               "probe_over_median_compression": (probe.get("seconds") or {}).get("total", 0) / seconds[len(seconds) // 2],
               "eval_tokens": int(args.eval_tokens), "loadavg": load(), "plan_loadavg": planned["loadavg_before"],
               "runs_from": args.runs_from}
    if same_session:
        total = (probe.get("seconds") or {}).get("total", 0)
        ranking["same_session"] = {n: {**v, "probe_over_compression": total / v["seconds"]}
                                   for n, v in same_session.items()}
    print(json.dumps(ranking), flush=True)
    if args.log:
        for r in rows:
            append_result(args.log, {**r, "spearman": rho})
        append_result(args.log, ranking)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
