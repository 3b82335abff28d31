"""The whole-step decode engine's C descriptions (kernels/decode.py) of runtime modules.

A module the engine can run describes itself (`decode_lin`: DenseLinear and the packed modules of
runtime/linear.py); a MoE block (peakllm_moe's, OLMoE's) is described here from its router and experts.
None means the engine cannot run it, and the runtime's op-by-op path serves that model instead.
"""

from __future__ import annotations

from torch import nn

from peakllm.kernels import decode
from peakllm.models.moe import PeakMoeBlock
from peakllm.runtime.experts import PackedExperts
from peakllm.runtime.families import ACT_SILU, act_kind


def any_lin(module: nn.Module, keep: list):
    """A decode-engine descriptor for a runtime module or a plain nn.Linear, or None."""
    if hasattr(module, "decode_lin"):
        return module.decode_lin(keep)
    if type(module) is nn.Linear:
        return decode.dense_lin(module.weight.detach(), module.bias, keep)
    return None


def _router(block: nn.Module):
    """(router with .weight / .bias, top_k, weighting) of a MoE block whose router is one linear map and
    whose weights the engine computes (decode.MOE_*), else None."""
    gate = getattr(block, "gate", None)
    if type(block) is PeakMoeBlock and gate.hidden is None:
        return gate, block.top_k, decode.MOE_SUM  # top k of the scores, summed
    if type(block).__name__ == "OlmoeSparseMoeBlock":  # softmax, top k of the probabilities, weighted by them
        return gate, gate.top_k, decode.MOE_SOFTMAX_TOPK if gate.norm_topk_prob else decode.MOE_SOFTMAX
    return None


def moe_desc(block: nn.Module, dim: int, batch: int, keep: list):
    """The engine's description of a MoE MLP block (linear router, SiLU experts weighted and summed), at
    batch 1 in fp32; None for anything else (its op-by-op path then runs)."""
    found = _router(block) if batch == 1 else None
    if found is None or any(hasattr(m, "lora_a") for m in block.modules()):  # an adapter inside: op by op
        return None
    gate, top_k, weighting = found
    router = decode.dense_lin(gate.weight.detach(), getattr(gate, "bias", None), keep)
    experts = block.experts
    if router is None or act_kind(experts.act_fn) != ACT_SILU:
        return None
    if isinstance(experts, PackedExperts):
        gate_up = [any_lin(mod, keep) for mod in experts.gate_up]
        down = [any_lin(mod, keep) for mod in experts.down]
    elif getattr(experts, "gate_up_proj", None) is not None and experts.gate_up_proj.dim() == 3:
        # transformers' fused experts (PeakMoe's = Qwen3-MoE's, OLMoE's): [E, 2I, H] gate rows first, [E, H, I]
        gate_up = [decode.dense_lin(w, None, keep) for w in experts.gate_up_proj.detach()]
        down = [decode.dense_lin(w, None, keep) for w in experts.down_proj.detach()]
    else:
        return None
    if any(lin is None for lin in gate_up + down):
        return None
    inter = gate_up[0].out_features // 2
    readout: list = []
    address = decode.moe(router, gate_up, down, top_k, inter, dim, keep, readout, weighting)
    block.engine_chosen = readout[0]  # the experts the engine's router picked last (runtime/offload.py)
    return address
