"""Sub1Linear: an nn.Linear replacement that multiplies straight from a sub-1-bit packed weight."""

from __future__ import annotations

import torch
from torch import nn

from peakllm.errors import PeakError
from peakllm.formats.sub1 import PackedSub1
from peakllm.kernels import decode
from peakllm.kernels.sub1 import operands, sub1_matmul
from peakllm.runtime.buffers import register_packed


class Sub1Linear(nn.Module):
    """y = x @ W.T (+ bias) with W held as a PackedSub1 (docs/SUB1_FORMAT.md).

    The packed tensors are registered as buffers so they show in state_dict and move with the module;
    the forward reads them through `packed`, whose dtypes never change (a module-wide `.to(dtype)` would
    otherwise turn the fp16 scales into something the format does not define).
    """

    def __init__(self, packed: PackedSub1, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(packed, PackedSub1):
            raise PeakError(f"Sub1Linear needs a PackedSub1, got {type(packed).__name__}")
        register_packed(self, packed, bias)
        self._ops = operands(packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise PeakError(f"Sub1Linear expects {self.in_features} input features, got {x.shape[-1]}")
        y = sub1_matmul(x, self.packed, self._ops)
        if self.bias is not None:
            y = y + self.bias.float()
        return y if x.dtype == torch.float32 or not x.dtype.is_floating_point else y.to(x.dtype)

    def decode_lin(self, keep: list):
        """This layer as a descriptor of the whole-step decode engine (kernels/decode.py)."""
        return decode.sub1_lin(self._ops, self.bias, self.in_features, self.out_features, keep)

    def extra_repr(self) -> str:
        p = self.packed
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sym_bits={p.dictionary.sym_bits}, bits_per_param={p.bits_per_param:.3f}, "
                f"bias={self.bias is not None}")
