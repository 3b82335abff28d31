"""Mixture-of-Experts matrices in the calibration pipeline.

The MoE blocks of transformers' Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE (and peakllm's own moefied
models) keep all experts of a layer in one module with fused 3-D parameters `gate_up_proj [E, 2I, H]`
and `down_proj [E, H, I]`, called as `experts(hidden [T, H], top_k_index [T, k], top_k_weights)`.
A hook on that call sees which tokens the model's own router sent to each expert, so every expert gets
its own Hessian from exactly its tokens (QMoE's per-expert calibration). The statistics are streamed, so
memory is one H x H (or I x I) matrix per expert whatever the token count; no per-expert token cap is
needed. Experts are compressed as matrices named `<experts>.gate_up_proj.<e>` and `<experts>.down_proj.<e>`:
all gate/up matrices first, then the down matrices calibrated on inputs from the compressed gate/up.

Rule for starved experts: an expert that received no calibration token gets the statistics pooled over
the whole layer (all tokens that entered the block for gate/up; the token-weighted mean of the other
experts' statistics for down). Each such case is counted in `report.experts_fallback`.
"""

from __future__ import annotations

import time

import torch.nn as nn

from peakllm.calibrate.distributed import workers
from peakllm.calibrate.stats import Stats, StopLayer
from peakllm.errors import PeakError


def _routed_inputs(args, kwargs):
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return hidden.reshape(-1, hidden.shape[-1]), index.reshape(hidden.reshape(-1, hidden.shape[-1]).shape[0], -1)


def collect_expert_stats(layer, experts: nn.Module, part: str, acts, layer_kwargs, li: int, kinds: set[str],
                         report) -> list[dict]:
    """Statistics of every expert's `part` inputs over all calibration batches, one dict per expert."""
    E = experts.gate_up_proj.shape[0]
    width = experts.gate_up_proj.shape[2] if part == "gate_up_proj" else experts.down_proj.shape[2]
    device = experts.gate_up_proj.device
    per_expert = [Stats(width, kinds, device) for _ in range(E)]
    pooled = Stats(width, kinds, device) if part == "gate_up_proj" else None
    spent = [0.0]

    def hook(mod, args, kwargs):
        t0 = time.perf_counter()
        hidden, index = _routed_inputs(args, kwargs)
        if pooled is not None:
            pooled.add(hidden)
        for e in range(E):
            tokens = (index == e).any(dim=-1).nonzero().squeeze(1)
            if tokens.numel() == 0:
                continue
            x = hidden[tokens]
            if part == "down_proj":
                gate, up = nn.functional.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
                x = mod.act_fn(gate) * up
            per_expert[e].add(x)
        spent[0] += time.perf_counter() - t0
        raise StopLayer

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    t0 = time.perf_counter()
    try:
        for b in range(len(acts)):
            try:
                layer(acts[b], **layer_kwargs[b][li])
            except StopLayer:
                pass
    finally:
        handle.remove()
    report.seconds["statistics"] += spent[0]
    report.seconds["forward"] += time.perf_counter() - t0 - spent[0]
    report.expert_tokens.extend(s.n for s in per_expert)

    finished = [s.finish() if s.n else None for s in per_expert]
    if any(f is None for f in finished):
        fallback = _pooled(pooled, finished)
        for e, f in enumerate(finished):
            if f is None:
                finished[e] = fallback
                report.experts_fallback += 1
    return finished


def _pooled(pooled, finished: list) -> dict:
    if pooled is not None and pooled.n:
        return pooled.finish()
    seen = [f for f in finished if f is not None]
    if not seen:
        raise PeakError("no expert of this layer received any calibration token; use more calibration data")
    total = sum(f["tokens"] for f in seen)
    out = {"tokens": 0}
    for key in ("hessian", "sqnorm"):
        if key in seen[0]:
            out[key] = sum(f[key] * (f["tokens"] / total) for f in seen)
    return out


def compress_experts(prefix: str, experts: nn.Module, part: str, stats: list[dict], method, li: int, report,
                     keep=None) -> None:
    """Call the method on every expert's matrix and write the results into the fused parameter. `keep(name,
    result)`: what report.modules holds of each (a streamed run keeps the packed form only; the full result
    carries the dense fp32 weight, 1.9 GB for an OLMoE layer's 128 expert matrices)."""
    param = getattr(experts, part)
    t0 = time.perf_counter()
    E = param.shape[0]
    group = getattr(method, "compress_group", None)  # experts sharing one budget (recipes.QuantRecipe)
    shared = group and group([f"{prefix}.{part}.{e}" for e in range(E)], [param.data[e] for e in range(E)],
                             stats, map_fn=lambda f, keys: (r for _, r in workers().solve(list(keys), f)))
    if shared:
        solves = enumerate(shared)
    else:
        solves = workers().solve(list(range(E)),  # dict(): pooled stats may be shared
                                 lambda e: method.compress(f"{prefix}.{part}.{e}", li, param.data[e], dict(stats[e])))
    for e, result in solves:
        name = f"{prefix}.{part}.{e}"
        if result is not None:
            param.data[e].copy_(result.weight.to(param.dtype))
            result = result.held_in(param.data[e])
            report.modules[name] = result if keep is None else keep(name, result)
            info = getattr(result, "info", None)
            if info is not None:
                report.damping_escalations += int(info.retries > 0)
                report.fallbacks += int(info.fallback_rtn)
        report.seconds["solver"] += time.perf_counter() - t0
        t0 = time.perf_counter()
