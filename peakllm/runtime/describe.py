"""The whole-step decode engine's C descriptions (kernels/decode.py) of runtime modules.

A module the engine can run describes itself (`decode_lin`: DenseLinear and the packed modules of
runtime/linear.py); a peakllm_moe block is described here from its router and experts. None means the
engine cannot run it, and the runtime's op-by-op path serves that model instead.
"""

from __future__ import annotations

from torch import nn

from peakllm.kernels import decode
from peakllm.runtime.families import ACT_SILU, act_kind


def any_lin(module: nn.Module, keep: list):
    """A decode-engine descriptor for a runtime module or a plain nn.Linear, or None."""
    if hasattr(module, "decode_lin"):
        return module.decode_lin(keep)
    if type(module) is nn.Linear:
        return decode.dense_lin(module.weight.detach(), module.bias, keep)
    return None


def moe_desc(block: nn.Module, dim: int, batch: int, keep: list):
    """The engine's description of a peakllm_moe MLP block (linear router, SiLU experts summed), at
    batch 1 in fp32; None for anything else (its op-by-op path then runs)."""
    from peakllm.models.moe import PeakMoeBlock, PeakMoeExperts
    from peakllm.runtime.experts import PackedExperts

    if batch != 1 or type(block) is not PeakMoeBlock or block.gate.hidden is not None:
        return None
    router = decode.dense_lin(block.gate.weight.detach(), block.gate.bias, keep)
    experts = block.experts
    if router is None or act_kind(experts.act_fn) != ACT_SILU:
        return None
    if isinstance(experts, PackedExperts):
        gate_up = [any_lin(mod, keep) for mod in experts.gate_up]
        down = [any_lin(mod, keep) for mod in experts.down]
    elif isinstance(experts, PeakMoeExperts):
        gate_up = [decode.dense_lin(w, None, keep) for w in experts.gate_up_proj.detach()]
        down = [decode.dense_lin(w, None, keep) for w in experts.down_proj.detach()]
    else:
        return None
    if any(lin is None for lin in gate_up + down):
        return None
    inter = gate_up[0].out_features // 2
    readout: list = []
    address = decode.moe(router, gate_up, down, block.top_k, inter, dim, keep, readout)
    block.engine_chosen = readout[0]  # the experts the engine's router picked last (runtime/offload.py)
    return address
