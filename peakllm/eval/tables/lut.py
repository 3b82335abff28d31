"""The LUT kernel's tables (docs/results/qmoe.md): `lut-kernel`, one row per matrix and kernel, from
benchmarks/bench_lut.py's lines; `lut-moe`, end-to-end decode of a ternary MoE through the decode engine's LUT
kind against the fp32 MoE and the older paths, one row per thread count and side, from benchmarks/bench_lut_moe.py."""

from __future__ import annotations

import statistics

from peakllm.eval.results import Table, median_spread, ratio


def _rows(lines: list[dict]) -> list[dict]:
    out = []
    for r in lines:
        cpu, wall = r["cpu_us_1thread_rounds"], r["us_rounds"]
        for name in r["bytes"]:
            out.append({
                "matrix": f"{r['case']} {r['shape'][0]}×{r['shape'][1]}",
                "weights": ("ternary sym, row scale" if r["kind"] == "ternary" else f"2-bit, g{r['group_size']}"),
                "batch": r["batch"], "kernel": name, "kb": f"{r['bytes'][name] / 1e3:.0f}",
                "cpu": median_spread(cpu[name], ".1f"),
                "roof_cpu": format(r["roofline_fraction_from_cpu"][name], ".2f"),
                "wall": median_spread(wall[name], ".0f"), "roof_wall": format(r["roofline_fraction"][name], ".2f"),
                "x": "–" if name == "lut" else ratio(cpu[name], cpu["lut"]),
                "x_wall": "–" if name == "lut" else ratio(wall[name], wall["lut"]),
                "probe": "–".join(format(p, ".1f") for p in r["probe_gb_s"]),
                "load": "–".join(map(str, r["load_avg"]))})
    return out


def _k(key):
    return lambda r: r[key]


LUT_KERNEL = Table("lut-kernel.jsonl", [
    ("matrix [out×in]", _k("matrix")), ("weights", _k("weights")), ("batch", _k("batch")), ("kernel", _k("kernel")),
    ("KB read", _k("kb")), ("1-thread CPU µs", _k("cpu")), ("roofline (2 × 1-thread)", _k("roof_cpu")),
    ("time ÷ lut's (1-thread CPU)", _k("x")), ("2-thread wall µs", _k("wall")), ("roofline (wall)", _k("roof_wall")),
    ("time ÷ lut's (wall)", _k("x_wall")), ("probe GB/s", _k("probe")), ("load", _k("load"))],
    where=lambda r: r.get("bench") == "lut-kernel", rows=_rows)


MOE_SIDES = {"fp32": "fp32 MoE", "ternary-lut": "ternary, LUT kind", "ternary-lut-off": "ternary, PEAKLLM_LUT=off",
             "sub1": "ternary experts, sub1 format"}


def _moe_rows(lines: list[dict]) -> list[dict]:
    out = []
    for r in lines:
        tok, ours = r["tok_s_rounds"], "ternary-lut"
        loads = [x for runs in r["load_rounds"].values() for run in runs for x in run]
        for side, v in tok.items():
            theirs = side != ours
            out.append({
                "threads": r["threads"], "rounds": r["rounds"], "side": MOE_SIDES.get(side, side),
                "folder": r["models"][side]["folder"],
                "mb": f"{r['weight_bytes'][side] / 1e6:.0f}", "tok": median_spread(v, ".1f"),
                "x": ratio(tok[ours], v) if theirs else "–",
                "xm": format(statistics.median(tok[ours]) / statistics.median(v), ".2f") if theirs else "–",
                "load": f"{min(loads):.1f}–{max(loads):.1f}", "greedy": "" if theirs else _greedy(r)})
    return out


def _greedy(r: dict) -> str:
    """Greedy steps (of n) in which the engine's tokens equal the op-by-op path's, int8 and exact tables."""
    n = r["greedy_steps"]
    i8, f32 = r["engine_vs_op_int8"], r["engine_vs_op_f32"]
    return (f"int8 tables {i8['agree_steps']}/{n} (op path's int8 vs exact: {r['op_int8_vs_f32_agree_steps']}/{n});"
            f" exact tables {f32['agree_steps']}/{n}, logits within {f32['max_logit_diff']:.2g}")


LUT_MOE = Table("lut-moe.jsonl", [
    ("threads", _k("threads")), ("rounds", _k("rounds")), ("model", _k("side")), ("folder", _k("folder")),
    ("MB read a token", _k("mb")),
    ("decode tok/s", _k("tok")), ("ternary-LUT ÷ this (per-round)", _k("x")), ("ratio of medians", _k("xm")),
    ("load", _k("load")), ("engine = op by op (greedy steps)", _k("greedy"))],
    where=lambda r: r.get("bench") == "lut-moe-decode", rows=_moe_rows)
