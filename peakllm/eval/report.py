"""Turn accumulated `--json --log` results into a Markdown table and matplotlib plots.

Every command can append its JSON result to a log (`--log FILE`); a report groups the records by
command, writes one Markdown table per command into `report.md`, and draws the plots the records
support: perplexity vs sparsity (per method, N:M patterns as points), perplexity vs bits/param
(per method), perplexity per model/dataset for plain evaluations, streamed compression's memory and time
against size, and decoding under --max-memory (tok/s, disk reads, the expert cache's hit rate).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from peakllm.errors import PeakError
from peakllm.formats.folder import staged_dir

SKIP_COLUMNS = {"command", "text", "prompt", "modules"}


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise PeakError(f"results file {path} not found")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise PeakError(f"{path}:{number} is not a JSON object (each line must be one --json result)") from None
        if not isinstance(record, dict):
            raise PeakError(f"{path}:{number} is not a JSON object")
        records.append(record)
    if not records:
        raise PeakError(f"results file {path} has no records")
    return records


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else str(value)


def markdown_tables(records: list[dict]) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r.get("command", "result")].append(r)
    parts = []
    for command, rows in groups.items():
        columns = []
        for r in rows:
            columns += [k for k in r if k not in SKIP_COLUMNS and k not in columns]
        parts.append(f"## {command}\n")
        parts.append("| " + " | ".join(columns) + " |")
        parts.append("|" + "---|" * len(columns))
        parts += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
        parts.append("")
    return "\n".join(parts)


def _plot_sparsity(records, ax) -> bool:
    pts = [r for r in records if "ppl" in r and "method" in r and ("sparsity" in r or "pattern" in r)]
    if not pts:
        return False
    by_method, patterns = defaultdict(list), []
    for r in pts:
        if r.get("pattern"):
            patterns.append(r)
        else:
            by_method[r["method"]].append((r.get("sparsity_target", r["sparsity"]), r["ppl"]))
    colors = {}
    for method, xy in sorted(by_method.items()):
        xy.sort()
        line, = ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=method)
        colors[method] = line.get_color()
    for r in patterns:  # N:M points in their method's colour
        xy = (r.get("sparsity", 0.5), r["ppl"])
        ax.scatter([xy[0]], [xy[1]], marker="x", color=colors.get(r["method"]))
        ax.annotate(f"{r['method']} {r['pattern']}", xy, fontsize=7)
    dense = [r["dense_ppl"] for r in pts if r.get("dense_ppl")]
    if dense:
        ax.axhline(dense[0], color="gray", linestyle="--", label="dense")
    ax.set(xlabel="sparsity", ylabel="perplexity", yscale="log", title="perplexity vs sparsity")
    ax.legend(fontsize=8)
    return True


def _series(r: dict) -> str:
    """One curve per way of compressing, along its size knob: the target of a size-targeted ternary run (the
    group size and what shapes the run name the curve), the group size of any other run (each point then
    labelled with it)."""
    name = f"{r.get('method', '?')} {r.get('bits', '')}".strip()
    if r.get("target_bits") is not None:
        name += f" {_groups(r)}" if _groups(r) else ""
        name += " rate-controlled"
        name += ", matched levels" if r.get("levels") == "matched" else ""
        name += ", experts share the budget" if r.get("bit_allocation") == "experts" else ""
    return name


def _groups(r: dict) -> str:
    """The run's group size as plots name it ("g64"); "" for one scale per row."""
    return f"g{r['group_size']}" if r.get("group_size") not in (None, -1) else ""


def _point_label(r: dict) -> str:
    """What tells a curve's points apart when the group size is its knob."""
    return _groups(r) if r.get("target_bits") is None else ""


def _plot_bits(records, ax) -> bool:
    """Perplexity against size; MoE runs are placed by their experts' bits/param (what QMoE compresses)."""
    import matplotlib

    pts = [r for r in records if "ppl" in r and "bits_per_param" in r and r.get("bits_per_param")]
    if not pts:
        return False
    experts = all(r.get("bits_per_param_experts") for r in pts)
    key = "bits_per_param_experts" if experts else "bits_per_param"
    by_series = defaultdict(list)
    for r in pts:
        by_series[_series(r)].append((r[key], r["ppl"], _point_label(r)))
    colors = matplotlib.colormaps["tab20" if len(by_series) > 10 else "tab10"].colors
    markers = "osD^v<>pPX*h"
    for i, (series, xy) in enumerate(sorted(by_series.items())):
        xy.sort()
        ax.plot([x for x, _, _ in xy], [y for _, y, _ in xy], marker=markers[i % len(markers)],
                color=colors[i % len(colors)], linestyle="-" if len(xy) > 1 else "", label=series)
        for x, y, text in xy:
            if text:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6)
    dense = {r["dense_ppl"] for r in pts if r.get("dense_ppl")}
    if len(dense) == 1:
        ax.axhline(dense.pop(), color="gray", linestyle="--", label="uncompressed")
    ax.set(xlabel=f"bits per parameter ({'experts' if experts else 'compressed modules'}, all metadata)",
           ylabel="perplexity", yscale="log", title="perplexity vs size")
    if len(by_series) > 6:  # beside the axes, where it covers no point
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.figure.set_size_inches(9.6, 4.2)
    else:
        ax.legend(fontsize=7)
    return True


def _plot_eval(records, ax) -> bool:
    pts = [r for r in records if r.get("command") == "eval" and "ppl" in r]
    if not pts:
        return False
    labels = [f"{r.get('model')}\n{r.get('dataset')} {r.get('dtype', '')} s{r.get('seqlen')}" for r in pts]
    ax.bar(range(len(pts)), [r["ppl"] for r in pts])
    ax.set_xticks(range(len(pts)), labels, fontsize=6, rotation=30, ha="right")
    ax.set(ylabel="perplexity", title="evaluations")
    return True


def _plot_scale(records, ax) -> bool:
    """Streamed runs: peak RSS and wall time against parameters (random-weight shapes marked)."""
    pts = sorted((r for r in records if r.get("streamed") and r.get("params") and r.get("peak_rss_bytes")),
                 key=lambda r: r["params"])
    if len(pts) < 2:
        return False
    x = [r["params"] / 1e9 for r in pts]
    ax.plot(x, [r["peak_rss_bytes"] / 2**30 for r in pts], marker="o", label="peak RSS, measured (GiB)")
    if all(r.get("predicted_peak_rss_bytes") for r in pts):
        ax.plot(x, [r["predicted_peak_rss_bytes"] / 2**30 for r in pts], marker="x", linestyle="--",
                label="peak RSS, predicted (GiB)")
    if pts[0].get("max_memory_bytes"):
        ax.axhline(pts[0]["max_memory_bytes"] / 2**30, color="gray", linestyle=":", label="--max-memory")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set(xscale="log", xlabel="parameters (billions; * = random weights)", ylabel="GiB", ylim=(0, None),
           title="streamed compression: memory and time vs size")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    for xi, r in zip(x, pts):
        ax.annotate(("*" if r.get("random_weights") else "") + str(r.get("shape", "")), (xi, r["peak_rss_bytes"] / 2**30),
                    fontsize=7)
    twin = ax.twinx()
    twin.plot(x, [r["seconds"] / 60 for r in pts], marker="s", color="tab:red", label="wall time (min)")
    twin.set(ylabel="minutes", ylim=(0, None))
    lines = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=7, loc="upper left")
    return True


def _plot_offload(records, ax) -> bool:
    """`bench --max-memory` runs: decode tok/s against the budget, and for MoE the expert cache's hit rate
    against its capacity (experts)."""
    pts = [r for r in records if isinstance(r.get("offload"), dict) and r.get("decode_tok_s")]
    if len(pts) < 2:
        return False
    moe = [r for r in pts if r["offload"].get("expert_capacity") is not None or r["offload"].get("experts")]
    if moe:
        def capacity(r):
            off = r["offload"]
            return off["experts"] if off.get("all_resident") else off["expert_capacity"]
        pts = sorted(moe, key=capacity)
        x = [capacity(r) for r in pts]
        ax.set(xlabel="expert cache (experts held in memory)", title="MoE decode under --max-memory")
    else:
        pts = sorted(pts, key=lambda r: r["offload"]["budget_bytes"])
        x = [r["offload"]["budget_bytes"] / 2**30 for r in pts]
        ax.set(xlabel="--max-memory (GiB)", title="decode under --max-memory (layers streamed)")
    ax.plot(x, [r["decode_tok_s"] for r in pts], marker="o", label="decode tok/s")
    ax.set(ylabel="tokens / s", ylim=(0, None))
    twin = ax.twinx()
    if moe:
        hits = [1.0 if r["offload"].get("all_resident") else (r.get("expert_hit_rate") or 0.0) for r in pts]
        twin.plot(x, hits, marker="s", color="tab:red",
                  label="expert hit rate")
        twin.set(ylabel="hit rate", ylim=(0, 1.05))
    else:
        twin.plot(x, [r.get("offload_bytes_read_per_step", 0) / 2**20 for r in pts], marker="s", color="tab:red",
                  label="MiB read from disk per token")
        twin.set(ylabel="MiB / token", ylim=(0, None))
    lines, extra = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=7, loc="center right")
    return True


def _plot_gguf(records, ax) -> bool:
    """GGUF files against llama-quantize's (benchmarks/bench_gguf_quality.py): wiki perplexity by both
    evaluators against whole-file bits/param, peakllm's seeds as median with their range. Only rows made with
    llama-quantize's preset rules on both sides (peakllm's rows naming a preset) are drawn."""
    import statistics

    pts = [r for r in records if r.get("bench") == "gguf-quality" and r.get("bits_per_param_total")
           and (r.get("tool", "").startswith("llama.cpp") or "preset" in r.get("preset", ""))]
    if not pts:
        return False
    groups = defaultdict(list)
    for r in pts:
        tool = "llama-quantize + imatrix" if r["tool"].startswith("llama.cpp") else "peakllm (GPTQ on the types)"
        groups[(r.get("model", "default"), tool, round(r["bits_per_param_total"], 3))].append(r)
    models = sorted({model for model, _, _ in groups}, key=lambda m: (m != "default", m))
    tools = (("llama-quantize + imatrix", "tab:blue", "s"), ("peakllm (GPTQ on the types)", "tab:red", "o"))
    for evaluator, key, style in (("peakllm eval", "ppl_peakllm_eval", "-"),
                                  ("llama-perplexity", "ppl_llama_perplexity", ":")):
        for i, model in enumerate(models):
            for tool, color, marker in tools:
                xs, ys = [], []
                for (m, t, bits), rows in sorted(groups.items(), key=lambda kv: kv[0][2]):
                    values = [r[key] for r in rows if (m, t) == (model, tool) and r.get(key)]
                    if values:
                        xs.append(bits)
                        ys.append(statistics.median(values))
                        if len(values) > 1:  # the seeds' (or reruns') range
                            ax.vlines(bits, min(values), max(values), color=color, linewidth=1)
                if xs:
                    label = f"{tool}, {evaluator}" + (f", {model}" if len(models) > 1 else "")
                    ax.plot(xs, ys, marker=marker, color=color, linestyle=style, label=label,
                            markerfacecolor=color if i == 0 else "none")
    for (_, tool, bits), rows in groups.items():
        if tool.startswith("llama"):
            ax.annotate(rows[0]["preset"].split()[0], (bits, rows[0]["ppl_peakllm_eval"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 4))
    ax.set(xlabel="bits per parameter (whole .gguf file over all parameters)", ylabel="wiki perplexity",
           title="GGUF: peakllm against llama-quantize at the same types")
    ax.legend(fontsize=6)
    return True


def write_report(results: str | Path, output: str | Path) -> dict:
    """Write report.md and plot PNGs into `output` (atomically); return what was written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(results)
    output = Path(output)
    with staged_dir(output, overwrite=True) as tmp:  # a report folder is always regenerated whole
        written = ["report.md"]
        body = [f"# peakllm report\n\n{len(records)} results from `{results}`.\n", markdown_tables(records)]
        for name, plot in (("sparsity.png", _plot_sparsity), ("size.png", _plot_bits), ("eval.png", _plot_eval),
                           ("scale.png", _plot_scale), ("offload.png", _plot_offload),
                           ("gguf.png", _plot_gguf)):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            if plot(records, ax):
                fig.tight_layout()
                fig.savefig(tmp / name, dpi=120)
                written.append(name)
                body.append(f"![{name}]({name})\n")
            plt.close(fig)
        (tmp / "report.md").write_text("\n".join(body), encoding="utf-8")
    return {"records": len(records), "output": str(output), "files": written}
