"""The tables that docs/results/*.md and README.md publish, each named, with its results file and columns.

`peakllm report --docs` renders every `<!-- table: NAME -->` block from here (see `peakllm.eval.results`).
A column is (header, function of one results line); rounds are shown as median (min–max) and a ratio between
two tools as the median of per-round ratios (min–max), both from `results`.
"""

from __future__ import annotations

from peakllm.eval.results import Table, median_spread, num, ratio
from peakllm.eval.results_tables_plan import PLAN_QUALITY, PLAN_QUALITY_RANKING


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

# -- decode speed ----------------------------------------------------------------------------------------------------

VS_LLAMACPP = [
    ("pair", k("pair")), ("threads", k("threads")), ("rounds", k("rounds")),
    ("peakllm tok/s", rounds("peakllm_tok_s")), ("llama.cpp tok/s", rounds("llamacpp_tok_s")),
    ("ratio", lambda r: ratio(r["peakllm_tok_s"], r["llamacpp_tok_s"])),
    ("peakllm roofline", k("roofline_fraction", ".2f")), ("load average", lambda r: "–".join(
        f"{x:.1f}" for x in r["load_average"]))]
SPEED_VS_LLAMACPP = Table("speed-vs-llamacpp.jsonl", VS_LLAMACPP)
INT8_ACT_DECODE = Table("int8-act.jsonl", VS_LLAMACPP, where=lambda r: r.get("pair") is not None)
SPEED_7B = Table("speed-7b-vs-llamacpp.jsonl", VS_LLAMACPP + [
    ("peakllm load s", rounds("peakllm_load_s", ".1f")),
    ("peak RSS decoding GB", lambda r: median_spread([b / GB for b in r.get("peakllm_peak_rss_decode_bytes") or []], ".2f")),
    ("packed GB", scaled("peakllm_weight_bytes", GB))])

INT8_ACT_QUALITY = Table("int8-act.jsonl", [
    ("tokens × windows", lambda r: f"{r['tokens']} × {r['windows']}"), ("ppl, fp32 activations", k("ppl_f32", ".2f")),
    ("ppl, int8 activations", k("ppl_int8", ".2f")),
    ("change", lambda r: f"{(r['ppl_int8'] / r['ppl_f32'] - 1) * 100:+.2f} %"),
    ("argmax agreement", k("argmax_agreement", ".3f"))], where=lambda r: r.get("ppl_int8") is not None)

SPECULATE = Table("speculate.jsonl", [
    ("text", k("text")), ("drafter", k("drafter")), ("k", k("k")), ("threads", k("threads")),
    ("draft threads", lambda r: "–" if r.get("drafter") == "prompt-lookup" else r.get("draft_threads") or r.get("threads")),
    ("rounds", k("rounds")),
    ("plain tok/s", rounds("plain_tok_s", ".1f")), ("speculative tok/s", rounds("spec_tok_s", ".1f")),
    ("speed-up", rounds("ratios", ".2f")), ("speed-up end to end", rounds("end_to_end_ratios", ".2f")),
    ("acceptance", k("acceptance_rate", ".2f")), ("tokens / pass", k("tokens_per_step", ".2f")),
    ("identical", lambda r: "yes" if r.get("output_identical") else "no"),
    ("load average (1, 5 min)", lambda r: ", ".join(f"{x:.1f}" for x in (r.get("load_average") or [])[:2]))])


def alternated(lines: list[dict]) -> list[dict]:
    """Gemma runs alternate f32 / int8 activations: one row per mode, and the ratio of each pair of runs."""
    f32 = [r for r in lines if r["intk_act"] == "f32"]
    int8 = [r for r in lines if r["intk_act"] == "int8"]
    out = []
    for name, runs in (("fp32 activations", f32), ("int8 activations", int8)):
        out.append({"mode": name, "tok": [r["decode_tok_s"] for r in runs], "roof": [r["roofline_fraction"] for r in runs],
                    "probe": [r["bandwidth_gb_s"] for r in runs],
                    "x": "–" if runs is f32 else ratio([r["decode_tok_s"] for r in runs], [r["decode_tok_s"] for r in f32])})
    return out


GEMMA_SPEED = Table("gemma-speed.jsonl", [
    ("activations", k("mode")), ("runs", lambda r: len(r["tok"])), ("decode tok/s", rounds("tok")),
    ("× fp32 activations", k("x")), ("roofline", rounds("roof", ".2f")), ("probe GB/s", rounds("probe"))], rows=alternated)

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

# -- big models ----------------------------------------------------------------------------------------------------------

SCALE = Table("scale.jsonl", [
    ("shape", k("shape")), ("weights", lambda r: "random" if r.get("random_weights") else "real"),
    ("params (B)", scaled("params", 1e9, ".3f")), ("input GB", scaled("input_bytes", GB)),
    ("peak RSS predicted / measured GiB", lambda r: f"{r['predicted_peak_rss_bytes'] / GIB:.2f} / {r['peak_rss_bytes'] / GIB:.2f}"),
    ("s per layer", k("seconds_per_layer", ".1f")), ("seconds", k("seconds", ".0f")),
    ("resumed at layer", k("resumed_at_layer"))])



def bench_ratio(kind: str):
    """peakllm's file against llama-quantize's in llama-bench: median of per-round tok/s ratios (spread)."""
    def get(r):
        b = (r.get("llama_bench") or {}).get(kind)
        return ratio(b["peakllm_tok_s"], b["llamacpp_tok_s"]) if b else "not run"
    return get


GGUF_SCALE = Table("gguf-scale.jsonl", [
    ("shape", k("shape")), ("decoder layers", lambda r: f"{r['layers']} of {r['layers_of_shape']}"),
    ("weights", lambda r: "random" if r.get("random_weights") else "real"),
    ("GGUF", lambda r: f"{r['method'].upper()} onto {r['type']}, embedding/output {r['embed']}"),
    ("params (B)", scaled("params", 1e9, ".3f")), ("--max-memory", k("max_memory")),
    ("peak RSS predicted / measured GiB", lambda r: f"{r['predicted_peak_rss_bytes'] / GIB:.2f} / {r['peak_rss_bytes'] / GIB:.2f}"),
    ("s per layer", k("seconds_per_layer", ".0f")), ("file GB", scaled("size_bytes", GB)),
    ("llama-bench --repack", lambda r: (r.get("llama_bench") or {}).get("repack", "")),
    ("llama-bench pp tok/s, × llama-quantize's file", bench_ratio("pp")),
    ("tg tok/s, × llama-quantize's file", bench_ratio("tg"))])

OFFLOAD_7B = Table("offload-7b.jsonl", [
    ("decode tok/s", k("decode_tok_s", ".2f")), ("planned GB read / token", scaled("offload_bytes_read_per_step", GB)),
    ("read from disk GB / token", scaled("disk_read_bytes_per_token", GB)),
    ("peak RSS while decoding GB", scaled("peak_rss_decode_bytes", GB)), ("peak RSS GB", scaled("peak_rss_bytes", GB)),
    ("note", k("note"))])


def against_in_memory(lines: list[dict]) -> list[dict]:
    """Each budget's rounds against the in-memory run's rounds of the same interleaved loop."""
    base = next(r for r in lines if r["budget"] == "in memory")["decode_tok_s_rounds"]
    return [{**r, "x": "–" if r["budget"] == "in memory" else ratio(r["decode_tok_s_rounds"], base)} for r in lines]


OFFLOAD_COLUMNS = [
    ("expert cache", k("budget")), ("decode tok/s", rounds("decode_tok_s_rounds")), ("× in memory", k("x")),
    ("hit rate", lambda r: num(r["expert_hit_rate"], 2) if r.get("expert_hit_rate") is not None else "1 (all resident)"),
    ("planned MiB / token", scaled("offload_bytes_read_per_step", MIB, ".1f")),
    ("read from disk MiB / token", scaled("disk_read_bytes_per_token", MIB, ".1f"))]
OFFLOAD_MOE = Table("offload-moe.jsonl", OFFLOAD_COLUMNS, rows=against_in_memory)
OFFLOAD_MOE_NO_READAHEAD = Table("offload-moe-no-readahead.jsonl", OFFLOAD_COLUMNS, rows=against_in_memory)

# -- serving ---------------------------------------------------------------------------------------------------------------


def level(n: int, field: str):
    return lambda r: next(x[field] for x in r["levels"] if x["concurrency"] == n)


SERVE = Table("serve-int8-act.jsonl", [
    ("run", k("run")), ("activations", k("intk_act")), ("1 stream tok/s", level(1, "tokens_per_s")),
    ("8 streams tok/s", level(8, "tokens_per_s")),
    ("× 1 stream", lambda r: num(level(8, "tokens_per_s")(r) / level(1, "tokens_per_s")(r), 3)),
    ("errors", lambda r: sum(x["errors"] for x in r["levels"])),
    ("mismatches", lambda r: sum(x["mismatches"] for x in r["levels"]))])

GGUF_QUALITY = Table("gguf-quality.jsonl", [
    ("tool", lambda r: r["tool"].split(" version")[0]), ("file", k("preset")), ("seed", k("seed")),
    ("file MB", scaled("file_bytes", 1e6, ".2f")), ("bits/param (file)", k("bits_per_param_total", ".3f")),
    ("wiki ppl (peakllm eval)", k("ppl_peakllm_eval", ".2f")),
    ("wiki ppl (llama-perplexity)", k("ppl_llama_perplexity", ".2f")),
    ("tensor types", lambda r: ", ".join(f"{n} {v['tensors']}" for n, v in r["tensor_types"].items() if n != "F32"))])

LOWBIT = Table("lowbit.jsonl", [
    ("model", k("model")), ("config", k("config")), ("seed", k("seed")),
    ("bits/param (decoder matrices)", k("linear_bits", ".3f")), ("wiki ppl", k("ppl", ".2f")),
    ("dense ppl", k("dense_ppl", ".2f")),
    ("grids chosen (matrices)", lambda r: ", ".join(f"{g} {n}" for g, n in (r.get("allocation_counts") or {}).items())),
    ("minutes", scaled("seconds", 60, ".1f")),
    ("load (1 min)", lambda r: (r.get("machine") or {}).get("loadavg", [""])[0])])

# -- recover ------------------------------------------------------------------------------------------------------

def before_after(name):
    return lambda r: ("" if r.get(f"ppl_before_{name}") is None else
                      f"{r[f'ppl_before_{name}']:.2f} → {r[f'ppl_after_{name}']:.2f} ({r[f'ppl_teacher_{name}']:.2f})")


RECOVER = Table("recover.jsonl", [
    ("compression", k("compression")), ("method", k("method")), ("steps", k("steps")),
    ("tokens", k("train_tokens")), ("train min", scaled("train_seconds", 60, ".1f")),
    ("wiki before → after (teacher)", before_after("wiki")), ("shakespeare", before_after("shakespeare")),
    ("bible", before_after("bible")), ("peak RSS GB", scaled("peak_rss_bytes", GB)),
    ("load (1 min)", lambda r: r.get("loadavg_start", (r.get("machine") or {}).get("loadavg", [""]))[0])],
    where=lambda r: r.get("kind") == "recovery")
RECOVER_MEMORY = Table("recover.jsonl", [
    ("method", k("method")), ("steps", k("steps")), ("trainable params", k("trainable_params")),
    ("peak RSS GB", scaled("peak_rss_bytes", GB)), ("LOMO / AdamW peak RSS", k("lomo_over_adamw_peak_rss", ".2f"))],
    where=lambda r: r.get("kind") == "memory")

# -- sparse models at run time (benchmarks/bench_sparse.py) ------------------------------------------------------

def _threads(r):
    return (r.get("machine") or {}).get("threads") or r.get("threads")


def _load(r):
    loads = r.get("load_rounds") or []
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else ""


SPARSE_KERNELS = Table("sparse-kernels.jsonl", [
    ("shape", k("shape")), ("layout", k("layout")), ("threads", _threads), ("bits/param", k("bits_per_param", ".2f")),
    ("µs a matvec", rounds("us_rounds", ".1f")), ("GB/s", k("gb_s", ".1f")),
    ("probe GB/s", rounds("bandwidth_rounds", ".1f")), ("roofline", k("roofline_fraction", ".2f")),
    ("× dense bf16", k("speedup_vs_dense_bf16", ".2f")), ("load", _load)])

SPARSE_DECODE = Table("sparse-models.jsonl", [
    ("bench", lambda r: "peakllm bench" if r["bench"] == "sparse-model" else "decode steps (one process)"),
    ("model", k("model")), ("threads", _threads),
    ("file MB (× bf16 dense)", lambda r: "" if r.get("weight_file_bytes") is None else
     f"{r['weight_file_bytes'] / 1e6:.1f} ({r['size_ratio']:.3f}×)"),
    ("decode tok/s", lambda r: median_spread(r.get("decode_tok_s_rounds") or r.get("tok_s_rounds") or [], ".1f")),
    ("dense bf16 tok/s", lambda r: median_spread(r.get("dense_decode_tok_s_rounds") or r.get("dense_tok_s_rounds")
                                                 or [], ".1f")),
    ("× dense: per-round median (min–max)", lambda r: median_spread(r.get("ratio_rounds") or r.get("wall_ratio_rounds")
                                                                    or [], ".2f")),
    ("ratio of medians", lambda r: format(r.get("ratio_of_medians") or r.get("wall_ratio_of_medians"), ".2f")),
    ("× dense, CPU time", rounds("cpu_ratio_rounds", ".2f")), ("rounds", k("rounds")), ("load", _load)],
    where=lambda r: r.get("bench") in ("sparse-model", "sparse-steps"))

SPARSE_PRUNE = Table("sparse-models.jsonl", [
    ("folder", k("name")), ("target", target), ("values", k("values")), ("embedding", lambda r: (
        "fp32" if r.get("embed_bits") == "keep" else f"int{r.get('embed_bits')}")),
    ("bits/param (linears)", k("bits_per_param", ".2f")), ("weights MB", scaled("weight_file_bytes", 1e6, ".1f")),
    ("× bf16 dense file", k("size_ratio", ".3f")), ("wiki ppl", k("ppl", ".2f")), ("dense ppl", k("dense_ppl", ".2f"))],
    where=lambda r: r.get("bench") == "sparse-prune")

TABLES = {
    "headline-sparsegpt": HEADLINE_SPARSEGPT, "prune": PRUNE, "prune-scaling": SCALING,
    "quantize": QUANTIZE, "quality": QUALITY, "quality-cli": QUALITY_CLI, "peers": PEERS,
    "gguf-quality": GGUF_QUALITY, "lowbit": LOWBIT,
    "speed-vs-llamacpp": SPEED_VS_LLAMACPP, "int8-act-decode": INT8_ACT_DECODE, "int8-act-quality": INT8_ACT_QUALITY,
    "speed-7b": SPEED_7B, "gemma-speed": GEMMA_SPEED, "speculate": SPECULATE,
    "headline-qmoe": HEADLINE_QMOE, "moefy": MOEFY, "qmoe-experts": QMOE_EXPERTS, "qmoe-target-bits": QMOE_TARGET_BITS,
    "qmoe-curve": QMOE_CURVE, "qmoe-seeds": QMOE_SEEDS, "sub1-roofline": SUB1_ROOFLINE, "sub1-e2e": SUB1_E2E,
    "qmoe-scale": QMOE_SCALE, "qmoe-scale-decode": QMOE_SCALE_DECODE,
    "scale": SCALE, "gguf-scale": GGUF_SCALE, "offload-7b": OFFLOAD_7B, "offload-moe": OFFLOAD_MOE,
    "offload-moe-no-readahead": OFFLOAD_MOE_NO_READAHEAD, "serve": SERVE,
    "recover": RECOVER, "recover-memory": RECOVER_MEMORY, "sparse-kernels": SPARSE_KERNELS,
    "sparse-decode": SPARSE_DECODE, "sparse-prune": SPARSE_PRUNE,
    "plan-quality": PLAN_QUALITY, "plan-quality-ranking": PLAN_QUALITY_RANKING,
}
