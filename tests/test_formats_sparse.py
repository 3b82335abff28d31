"""Bitmask and N:M sparse packing: exact round trips (float and int-k kept values) against slow references,
the N:M contract enforced, and corrupted tensors rejected with PeakError."""

from types import SimpleNamespace

import pytest
import torch

from peakllm.errors import PeakError
from peakllm.formats.bitpack import unpack_bits
from peakllm.formats.sparse import PackedBitmask, PackedNM, index_bits, pack_ragged, unpack_ragged
from peakllm.solvers.grids import Grid
from peakllm.solvers.rtn import rtn
from peakllm.solvers.sparsegpt import sparsegpt


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_mask(shape, density, seed):
    return torch.rand(shape, generator=gen(seed)) < density


def nm_random_mask(out, cols, n, m, seed):
    """Exactly n zeros in every group of m columns, at random positions."""
    score = torch.rand(out, cols // m, m, generator=gen(seed))
    drop = score.argsort(-1)[..., :n]
    mask = torch.ones(out, cols // m, m, dtype=torch.bool)
    mask.scatter_(-1, drop, False)
    return mask.reshape(out, cols)


def reference_dequant_kept(qw, mask):
    """Loop over every kept weight: scale[r, c // gs] * (code - zero[r, c // gs]); zero elsewhere."""
    gs = qw.grid["group_size"]
    out = torch.zeros(mask.shape)
    for r, c in mask.nonzero().tolist():
        g = 0 if gs == -1 else c // gs
        out[r, c] = qw.params["scale"][r, g] * (float(qw.codes[r, c]) - qw.params["zero"][r, g])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 13), (7, 64)])
def test_bitmask_float_round_trip(dtype, shape):
    W = torch.randn(shape, generator=gen(shape[1])).to(dtype)
    mask = random_mask(shape, 0.4, shape[0])
    packed = PackedBitmask.pack(W, mask)
    assert packed.values.dtype == dtype and packed.values.shape == (int(mask.sum()),)
    assert torch.equal(packed.dequantize(), torch.where(mask, W, 0).float())
    # mask bit c%8 of byte c//8, the documented layout
    m = packed.mask
    for r in range(shape[0]):
        for c in range(shape[1]):
            assert bool((int(m[r, c // 8]) >> (c % 8)) & 1) == bool(mask[r, c])
    again = PackedBitmask.from_tensors(packed.to_tensors(""), packed.metadata())
    assert torch.equal(again.dequantize(), packed.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 8, 12])
def test_bitmask_quantized_round_trip(bits, group_size):
    W = torch.randn(6, 30, generator=gen(bits))
    mask = random_mask(W.shape, 0.5, bits + 100)
    mask[2] = False  # an empty row
    qw = rtn(W, Grid("affine", bits, group_size, False))
    packed = PackedBitmask.pack(W, mask, qw)
    assert torch.equal(packed.dequantize(), reference_dequant_kept(qw, mask))
    again = PackedBitmask.from_tensors(packed.to_tensors("x."), packed.metadata(), "x.")
    assert torch.equal(again.dequantize(), reference_dequant_kept(qw, mask))


def test_ragged_layout_rows_start_on_bytes():
    counts = torch.tensor([3, 0, 5, 1])
    codes = torch.randint(0, 8, (9,), generator=gen(4), dtype=torch.uint8)
    stream = pack_ragged(codes, counts, 3)
    # rows take ceil(3*3/8)=2, 0, ceil(15/8)=2, 1 bytes; each row is its own bitstream from bit 0
    assert stream.numel() == 5
    assert torch.equal(unpack_bits(stream[0:2].reshape(1, 2), 3, 3)[0], codes[0:3])
    assert torch.equal(unpack_bits(stream[2:4].reshape(1, 2), 3, 5)[0], codes[3:8])
    assert torch.equal(unpack_bits(stream[4:5].reshape(1, 1), 3, 1)[0], codes[8:9])
    assert torch.equal(unpack_ragged(stream, counts, 3), codes)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (1, 2), (3, 5)])
def test_nm_float_round_trip(n, m):
    cols = m * 6
    W = torch.randn(5, cols, generator=gen(n * 10 + m))
    mask = nm_random_mask(5, cols, n, m, seed=m)
    packed = PackedNM.pack(W, mask, n, m)
    k = m - n
    assert packed.values.shape == (5, cols * k // m)
    assert packed.indices.shape == (5, -(-(cols * k // m) * index_bits(m) // 8))
    assert torch.equal(packed.dequantize(), torch.where(mask, W, 0))
    # slow reference of the stored layout: kept values row-major, positions ascending in each group
    pos = unpack_bits(packed.indices, index_bits(m), cols * k // m)
    for r in range(5):
        kept_cols = mask[r].nonzero().flatten()
        assert torch.equal(packed.values[r], W[r, kept_cols])
        assert torch.equal(pos[r].long(), kept_cols % m)
    again = PackedNM.from_tensors(packed.to_tensors(""), packed.metadata())
    assert torch.equal(again.dequantize(), packed.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nm_quantized_from_sparsegpt(bits):
    g = gen(bits)
    W = torch.randn(8, 32, generator=g)
    X = torch.randn(128, 32, generator=g)
    res = sparsegpt(W, X.T @ X, 0.5, prunen=2, prunem=4, grid=Grid("affine", bits, 16, False))
    packed = PackedNM.pack(res.weight, res.mask, 2, 4, res.quant)
    assert torch.equal(packed.dequantize(), reference_dequant_kept(res.quant, res.mask))
    assert torch.equal(packed.dequantize(), res.weight)  # pruned weights are exactly 0 in the solver too
    again = PackedNM.from_tensors(packed.to_tensors(""), packed.metadata())
    assert torch.equal(again.dequantize(), res.weight)


def test_nm_contract_enforced():
    W = torch.randn(3, 8, generator=gen(0))
    mask = nm_random_mask(3, 8, 2, 4, seed=0)
    bad = mask.clone()
    bad[0, :4] = True  # this group keeps all 4
    with pytest.raises(PeakError, match="not 2:4"):
        PackedNM.pack(W, bad, 2, 4)
    with pytest.raises(PeakError, match="divisible"):
        PackedNM.pack(W[:, :6], mask[:, :6], 2, 4)
    with pytest.raises(PeakError, match="N:M needs"):
        PackedNM.pack(W, mask, 4, 4)


def test_nm_indices_must_ascend():
    W = torch.randn(2, 8, generator=gen(1))
    packed = PackedNM.pack(W, nm_random_mask(2, 8, 2, 4, seed=1), 2, 4)
    tensors = dict(packed.to_tensors(""))
    idx = unpack_bits(packed.indices, 2, 4)
    idx[0, 0], idx[0, 1] = idx[0, 1].clone(), idx[0, 0].clone()  # descending within a group
    from peakllm.formats.bitpack import pack_bits
    tensors["indices"] = pack_bits(idx, 2)
    with pytest.raises(PeakError, match="ascending"):
        PackedNM.from_tensors(tensors, packed.metadata())


def test_sparse_rejects_act_order_and_ternary():
    W = torch.randn(2, 8, generator=gen(2))
    mask = random_mask(W.shape, 0.5, 2)
    qw = rtn(W, Grid("affine", 4, 4, False))
    act = SimpleNamespace(**{**vars(qw), "g_idx": torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.int32)})
    with pytest.raises(PeakError, match="g_idx"):
        PackedBitmask.pack(W, mask, act)
    with pytest.raises(PeakError, match="affine"):
        PackedBitmask.pack(W, mask, rtn(W, Grid("ternary", 2, 4, False)))


def test_bitmask_corruption_rejected():
    W = torch.randn(4, 20, generator=gen(3))
    mask = random_mask(W.shape, 0.5, 3)
    qw = rtn(W, Grid("affine", 3, 8, False))
    packed = PackedBitmask.pack(W, mask, qw)
    base = dict(packed.to_tensors(""))
    cases = {
        "row_offsets": base["row_offsets"].flip(0).contiguous(),
        "qweight": base["qweight"][:-1].contiguous(),
        "mask": torch.full_like(base["mask"], 0xFF),  # sets bits past column 20
        "zeros": torch.full_like(base["zeros"], 9),
    }
    for name, bad in cases.items():
        tensors = dict(base, **{name: bad})
        with pytest.raises(PeakError):
            PackedBitmask.from_tensors(tensors, packed.metadata())
    with pytest.raises(PeakError, match="bits"):
        PackedBitmask.from_tensors(base, {**packed.metadata(), "bits": 5})


def test_nbytes_by_hand():
    W = torch.randn(4, 16, generator=gen(5))
    mask = nm_random_mask(4, 16, 2, 4, seed=5)
    qw = rtn(W, Grid("affine", 4, 8, False))
    packed = PackedNM.pack(W, mask, 2, 4, qw)
    # 8 kept per row: qweight 4*4 bytes, indices 4*ceil(8*2/8)=4*2, scales 4*2 fp16, zeros 4*2
    assert packed.nbytes == 16 + 8 + 16 + 8
    bm = PackedBitmask.pack(W, mask)
    # mask 4*2 bytes, row_offsets 5 int64, 32 fp32 values
    assert bm.nbytes == 8 + 40 + 128
