"""TernaryLinear: the dense-layout ternary matrix (formats/intk.PackedTernary) run by the LUT kernel.

Before this module a `--bits ternary --format peakllm` matrix was dequantized to a dense float matrix on load.
Now its 2-bit codes are repacked once into the lookup-table layout (kernels/lut.py) and every call, any number
of rows, multiplies from that: at 1024x2048 a batch-1 call is about 2x the int-k 2-bit kernel and the sub1
kernel (docs/LUT_KERNEL.md), and a prefill of B rows costs B table passes over the same bytes.
"""

from __future__ import annotations

import torch
from torch import nn

from peakllm.errors import PeakError
from peakllm.formats.intk import PackedTernary
from peakllm.kernels import decode, lut
from peakllm.runtime.buffers import register_packed
from peakllm.runtime.linear import int8_act_default


class TernaryLinear(nn.Module):
    """y = x @ W.T (+ bias) for a PackedTernary W; the packed tensors stay buffers under their stored names."""

    def __init__(self, packed: PackedTernary, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(packed, PackedTernary):
            raise PeakError(f"TernaryLinear needs a PackedTernary, got {type(packed).__name__}")
        if not lut.applies(packed.in_features, packed.group_size):
            raise PeakError(f"TernaryLinear needs group_size -1 or a multiple of 16, got {packed.group_size}")
        register_packed(self, packed, bias)
        self.weights = lut.pack_ternary(packed.codes().contiguous(), packed.scale_neg, packed.scale_pos,
                                        packed.group_size)
        # int8 tables go with int8 activations ($PEAKLLM_INTK_ACT, default int8: ~0.5% error); with f32
        # activations the tables stay fp32 (exact to fp32 rounding, scalar code, slower)
        self.exact = not int8_act_default()
        self._kernel = lut.bind_lut(self.weights, self.exact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise PeakError(f"TernaryLinear expects {self.in_features} input features, got {x.shape[-1]}")
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        y = self._kernel(x2.contiguous())
        if self.bias is not None:
            y = y + self.bias.float()
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 or not x.dtype.is_floating_point else y.to(x.dtype)

    def decode_lin(self, keep: list):
        """This matrix in the whole-step decode engine: the same lookup tables (int8 or exact) as forward's."""
        return decode.lut_lin(self.weights, self.exact, self.bias, keep)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size="
                f"{self.packed.group_size}, sym={self.packed.sym}, exact={self.exact}, bias={self.bias is not None}")
