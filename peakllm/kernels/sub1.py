"""y = x @ W.T straight from the sub-1-bit stream (kernels/sub1.cpp), with a pure-torch reference.

The compiled kernel decodes every row's dictionary words and adds the x values at its nonzeros, so the
dense matrix never exists; the reference decodes to dense fp32 and calls F.linear. Without a compiler
(or with PEAKLLM_NO_KERNELS set) `sub1_matmul` uses the reference.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch
import torch.nn.functional as F

from peakllm.errors import PeakError
from peakllm.formats.sub1 import PackedSub1
from peakllm.kernels.build import load_library

_fn = None
_tried = False


class Operands(NamedTuple):
    """What the kernel reads, prepared once per matrix: the dictionary table and fp32 scales."""

    stream: torch.Tensor
    block_offsets: torch.Tensor
    table: torch.Tensor  # int64 view of the uint64 dictionary entries
    scale_pos: torch.Tensor
    scale_neg: torch.Tensor | None  # None: symmetric


def _kernel():
    global _fn, _tried
    if not _tried:
        _tried = True
        lib = load_library("sub1")
        if lib is not None:
            _fn = lib.sub1_matmul_f32
            _fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
            _fn.restype = ctypes.c_int
    return _fn


def available() -> bool:
    return _kernel() is not None


def operands(packed: PackedSub1) -> Operands:
    table = torch.from_numpy(packed.dictionary.tables.entry.view("int64"))
    return Operands(packed.stream.contiguous(), packed.block_offsets.contiguous(), table,
                    packed.scale_pos.float().contiguous(),
                    None if packed.sym else packed.scale_neg.float().contiguous())


def sub1_reference(x: torch.Tensor, packed: PackedSub1) -> torch.Tensor:
    """Decode to dense fp32, then F.linear: fp32 output [..., out]."""
    return F.linear(x.float(), packed.dequantize())


def sub1_matmul(x: torch.Tensor, packed: PackedSub1, ops: Operands | None = None,
                n_threads: int | None = None) -> torch.Tensor:
    """x [..., in] (any float dtype, computed in fp32) -> fp32 [..., out], from the packed stream."""
    if x.shape[-1] != packed.in_features:
        raise PeakError(f"sub1 matmul: x has {x.shape[-1]} features, the weight wants {packed.in_features}")
    fn = _kernel()
    if fn is None:
        return sub1_reference(x, packed)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.in_features).to(torch.float32).contiguous()
    batch = x2.shape[0]
    y = torch.empty(*lead, packed.out_features, dtype=torch.float32)
    if batch == 0:
        return y
    ops = ops or operands(packed)
    rc = fn(ops.stream.data_ptr(), ops.block_offsets.data_ptr(), ops.table.data_ptr(), packed.dictionary.sym_bits,
            ops.scale_pos.data_ptr(), None if ops.scale_neg is None else ops.scale_neg.data_ptr(),
            packed.out_features, packed.in_features, packed.group_size, packed.block_rows,
            x2.data_ptr(), batch, y.data_ptr(), n_threads or torch.get_num_threads())
    if rc != 0:
        raise PeakError(f"sub1 kernel refused a [{packed.out_features}, {packed.in_features}] matrix")
    return y
