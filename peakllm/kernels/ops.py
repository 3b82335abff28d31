"""Python entry points of the packed-weight kernels: validate, then call intk.cpp / sparse.cpp or,
when no compiler is available (or PEAKLLM_NO_KERNELS is set), the pure-torch reference.

All matmuls take x as a 2-D [B, in] fp32 or bf16 tensor and return fp32 [B, out] (`y = x @ W.T`);
`runtime/linear.py` handles leading dims, output dtype, bias and the prefill path.

int-k groups are passed as `group_starts` (int32 [n_groups + 1], column ranges in the stored order)
built by `intk_groups`: for act-order layers it also returns `perm`, the column order that makes every
group contiguous, and the codes must be permuted once with `permute_columns`.
"""

from __future__ import annotations

import ctypes
import math

import torch

from peakllm.errors import PeakError
from peakllm.kernels import reference as ref
from peakllm.kernels.build import load_library, ptr

INTK_BITS = (2, 3, 4, 8)
_VALUE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CODES = 3
_I, _L, _P = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "intk": {
        "intk_gemm": [_P, _I, _P, _I, _L, _P, _P, _P, _P, _I, _L, _I, _P, _I],
        "intk_gemm_a8": [_P, _I, _P, _I, _L, _P, _P, _P, _P, _I, _L, _I, _P, _I],
        "intk_dequant": [_P, _P, _P, _P, _I, _L, _L, _I, _P, _I, _I],
        "intk_a8_path": [],
    },
    "sparse": {
        "nm_gemm": [_P, _I, _I, _L, _L, _I, _I, _P, _I, _P, _I, _P, _P, _I, _P, _P, _I],
        "bitmask_gemm": [_P, _I, _I, _L, _L, _P, _P, _P, _I, _P, _P, _I, _P, _P, _I, _P, _L, _I],
        "nm_dequant": [_L, _L, _I, _I, _P, _I, _P, _I, _P, _P, _I, _P, _P, _I, _I],
        "bitmask_dequant": [_L, _L, _P, _P, _P, _I, _P, _P, _I, _P, _P, _I, _L, _P, _I, _I],
    },
}
_fns: dict[str, dict | None] = {}


def bind(lib: ctypes.CDLL, lib_name: str) -> dict:
    """The functions of a loaded `lib_name` library (intk, sparse) with their ctypes signatures, by name
    (also for builds compiled elsewhere: the scalar-path tests, benchmarks/bench_intk_builds.py)."""
    fns = {}
    for name, argtypes in _SIGNATURES[lib_name].items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        fns[name] = fn
    return fns


def _kernels(lib_name: str) -> dict | None:
    """ctypes functions of one library, or None when it cannot be built."""
    if lib_name not in _fns:
        lib = load_library(lib_name)
        _fns[lib_name] = None if lib is None else bind(lib, lib_name)
    return _fns[lib_name]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise PeakError(msg)


def _check_tensor(t, name, dtype, shape) -> None:
    _check(isinstance(t, torch.Tensor), f"{name} must be a tensor")
    _check(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")
    _check(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    _check(t.is_contiguous() and t.device.type == "cpu", f"{name} must be a contiguous CPU tensor")


def _check_x(x: torch.Tensor, in_features: int) -> None:
    _check(isinstance(x, torch.Tensor) and x.dim() == 2, "x must be a 2-D tensor [batch, in_features]")
    _check(x.dtype in (torch.float32, torch.bfloat16), f"x must be float32 or bfloat16, got {x.dtype}")
    _check(x.shape[1] == in_features, f"x has {x.shape[1]} features, the weight expects {in_features}")
    _check(x.is_contiguous() and x.device.type == "cpu", "x must be a contiguous CPU tensor")


def _threads() -> int:
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- int-k

def intk_groups(in_features: int, group_size: int, g_idx: torch.Tensor | None = None):
    """(group_starts int32 [n_groups + 1], perm int32 [in] or None) for the kernels' contiguous groups."""
    _check(group_size == -1 or group_size > 0, f"group_size must be positive or -1, got {group_size}")
    if g_idx is None:
        size = in_features if group_size == -1 else group_size
        starts = list(range(0, in_features, size)) + [in_features]
        return torch.tensor(starts, dtype=torch.int32), None
    _check(g_idx.dim() == 1 and g_idx.numel() == in_features, f"g_idx must have {in_features} entries")
    _check(not g_idx.dtype.is_floating_point, "g_idx must be an integer tensor")
    n_groups = math.ceil(in_features / (in_features if group_size == -1 else group_size))
    _check(bool(((g_idx >= 0) & (g_idx < n_groups)).all()), f"g_idx values must lie in [0, {n_groups})")
    counts = torch.bincount(g_idx.to(torch.int64), minlength=n_groups)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    perm = torch.argsort(g_idx.to(torch.int64), stable=True).to(torch.int32)
    return starts, perm


def permute_columns(qweight: torch.Tensor, bits: int, in_features: int, perm: torch.Tensor) -> torch.Tensor:
    """The same int-k bitstreams with column j holding original column perm[j] (once, at load time)."""
    codes = ref.unpack_bitstream(qweight, bits, in_features)
    return ref.pack_bitstream(codes[:, perm.to(torch.int64)], bits)


def _check_intk(qweight, scales, zeros, bits, group_starts, in_features):
    _check(bits in INTK_BITS, f"int-k kernels support bits {INTK_BITS}, got {bits}")
    _check(isinstance(group_starts, torch.Tensor) and group_starts.dtype == torch.int32
           and group_starts.dim() == 1 and group_starts.numel() >= 2, "group_starts must be int32 [n_groups + 1]")
    out, n_groups = scales.shape[0], group_starts.numel() - 1
    _check_tensor(qweight, "qweight", torch.uint8, (out, math.ceil(in_features * bits / 8)))
    _check_tensor(scales, "scales", torch.float16, (out, n_groups))
    _check_tensor(zeros, "zeros", torch.uint8, (out, n_groups))
    _check(group_starts.is_contiguous(), "group_starts must be contiguous")


def _stored_g_idx(group_starts: torch.Tensor) -> torch.Tensor:
    """Group of each stored column when groups are the contiguous ranges of group_starts."""
    sizes = (group_starts[1:] - group_starts[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(sizes.numel()), sizes)


def int8_act_applies(bits: int, group_starts: torch.Tensor) -> bool:
    """Whether the int8-activation path runs for this layer: bits 2, 4 or 8 and groups of one or more
    whole 32-column blocks (other layers take the fp32-activation path, also when it is asked for)."""
    return (bits in (2, 4, 8) and bool((group_starts % 32 == 0).all())
            and bool((group_starts[1:] > group_starts[:-1]).all()))


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq int8 [B, in], sx fp32 [B, in/32]) as the int8-activation path quantizes x (in % 32 == 0):
    sx = max|block| / 127, xq = round-half-even(x * (127 / max|block|)); x ~ sx * xq, off by <= sx / 2."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1)
    # a true fp32 division as in C (`127.0 / tensor` would be 127 * reciprocal, rounded twice)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    return torch.round(xb * inv.unsqueeze(-1)).to(torch.int8).reshape(x.shape), amax / 127.0


def intk_matmul(x, qweight, scales, zeros, bits: int, group_starts, perm=None, int8_act: bool = False) -> torch.Tensor:
    """fp32 [B, out] = x[:, perm] @ W.T for int-k W (columns in stored order, groups by group_starts).

    int8_act: quantize x to int8 per 32-column block and use integer dot products where
    `int8_act_applies` (intk_a8_impl.h states the error bound); the reference path without a compiler
    computes the same product on the quantized x."""
    _check(isinstance(group_starts, torch.Tensor) and group_starts.numel() >= 2,
           "group_starts must be int32 [n_groups + 1]")
    in_features = int(group_starts[-1])
    _check_x(x, in_features)
    _check_intk(qweight, scales, zeros, bits, group_starts, in_features)
    if perm is not None:
        _check_tensor(perm, "perm", torch.int32, (in_features,))
    int8_act = int8_act and int8_act_applies(bits, group_starts)
    fns = _kernels("intk")
    if fns is None:
        W = ref.dequantize_intk(qweight, scales, zeros, bits, in_features, -1, _stored_g_idx(group_starts))
        xs = x if perm is None else x[:, perm.to(torch.int64)]
        if int8_act and xs.shape[0]:
            xq, sx = quantize_act_int8(xs)
            xs = (xq.float().reshape(xs.shape[0], -1, 32) * sx.unsqueeze(-1)).reshape(xs.shape)
        return ref.matmul_ref(xs, W)
    B, out = x.shape[0], qweight.shape[0]
    y = torch.empty(B, out, dtype=torch.float32)
    if B == 0 or out == 0:
        return y.zero_()
    rc = fns["intk_gemm_a8" if int8_act else "intk_gemm"](ptr(x), int(x.dtype == torch.bfloat16), ptr(perm) if perm is not None else None, B,
                          in_features, ptr(qweight), ptr(scales), ptr(zeros), ptr(group_starts),
                          group_starts.numel() - 1, out, bits, ptr(y), _threads())
    _check(rc == 0, f"intk_gemm rejected its input (code {rc}): group_starts must rise from 0 to in_features, "
                    "perm must hold column indices")
    return y


def intk_dequantize(qweight, scales, zeros, bits: int, group_starts, in_features: int,
                    dtype=torch.float32) -> torch.Tensor:
    """Dense W [out, in] in the stored column order, for prefill GEMMs; dtype float32 or bfloat16."""
    _check_intk(qweight, scales, zeros, bits, group_starts, in_features)
    _check(dtype in (torch.float32, torch.bfloat16), f"dequantize to float32 or bfloat16, not {dtype}")
    fns = _kernels("intk")
    if fns is None:
        return ref.dequantize_intk(qweight, scales, zeros, bits, in_features, -1, _stored_g_idx(group_starts)).to(dtype)
    W = torch.empty(qweight.shape[0], in_features, dtype=dtype)
    if W.numel():
        rc = fns["intk_dequant"](ptr(qweight), ptr(scales), ptr(zeros), ptr(group_starts), group_starts.numel() - 1,
                                 in_features, qweight.shape[0], bits, ptr(W), int(dtype == torch.bfloat16), _threads())
        _check(rc == 0, f"intk_dequant rejected its input (code {rc}): group_starts must rise from 0 to in_features")
    return W


# ---------------------------------------------------------------------------------------------- sparse

def _value_args(values, qweight, scales, zeros, bits, group_size, in_features, out, kept_shape):
    """(pointer args, value kind) for kept values given as floats or as int-k codes; validates both."""
    _check((values is None) != (qweight is None), "give exactly one of values (floats) or qweight (int-k codes)")
    if values is not None:
        _check(values.dtype in _VALUE_KIND, f"values must be float32, bfloat16 or float16, got {values.dtype}")
        _check_tensor(values, "values", values.dtype, kept_shape(None))
        return values, _VALUE_KIND[values.dtype]
    _check(bits in range(1, 9), f"code bits must be in 1..8, got {bits}")
    _check(group_size == -1 or (isinstance(group_size, int) and group_size > 0), "group_size must be positive or -1")
    n_groups = math.ceil(in_features / (in_features if group_size == -1 else group_size)) if in_features else 0
    _check_tensor(qweight, "qweight", torch.uint8, kept_shape(bits))
    _check_tensor(scales, "scales", torch.float16, (out, n_groups))
    _check_tensor(zeros, "zeros", torch.uint8, (out, n_groups))
    return qweight, _CODES


def _check_nm(indices, n, m, in_features, values, qweight, scales, zeros, bits, group_size):
    """Validated (out, kept values or codes, value kind) of an N:M layout."""
    _check(m >= 2 and 0 <= n < m and in_features % m == 0,
           f"N:M needs 0 <= N < M and in % M == 0 ({n}:{m}, in={in_features})")
    per_row = in_features // m * (m - n)
    _check(isinstance(indices, torch.Tensor) and indices.dim() == 2, "indices must be a 2-D uint8 tensor")
    out = indices.shape[0]
    _check_tensor(indices, "indices", torch.uint8, (out, math.ceil(per_row * max(1, math.ceil(math.log2(m))) / 8)))
    shape = lambda k: (out, per_row) if k is None else (out, math.ceil(per_row * k / 8))  # noqa: E731
    vals, kind = _value_args(values, qweight, scales, zeros, bits, group_size, in_features, out, shape)
    return out, vals, kind


def _code_args(kind, vals, bits, scales, zeros, group_size):
    """The (qweight, bits, scales, zeros, group_size) kernel arguments; empty ones for float values."""
    if kind != _CODES:
        return None, 0, None, None, -1
    return ptr(vals), bits, ptr(scales), ptr(zeros), group_size


def nm_matmul(x, indices, n: int, m: int, values=None, qweight=None, scales=None, zeros=None,
              bits: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """fp32 [B, out] = x @ W.T for N:M-sparse W (N zeros in every M columns) with float or int-k kept values."""
    _check(isinstance(x, torch.Tensor) and x.dim() == 2, "x must be a 2-D tensor [batch, in_features]")
    B, in_features = x.shape
    _check_x(x, in_features)
    out, vals, kind = _check_nm(indices, n, m, in_features, values, qweight, scales, zeros, bits, group_size)
    fns = _kernels("sparse")
    if fns is None:
        W = ref.dequantize_nm(indices, n, m, in_features, values, qweight, scales, zeros, bits, group_size)
        return ref.matmul_ref(x, W)
    y = torch.empty(B, out, dtype=torch.float32)
    if B == 0 or out == 0:
        return y.zero_()
    rc = fns["nm_gemm"](ptr(x), int(x.dtype == torch.bfloat16), B, in_features, out, n, m, ptr(vals), kind,
                        *_code_args(kind, vals, bits, scales, zeros, group_size), ptr(indices), ptr(y), _threads())
    _check(rc == 0, f"nm_gemm rejected its input (code {rc}): positions must be < M")
    return y


def nm_dequantize(indices, n: int, m: int, in_features: int, values=None, qweight=None, scales=None, zeros=None,
                  bits: int | None = None, group_size: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """Dense W [out, in] of an N:M layout (float32 or bfloat16), for prefill GEMMs."""
    out, vals, kind = _check_nm(indices, n, m, in_features, values, qweight, scales, zeros, bits, group_size)
    _check(dtype in (torch.float32, torch.bfloat16), f"dequantize to float32 or bfloat16, not {dtype}")
    fns = _kernels("sparse")
    if fns is None:
        return ref.dequantize_nm(indices, n, m, in_features, values, qweight, scales, zeros, bits, group_size).to(dtype)
    W = torch.empty(out, in_features, dtype=dtype)
    if W.numel():
        rc = fns["nm_dequant"](in_features, out, n, m, ptr(vals), kind,
                               *_code_args(kind, vals, bits, scales, zeros, group_size), ptr(indices), ptr(W),
                               int(dtype == torch.bfloat16), _threads())
        _check(rc == 0, f"nm_dequant rejected its input (code {rc}): positions must be < M")
    return W


def bitmask_code_offsets(row_offsets: torch.Tensor, bits: int) -> torch.Tensor:
    """Byte offset of each row's code bitstream (rows padded to a byte) from the kept-value row_offsets."""
    counts = row_offsets[1:] - row_offsets[:-1]
    nbytes = (counts * bits + 7) // 8
    return torch.cat([torch.zeros(1, dtype=torch.int64), nbytes.cumsum(0)])


def _check_bitmask(mask, row_offsets, in_features, values, qweight, scales, zeros, bits, group_size, qrow_offsets):
    """Validated (out, kept values or codes, value kind, qrow_offsets) of a bitmask layout."""
    _check(isinstance(mask, torch.Tensor) and mask.dim() == 2, "mask must be a 2-D uint8 tensor")
    out = mask.shape[0]
    _check_tensor(mask, "mask", torch.uint8, (out, math.ceil(in_features / 8)))
    _check_tensor(row_offsets, "row_offsets", torch.int64, (out + 1,))
    flat = lambda k: tuple((values if k is None else qweight).shape)  # noqa: E731 - offsets are checked in C++
    vals, kind = _value_args(values, qweight, scales, zeros, bits, group_size, in_features, out, flat)
    _check(vals.dim() == 1, "kept values / codes of a bitmask layout must be a flat 1-D tensor")
    if kind == _CODES:
        if qrow_offsets is None:
            qrow_offsets = bitmask_code_offsets(row_offsets, bits)
        _check_tensor(qrow_offsets, "qrow_offsets", torch.int64, (out + 1,))
    return out, vals, kind, qrow_offsets


def bitmask_matmul(x, mask, row_offsets, values=None, qweight=None, scales=None, zeros=None,
                   bits: int | None = None, group_size: int | None = None, qrow_offsets=None) -> torch.Tensor:
    """fp32 [B, out] = x @ W.T for bitmask-sparse W with float or int-k kept values (row-major, flat)."""
    _check(isinstance(x, torch.Tensor) and x.dim() == 2, "x must be a 2-D tensor [batch, in_features]")
    B, in_features = x.shape
    _check_x(x, in_features)
    out, vals, kind, qrow_offsets = _check_bitmask(mask, row_offsets, in_features, values, qweight, scales, zeros,
                                                   bits, group_size, qrow_offsets)
    fns = _kernels("sparse")
    if fns is None:
        W = ref.dequantize_bitmask(mask, row_offsets, in_features, values, qweight, scales, zeros, bits, group_size)
        return ref.matmul_ref(x, W)
    y = torch.empty(B, out, dtype=torch.float32)
    if B == 0 or out == 0:
        return y.zero_()
    q, b, sc, z, gs = _code_args(kind, vals, bits, scales, zeros, group_size)
    rc = fns["bitmask_gemm"](ptr(x), int(x.dtype == torch.bfloat16), B, in_features, out, ptr(mask), ptr(row_offsets),
                             ptr(vals), kind, q, ptr(qrow_offsets) if q else None, b, sc, z, gs, ptr(y), vals.numel(),
                             _threads())
    _check(rc == 0, f"bitmask_gemm rejected its input (code {rc}): mask, row_offsets and values disagree")
    return y


def bitmask_dequantize(mask, row_offsets, in_features: int, values=None, qweight=None, scales=None, zeros=None,
                       bits: int | None = None, group_size: int | None = None, qrow_offsets=None,
                       dtype=torch.float32) -> torch.Tensor:
    """Dense W [out, in] of a bitmask layout (float32 or bfloat16), for prefill GEMMs."""
    out, vals, kind, qrow_offsets = _check_bitmask(mask, row_offsets, in_features, values, qweight, scales, zeros,
                                                   bits, group_size, qrow_offsets)
    _check(dtype in (torch.float32, torch.bfloat16), f"dequantize to float32 or bfloat16, not {dtype}")
    fns = _kernels("sparse")
    if fns is None:
        W = ref.dequantize_bitmask(mask, row_offsets, in_features, values, qweight, scales, zeros, bits, group_size)
        return W.to(dtype)
    W = torch.empty(out, in_features, dtype=dtype)
    if W.numel():
        q, b, sc, z, gs = _code_args(kind, vals, bits, scales, zeros, group_size)
        rc = fns["bitmask_dequant"](in_features, out, ptr(mask), ptr(row_offsets), ptr(vals), kind, q,
                                    ptr(qrow_offsets) if q else None, b, sc, z, gs, vals.numel(), ptr(W),
                                    int(dtype == torch.bfloat16), _threads())
        _check(rc == 0, f"bitmask_dequant rejected its input (code {rc}): mask, row_offsets and values disagree")
    return W


# ------------------------------------------------------------------------------ prebound calls (decode)
# Checking every tensor on every call costs tens of microseconds, as much as a small matvec. A module
# validates its packed tensors once (by calling the checked function above) and then uses one of these
# closures, which take only x: a contiguous 2-D float32 / bfloat16 CPU tensor of the right width,
# checked by the caller. They hold references to the tensors whose addresses they keep.

def _addr(t) -> int | None:
    return None if t is None else t.data_ptr()


def _raise_on(rc: int, kernel: str) -> None:
    if rc:
        raise PeakError(f"{kernel} rejected its input (code {rc})")


def bind_intk(qweight, scales, zeros, bits: int, group_starts, perm=None, int8_act: bool = False):
    """x -> fp32 x[:, perm] @ W.T, for tensors already accepted by intk_matmul."""
    fns = _kernels("intk")
    if fns is None:
        return lambda x: intk_matmul(x, qweight, scales, zeros, bits, group_starts, perm, int8_act)
    fn = fns["intk_gemm_a8" if int8_act and int8_act_applies(bits, group_starts) else "intk_gemm"]
    out, in_features, n_groups = qweight.shape[0], int(group_starts[-1]), group_starts.numel() - 1
    tensors = (qweight, scales, zeros, group_starts, perm)
    p_perm, p_q, p_s, p_z, p_g = _addr(perm), _addr(qweight), _addr(scales), _addr(zeros), _addr(group_starts)

    def call(x, _keep=tensors):
        y = torch.empty(x.shape[0], out, dtype=torch.float32)
        _raise_on(fn(x.data_ptr(), int(x.dtype == torch.bfloat16), p_perm, x.shape[0], in_features, p_q, p_s, p_z,
                     p_g, n_groups, out, bits, y.data_ptr(), torch.get_num_threads()), "intk_gemm")
        return y

    return call


def bind_nm(indices, n: int, m: int, in_features: int, values=None, qweight=None, scales=None, zeros=None,
            bits=None, group_size=None):
    """x -> fp32 x @ W.T, for tensors already accepted by nm_matmul."""
    fns = _kernels("sparse")
    if fns is None:
        return lambda x: nm_matmul(x, indices, n, m, values, qweight, scales, zeros, bits, group_size)
    fn, out = fns["nm_gemm"], indices.shape[0]
    vals = values if values is not None else qweight
    kind = _CODES if values is None else _VALUE_KIND[values.dtype]
    tensors = (indices, vals, scales, zeros)
    code_args = _code_args(kind, vals, bits, scales, zeros, group_size)
    p_vals, p_idx = vals.data_ptr(), indices.data_ptr()

    def call(x, _keep=tensors):
        y = torch.empty(x.shape[0], out, dtype=torch.float32)
        _raise_on(fn(x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], in_features, out, n, m, p_vals, kind,
                     *code_args, p_idx, y.data_ptr(), torch.get_num_threads()), "nm_gemm")
        return y

    return call


def bind_bitmask(mask, row_offsets, in_features: int, values=None, qweight=None, scales=None, zeros=None, bits=None,
                 group_size=None, qrow_offsets=None):
    """x -> fp32 x @ W.T, for tensors already accepted by bitmask_matmul."""
    fns = _kernels("sparse")
    if fns is None:
        return lambda x: bitmask_matmul(x, mask, row_offsets, values, qweight, scales, zeros, bits, group_size,
                                        qrow_offsets)
    fn, out = fns["bitmask_gemm"], mask.shape[0]
    vals = values if values is not None else qweight
    kind = _CODES if values is None else _VALUE_KIND[values.dtype]
    tensors = (mask, row_offsets, vals, scales, zeros, qrow_offsets)
    q, b, sc, z, gs = _code_args(kind, vals, bits, scales, zeros, group_size)
    p_mask, p_ro, p_vals, p_qro, n_values = mask.data_ptr(), row_offsets.data_ptr(), vals.data_ptr(), _addr(
        qrow_offsets), vals.numel()

    def call(x, _keep=tensors):
        y = torch.empty(x.shape[0], out, dtype=torch.float32)
        _raise_on(fn(x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], in_features, out, p_mask, p_ro, p_vals,
                     kind, q, p_qro if q else None, b, sc, z, gs, y.data_ptr(), n_values, torch.get_num_threads()),
                  "bitmask_gemm")
        return y

    return call
