"""Published tables of running compressed models: decode speed, big models, serving, recovery, sparse models."""

from __future__ import annotations

from peakllm.eval.results import Table, median_spread, num, ratio
from peakllm.eval.tables.columns import (
    GB,
    GIB,
    MIB,
    k,
    load,
    rounds,
    scaled,
    target,
    threads,
)

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
    ("peakllm load s", rounds("peakllmload_s", ".1f")),
    ("peak RSS decoding GB", lambda r: median_spread([b / GB for b in r.get("peakllm_peak_rss_decode_bytes") or []], ".2f")),
    ("packed GB", scaled("peakllm_weight_bytes", GB))])

INT8_ACT_QUALITY = Table("int8-act.jsonl", [
    ("tokens × windows", lambda r: f"{r['tokens']} × {r['windows']}"), ("ppl, fp32 activations", k("ppl_f32", ".2f")),
    ("ppl, int8 activations", k("ppl_int8", ".2f")),
    ("change", lambda r: f"{(r['ppl_int8'] / r['ppl_f32'] - 1) * 100:+.2f} %"),
    ("argmax agreement", k("argmax_agreement", ".3f"))], where=lambda r: r.get("ppl_int8") is not None)

SPECULATE = Table("speculate.jsonl", [
    ("text", k("text")), ("drafter", k("drafter")), ("k", k("k")), ("threads", k("threads")),
    ("draft threads", lambda r: "–" if r.get("drafter") == "prompt-lookup" else r.get("draftthreads") or r.get("threads")),
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

RECOVER_ADAPTER = Table("adapter.jsonl", [  # benchmarks/bench_adapter.py
    ("measured as", lambda r: "one process, interleaved" if r["bench"].endswith("interleaved") else "`peakllm bench` runs"),
    ("adapter", lambda r: f"rank {r['adapter_rank']}, {r['adapter_layers']} linears, A/B {r['adapter_dtype']}"),
    ("rounds", k("rounds")), ("decode tok/s without", rounds("tok_s_without", ".1f")), ("with", rounds("tok_s_with", ".1f")),
    ("× without: per-round median (min–max)", rounds("ratios", ".3f")), ("load (1 min)", load)])

# -- sparse models at run time (benchmarks/bench_sparse.py) ------------------------------------------------------

SPARSE_KERNELS = Table("sparse-kernels.jsonl", [
    ("shape", k("shape")), ("layout", k("layout")), ("threads", threads), ("bits/param", k("bits_per_param", ".2f")),
    ("µs a matvec", rounds("us_rounds", ".1f")), ("GB/s", k("gb_s", ".1f")),
    ("probe GB/s", rounds("bandwidth_rounds", ".1f")), ("roofline", k("roofline_fraction", ".2f")),
    ("× dense bf16", k("speedup_vs_dense_bf16", ".2f")), ("load", load)])

SPARSE_DECODE = Table("sparse-models.jsonl", [
    ("bench", lambda r: "peakllm bench" if r["bench"] == "sparse-model" else "decode steps (one process)"),
    ("model", k("model")), ("threads", threads),
    ("file MB (× bf16 dense)", lambda r: "" if r.get("weight_file_bytes") is None else
     f"{r['weight_file_bytes'] / 1e6:.1f} ({r['size_ratio']:.3f}×)"),
    ("decode tok/s", lambda r: median_spread(r.get("decode_tok_s_rounds") or r.get("tok_s_rounds") or [], ".1f")),
    ("dense bf16 tok/s", lambda r: median_spread(r.get("dense_decode_tok_s_rounds") or r.get("dense_tok_s_rounds")
                                                 or [], ".1f")),
    ("× dense: per-round median (min–max)", lambda r: median_spread(r.get("ratio_rounds") or r.get("wall_ratio_rounds")
                                                                    or [], ".2f")),
    ("ratio of medians", lambda r: format(r.get("ratio_of_medians") or r.get("wall_ratio_of_medians"), ".2f")),
    ("× dense, CPU time", rounds("cpu_ratio_rounds", ".2f")), ("rounds", k("rounds")), ("load", load)],
    where=lambda r: r.get("bench") in ("sparse-model", "sparse-steps"))

SPARSE_PRUNE = Table("sparse-models.jsonl", [
    ("folder", k("name")), ("target", target), ("values", k("values")), ("embedding", lambda r: (
        "fp32" if r.get("embed_bits") == "keep" else f"int{r.get('embed_bits')}")),
    ("bits/param (linears)", k("bits_per_param", ".2f")), ("weights MB", scaled("weight_file_bytes", 1e6, ".1f")),
    ("× bf16 dense file", k("size_ratio", ".3f")), ("wiki ppl", k("ppl", ".2f")), ("dense ppl", k("dense_ppl", ".2f"))],
    where=lambda r: r.get("bench") == "sparse-prune")

GGUF_SPEED = Table("gguf-speed.jsonl", [
    ("preset", k("preset")), ("file MB peakllm / llama-quantize", lambda r: "{:.2f} / {:.2f}".format(
        r["file_bytes"]["ours"] / 1e6, r["file_bytes"]["theirs"] / 1e6)),
    ("same tensor types", lambda r: "yes" if r["tensor_types"]["ours"] == r["tensor_types"]["theirs"] else "no"),
    ("rounds", k("rounds")), ("threads", k("threads")),
    ("tg peakllm tok/s", lambda r: median_spread(r["tg"]["peakllm_tok_s"], ".1f")),
    ("tg llama-quantize tok/s", lambda r: median_spread(r["tg"]["llamacpp_tok_s"], ".1f")),
    ("tg ratio", lambda r: median_spread(r["tg"]["ratio_rounds"], ".3f")),
    ("pp ratio", lambda r: median_spread(r["pp"]["ratio_rounds"], ".3f")),
    ("load", lambda r: f"{min(r['loadavg_per_round']):.1f}–{max(r['loadavg_per_round']):.1f}")])

RUNTIME_MEMORY = Table("runtime-memory.jsonl", [
    ("model", k("model")), ("--max-memory", k("max_memory")),
    ("process MiB (measured)", scaled("process_bytes", MIB, ".1f")),
    ("forward buffers MiB (bound)", scaled("workspace_bytes", MIB, ".1f")),
    ("layers pinned / streamed", lambda r: "" if r.get("refused") else f"{r['pinned_layers']} / {r['streamed_layers']}"),
    ("predicted peak MiB", scaled("predicted_peak_bytes", MIB, ".1f")),
    ("measured peak MiB", scaled("peak_rss_bytes", MIB, ".1f")),
    ("within budget", lambda r: "refused before any work; smallest budget that runs: "
     + r["refused"].rsplit("runs is ", 1)[-1] if r.get("refused") else ("yes" if r["within_budget"] else "NO")),
    ("decode tok/s", k("decode_tok_s", ".1f")),
    ("load (1 min)", lambda r: (r.get("machine") or {}).get("loadavg", [""])[0])])

TABLES = {
    "runtime-memory": RUNTIME_MEMORY, "recover-adapter": RECOVER_ADAPTER,
    "speed-vs-llamacpp": SPEED_VS_LLAMACPP, "int8-act-decode": INT8_ACT_DECODE, "int8-act-quality": INT8_ACT_QUALITY,
    "speed-7b": SPEED_7B, "gemma-speed": GEMMA_SPEED, "speculate": SPECULATE,
    "scale": SCALE, "gguf-scale": GGUF_SCALE, "offload-7b": OFFLOAD_7B, "offload-moe": OFFLOAD_MOE,
    "offload-moe-no-readahead": OFFLOAD_MOE_NO_READAHEAD, "serve": SERVE,
    "recover": RECOVER, "recover-memory": RECOVER_MEMORY, "sparse-kernels": SPARSE_KERNELS,
    "sparse-decode": SPARSE_DECODE, "sparse-prune": SPARSE_PRUNE, "gguf-speed": GGUF_SPEED,
}
