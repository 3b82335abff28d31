"""Little-endian k-bit bitstreams, one per row (docs/DESIGN.md "Packed layouts: bitstream").

The code of column c occupies bits [c*k, (c+1)*k) counting from bit 0 of byte 0; a row is padded with
zero bits to a whole byte. Everything is vectorised over bits, never over elements.
"""

import math

import torch

from peakllm.errors import PeakError

# Rows are packed in chunks so the int64 intermediates (8 bytes a code) stay small for embedding-sized
# matrices.
_CHUNK_ELEMS = 1 << 22


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one row of n k-bit codes takes once packed."""
    return math.ceil(n * bits / 8)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise PeakError(f"bit width must be an integer in 1..8, got {bits!r}")


def _row_chunks(rows: int, per_row: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_row))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, n] (each < 2**bits) -> uint8 [rows, ceil(n*bits/8)] bitstreams."""
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise PeakError(f"pack_bits wants a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    rows, n = codes.shape
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise PeakError(f"a code {int(codes.max())} does not fit in {bits} bits")
    nbytes = packed_row_bytes(n, bits)
    if bits == 8:
        return codes.contiguous().clone()
    # Eight k-bit codes fill exactly k bytes: build each such 8k-bit word as an int64, then split it.
    n_words = math.ceil(n / 8)
    code_shift = torch.arange(8, dtype=torch.int64) * bits
    byte_shift = torch.arange(bits, dtype=torch.int64) * 8
    out = torch.empty(rows, n_words * bits, dtype=torch.uint8)
    for r0, r1 in _row_chunks(rows, n_words * 8):
        chunk = torch.nn.functional.pad(codes[r0:r1], (0, n_words * 8 - n)).to(torch.int64)
        words = (chunk.reshape(r1 - r0, n_words, 8) << code_shift).sum(-1, keepdim=True)
        out[r0:r1] = ((words >> byte_shift) & 0xFF).reshape(r1 - r0, n_words * bits).to(torch.uint8)
    return out[:, :nbytes].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 bitstreams [rows, ceil(n*bits/8)] -> uint8 codes [rows, n]."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise PeakError(f"unpack_bits wants a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if not isinstance(n, int) or n < 0:
        raise PeakError(f"number of codes must be a non-negative integer, got {n!r}")
    rows, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, bits):
        raise PeakError(f"{n} codes of {bits} bits need {packed_row_bytes(n, bits)} bytes a row, found {nbytes}")
    if bits == 8:
        return packed.contiguous().clone()
    n_words = math.ceil(n / 8)
    code_shift = torch.arange(8, dtype=torch.int64) * bits
    byte_shift = torch.arange(bits, dtype=torch.int64) * 8
    out = torch.empty(rows, n_words * 8, dtype=torch.uint8)
    for r0, r1 in _row_chunks(rows, n_words * 8):
        chunk = torch.nn.functional.pad(packed[r0:r1], (0, n_words * bits - nbytes)).to(torch.int64)
        words = (chunk.reshape(r1 - r0, n_words, bits) << byte_shift).sum(-1, keepdim=True)
        out[r0:r1] = ((words >> code_shift) & ((1 << bits) - 1)).reshape(r1 - r0, n_words * 8).to(torch.uint8)
    return out[:, :n].contiguous()


def padding_is_zero(packed: torch.Tensor, bits: int, n: int) -> bool:
    """True when the pad bits after the last code of every row are zero, as the layout requires."""
    pad = packed.shape[1] * 8 - n * bits
    if pad <= 0 or packed.shape[0] == 0:
        return True
    last = packed[:, -1].to(torch.int32)
    return bool(((last >> (8 - pad)) == 0).all())
