"""int-k and ternary packing: dequantize equals a column-by-column reference from codes and params, and
equals the solver's own dequantized weights; act-order g_idx survives; bad tensors raise PeakError."""

from types import SimpleNamespace

import pytest
import torch

from peakllm.errors import PeakError
from peakllm.formats.intk import PackedIntK, PackedTernary
from peakllm.solvers.gptq import gptq
from peakllm.solvers.grids import Grid
from peakllm.solvers.rtn import rtn


def fp16_exact(x):
    return x.to(torch.float16).float()


def reference_affine(codes, scale, zero, groups):
    """One column at a time: w[:, c] = scale[:, g(c)] * (codes[:, c] - zero[:, g(c)])."""
    out = torch.empty(codes.shape)
    for c in range(codes.shape[1]):
        g = int(groups[c])
        out[:, c] = scale[:, g] * (codes[:, c].float() - zero[:, g])
    return out


def random_affine_qw(out, cols, bits, group_size, *, sym=False, act_order=False, seed=0):
    """A QuantizedWeight-shaped input with random codes/params and (optionally) act-order groups."""
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else -(-cols // group_size)
    codes = torch.randint(0, 1 << bits, (out, cols), generator=g, dtype=torch.uint8)
    scale = fp16_exact(torch.rand(out, n_groups, generator=g) * 0.1 + 1e-3)
    if sym:
        zero = torch.full((out, n_groups), float(1 << (bits - 1)))
    else:
        zero = torch.randint(0, 1 << bits, (out, n_groups), generator=g).float()
    g_idx = None
    groups = torch.zeros(cols, dtype=torch.long) if group_size == -1 else torch.arange(cols) // group_size
    if act_order:
        perm = torch.randperm(cols, generator=g)
        groups = torch.empty(cols, dtype=torch.long)
        groups[perm] = torch.arange(cols) // group_size  # groups consecutive in the permuted order
        g_idx = groups.to(torch.int32)
    weight = reference_affine(codes, scale, zero, groups)
    grid = {"kind": "affine", "bits": bits, "group_size": group_size, "sym": sym}
    return SimpleNamespace(weight=weight, codes=codes, params={"scale": scale, "zero": zero}, g_idx=g_idx,
                           grid=grid), groups


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16, 24])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_round_trip_exact(bits, group_size, sym):
    W = torch.randn(7, 50, generator=torch.Generator().manual_seed(bits + group_size))
    qw = rtn(W, Grid("affine", bits, group_size, sym))
    packed = PackedIntK.from_quantized(qw)
    assert torch.equal(packed.dequantize(), qw.weight)
    assert torch.equal(packed.codes(), qw.codes)
    again = PackedIntK.from_tensors(packed.to_tensors("m."), packed.metadata(), "m.")
    assert torch.equal(again.dequantize(), qw.weight)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_act_order_g_idx_round_trip(bits):
    qw, groups = random_affine_qw(6, 45, bits, 8, act_order=True, seed=bits)
    packed = PackedIntK.from_quantized(qw)
    assert packed.g_idx is not None and torch.equal(packed.g_idx, groups.to(torch.int32))
    ref = reference_affine(qw.codes, qw.params["scale"], qw.params["zero"], groups)
    assert torch.equal(packed.dequantize(), ref)
    tensors = packed.to_tensors("")
    assert set(tensors) == {"qweight", "scales", "zeros", "g_idx"}
    assert torch.equal(PackedIntK.from_tensors(tensors, packed.metadata()).dequantize(), ref)


def test_gptq_act_order_matches_solver_weights():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 40, generator=g)
    X = torch.randn(200, 40, generator=g) * torch.linspace(0.1, 3, 40)
    qw, _ = gptq(W, X.T @ X, Grid("affine", 3, 8, False), act_order="group")
    packed = PackedIntK.from_quantized(qw)
    assert torch.equal(packed.dequantize(), qw.weight)
    static, _ = gptq(W, X.T @ X, Grid("affine", 3, 8, False), act_order="static")
    assert static.g_idx is None
    packed = PackedIntK.from_quantized(static)
    assert packed.g_idx is None and "g_idx" not in packed.to_tensors("")
    assert torch.equal(packed.dequantize(), static.weight)


def test_contiguous_g_idx_is_dropped():
    qw, _ = random_affine_qw(4, 32, 4, 8, seed=2)
    qw.g_idx = (torch.arange(32) // 8).to(torch.int32)
    assert PackedIntK.from_quantized(qw).g_idx is None


@pytest.mark.parametrize("group_size", [-1, 5])
@pytest.mark.parametrize("sym", [False, True])
def test_ternary_round_trip(group_size, sym):
    W = torch.randn(5, 23, generator=torch.Generator().manual_seed(7))
    qw = rtn(W, Grid("ternary", 2, group_size, sym))
    packed = PackedTernary.from_quantized(qw)
    assert torch.equal(packed.dequantize(), qw.weight)
    codes, neg, pos = qw.codes, qw.params["scale_neg"], qw.params["scale_pos"]
    groups = torch.zeros(23, dtype=torch.long) if group_size == -1 else torch.arange(23) // group_size
    ref = torch.zeros(5, 23)
    for c in range(23):
        gi = int(groups[c])
        ref[:, c] = torch.where(codes[:, c] == 0, -neg[:, gi], torch.where(codes[:, c] == 2, pos[:, gi], 0.0))
    assert torch.equal(packed.dequantize(), ref)
    again = PackedTernary.from_tensors(packed.to_tensors(""), packed.metadata())
    assert torch.equal(again.dequantize(), ref)


def test_nbytes_by_hand():
    qw, _ = random_affine_qw(5, 50, 3, 16, seed=3)
    packed = PackedIntK.from_quantized(qw)
    # qweight 5 rows * ceil(50*3/8)=19 bytes, scales 5*4 fp16, zeros 5*4 uint8
    assert packed.nbytes == 5 * 19 + 5 * 4 * 2 + 5 * 4
    qw_act, _ = random_affine_qw(5, 50, 3, 16, act_order=True, seed=3)
    assert PackedIntK.from_quantized(qw_act).nbytes == 5 * 19 + 5 * 4 * 2 + 5 * 4 + 50 * 4


def _tensors_and_meta(bits=4):
    qw, _ = random_affine_qw(4, 20, bits, 8, act_order=True, seed=5)
    packed = PackedIntK.from_quantized(qw)
    return dict(packed.to_tensors("")), packed.metadata()


@pytest.mark.parametrize("corrupt, match", [
    (lambda t, m: t.update(qweight=t["qweight"][:, :-1].contiguous()), "qweight"),
    (lambda t, m: t.update(scales=t["scales"].float()), "scales"),
    (lambda t, m: t.update(zeros=torch.full_like(t["zeros"], 16)), "zero points exceed"),
    (lambda t, m: t.update(g_idx=torch.full_like(t["g_idx"], 3)), "g_idx"),
    (lambda t, m: t.pop("scales"), "missing"),
    (lambda t, m: m.update(version=2), "version"),
    (lambda t, m: m.update(bits=5), "bits"),
    (lambda t, m: m.update(in_features=21), "qweight|g_idx"),
    (lambda t, m: m.update(group_size=0), "group_size"),
    (lambda t, m: m.update(sym=True), "symmetric"),
    (lambda t, m: m.update(out_features="4"), "out_features"),
    (lambda t, m: t.update(scales=torch.full_like(t["scales"], float("inf"))), "non-finite"),
])
def test_from_tensors_rejects_corruption(corrupt, match):
    tensors, meta = _tensors_and_meta()
    corrupt(tensors, meta)
    with pytest.raises(PeakError, match=match):
        PackedIntK.from_tensors(tensors, meta)


def test_nonzero_padding_bits_rejected():
    tensors, meta = _tensors_and_meta(bits=3)  # 20 codes * 3 bits = 60 bits: 4 pad bits per row
    q = tensors["qweight"].clone()
    q[0, -1] |= 0x80
    tensors["qweight"] = q
    with pytest.raises(PeakError, match="padding"):
        PackedIntK.from_tensors(tensors, meta)


def test_ternary_code_three_rejected():
    qw = rtn(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), Grid("ternary", 2, -1, False))
    packed = PackedTernary.from_quantized(qw)
    tensors = dict(packed.to_tensors(""))
    tensors["qweight"] = torch.full_like(tensors["qweight"], 0xFF)
    with pytest.raises(PeakError, match="code 3"):
        PackedTernary.from_tensors(tensors, packed.metadata())


def test_bad_solver_outputs_rejected():
    qw, _ = random_affine_qw(3, 16, 4, 8, seed=9)
    qw.params["zero"] = qw.params["zero"] + 0.5
    with pytest.raises(PeakError, match="zero points"):
        PackedIntK.from_quantized(qw)
    qw, _ = random_affine_qw(3, 16, 4, 8, seed=9)
    qw.params["scale"] = qw.params["scale"] * 1e6
    with pytest.raises(PeakError, match="overflows fp16"):
        PackedIntK.from_quantized(qw)
    with pytest.raises(PeakError, match="affine"):
        PackedTernary.from_quantized(qw)
    qw, _ = random_affine_qw(3, 16, 4, 8, act_order=True, seed=9)
    qw.grid = {"kind": "ternary", "bits": 2, "group_size": 8, "sym": False}
    qw.params = {"scale_neg": qw.params["scale"], "scale_pos": qw.params["scale"]}
    qw.codes = qw.codes % 3
    with pytest.raises(PeakError, match="g_idx"):
        PackedTernary.from_quantized(qw)
