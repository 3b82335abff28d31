"""The LUT kernel behind the runtime's modules: TernaryLinear for dense-layout ternary matrices, and
IntKLinear's 2-bit layers with int8 activations; $PEAKLLM_LUT=off keeps the paths before it."""

from __future__ import annotations

import pytest
import torch

from peakllm.formats.intk import PackedIntK, PackedTernary
from peakllm.kernels import lut, ops
from peakllm.kernels import lut_reference as R
from peakllm.models.packed import runtime_module
from peakllm.runtime.linear import IntKLinear, packed_linear
from peakllm.runtime.ternary import TernaryLinear


def ternary(out, inn, gs, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    ng = 1 if gs == -1 else -(-inn // gs)
    codes = torch.randint(0, 3, (out, inn), dtype=torch.uint8, generator=g)
    sn = torch.rand(out, ng, generator=g) * 0.1 + 0.01
    sp = sn if sym else torch.rand(out, ng, generator=g) * 0.1 + 0.01
    return PackedTernary.from_codes(codes, sn, sp, group_size=gs, sym=sym)


def intk2(out, inn, gs, seed=0):
    g = torch.Generator().manual_seed(seed)
    ng = 1 if gs == -1 else -(-inn // gs)
    codes = torch.randint(0, 4, (out, inn), dtype=torch.uint8, generator=g)
    return PackedIntK.from_codes(codes, torch.rand(out, ng, generator=g) * 0.1 + 0.01,
                                 torch.randint(0, 4, (out, ng), generator=g).float(), bits=2, group_size=gs)


@pytest.mark.parametrize("sym,gs", [(True, -1), (False, 32), (True, 64), (False, -1)])
@pytest.mark.parametrize("act", ["int8", "f32"])
def test_ternary_linear_matches_dequantized(sym, gs, act, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("PEAKLLM_INTK_ACT", act)
    p = ternary(40, 200, gs, sym)
    bias = torch.randn(40)
    mod = runtime_module("layer", p, torch.nn.Linear(200, 40))
    assert isinstance(mod, TernaryLinear) and mod.exact == (act == "f32")
    if act == "f32":  # fp32 tables: dequantize-then-matmul up to fp32 rounding
        x = torch.randn(3, 200)
        assert torch.allclose(mod(x), x @ p.dequantize().T + mod.bias, atol=1e-5, rtol=1e-5)
    mod.bias = bias
    W = p.dequantize()
    for rows in (1, 5, 40):
        x = torch.randn(rows, 200)
        y = mod(x)
        exact = x @ W.T + bias
        assert ((y - exact).abs() <= R.error_bound(x, mod.weights)).all()
        assert (y - exact).pow(2).mean().sqrt() < 0.015 * exact.pow(2).mean().sqrt()
    x = torch.randn(2, 3, 200).bfloat16()
    y = mod(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 40)
    assert torch.allclose(y.float(), (x.float() @ W.T + bias), rtol=0.05, atol=0.05)
    assert mod.decode_lin([]) is not None


def test_ternary_falls_back_to_dense_when_off_or_not_applicable(monkeypatch):
    assert runtime_module("layer", ternary(8, 40, 8, True), None) is None  # groups of 8: no LUT layout
    monkeypatch.setenv(lut.LUT_ENV, "off")
    assert runtime_module("layer", ternary(8, 64, -1, True), None) is None


def layer(p: PackedIntK) -> IntKLinear:
    return packed_linear("intk", p.to_tensors(""), p.metadata())


def test_intk2_int8_act_runs_the_lut_kernel(monkeypatch):
    torch.manual_seed(0)
    p = intk2(48, 256, 64)
    x = torch.randn(3, 256)
    want = lut.lut_matmul(x, lut.intk2_weights(p.qweight, p.scales, p.zeros, 256, 64))
    mod = layer(p)
    mod.set_int8_act(True)
    assert torch.equal(mod(x), want)  # exactly the LUT kernel's result
    exact = x @ p.dequantize().T
    assert (mod(x) - exact).pow(2).mean().sqrt() < 0.015 * exact.pow(2).mean().sqrt()
    monkeypatch.setenv(lut.LUT_ENV, "off")
    mod.set_int8_act(True)  # rebinds
    starts, _ = ops.intk_groups(256, 64)
    assert torch.equal(mod(x), ops.intk_matmul(x, p.qweight, p.scales, p.zeros, 2, starts, int8_act=True))


def test_intk2_f32_activations_keep_the_old_kernel():
    p = intk2(16, 128, 32)
    mod = layer(p)
    mod.set_int8_act(False)
    x = torch.randn(2, 128)
    starts, _ = ops.intk_groups(128, 32)
    assert torch.equal(mod(x), ops.intk_matmul(x, p.qweight, p.scales, p.zeros, 2, starts))


def test_bad_switch_value(monkeypatch):
    monkeypatch.setenv(lut.LUT_ENV, "maybe")
    with pytest.raises(Exception, match="PEAKLLM_LUT"):
        lut.enabled()
