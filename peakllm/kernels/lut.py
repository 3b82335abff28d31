"""Lookup-table matmul for 2-bit int-k and ternary weights (kernels/lut.cpp; docs/LUT_KERNEL.md).

`pack_intk2` / `pack_ternary` repack the codes of an existing matrix (PackedIntK with bits=2, PackedTernary)
into the kernel's bit-plane index layout, once, at load time; `lut_matmul(x, w)` computes fp32 x @ W.T from it.
By default the per-token tables are int8 (one scale per k-block of columns: the error bound is
`lut_reference.error_bound`); `exact=True` keeps them fp32 (the product of the dequantized matrix up to float
rounding). Without a compiler the torch reference in lut_reference.py runs instead.
"""

from __future__ import annotations

import ctypes
import os
import torch

from peakllm.errors import PeakError
from peakllm.kernels.build import load_library
from peakllm.kernels.lut_reference import INT2, TERN_ASYM, TERN_SYM, LutWeights, lut_matmul_ref
from peakllm.kernels.ops import check, check_x

LUT_ENV = "PEAKLLM_LUT"  # on (default) | off: whether runtime layers use this kernel where it applies
KBLOCK = 128  # columns per table scale when the groups allow (the largest of 128, 64, 32, 16 dividing them)
_I, _L, _P = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
_fns: dict = {}


def applies(in_features: int, group_size: int) -> bool:
    """Whether a matrix with these groups fits the layout: one group a row, or groups of a multiple of 16 columns."""
    return in_features >= 1 and (group_size == -1 or (group_size > 0 and group_size % 16 == 0))


def enabled() -> bool:
    """$PEAKLLM_LUT = on | off (default on): runtime layers use the LUT kernel where it applies."""
    value = os.environ.get(LUT_ENV, "on").strip().lower()
    check(value in ("on", "off"), f"{LUT_ENV} must be 'on' or 'off', got {value!r}")
    return value == "on"


def intk2_weights(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                  group_size: int) -> LutWeights:
    """LutWeights of a 2-bit int-k matrix as stored (qweight bitstream [out, ceil(in/4)], contiguous groups)."""
    codes = ((qweight.unsqueeze(-1) >> torch.arange(0, 8, 2, dtype=torch.uint8)) & 3).reshape(qweight.shape[0], -1)
    return pack_intk2(codes[:, :in_features].contiguous(), scales, zeros, group_size)


def _geometry(in_features: int, group_size: int, kblock: int) -> tuple[int, int, int]:
    """(in_pad, group, kblock): the padded width, group and table block for these groups."""
    check(applies(in_features, group_size), f"the LUT kernel needs group_size -1 or a multiple of 16, got {group_size}")
    check(kblock in (16, 32, 64, 128, 256), f"kblock must be 16, 32, 64, 128 or 256, got {kblock}")
    width = -(-in_features // 16) * 16 if group_size == -1 else group_size
    k = next(k for k in (256, 128, 64, 32, 16) if k <= kblock and width % k == 0)
    if group_size == -1:
        return width, width, k
    n_groups = -(-in_features // group_size)
    last = in_features - (n_groups - 1) * group_size
    return (n_groups - 1) * group_size + -(-last // k) * k, group_size, k


def _tile_params(p: torch.Tensor, out_pad: int) -> torch.Tensor:
    """[out, n_groups] -> [out_pad/8, n_groups, 8], padded rows 0."""
    out, g = p.shape
    full = torch.zeros(out_pad, g, dtype=p.dtype)
    full[:out] = p
    return full.reshape(out_pad // 8, 8, g).transpose(1, 2).contiguous()


def _pack(planes0: torch.Tensor, planes1: torch.Tensor, in_pad: int, out_pad: int) -> torch.Tensor:
    """Bit planes uint8 [out, in] (0/1) -> qlut uint8 [out_pad/8, in_pad/16, 32] (lut_impl.h's byte order)."""
    out, in_features = planes0.shape
    bits = torch.zeros(2, out_pad, in_pad, dtype=torch.uint8)
    bits[0, :out, :in_features] = planes0
    bits[1, :out, :in_features] = planes1
    idx = (bits.reshape(2, out_pad, in_pad // 4, 4) << torch.arange(4, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    # idx [p, row, 4-column group]; group 4j + 2h + L goes to lane L, nibble h of column tile j
    idx = idx.reshape(2, out_pad // 8, 8, in_pad // 16, 2, 2)  # p, tile, r, j, h, L
    byte = idx[..., 0, :] | (idx[..., 1, :] << 4)  # p, tile, r, j, L
    return byte.permute(1, 3, 4, 2, 0).reshape(out_pad // 8, in_pad // 16, 32).contiguous()


def pack_intk2(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               kblock: int = KBLOCK) -> LutWeights:
    """2-bit affine codes uint8 [out, in] (w = scale * (q - zero), contiguous groups) -> LutWeights."""
    check(codes.dtype == torch.uint8 and codes.dim() == 2, "codes must be uint8 [out, in]")
    check(not codes.numel() or int(codes.max()) <= 3, "2-bit codes must lie in [0, 3]")
    out, in_features = codes.shape
    in_pad, group, k = _geometry(in_features, group_size, kblock)
    n_groups = -(-in_pad // group)
    check(scales.shape == (out, n_groups) and zeros.shape == (out, n_groups),
          f"scales and zeros must be [{out}, {n_groups}]")
    out_pad = -(-out // 8) * 8
    return LutWeights(_pack(codes & 1, codes >> 1, in_pad, out_pad), _tile_params(scales.to(torch.float16), out_pad),
                      _tile_params(zeros.to(torch.uint8), out_pad), INT2, in_features, out, in_pad, out_pad, group, k)


def pack_ternary(codes: torch.Tensor, scale_neg: torch.Tensor, scale_pos: torch.Tensor, group_size: int,
                 kblock: int = KBLOCK) -> LutWeights:
    """Ternary codes uint8 [out, in] ({0, 1, 2} = {-scale_neg, 0, +scale_pos}) -> LutWeights (symmetric when
    the two scales are equal everywhere: one plane sum less per row)."""
    check(codes.dtype == torch.uint8 and codes.dim() == 2, "codes must be uint8 [out, in]")
    check(not codes.numel() or int(codes.max()) <= 2, "ternary codes must be 0, 1 or 2")
    out, in_features = codes.shape
    in_pad, group, k = _geometry(in_features, group_size, kblock)
    n_groups = -(-in_pad // group)
    check(scale_neg.shape == (out, n_groups) and scale_pos.shape == (out, n_groups),
          f"scale_neg and scale_pos must be [{out}, {n_groups}]")
    out_pad = -(-out // 8) * 8
    sn, sp = scale_neg.to(torch.float16), scale_pos.to(torch.float16)
    sym = torch.equal(sn, sp)
    # plane 0: q == 2; plane 1: q != 0, the complement of q == 0, so that its table entry is minus q == 0's
    qlut = _pack((codes == 2).to(torch.uint8), (codes != 0).to(torch.uint8), in_pad, out_pad)
    return LutWeights(qlut, _tile_params(sn, out_pad), None if sym else _tile_params(sp, out_pad),
                      TERN_SYM if sym else TERN_ASYM, in_features, out, in_pad, out_pad, group, k)


def library_fns():
    """(lut_gemm, lut_path) of the compiled library, or None when it cannot be built."""
    if "lut" not in _fns:
        lib = load_library("lut")
        _fns["lut"] = None if lib is None else bind(lib)
    return _fns["lut"]


def bind(lib: ctypes.CDLL) -> dict:
    """The ctypes functions of a loaded lut library (also for builds compiled elsewhere: the scalar-path test)."""
    gemm, path = lib.lut_gemm, lib.lut_path
    gemm.argtypes = [_P, _I, _I, _L, _L, _L, _L, _P, _P, _P, _I, _I, _I, _I, _P, _I, _I]
    gemm.restype = path.restype = ctypes.c_int
    path.argtypes = []
    return {"lut_gemm": gemm, "lut_path": path}


def check_weights(w: LutWeights) -> None:
    check(isinstance(w, LutWeights), f"expected LutWeights, got {type(w).__name__}")
    check(w.kind in (INT2, TERN_SYM, TERN_ASYM), f"unknown LUT kind {w.kind}")
    tiles, g = w.out_pad // 8, w.n_groups
    for name, t, dtype, shape in (("qlut", w.qlut, torch.uint8, (tiles, w.in_pad // 16, 32)),
                                  ("s1", w.s1, torch.float16, (tiles, g, 8))):
        check(t.dtype == dtype and tuple(t.shape) == shape and t.is_contiguous(), f"{name} must be {dtype} {shape}")
    if w.kind != TERN_SYM:
        dtype = torch.uint8 if w.kind == INT2 else torch.float16
        check(w.p2 is not None and w.p2.dtype == dtype and tuple(w.p2.shape) == (tiles, g, 8) and w.p2.is_contiguous(),
              f"p2 must be {dtype} {(tiles, g, 8)}")


def bind_lut(w: LutWeights, exact: bool = False, fns: dict | None = None):
    """x -> fp32 [B, out] = x @ W.T for a contiguous fp32 / bf16 x [B, in] already checked by the caller."""
    check_weights(w)
    fns = fns or library_fns()
    if fns is None:
        return lambda x: lut_matmul_ref(x, w, exact)
    gemm = fns["lut_gemm"]
    args = (w.in_features, w.in_pad, w.out_features, w.out_pad, w.qlut.data_ptr(), w.s1.data_ptr(),
            None if w.p2 is None else w.p2.data_ptr(), w.kind, w.group, w.n_groups, w.kblock)

    def call(x, _keep=w):
        y = torch.empty(x.shape[0], w.out_features, dtype=torch.float32)
        if x.shape[0]:
            rc = gemm(x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], *args, y.data_ptr(),
                      torch.get_num_threads(), int(exact))
            if rc:
                raise PeakError(f"lut_gemm rejected its input (code {rc})")
        return y

    return call


def lut_matmul(x: torch.Tensor, w: LutWeights, exact: bool = False) -> torch.Tensor:
    """fp32 [B, out] = x @ W.T; x fp32 or bf16 [B, in]."""
    check_x(x, w.in_features)
    return bind_lut(w, exact)(x)
