"""What differs between the model families the lean runtime runs, read off an HF model once.

Llama, Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma-3 and OLMoE share one decoder shape (RMSNorm, RoPE,
grouped-query attention, a gated MLP or a mixture of gated experts); what differs is small and is described
here so that `runtime/model.py` and the decode engine see one layout:
- Gemma's RMSNorm multiplies by (1 + weight): folded into the weight once (`norm_params`).
- The gated MLP's activation: SiLU (SwiGLU) or GELU-tanh (GeGLU) (`act_kind`).
- Phi-3 fuses q, k, v into `qkv_proj` and gate, up into `gate_up_proj`: split into row views of the same
  bytes when the module allows it (`linear.split_rows`), so no weight is copied.
- Per-layer sliding windows and RoPE tables (Gemma-3's local / global layers; Qwen2's sliding layers) from
  `config.layer_types` (`layer_windows`, `rope_kinds`).
- q/k norms: per head (Qwen3, Gemma-3: a weight of head_dim) or over the whole projection output (OLMoE:
  a weight of heads * head_dim) (`qk_norm_full`).
- MoE blocks (peakllm_moe, OLMoE) run as the model's own module; the engine reads their router and experts
  (`runtime/describe.py`).
- Things the runtime does not implement (logit soft-capping, partial rotary, OLMoE's clip_qkv) are refused with one line by
  `check_config`, and the caller falls back to the HF model.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from peakllm.errors import PeakError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "peakllm_moe", "olmoe")
ACT_SILU, ACT_GELU_TANH = 0, 1  # kernels/dense_impl.h


def check_config(config) -> None:
    """One clear PeakError for a model the runtime cannot run exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise PeakError(f"the lean runtime supports {', '.join(SUPPORTED)} models, not '{model_type}'")
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, name, None) is not None:
            raise PeakError(f"the lean runtime does not implement {name} (this model sets it)")
    rope = getattr(config, "rope_parameters", None) or {}
    factors = [p.get("partial_rotary_factor", 1.0) for p in rope.values() if isinstance(p, dict)]
    if isinstance(rope, dict) and "partial_rotary_factor" in rope:
        factors.append(rope["partial_rotary_factor"])
    factors.append(getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    if any(float(f) != 1.0 for f in factors):
        raise PeakError("the lean runtime does not implement partial rotary embeddings")
    if getattr(config, "clip_qkv", None) is not None:
        raise PeakError("the lean runtime does not implement clip_qkv (this model sets it)")
    if getattr(config, "use_bidirectional_attention", False):
        raise PeakError("the lean runtime runs causal attention only; this model attends bidirectionally")


def _offset_norm(norm: nn.Module) -> bool:
    name = type(norm).__name__
    return name.startswith("Gemma") and name.endswith("RMSNorm")  # y = norm(x) * (1 + weight)


def norm_params(norm: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(weight such that y = rmsnorm(x) * weight, eps) of an RMSNorm module of any family: in `dtype`, except
    Gemma's (1 + weight), which stays fp32 as Gemma computes it (the kernels then round once, `norm_mul`)."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-6
    weight = norm.weight.detach()
    if _offset_norm(norm):
        return (1.0 + weight.float()).contiguous(), float(eps)
    return weight.to(dtype).contiguous(), float(eps)


def qk_norm_full(norm: nn.Module, head_dim: int) -> bool:
    """True when a q or k norm spans the whole projection output (OLMoE) rather than each head (Qwen3)."""
    return norm.weight.numel() != head_dim


def act_kind(fn) -> int | None:
    """The kernels' code for a gated MLP's activation module, or None for one they do not have."""
    name = type(fn).__name__
    if isinstance(fn, nn.SiLU) or name == "SiLUActivation":
        return ACT_SILU
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh"):
        return ACT_GELU_TANH
    if isinstance(fn, nn.GELU) and fn.approximate == "tanh":
        return ACT_GELU_TANH
    return None


def layer_windows(config, n_layers: int) -> list[int] | None:
    """Each layer's sliding window (0: full attention) when the config names layer types, else None."""
    types = getattr(config, "layer_types", None)
    if not types:
        return None
    window = getattr(config, "sliding_window", None) or 0
    return [window if t == "sliding_attention" else 0 for t in types[:n_layers]]


def rope_kinds(config, rotary_emb: nn.Module, n_layers: int) -> list[str | None]:
    """The key of each layer's RoPE table: its layer type when the rotary module takes one (Gemma-3's
    local and global layers have different bases), else None (one table for all)."""
    if "layer_type" not in inspect.signature(rotary_emb.forward).parameters:
        return [None] * n_layers
    return list(config.layer_types[:n_layers])
