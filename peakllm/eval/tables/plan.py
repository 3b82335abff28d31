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
    ("probe s (load / pass / anchor)", lambda r: " / ".join(
        str((r.get("probe") or {}).get("seconds", {}).get(x, "")) for x in ("load", "pass", "anchor"))),
    ("plan s", f("plan_seconds", ".0f")), ("median compression s", f("compression_seconds_median", ".0f")),
    ("probe / median compression", f("probe_over_median_compression", ".2f")), ("load (1 min)", load)],
    where=lambda r: r.get("kind") == "ranking")
