"""The tables of `peakllm plan`'s predictions against the runs they describe (benchmarks/bench_plan_quality.py)."""

from __future__ import annotations

from peakllm.eval.results import Table


def f(key, fmt: str):
    return lambda r: "" if r.get(key) is None else format(r[key], fmt)


def predicted_ppl(r) -> str:
    ratio = r.get("predicted_ppl_ratio")
    return "" if ratio is None else f"{r['dense_ppl'] * ratio:.2f}"


def load(r) -> str:
    return str(r.get("run_loadavg", r.get("loadavg", [""]))[0])


def probe_seconds(r) -> dict:
    return (r.get("probe") or {}).get("seconds", {})


def same_session(r) -> str:
    """Compressions timed again beside the probe (--retime): their seconds, and the probe's share of them."""
    return "; ".join(f"{n} {v['seconds']:.0f} s (load {v['loadavg_before'][0]}), {v['probe_over_compression']:.3f}"
                     for n, v in (r.get("same_session") or {}).items())


def plan_load(r) -> str:
    """The load when the plan ran (older lines: when the bench ended)."""
    return str(r["plan_loadavg"][0]) if r.get("plan_loadavg") else load(r)


PLAN_QUALITY = Table("plan-quality.jsonl", [
    ("model", lambda r: r["model"]), ("plan", lambda r: f"{r['method']} {r['bits']}-bit g{r['group_size']}"),
    ("probe score", f("probe_score", ".4g")), ("predicted Δ log ppl", f("predicted_dlog_ppl", ".4f")),
    ("measured Δ log ppl", f("measured_dlog_ppl", ".4f")), ("predicted ppl", predicted_ppl),
    ("measured ppl", f("measured_ppl", ".2f")), ("dense ppl", f("dense_ppl", ".2f")),
    ("rank predicted / measured", lambda r: f"{r['predicted_rank']:g} / {r['measured_rank']:g}"),
    ("Spearman", f("spearman", ".3f")), ("compression min", lambda r: f"{r['compression_seconds'] / 60:.1f}"),
    ("load (1 min)", load)],
    where=lambda r: r.get("kind") != "ranking")

PLAN_QUALITY_RANKING = Table("plan-quality.jsonl", [
    ("model", lambda r: r["model"]), ("plans", lambda r: r["plans"]), ("Spearman", f("spearman", ".3f")),
    ("probe tokens", lambda r: (r.get("probe") or {}).get("calib_tokens", "")),
    ("layers scored", lambda r: (r.get("probe") or {}).get("layers_scored", "")),
    ("held out", lambda r: {True: "yes", False: "no"}.get((r.get("probe") or {}).get("holdout", False))),
    ("probe s", lambda r: str(probe_seconds(r).get("total", ""))),
    ("probe parts s", lambda r: ", ".join(f"{k} {v}" for k, v in probe_seconds(r).items() if k != "total")),
    ("plan s", f("plan_seconds", ".0f")), ("median compression s", f("compression_seconds_median", ".0f")),
    ("probe / median compression", f("probe_over_median_compression", ".3f")),
    ("same load: compression s, probe / it", same_session), ("load (1 min)", plan_load)],
    where=lambda r: r.get("kind") == "ranking")
