"""Python entry points of the N:M and bitmask sparse kernels (sparse.cpp): validate, then call the compiled
kernel or, without one, the pure-torch reference; prebound closures for decode. Kept values are floats or
int-k codes over the kept values (docs/DESIGN.md "Packed layouts")."""

from __future__ import annotations

import math

import torch

from peakllm.kernels import reference as ref
from peakllm.kernels.build import ptr
from peakllm.kernels.ops import CODES, VALUE_KIND, addr, check, check_tensor, check_x, library_fns, raise_on, threads


def _value_args(values, qweight, scales, zeros, bits, group_size, in_features, out, kept_shape):
    """(pointer args, value kind) for kept values given as floats or as int-k codes; validates both."""
    check((values is None) != (qweight is None), "give exactly one of values (floats) or qweight (int-k codes)")
    if values is not None:
        check(values.dtype in VALUE_KIND, f"values must be float32, bfloat16 or float16, got {values.dtype}")
        check_tensor(values, "values", values.dtype, kept_shape(None))
        return values, VALUE_KIND[values.dtype]
    check(bits in range(1, 9), f"code bits must be in 1..8, got {bits}")
    check(group_size == -1 or (isinstance(group_size, int) and group_size > 0), "group_size must be positive or -1")
    n_groups = math.ceil(in_features / (in_features if group_size == -1 else group_size)) if in_features else 0
    check_tensor(qweight, "qweight", torch.uint8, kept_shape(bits))
    check_tensor(scales, "scales", torch.float16, (out, n_groups))
    check_tensor(zeros, "zeros", torch.uint8, (out, n_groups))
    return qweight, CODES


def _check_nm(indices, n, m, in_features, values, qweight, scales, zeros, bits, group_size):
    """Validated (out, kept values or codes, value kind) of an N:M layout."""
    check(m >= 2 and 0 <= n < m and in_features % m == 0,
           f"N:M needs 0 <= N < M and in % M == 0 ({n}:{m}, in={in_features})")
    per_row = in_features // m * (m - n)
    check(isinstance(indices, torch.Tensor) and indices.dim() == 2, "indices must be a 2-D uint8 tensor")
    out = indices.shape[0]
    check_tensor(indices, "indices", torch.uint8, (out, math.ceil(per_row * max(1, math.ceil(math.log2(m))) / 8)))
    shape = lambda k: (out, per_row) if k is None else (out, math.ceil(per_row * k / 8))  # noqa: E731
    vals, kind = _value_args(values, qweight, scales, zeros, bits, group_size, in_features, out, shape)
    return out, vals, kind


def _code_args(kind, vals, bits, scales, zeros, group_size):
    """The (qweight, bits, scales, zeros, group_size) kernel arguments; empty ones for float values."""
    if kind != CODES:
        return None, 0, None, None, -1
    return ptr(vals), bits, ptr(scales), ptr(zeros), group_size


def nm_matmul(x, indices, n: int, m: int, values=None, qweight=None, scales=None, zeros=None,
              bits: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """fp32 [B, out] = x @ W.T for N:M-sparse W (N zeros in every M columns) with float or int-k kept values."""
    check(isinstance(x, torch.Tensor) and x.dim() == 2, "x must be a 2-D tensor [batch, in_features]")
    B, in_features = x.shape
    check_x(x, in_features)
    out, vals, kind = _check_nm(indices, n, m, in_features, values, qweight, scales, zeros, bits, group_size)
    fns = library_fns("sparse")
    if fns is None:
        W = ref.dequantize_nm(indices, n, m, in_features, values, qweight, scales, zeros, bits, group_size)
        return ref.matmul_ref(x, W)
    y = torch.empty(B, out, dtype=torch.float32)
    if B == 0 or out == 0:
        return y.zero_()
    rc = fns["nm_gemm"](ptr(x), int(x.dtype == torch.bfloat16), B, in_features, out, n, m, ptr(vals), kind,
                        *_code_args(kind, vals, bits, scales, zeros, group_size), ptr(indices), ptr(y), threads())
    check(rc == 0, f"nm_gemm rejected its input (code {rc}): positions must be < M")
    return y


def nm_dequantize(indices, n: int, m: int, in_features: int, values=None, qweight=None, scales=None, zeros=None,
                  bits: int | None = None, group_size: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """Dense W [out, in] of an N:M layout (float32 or bfloat16), for prefill GEMMs."""
    out, vals, kind = _check_nm(indices, n, m, in_features, values, qweight, scales, zeros, bits, group_size)
    check(dtype in (torch.float32, torch.bfloat16), f"dequantize to float32 or bfloat16, not {dtype}")
    fns = library_fns("sparse")
    if fns is None:
        return ref.dequantize_nm(indices, n, m, in_features, values, qweight, scales, zeros, bits, group_size).to(dtype)
    W = torch.empty(out, in_features, dtype=dtype)
    if W.numel():
        rc = fns["nm_dequant"](in_features, out, n, m, ptr(vals), kind,
                               *_code_args(kind, vals, bits, scales, zeros, group_size), ptr(indices), ptr(W),
                               int(dtype == torch.bfloat16), threads())
        check(rc == 0, f"nm_dequant rejected its input (code {rc}): positions must be < M")
    return W


def bitmask_code_offsets(row_offsets: torch.Tensor, bits: int) -> torch.Tensor:
    """Byte offset of each row's code bitstream (rows padded to a byte) from the kept-value row_offsets."""
    counts = row_offsets[1:] - row_offsets[:-1]
    nbytes = (counts * bits + 7) // 8
    return torch.cat([torch.zeros(1, dtype=torch.int64), nbytes.cumsum(0)])


def _check_bitmask(mask, row_offsets, in_features, values, qweight, scales, zeros, bits, group_size, qrow_offsets):
    """Validated (out, kept values or codes, value kind, qrow_offsets) of a bitmask layout."""
    check(isinstance(mask, torch.Tensor) and mask.dim() == 2, "mask must be a 2-D uint8 tensor")
    out = mask.shape[0]
    check_tensor(mask, "mask", torch.uint8, (out, math.ceil(in_features / 8)))
    check_tensor(row_offsets, "row_offsets", torch.int64, (out + 1,))
    flat = lambda k: tuple((values if k is None else qweight).shape)  # noqa: E731 - offsets are checked in C++
    vals, kind = _value_args(values, qweight, scales, zeros, bits, group_size, in_features, out, flat)
    check(vals.dim() == 1, "kept values / codes of a bitmask layout must be a flat 1-D tensor")
    if kind == CODES:
        if qrow_offsets is None:
            qrow_offsets = bitmask_code_offsets(row_offsets, bits)
        check_tensor(qrow_offsets, "qrow_offsets", torch.int64, (out + 1,))
    return out, vals, kind, qrow_offsets


def bitmask_matmul(x, mask, row_offsets, values=None, qweight=None, scales=None, zeros=None,
                   bits: int | None = None, group_size: int | None = None, qrow_offsets=None) -> torch.Tensor:
    """fp32 [B, out] = x @ W.T for bitmask-sparse W with float or int-k kept values (row-major, flat)."""
    check(isinstance(x, torch.Tensor) and x.dim() == 2, "x must be a 2-D tensor [batch, in_features]")
    B, in_features = x.shape
    check_x(x, in_features)
    out, vals, kind, qrow_offsets = _check_bitmask(mask, row_offsets, in_features, values, qweight, scales, zeros,
                                                   bits, group_size, qrow_offsets)
    fns = library_fns("sparse")
    if fns is None:
        W = ref.dequantize_bitmask(mask, row_offsets, in_features, values, qweight, scales, zeros, bits, group_size)
        return ref.matmul_ref(x, W)
    y = torch.empty(B, out, dtype=torch.float32)
    if B == 0 or out == 0:
        return y.zero_()
    q, b, sc, z, gs = _code_args(kind, vals, bits, scales, zeros, group_size)
    rc = fns["bitmask_gemm"](ptr(x), int(x.dtype == torch.bfloat16), B, in_features, out, ptr(mask), ptr(row_offsets),
                             ptr(vals), kind, q, ptr(qrow_offsets) if q else None, b, sc, z, gs, ptr(y), vals.numel(),
                             threads())
    check(rc == 0, f"bitmask_gemm rejected its input (code {rc}): mask, row_offsets and values disagree")
    return y


def bitmask_dequantize(mask, row_offsets, in_features: int, values=None, qweight=None, scales=None, zeros=None,
                       bits: int | None = None, group_size: int | None = None, qrow_offsets=None,
                       dtype=torch.float32) -> torch.Tensor:
    """Dense W [out, in] of a bitmask layout (float32 or bfloat16), for prefill GEMMs."""
    out, vals, kind, qrow_offsets = _check_bitmask(mask, row_offsets, in_features, values, qweight, scales, zeros,
                                                   bits, group_size, qrow_offsets)
    check(dtype in (torch.float32, torch.bfloat16), f"dequantize to float32 or bfloat16, not {dtype}")
    fns = library_fns("sparse")
    if fns is None:
        W = ref.dequantize_bitmask(mask, row_offsets, in_features, values, qweight, scales, zeros, bits, group_size)
        return W.to(dtype)
    W = torch.empty(out, in_features, dtype=dtype)
    if W.numel():
        q, b, sc, z, gs = _code_args(kind, vals, bits, scales, zeros, group_size)
        rc = fns["bitmask_dequant"](in_features, out, ptr(mask), ptr(row_offsets), ptr(vals), kind, q,
                                    ptr(qrow_offsets) if q else None, b, sc, z, gs, vals.numel(), ptr(W),
                                    int(dtype == torch.bfloat16), threads())
        check(rc == 0, f"bitmask_dequant rejected its input (code {rc}): mask, row_offsets and values disagree")
    return W


def bind_nm(indices, n: int, m: int, in_features: int, values=None, qweight=None, scales=None, zeros=None,
            bits=None, group_size=None):
    """x -> fp32 x @ W.T, for tensors already accepted by nm_matmul."""
    fns = library_fns("sparse")
    if fns is None:
        return lambda x: nm_matmul(x, indices, n, m, values, qweight, scales, zeros, bits, group_size)
    fn, out = fns["nm_gemm"], indices.shape[0]
    vals = values if values is not None else qweight
    kind = CODES if values is None else VALUE_KIND[values.dtype]
    tensors = (indices, vals, scales, zeros)
    code_args = _code_args(kind, vals, bits, scales, zeros, group_size)
    p_vals, p_idx = vals.data_ptr(), indices.data_ptr()

    def call(x, _keep=tensors):
        y = torch.empty(x.shape[0], out, dtype=torch.float32)
        raise_on(fn(x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], in_features, out, n, m, p_vals, kind,
                     *code_args, p_idx, y.data_ptr(), torch.get_num_threads()), "nm_gemm")
        return y

    return call


def bind_bitmask(mask, row_offsets, in_features: int, values=None, qweight=None, scales=None, zeros=None, bits=None,
                 group_size=None, qrow_offsets=None):
    """x -> fp32 x @ W.T, for tensors already accepted by bitmask_matmul."""
    fns = library_fns("sparse")
    if fns is None:
        return lambda x: bitmask_matmul(x, mask, row_offsets, values, qweight, scales, zeros, bits, group_size,
                                        qrow_offsets)
    fn, out = fns["bitmask_gemm"], mask.shape[0]
    vals = values if values is not None else qweight
    kind = CODES if values is None else VALUE_KIND[values.dtype]
    tensors = (mask, row_offsets, vals, scales, zeros, qrow_offsets)
    q, b, sc, z, gs = _code_args(kind, vals, bits, scales, zeros, group_size)
    p_mask, p_ro, p_vals, p_qro, n_values = mask.data_ptr(), row_offsets.data_ptr(), vals.data_ptr(), addr(
        qrow_offsets), vals.numel()

    def call(x, _keep=tensors):
        y = torch.empty(x.shape[0], out, dtype=torch.float32)
        raise_on(fn(x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], in_features, out, p_mask, p_ro, p_vals,
                     kind, q, p_qro if q else None, b, sc, z, gs, y.data_ptr(), n_values, torch.get_num_threads()),
                  "bitmask_gemm")
        return y

    return call
