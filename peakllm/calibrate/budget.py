"""The peak memory of a compression, streamed or in memory, predicted before anything is loaded.

The prediction is made from the config's shapes (on the meta skeleton): the process as it stands (Python,
torch, transformers) plus the largest of the run's phases. Each phase is a sum of named terms, so a refusal
can say what does not fit and what would.
"""

from __future__ import annotations

import torch.nn as nn

from peakllm import memory
from peakllm.models.anatomy import decoder_layers, fused_experts


def layer_terms(layer, *, batch_tokens: int, seqlen: int, batch: int, hessian: bool, source_bytes: int) -> dict:
    """Bytes one decoder layer needs at its worst moment (from its meta shapes): its fp32 weights, plus the
    largest of reading it, collecting a group's statistics while the layer runs, and solving its biggest
    matrix (the statistics' H, the solver's copy of H and two more in x in factors, copies of W)."""
    params = sum(p.numel() for p in layer.parameters())
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    by_width: dict[int, int] = {}
    for m in linears:
        by_width[m.in_features] = by_width.get(m.in_features, 0) + 1
    inter = max((m.out_features for m in linears), default=0)
    widest = max((m.in_features for m in linears), default=0)
    cfg = getattr(getattr(layer, "self_attn", None), "config", None)
    n_heads = getattr(cfg, "num_attention_heads", 1) if cfg is not None else 1
    forward = 4 * batch_tokens * (3 * inter + 4 * widest) + 4 * batch * n_heads * seqlen * seqlen
    stats = 4 * max((min(n, 3) * w * w for w, n in by_width.items()), default=0) if hessian else 0
    solve = max((4 * (4 * m.in_features ** 2 + 3 * m.in_features * m.out_features) for m in linears), default=0)
    for experts in fused_experts(layer).values():
        E, two_i, H = experts.gate_up_proj.shape
        I = experts.down_proj.shape[2]
        if hessian:  # one H per expert plus the pooled one, for the wider of the two parts
            stats = max(stats, 4 * (E + 1) * max(H * H, I * I))
        solve = max(solve, 4 * (3 * max(H, I) ** 2 + 3 * two_i * H))
    if not hessian:
        solve = max((4 * 3 * m.in_features * m.out_features for m in linears), default=0)
    moments = {"layer as read from disk": {"layer as read from disk": source_bytes * params},
               "statistics": {"statistics (Hessians)": stats, "forward intermediates": forward},
               "solve": {"statistics (Hessians)": stats, "solver workspace": solve}}
    worst = max(moments.values(), key=lambda t: sum(t.values()))
    return {"layer weights fp32": 4 * params, **worst}


# What rounding one matrix onto a GGUF block type holds besides its fp32 weight, in bytes a weight: the uint8
# codes until the file has them, the fp32 dequantized copy the model gets and the packed bytes (one matrix at a
# time); plus the grid fit's and dequantizer's workspace, row chunks of a fixed size (formats/gguf/blocks.py).
GGUF_CODES_BYTES, GGUF_ONE_MATRIX_BYTES, GGUF_WORKSPACE_BYTES = 1, 4 + 2, 400 << 20


def gguf_terms(layer_params: int, largest: int) -> dict:
    return {"GGUF codes (uint8) until written": GGUF_CODES_BYTES * layer_params,
            "GGUF: one matrix dequantized and packed, fit workspace": GGUF_ONE_MATRIX_BYTES * largest
            + GGUF_WORKSPACE_BYTES}


def predict(streamed, *, calib_tokens: int, calib_seqlen: int, batch_size: int, hessian: bool, eval_tokens: int,
            offload_bytes: int | None, gguf_outer: list[int] | None = None,
            intk_outer: tuple[list[int], int] | None = None) -> dict:
    """The peak of a streamed compression, phase by phase; acts held in RAM are capped at offload_bytes.
    ``gguf_outer``: a GGUF run, with the sizes of the outer matrices (embedding, lm_head) it rounds onto a
    block type; ``intk_outer``: (those sizes, bits) when they are rounded onto an int-k grid (--embed-bits).
    The input embedding is read before the first layer and held to the end (capture, then every layer)."""
    cfg = streamed.model.config
    hidden = cfg.hidden_size
    vocab = cfg.vocab_size
    acts = 4 * calib_tokens * hidden
    in_ram = acts if offload_bytes is None else min(acts, offload_bytes)
    eval_acts = 2 * 4 * eval_tokens * hidden
    src = streamed.source_dtype.itemsize
    common = {"calibration activations (in RAM, current + next layer)": 2 * in_ram,
              "evaluation activations (dense + compressed)": eval_acts}
    embed = {"embedding fp32 (held from capture to the end)": 4 * vocab * hidden}
    # rounding onto an int-k grid (solvers.rtn): a dequantized fp32 copy and uint8 codes of the matrix at once
    rounding = {"outer matrix rounded: fp32 copy + codes": 5 * max(intk_outer[0])} if intk_outer else {}
    phases = {"capture (embedding in fp32)": {**common, **embed, **rounding}}
    worst_layer, worst = None, -1
    for i, layer in enumerate(streamed.layers):
        terms = layer_terms(layer, batch_tokens=batch_size * calib_seqlen if calib_tokens else 0, seqlen=calib_seqlen,
                            batch=batch_size if calib_tokens else 0, hessian=hessian, source_bytes=src)
        if sum(terms.values()) > worst:
            worst_layer, worst = terms, sum(terms.values())
    phases["largest decoder layer"] = {**common, **embed, **worst_layer}
    if gguf_outer is not None:
        largest = max((m.weight.numel() for layer in streamed.layers for m in layer.modules()
                       if isinstance(m, nn.Linear)), default=0)
        phases["largest decoder layer"].update(gguf_terms(worst_layer["layer weights fp32"] // 4, largest))
    tied = getattr(cfg, "tie_word_embeddings", False)
    outer = sum(p.numel() for _, mod in streamed.outer_modules() for p in mod.parameters(recurse=False)
                if not (tied and mod is streamed.model.get_output_embeddings()))
    rest = {**common, "embedding and head fp32": 4 * outer}
    if eval_tokens:  # the dense and the compressed model's perplexity, with the outer matrices loaded
        rest["logits"] = 3 * 4 * 512 * vocab
    if intk_outer:
        sizes, bits = intk_outer
        rest.update({**rounding, "outer matrices: codes and packed bytes": int(sum(sizes) * (1 + bits / 8))})
    phases["the rest (embedding, norm, lm_head in fp32) written last"] = rest
    if gguf_outer:
        phases["the rest (embedding, norm, lm_head in fp32) written last"].update(
            gguf_terms(sum(gguf_outer), max(gguf_outer)))
    if eval_tokens:
        phases["evaluation head (norm + lm_head fp32, logits)"] = {
            "evaluation activations (dense + compressed)": eval_acts, "lm_head fp32": 4 * vocab * hidden,
            "logits": 3 * 4 * 512 * vocab}
    base = memory.rss_bytes()
    name, terms = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    return {"predicted_peak_bytes": base + sum(terms.values()), "baseline_bytes": base, "peak_phase": name,
            "terms": terms, "activation_bytes": acts, "activations_in_ram_bytes": in_ram}


def eval_terms(cfg, seqlen: int) -> dict:
    """One evaluation window's forward: the logits, their shifted copy and log-softmax (fp32), and the
    widest intermediates of a layer."""
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    inter = getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", 1)
    return {"evaluation logits": 3 * 4 * seqlen * vocab,
            "evaluation forward": 4 * seqlen * (3 * inter + 4 * hidden) + 4 * heads * seqlen * seqlen}


def kept_bytes_per_param(recipe) -> float:
    """What an in-memory run keeps of each compressed weight until the output is written, its dense weight
    being the model's own (ModuleResult.held_in): uint8 codes, a bool mask, the grid's fp32 parameters."""
    grid = getattr(recipe, "grid", None) or getattr(recipe, "type", None)
    quant = grid is not None
    sparse = getattr(recipe, "sparsity", None) is not None or getattr(recipe, "pattern", None) is not None
    gs = getattr(grid, "group_size", 32) if quant and not isinstance(grid, str) else 32
    return float(quant) + float(sparse) + (8 / gs if quant and gs > 0 else 0.0)


def predict_in_memory(model, *, source_bytes: int | None, compressed_params: int, kept_per_param: float,
                      output_bytes: int, outer_quantized: list[int], calib_tokens: int, calib_seqlen: int,
                      batch_size: int, hessian: bool, eval_tokens: int, offload_bytes: int | None) -> dict:
    """The peak of an in-memory compression, phase by phase, from `model`'s shapes (its meta skeleton before
    loading, with `source_bytes` the input's weight files, or the loaded model: source_bytes None). The fp32
    model is held throughout; on top: loading (the input's memory-mapped pages), each evaluation, rounding the
    outer matrices (`outer_quantized`: their sizes), the largest layer's calibration (as a streamed run's
    layer, less its weights, which the model already holds, plus every result kept so far), writing (the
    packed output, `output_bytes`, beside the kept results)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())  # a tied lm_head once
    held = {"model fp32": 4 * params} if source_bytes is not None else {}  # loaded: in the process's RSS
    outer_codes = sum(outer_quantized)
    kept = {"results kept (codes, masks, grid parameters)": int(kept_per_param * compressed_params) + outer_codes}
    acts = 4 * calib_tokens * cfg.hidden_size
    in_ram = acts if offload_bytes is None else min(acts, offload_bytes)
    phases = {}
    if source_bytes is not None:
        phases["loading (input pages + fp32 model)"] = {**held, "input weight files": source_bytes}
    evaluation = eval_terms(cfg, 512) if eval_tokens else {}
    if eval_tokens:
        phases["dense evaluation"] = {**held, **evaluation}
    if outer_quantized:  # rtn: a dequantized fp32 copy and the codes of the largest, the codes of the others
        phases["rounding the embedding"] = {**held, "outer matrices: codes": outer_codes,
                                            "outer matrix: dequantized copy": 4 * max(outer_quantized)}
    layers, _ = decoder_layers(model)
    data = 1 if calib_tokens else 0  # without data (RTN, magnitude) no layer runs
    worst = max((layer_terms(layer, batch_tokens=data * batch_size * calib_seqlen, seqlen=calib_seqlen,
                             batch=data * batch_size, hessian=hessian, source_bytes=0) for layer in layers),
                key=lambda t: sum(t.values()))
    worst = {k: v for k, v in worst.items() if k not in ("layer weights fp32", "layer as read from disk")}
    phases["largest decoder layer"] = {**held, **kept, **worst,
                                       "calibration activations (in RAM, current + next layer)": 2 * in_ram}
    phases["writing the output"] = {**held, **kept, "packed output": output_bytes}
    if eval_tokens:
        phases["evaluation after"] = {**held, **kept, **evaluation}
    base = memory.rss_bytes()
    name, terms = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    return {"predicted_peak_bytes": base + sum(terms.values()), "baseline_bytes": base, "peak_phase": name,
            "terms": terms, "activation_bytes": acts, "activations_in_ram_bytes": in_ram}


def describe(prediction: dict) -> str:
    lines = [f"  process so far: {memory.gb(prediction['baseline_bytes'])}"]
    lines += [f"  {k}: {memory.gb(v)}" for k, v in sorted(prediction["terms"].items(), key=lambda kv: -kv[1]) if v]
    return "\n".join(lines)
