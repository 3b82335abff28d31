"""The column helpers every published table is built from: a column is (header, function of one results line)."""

from __future__ import annotations

from peakllm.eval.results import median_spread


def k(key, fmt: str | None = None):
    """A field, optionally formatted (`.2f`); empty when missing."""
    def get(r):
        v = r.get(key)
        return "" if v is None else (format(v, fmt) if fmt else v)
    return get


def scaled(key, unit: float, fmt: str = ".2f"):
    return lambda r: "" if r.get(key) is None else format(r[key] / unit, fmt)


def part(key, name, fmt: str = ".0f"):
    return lambda r: "" if not r.get(key) else format(r[key].get(name, 0), fmt)


def rounds(key, fmt: str | None = None):
    return lambda r: median_spread(r.get(key) or [], fmt)


def group(r) -> str:
    g = r.get("group_size")
    return "row" if g in (-1, None) else str(g)


def bits(r) -> str:
    return "ternary" if r.get("bits") == "ternary" else f"{r.get('bits')}-bit"


def target(r) -> str:
    return r.get("pattern") or f"{r.get('sparsity_target', 0):.0%}"


def breakdown(r) -> str:
    t = r.get("time_breakdown") or {}
    return " / ".join(f"{t.get(x, 0):.0f}" for x in ("forward", "statistics", "solver"))


GIB, GB, MIB = 2**30, 1e9, 2**20


def threads(r):
    return (r.get("machine") or {}).get("threads") or r.get("threads")


def load(r):
    loads = r.get("load_rounds") or []
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else ""
