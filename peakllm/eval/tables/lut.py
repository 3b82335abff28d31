"""The LUT kernel's table (docs/results/qmoe.md, `lut-kernel`): one row per matrix and kernel, from
benchmarks/bench_lut.py's lines."""

from __future__ import annotations

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
