"""Published tables of compression: SparseGPT, quantization (peakllm's formats and GGUF against llama-quantize), QMoE."""

from __future__ import annotations

from peakllm.eval.results import Table, num, ratio
from peakllm.eval.tables.columns import (
    GB,
    MIB,
    bits,
    breakdown,
    group,
    k,
    rounds,
    scaled,
    target,
)

# -- SparseGPT ---------------------------------------------------------------------------------------------------

PRUNE = Table("prune.jsonl", [
    ("method", k("method")), ("target", target), ("sparsity", k("sparsity", ".3f")), ("wiki ppl", k("ppl", ".2f")),
    ("dense ppl", k("dense_ppl", ".2f")),
    ("calib tokens", lambda r: "data-free" if r["method"] == "magnitude" else r.get("calib_tokens")), ("threads", k("threads")),
    ("seconds", k("seconds", ".0f")), ("forward / stats / solver s", breakdown),
    ("peak RSS GB", scaled("peak_rss_bytes", GB))])

SCALING = Table("scaling.jsonl", [
    ("calib tokens", k("calib_tokens")), ("seconds", k("seconds", ".0f")), ("forward / stats / solver s", breakdown),
    ("wiki ppl", k("ppl", ".2f")), ("dense ppl", k("dense_ppl", ".2f")), ("eval tokens", k("eval_tokens")),
    ("peak RSS GB", scaled("peak_rss_bytes", GB))])


def by_target(lines: list[dict]) -> list[dict]:
    """One row per sparsity target, one ppl column per method (file order of the targets)."""
    rows: dict[str, dict] = {}
    for r in lines:
        rows.setdefault(target(r), {"target": target(r), "dense": r.get("dense_ppl")})[r["method"]] = r["ppl"]
    return list(rows.values())


HEADLINE_SPARSEGPT = Table("prune.jsonl", [
    ("target", k("target")), ("SparseGPT", k("sparsegpt", ".2f")), ("Wanda", k("wanda", ".2f")),
    ("magnitude", k("magnitude", ".2f")), ("dense", k("dense", ".2f"))], rows=by_target)

# -- quantization --------------------------------------------------------------------------------------------------

QUANTIZE = Table("quantize.jsonl", [
    ("method", k("method")), ("bits", k("bits")), ("group", group),
    ("act-order", lambda r: "g_idx" if r.get("act_order") else "no"), ("bits/param", k("bits_per_param", ".3f")),
    ("wiki ppl", k("ppl", ".2f")), ("dense ppl", k("dense_ppl", ".2f")), ("threads", k("threads")),
    ("seconds", k("seconds", ".0f"))])


def by_config(lines: list[dict]) -> list[dict]:
    """Seeds of one configuration in one row: ppl as median (min–max) over the seeds."""
    rows: dict[str, dict] = {}
    for r in lines:
        row = rows.setdefault(r["config"], {**r, "ppls": [], "seeds": []})
        row["ppls"].append(r["ppl"])
        row["seeds"].append(str(r["seed"]))
    return list(rows.values())


QUALITY = Table("quality.jsonl", [
    ("configuration", k("config")), ("act-order", k("act_order")), ("embedding bits", k("embed_bits")),
    ("seeds", lambda r: ", ".join(r["seeds"])), ("wiki ppl, median (min–max)", rounds("ppls", ".2f")),
    ("bits/param (linears)", k("bits_per_param", ".2f")), ("bits/param (file)", k("bits_per_param_total", ".2f"))],
    rows=by_config)

QUALITY_CLI = Table("quality-cli.jsonl", [
    ("model", k("model")), ("method", k("method")), ("act-order", k("act_order")),
    ("embedding bits", lambda r: r.get("embed_bits") or "fp32"), ("wiki ppl", k("ppl", ".2f")),
    ("dense ppl", k("dense_ppl", ".2f")), ("bits/param (linears)", k("bits_per_param", ".2f")),
    ("bits/param (file)", k("bits_per_param_total", ".2f")), ("seconds", k("seconds", ".0f"))])

PEERS = Table("peers.jsonl", [
    ("tool", k("tool")), ("file", k("scheme")), ("seed", k("seed")), ("bits/param (file)", k("bits_per_param_total", ".2f")),
    ("wiki ppl", k("ppl", ".2f"))], where=lambda r: r.get("ppl") is not None)


GGUF_QUALITY = Table("gguf-quality.jsonl", [
    ("model", lambda r: r.get("model", "default")), ("tool", lambda r: r["tool"].split(" version")[0]), ("file", k("preset")), ("seed", k("seed")),
    ("file MB", scaled("file_bytes", 1e6, ".2f")), ("bits/param (file)", k("bits_per_param_total", ".3f")),
    ("wiki ppl (peakllm eval)", k("ppl_peakllm_eval", ".2f")),
    ("wiki ppl (llama-perplexity)", k("ppl_llama_perplexity", ".2f")),
    ("tensor types", lambda r: ", ".join(f"{n} {v['tensors']}" for n, v in r["tensor_types"].items() if n != "F32"))])

LOWBIT = Table("lowbit.jsonl", [
    ("model", k("model")), ("config", k("config")), ("seed", k("seed")),
    ("bits/param (decoder matrices)", k("linear_bits", ".3f")), ("wiki ppl", k("ppl", ".2f")),
    ("dense ppl", k("dense_ppl", ".2f")),
    ("grids chosen (matrices)", lambda r: ", ".join(f"{g} {n}" for g, n in (r.get("allocation_counts") or {}).items())
     or ", ".join(f"rule {a}" for f, a in zip(r["args"], r["args"][1:]) if f == "--matrix-grid")),
    ("minutes", scaled("seconds", 60, ".1f")),
    ("load (1 min)", lambda r: (r.get("machine") or {}).get("loadavg", [""])[0])])


# -- QMoE --------------------------------------------------------------------------------------------------------------

MOEFY = Table("qmoe.jsonl", [
    ("experts", k("experts")), ("top-k", k("top_k")), ("active params", k("active_params_fraction", ".3f")),
    ("wiki ppl", k("ppl", ".2f")), ("dense ppl", k("dense_ppl", ".2f")), ("seconds", k("seconds", ".0f"))],
    where=lambda r: r.get("command") == "moefy")


def experts_how(r) -> str:
    how = f"{r.get('method', '').upper()} {bits(r)}"
    how += f", g{r['group_size']}" if r.get("group_size") not in (None, -1) else ", per row"
    if r.get("target_bits") is not None:
        how += f", --target-bits {r['target_bits']}"
    if r.get("levels") == "matched":
        how += ", matched levels"
    if r.get("bit_allocation") == "experts":
        how += ", experts share the budget"
    return how


QMOE_COLUMNS = [
    ("experts", experts_how), ("format", k("format")), ("bits/param (experts)", k("bits_per_param_experts", ".3f")),
    ("wiki ppl", lambda r: num(r["ppl"])), ("MoE ppl", k("dense_ppl", ".2f")), ("seconds", k("seconds", ".0f"))]
QMOE_EXPERTS = Table("qmoe.jsonl", QMOE_COLUMNS[:3] + [("bits/param (file)", k("bits_per_param_total", ".2f")),
                                                       ("file MB", scaled("size_bytes", 1e6, ".1f"))] + QMOE_COLUMNS[3:],
                     where=lambda r: r.get("command") == "quantize")
QMOE_TARGET_BITS = Table("qmoe-target-bits.jsonl", QMOE_COLUMNS)
QMOE_CURVE = Table("qmoe-curve.jsonl", QMOE_COLUMNS + [("tree", k("tree"))])
QMOE_SEEDS = Table("qmoe-seeds.jsonl", [("seed", k("seed"))] + QMOE_COLUMNS[:1] + [
    ("bits/param (experts)", k("bits_per_param_experts", ".4f")), ("wiki ppl", lambda r: num(r["ppl"])),
    ("codes thinned", k("thinned_codes"))])


def best_curve(lines: list[dict]) -> list[dict]:
    """The README's QMoE headline: the two baselines and the lowest ppl at or under 0.8 bits."""
    rtn = [r for r in lines if r["method"] == "rtn" and r["bits"] == "ternary" and r["group_size"] == -1]
    plain = [r for r in lines if r["method"] == "gptq" and r["bits"] == "ternary" and r.get("target_bits") is None]
    rated = [r for r in lines if r.get("target_bits") is not None and r["bits_per_param_experts"] <= 0.8]
    two = [r for r in lines if r["bits"] == 2 and r["method"] == "gptq"]
    return rtn[:1] + plain[:1] + sorted(rated, key=lambda r: r["ppl"])[:1] + two[:1]


HEADLINE_QMOE = Table("qmoe-curve.jsonl", QMOE_COLUMNS[:1] + [QMOE_COLUMNS[2], QMOE_COLUMNS[3], QMOE_COLUMNS[4]],
                      rows=best_curve)

SUB1_ROOFLINE = Table("sub1-kernel.jsonl", [
    ("matrix", lambda r: "×".join(map(str, r["shape"]))), ("symbol bits", k("sym_bits")),
    ("bits/param", k("bits_per_param", ".3f")),
    ("ns per symbol gather / fused", lambda r: "{gather} / {fused}".format(**r["ns_per_symbol_1thread"])),
    ("speed-up (1-thread CPU time)", k("speedup_cpu_1thread", ".2f")),
    ("roofline gather / fused (2 × 1-thread CPU GB/s)", lambda r: "{gather} / {fused}".format(
        **r["roofline_fraction_from_cpu"]) if r.get("roofline_fraction_from_cpu") else "not recorded"),
    ("probe GB/s", k("probe_gb_s")), ("load", lambda r: "–".join(map(str, r["load_avg"])))],
    where=lambda r: r.get("bench") == "sub1-roofline")


def e2e(lines: list[dict]) -> list[dict]:
    out = []
    for r in lines:
        runs = r["decode_runs"]
        base = next(iter(runs))
        for name, v in runs.items():
            out.append({"threads": r["threads"], "rounds": r["rounds"], "model": name, "tok": v,
                        "x": "–" if name == base else ratio(v, runs[base]), "load": "–".join(map(str, r["load_avg"]))})
    return out


SUB1_E2E = Table("sub1-kernel.jsonl", [
    ("threads", k("threads")), ("rounds", k("rounds")), ("model", k("model")), ("decode tok/s", rounds("tok")),
    ("× moe-fp32", k("x")), ("load", k("load"))], where=lambda r: r.get("bench") == "sub1-e2e", rows=e2e)

QMOE_SCALE = Table("qmoe-scale.jsonl", [
    ("layers", k("layers")), ("tree", lambda r: r.get("tree") or ""),
    ("bits/param (experts)", k("bits_per_param_experts", ".3f")), ("seconds", k("seconds", ".0f")),
    ("peak RSS GB", scaled("peak_rss_bytes", GB)), ("predicted GB", scaled("predicted_peak_rss_bytes", GB)),
    ("budget GB", scaled("max_memory_bytes", GB)), ("note", k("note"))],
    where=lambda r: r.get("method") == "gptq" and r.get("seconds"))
QMOE_SCALE_DECODE = Table("qmoe-scale.jsonl", [
    ("budget", lambda r: "in memory" if not r.get("offload") else f"{r['offload'].get('budget_bytes', 0) / MIB:.0f} MiB"),
    ("decode tok/s", k("decode_tok_s", ".2f")), ("expert hit rate", k("expert_hit_rate", ".2f")),
    ("peak RSS while decoding GB", scaled("peak_rss_decode_bytes", GB)), ("note", k("note"))],
    where=lambda r: r.get("decode_tok_s") is not None)


TABLES = {
    "headline-sparsegpt": HEADLINE_SPARSEGPT, "prune": PRUNE, "prune-scaling": SCALING,
    "quantize": QUANTIZE, "quality": QUALITY, "quality-cli": QUALITY_CLI, "peers": PEERS,
    "gguf-quality": GGUF_QUALITY, "lowbit": LOWBIT,
    "headline-qmoe": HEADLINE_QMOE, "moefy": MOEFY, "qmoe-experts": QMOE_EXPERTS, "qmoe-target-bits": QMOE_TARGET_BITS,
    "qmoe-curve": QMOE_CURVE, "qmoe-seeds": QMOE_SEEDS, "sub1-roofline": SUB1_ROOFLINE, "sub1-e2e": SUB1_E2E,
    "qmoe-scale": QMOE_SCALE, "qmoe-scale-decode": QMOE_SCALE_DECODE,
}
