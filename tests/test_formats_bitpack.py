"""Bitstreams against a slow reference built from Python integers (DESIGN.md "Packed layouts: bitstream")."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peakllm.errors import PeakError
from peakllm.formats.bitpack import pack_bits, unpack_bits

SHAPES = [(1, 1), (3, 5), (4, 7), (2, 33), (5, 100), (3, 130)]


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Row r as one Python integer whose bit c*bits+b is bit b of code c, written little-endian."""
    rows, n = codes.shape
    nbytes = (n * bits + 7) // 8
    out = []
    for row in codes.tolist():
        stream = sum(code << (c * bits) for c, code in enumerate(row))
        out.append(list(stream.to_bytes(nbytes, "little")))
    return torch.tensor(out, dtype=torch.uint8).reshape(rows, nbytes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_matches_reference_and_round_trips(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], (shape[1] * bits + 7) // 8)
    assert torch.equal(packed, reference_pack(codes, bits))
    assert torch.equal(unpack_bits(packed, bits, shape[1]), codes)


def test_documented_int4_and_int2_bytes():
    codes = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    # int4: byte j = code[2j] | code[2j+1] << 4, last byte padded with zero bits
    assert pack_bits(codes, 4).tolist() == [[1 | 2 << 4, 3 | 4 << 4, 5]]
    codes2 = torch.tensor([[1, 2, 3, 0, 2]], dtype=torch.uint8)
    assert pack_bits(codes2, 2).tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6, 2]]
    # int3: eight codes in three bytes
    codes3 = torch.arange(8, dtype=torch.uint8).reshape(1, 8)
    assert pack_bits(codes3, 3).shape == (1, 3)


def test_chunked_rows_match_reference(monkeypatch):
    import peakllm.formats.bitpack as bp
    monkeypatch.setattr(bp, "_CHUNK_ELEMS", 40)  # force many row chunks
    codes = torch.randint(0, 8, (9, 13), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(bp.pack_bits(codes, 3), reference_pack(codes, 3))
    assert torch.equal(bp.unpack_bits(bp.pack_bits(codes, 3), 3, 13), codes)


def test_errors_are_peak_errors():
    codes = torch.tensor([[4, 1]], dtype=torch.uint8)
    with pytest.raises(PeakError, match="does not fit"):
        pack_bits(codes, 2)
    with pytest.raises(PeakError, match="1..8"):
        pack_bits(codes, 9)
    with pytest.raises(PeakError, match="uint8"):
        pack_bits(codes.to(torch.int32), 4)
    with pytest.raises(PeakError, match="need 1 bytes"):
        unpack_bits(torch.zeros(1, 2, dtype=torch.uint8), 4, 2)


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(0, 4), n=st.integers(0, 70), seed=st.integers(0, 2**31))
def test_random_shapes_match_reference(bits, rows, n, seed):
    codes = torch.randint(0, 1 << bits, (rows, n), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert torch.equal(packed, reference_pack(codes, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)
