"""Pure-torch references for the packed-weight kernels: dequantize to dense, then `y = x @ W.T`.

Written to be obviously right rather than fast; each reads the layouts of docs/DESIGN.md
"Packed layouts" exactly as stored. The compiled kernels (intk.cpp, sparse.cpp) are tested against
these, and `ops.py` falls back to them when no compiler is available.
"""

from __future__ import annotations

import math

import torch


def unpack_bitstream(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [rows, nbytes] little-endian bitstreams -> int64 codes [rows, count]."""
    rows = packed.shape[0]
    bit_values = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # LSB first, uint8 to save memory
    stream = bit_values.reshape(rows, -1)[:, : count * bits].reshape(rows, count, bits)
    codes = torch.zeros(rows, count, dtype=torch.uint8)
    for b in range(bits):
        codes |= stream[..., b] << b
    return codes.to(torch.int64)


def unpack_flat_rows(packed: torch.Tensor, bits: int, counts: list[int]) -> list[torch.Tensor]:
    """A flat byte buffer of per-row bitstreams (each padded to a byte) -> one int64 code vector per row."""
    flat = packed.reshape(-1)
    rows, start = [], 0
    for n in counts:
        nbytes = math.ceil(n * bits / 8)
        rows.append(unpack_bitstream(flat[start : start + nbytes].reshape(1, -1), bits, n)[0])
        start += nbytes
    return rows


def column_groups(in_features: int, group_size: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Group index of every input column: g_idx when given, else column // group_size."""
    if g_idx is not None:
        return g_idx.to(torch.int64)
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features) // size


def dequantize_intk(qweight, scales, zeros, bits, in_features, group_size, g_idx=None) -> torch.Tensor:
    """int-k affine codes -> fp32 [out, in] with w = scale * (q - zero)."""
    q = unpack_bitstream(qweight, bits, in_features).float()
    groups = column_groups(in_features, group_size, g_idx)
    scale = scales.float()[:, groups]
    zero = zeros.float()[:, groups]
    return scale * (q - zero)


def _dequantize_kept(codes_per_row, kept_columns, scales, zeros, group_size):
    """Affine dequantization of kept values whose groups follow their original column."""
    rows = []
    for r, (q, cols) in enumerate(zip(codes_per_row, kept_columns)):
        g = cols // group_size if group_size != -1 else torch.zeros_like(cols)
        rows.append(scales[r].float()[g] * (q.float() - zeros[r].float()[g]))
    return rows


def dequantize_nm(indices, n, m, in_features, values=None, qweight=None, scales=None, zeros=None,
                  bits=None, group_size=None) -> torch.Tensor:
    """N:M sparse (N zeros in every M columns) -> fp32 [out, in]; kept values are `values` or int-k codes."""
    keep = m - n
    out = indices.shape[0]
    per_row = in_features * keep // m
    pos_bits = max(1, math.ceil(math.log2(m)))
    pos = unpack_bitstream(indices, pos_bits, per_row)
    cols = (torch.arange(per_row) // keep) * m + pos  # [out, per_row] original columns
    if values is not None:
        kept = values.float()
    else:
        q = unpack_bitstream(qweight, bits, per_row).float()
        groups = cols // (in_features if group_size == -1 else group_size)
        kept = scales.float().gather(1, groups) * (q - zeros.float().gather(1, groups))
    W = torch.zeros(out, in_features)
    W.scatter_(1, cols, kept)
    return W


def dequantize_bitmask(mask, row_offsets, in_features, values=None, qweight=None, scales=None, zeros=None,
                       bits=None, group_size=None) -> torch.Tensor:
    """Bitmask sparse -> fp32 [out, in]; kept values in row-major order are floats or int-k codes."""
    out = mask.shape[0]
    keep = unpack_bitstream(mask, 1, in_features).bool()
    counts = (row_offsets[1:] - row_offsets[:-1]).tolist()
    W = torch.zeros(out, in_features)
    if values is not None:
        W[keep] = values.reshape(-1).float()
        return W
    kept_columns = [row.nonzero().reshape(-1) for row in keep]
    codes = unpack_flat_rows(qweight, bits, counts)
    for r, w in enumerate(_dequantize_kept(codes, kept_columns, scales, zeros, group_size)):
        W[r, kept_columns[r]] = w
    return W


def matmul_ref(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """y = x @ W.T in fp32 over any leading dims of x."""
    return x.float() @ W.T


def pack_bitstream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes [rows, n] (< 2**bits) -> uint8 [rows, ceil(n*bits/8)] little-endian bitstreams."""
    rows, n = codes.shape
    bit_values = (codes.to(torch.uint8).unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8)) & 1
    nbytes = math.ceil(n * bits / 8)
    stream = torch.nn.functional.pad(bit_values.reshape(rows, n * bits), (0, nbytes * 8 - n * bits))
    stream = stream.reshape(rows, nbytes, 8)
    packed = torch.zeros(rows, nbytes, dtype=torch.uint8)
    for b in range(8):
        packed |= stream[..., b] << b
    return packed
