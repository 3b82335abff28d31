"""runtime/linear.py: packed modules compute F.linear(x, W, bias) on any leading dims, through the
kernels (<= PREFILL_ROWS rows) and through dequantize + GEMM (prefill), and load the formats room's
packed tensors via packed_linear. Tolerances: fp32 accumulation order (1e-5 of |x| @ |W|.T plus the
zero-point split of int-k); for bf16 inputs also the bf16 rounding of the output (2^-8 of |y|).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from peakllm.errors import PeakError
from peakllm.kernels import reference as ref
from peakllm.runtime import linear
from peakllm.runtime.linear import BitmaskLinear, IntKLinear, NMLinear, packed_linear


def intk_layer(out=24, inn=80, bits=4, group_size=32, act_order=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_groups = math.ceil(inn / group_size)
    codes = torch.randint(0, 2**bits, (out, inn), dtype=torch.uint8, generator=g)
    scales = ((torch.rand(out, n_groups, generator=g) + 0.5) / 2**bits).half()
    zeros = torch.randint(0, 2**bits, (out, n_groups), dtype=torch.uint8, generator=g)
    g_idx = None
    if act_order:
        g_idx = torch.empty(inn, dtype=torch.int32)
        g_idx[torch.randperm(inn, generator=g)] = (torch.arange(inn) // group_size).to(torch.int32)
    qweight = ref.pack_bitstream(codes, bits)
    bias = torch.randn(out, generator=g)
    W = ref.dequantize_intk(qweight, scales, zeros, bits, inn, group_size, g_idx)
    groups = ref.column_groups(inn, group_size, g_idx)
    big = scales.float()[:, groups] * (codes.float() + zeros.float()[:, groups])
    layer = IntKLinear(inn, out, bits, group_size, qweight, scales, zeros, g_idx=g_idx, bias=bias)
    return layer, W, bias, big


def check(y, x, W, bias, big):
    y_ref = F.linear(x.float(), W, bias)
    bound = 1e-5 * (x.float().abs() @ big.T) + 1e-5
    if y.dtype == torch.bfloat16:  # output rounded once from fp32
        bound = bound + y_ref.abs() * 2**-8
    assert bool(((y.float() - y_ref).abs() <= bound).all()), f"max error {(y.float() - y_ref).abs().max().item():.3g}"


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_intk_linear_decode_batch_and_prefill(bits, act_order):
    layer, W, bias, big = intk_layer(bits=bits, act_order=act_order, seed=bits)
    for shape in [(80,), (1, 80), (3, 5, 80), (linear.PREFILL_ROWS + 1, 80), (2, 40, 80)]:
        x = torch.randn(*shape)
        y = layer(x)
        assert y.shape == (*shape[:-1], 24) and y.dtype == torch.float32
        check(y.reshape(-1, 24), x.reshape(-1, 80), W, bias, big)
        xb = x.bfloat16()
        yb = layer(xb)
        assert yb.dtype == torch.bfloat16
        check(yb.reshape(-1, 24), xb.reshape(-1, 80), W, bias, big)
    assert torch.equal(layer.dequantize(), W)


def test_prefill_path_agrees_with_kernel_path(monkeypatch):
    layer, W, bias, big = intk_layer(out=40, inn=96, bits=4, group_size=32, act_order=True)
    x = torch.randn(8, 96)
    y_kernel = layer(x)
    monkeypatch.setattr(linear, "PREFILL_ROWS", 0)
    check(layer(x), x, W, bias, big)
    torch.testing.assert_close(layer(x), y_kernel, rtol=1e-5, atol=1e-5)


def test_state_dict_holds_the_on_disk_tensors():
    layer, *_ = intk_layer(act_order=True)
    assert sorted(layer.state_dict()) == ["bias", "g_idx", "qweight", "scales", "zeros"]
    layer2, *_ = intk_layer(act_order=False)
    assert sorted(layer2.state_dict()) == ["bias", "qweight", "scales", "zeros"]


def test_load_state_dict_rederives_the_kernel_layout():
    """Loading other packed tensors into a built act-order layer must not run the old sorted codes."""
    layer, *_ = intk_layer(act_order=True, seed=1)
    other, W, bias, big = intk_layer(act_order=True, seed=2)
    x = torch.randn(3, 80)
    layer(x)  # binds the kernel to the first layer's tensors
    layer.load_state_dict(other.state_dict())
    check(layer(x), x, W, bias, big)


def test_dtype_casts_keep_the_packed_layout():
    """model.to(bf16) must not turn fp16 scales or float values into another layout."""
    layer, W, bias, big = intk_layer(act_order=True, seed=3)
    x = torch.randn(2, 80)
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.uint8
    check(layer(x), x, W, layer.bias.float(), big)
    weight, mask = sparse_weights(8, 32, n=2, m=4)
    pos = mask.reshape(8, -1, 4).nonzero()[:, 2].reshape(8, -1)
    nm = NMLinear(32, 8, 2, 4, ref.pack_bitstream(pos, 2), values=weight[mask].reshape(8, -1))
    nm.half()
    assert nm.values.dtype == torch.float32
    torch.testing.assert_close(nm(x[:, :32]), x[:, :32] @ (weight * mask).T, rtol=1e-5, atol=1e-5)


def test_copies_and_pickles_run_their_own_tensors(tmp_path):
    layer, W, bias, big = intk_layer(act_order=True, seed=4)
    x = torch.randn(2, 80)
    y = layer(x)
    clone = copy.deepcopy(layer)
    clone.scales.mul_(2)  # in place: only the clone's kernel may see it
    torch.testing.assert_close(layer(x), y)
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), y)
    assert not torch.allclose(clone(x), y)


def test_half_inputs_run_in_float32():
    layer, W, bias, big = intk_layer(act_order=False)
    x = torch.randn(2, 80).half()
    y = layer(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), F.linear(x.float(), W, bias), rtol=2e-3, atol=2e-3)


def sparse_weights(out, inn, n=None, m=None, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inn, generator=g)
    if n is None:
        mask = torch.rand(out, inn, generator=g) < density
    else:
        idx = torch.rand(out, inn // m, m, generator=g).topk(m - n, dim=-1).indices
        mask = torch.zeros(out, inn // m, m, dtype=torch.bool).scatter_(2, idx, True).reshape(out, inn)
    return weight, mask


def affine_qw(weight, bits, group_size):
    """A duck-typed solver QuantizedWeight (codes + fp16-exact scale / integer zero per group)."""
    out, inn = weight.shape
    n_groups = math.ceil(inn / group_size)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2**bits, (out, inn), dtype=torch.uint8, generator=g)
    scale = ((torch.rand(out, n_groups, generator=g) + 0.5) / 2**bits).half().float()
    zero = torch.randint(0, 2**bits, (out, n_groups), generator=g).float()
    grid = {"kind": "affine", "bits": bits, "group_size": group_size, "sym": False}
    return SimpleNamespace(codes=codes, params={"scale": scale, "zero": zero}, g_idx=None, grid=grid, weight=None)


def test_packed_linear_runs_the_formats_layouts():
    """Modules built from the formats room's to_tensors()/metadata() reproduce its dequantize()."""
    formats_intk = pytest.importorskip("peakllm.formats.intk")
    formats_sparse = pytest.importorskip("peakllm.formats.sparse")
    out, inn = 20, 64
    weight, nm_mask = sparse_weights(out, inn, n=2, m=4)
    _, bm_mask = sparse_weights(out, inn, density=0.3, seed=2)
    qw = affine_qw(weight, 4, 16)
    g_idx = torch.empty(inn, dtype=torch.int32)
    g_idx[torch.randperm(inn)] = (torch.arange(inn) // 16).to(torch.int32)  # act-order groups
    packs = [
        formats_intk.PackedIntK.from_codes(qw.codes, qw.params["scale"], qw.params["zero"], bits=4, group_size=16),
        formats_intk.PackedIntK.from_codes(qw.codes, qw.params["scale"], qw.params["zero"], bits=4, group_size=16,
                                           g_idx=g_idx),
        formats_sparse.PackedNM.pack(weight, nm_mask, 2, 4),
        formats_sparse.PackedNM.pack(weight, nm_mask, 2, 4, qw=qw),
        formats_sparse.PackedBitmask.pack(weight, bm_mask),
        formats_sparse.PackedBitmask.pack(weight, bm_mask, qw=qw),
    ]
    bias = torch.randn(out)
    x = torch.randn(3, 7, inn)
    for pack in packs:
        layer = packed_linear(pack.kind, pack.to_tensors(), pack.metadata(), bias=bias)
        W = pack.dequantize().float()
        torch.testing.assert_close(layer.dequantize(), W, rtol=0, atol=0)
        y_ref = F.linear(x, W, bias)
        torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer(x.reshape(21, 1, inn)[:1]), y_ref.reshape(21, 1, out)[:1], rtol=1e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("prefill", [False, True])
def test_sparse_linear_modules(prefill, monkeypatch):
    if prefill:
        monkeypatch.setattr(linear, "PREFILL_ROWS", 0)
    out, inn = 18, 96
    weight, mask = sparse_weights(out, inn, n=2, m=4, seed=5)
    pos = mask.reshape(out, -1, 4).nonzero()[:, 2].reshape(out, -1)
    values = weight[mask].reshape(out, -1)
    nm = NMLinear(inn, out, 2, 4, ref.pack_bitstream(pos, 2), values=values.bfloat16())
    W = (weight * mask).bfloat16().float()
    x = torch.randn(5, inn)
    torch.testing.assert_close(nm(x), x @ W.T, rtol=1e-5, atol=1e-4)
    _, bmask = sparse_weights(out, inn, density=0.25, seed=6)
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), bmask.sum(1).cumsum(0)])
    bm = BitmaskLinear(inn, out, ref.pack_bitstream(bmask.to(torch.uint8), 1), row_offsets, values=weight[bmask])
    xb = x.bfloat16()
    Wb = weight * bmask
    check(bm(xb), xb, Wb, None, Wb.abs())


def test_packed_linear_rejects_bad_requests():
    layer, *_ = intk_layer(act_order=False)
    tensors = {"qweight": layer.qweight, "scales": layer.scales, "zeros": layer.zeros}
    meta = {"in_features": 80, "out_features": 24, "bits": 4, "group_size": 32}
    assert isinstance(packed_linear("intk", tensors, meta), IntKLinear)
    with pytest.raises(PeakError, match="unknown packed layer kind"):
        packed_linear("int4", tensors, meta)
    with pytest.raises(PeakError, match="missing 'zeros'"):
        packed_linear("intk", {k: tensors[k] for k in ("qweight", "scales")}, meta)
    with pytest.raises(PeakError, match="features"):
        layer(torch.randn(2, 81))
    with pytest.raises(PeakError, match="scales"):
        packed_linear("intk", tensors, dict(meta, out_features=25))
