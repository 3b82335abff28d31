"""The batch-1 bf16 sparse rows (kernels/sparse_bf16_impl.h, what `peakllm prune` writes by default) against
dequantize-then-matmul, through the per-op kernels and the decode engine, on tiny shapes whose widths leave
every kind of tail (past the last whole 32 / 16 columns, a partial mask byte) and rows that end at the
tensor's end (where the 8-value reads must stop). Tolerance as tests/test_kernels_sparse.py: fp32 summation
order, 1e-5 of |x| @ |W|.T."""

from __future__ import annotations

import pytest
import torch

from peakllm.errors import PeakError
from peakllm.kernels import decode, sparse_ops
from peakllm.kernels import reference as ref
from peakllm.runtime.linear import BitmaskLinear, NMLinear


def assert_close_to(y, y_ref, mag):
    err = (y - y_ref).abs()
    assert bool((err <= 1e-5 * mag + 1e-6).all()), f"max error {err.max().item():.3g}"


def nm24(out, inn, g):
    pos = torch.rand(out, inn // 4, 4, generator=g).topk(2, dim=-1).indices.sort(-1).values.reshape(out, -1)
    return ref.pack_bitstream(pos, 2), torch.randn(out, inn // 2, generator=g).bfloat16()


def bitmask(out, inn, density, g):
    keep = torch.rand(out, inn, generator=g) < density
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])
    values = torch.randn(int(row_offsets[-1]), generator=g).bfloat16()
    return ref.pack_bitstream(keep.to(torch.uint8), 1), row_offsets, values


def _engine(layer, x):
    keep: list = []
    lin = layer.decode_lin(keep)
    assert lin is not None
    return decode.lin_apply(lin, x, threads=2)


@pytest.mark.parametrize("out,inn", [(1, 4), (3, 32), (5, 36), (7, 100), (6, 64), (4, 200)])
def test_nm24_bf16_batch1_matches_dequantized(out, inn):
    g = torch.Generator().manual_seed(out * 1000 + inn)
    indices, values = nm24(out, inn, g)
    W = ref.dequantize_nm(indices, 2, 4, inn, values=values)
    layer = NMLinear(inn, out, 2, 4, indices, values=values)
    for x in (torch.randn(1, inn, generator=g), torch.randn(1, inn, generator=g).bfloat16()):
        expect, mag = ref.matmul_ref(x.float(), W), x.float().abs() @ W.abs().T
        y = sparse_ops.nm_matmul(x, indices, 2, 4, values=values)
        assert_close_to(y, expect, mag)
        assert torch.equal(_engine(layer, x.float()), sparse_ops.nm_matmul(x.float(), indices, 2, 4, values=values))


@pytest.mark.parametrize("out,inn", [(1, 8), (3, 15), (5, 16), (7, 100), (4, 129), (9, 64)])
@pytest.mark.parametrize("density", [0.5, 1.0, 0.1, 0.0])
def test_bitmask_bf16_batch1_matches_dequantized(out, inn, density):
    g = torch.Generator().manual_seed(out * 1000 + inn + int(density * 10))
    mask, row_offsets, values = bitmask(out, inn, density, g)
    W = ref.dequantize_bitmask(mask, row_offsets, inn, values=values)
    layer = BitmaskLinear(inn, out, mask, row_offsets, values=values)
    for x in (torch.randn(1, inn, generator=g), torch.randn(1, inn, generator=g).bfloat16()):
        expect, mag = ref.matmul_ref(x.float(), W), x.float().abs() @ W.abs().T
        y = sparse_ops.bitmask_matmul(x, mask, row_offsets, values=values)
        assert_close_to(y, expect, mag)
        assert torch.equal(_engine(layer, x.float()), sparse_ops.bitmask_matmul(x.float(), mask, row_offsets,
                                                                                values=values))


def test_bitmask_bf16_batch1_rejects_a_row_count_the_mask_disagrees_with():
    g = torch.Generator().manual_seed(3)
    mask, row_offsets, values = bitmask(4, 64, 0.5, g)
    bad = row_offsets.clone()
    bad[1] += 1  # row 0 claims one value more than its mask keeps, row 1 one fewer
    with pytest.raises(PeakError):
        sparse_ops.bitmask_matmul(torch.randn(1, 64), mask, bad, values=values)
