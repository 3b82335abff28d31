"""How a packed layer keeps its tensors: as persistent buffers under their stored names (so a state dict round
trip is the format's own), with its bias checked. Shared by the layers whose packed form is one object
(`sub1.Sub1Linear`, `ternary.TernaryLinear`)."""

from __future__ import annotations

import torch
from torch import nn

from peakllm.errors import PeakError


def register_packed(module: nn.Module, packed, bias: torch.Tensor | None) -> None:
    """A packed layer's tensors as persistent buffers under their stored names, and its bias (checked, fp32)."""
    module.packed = packed
    module.in_features, module.out_features = packed.in_features, packed.out_features
    for name, t in packed.to_tensors("").items():
        module.register_buffer(name, t, persistent=True)
    if bias is not None:
        bias = torch.as_tensor(bias)
        if bias.shape != (module.out_features,):
            raise PeakError(f"{type(module).__name__} bias must have shape [{module.out_features}], "
                            f"got {tuple(bias.shape)}")
        bias = bias.detach().float().contiguous()
    module.register_buffer("bias", bias)
