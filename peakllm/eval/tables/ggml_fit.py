"""The `ggml-fit` table: llama.cpp block types' parameter fit, compiled kernel against its torch reference
(benchmarks/bench_ggml_fit.py). A module of its own until the lead adds it to `eval/tables`' TABLES."""

from __future__ import annotations

from peakllm.eval.results import Table, median_spread

GGML_FIT = Table("ggml-fit.jsonl", [
    ("type", lambda r: r["type"]), ("matrix", lambda r: f"{r['rows']} × {r['cols']}"),
    ("importance", lambda r: "yes" if r["importance"] else "no"), ("threads", lambda r: r["threads"]),
    ("rounds", lambda r: r["rounds"]),
    ("reference ns/weight", lambda r: median_spread(r["reference_ns_per_weight"], ".0f")),
    ("kernel ns/weight", lambda r: median_spread(r["kernel_ns_per_weight"], ".1f")),
    ("speed-up", lambda r: median_spread(r["speedup_rounds"], ".0f")),
    ("same parameters", lambda r: "bit for bit" if r["identical"] else "no"),
    ("load", lambda r: f"{min(r['loadavg_per_round']):.1f}–{max(r['loadavg_per_round']):.1f}")],
    where=lambda r: r.get("bench") == "ggml-fit")
