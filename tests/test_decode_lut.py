"""The lookup-table linear kind of the whole-step decode engine (kernels/decode_lut.h): its rows are the LUT
kernel's (lut_gemm, the op-by-op path) bit for bit, for ternary (TernaryLinear, MoE experts) and 2-bit int-k
layers with int8 activations; whole models decode to the op-by-op path's logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from peakllm.formats.intk import PackedIntK, PackedTernary
from peakllm.formats.rotation import Rotation, pack_signs
from peakllm.kernels import decode, lut
from peakllm.runtime.linear import IntKLinear
from peakllm.runtime.model import RuntimeModel
from peakllm.runtime.ternary import TernaryLinear
from conftest import tiny_family

pytestmark = pytest.mark.skipif(not decode.available(torch.float32), reason="decode engine not built")


def ternary(out, inn, gs, sym, g, scale=0.1):
    ng = 1 if gs == -1 else -(-inn // gs)
    codes = torch.randint(0, 3, (out, inn), dtype=torch.uint8, generator=g)
    sn = torch.rand(out, ng, generator=g) * scale + 0.01
    sp = sn if sym else torch.rand(out, ng, generator=g) * scale + 0.01
    return TernaryLinear(PackedTernary.from_codes(codes, sn, sp, group_size=gs, sym=sym))


def intk2(out, inn, gs, g, rotate=False, scale=0.05):
    ng = 1 if gs == -1 else -(-inn // gs)
    p = PackedIntK.from_codes(torch.randint(0, 4, (out, inn), dtype=torch.uint8, generator=g),
                              torch.rand(out, ng, generator=g) * scale + 0.01,
                              torch.randint(0, 4, (out, ng), generator=g).float(), bits=2, group_size=gs)
    signs = (torch.randint(0, 2, (inn,), generator=g) * 2 - 1).to(torch.int8) if rotate else None
    layer = IntKLinear(inn, out, 2, gs, p.qweight, p.scales, p.zeros, rot_signs=None if signs is None else
                       pack_signs(signs), rot_block=32 if rotate else 0)
    layer.set_int8_act(True)
    assert layer.rotation is None or torch.equal(layer.rotation.signs, Rotation(32, signs).signs)
    return layer


@pytest.mark.parametrize("out,inn,gs", [(40, 200, -1), (37, 576, 64), (9, 96, 32), (192, 576, -1)])
def test_lut_lin_equals_the_lut_kernel(out, inn, gs):
    g = torch.Generator().manual_seed(out)
    for exact in (False, True):
        for w in (ternary(out, inn, gs, True, g).weights, ternary(out, inn, gs, False, g).weights,
                  lut.intk2_weights(*_codes(out, inn, gs, g), inn, gs)):
            bias = torch.randn(out, generator=g)
            keep: list = []
            lin = decode.lut_lin(w, exact, bias, keep)
            for batch in (1, 3, 5):
                for threads in (1, 2, 3):
                    x = torch.randn(batch, inn, generator=g)
                    assert torch.equal(decode.lin_apply(lin, x, threads), lut.lut_matmul(x, w, exact) + bias)
                    # the same x again: the tables each thread kept are those of x
                    assert torch.equal(decode.lin_apply(lin, x, threads), lut.lut_matmul(x, w, exact) + bias)


def _codes(out, inn, gs, g):
    p = intk2(out, inn, gs, g)
    return p.qweight, p.scales, p.zeros


def test_modules_describe_themselves_as_lut_lins(monkeypatch):
    g = torch.Generator().manual_seed(1)
    for layer in (intk2(24, 128, 32, g), intk2(24, 128, 64, g, rotate=True), ternary(24, 128, -1, False, g)):
        lin = layer.decode_lin([])
        assert lin.kind == decode.LIN_LUT
        for batch in (1, 4):
            x = torch.randn(batch, 128, generator=g)
            assert torch.equal(decode.lin_apply(lin, x, 2), layer(x))  # the rotated one: x R, then the tables
    layer = intk2(24, 128, 32, g)
    layer.set_int8_act(False)
    assert layer.decode_lin([]).kind == decode.LIN_INTK  # f32 activations: the int-k kernel, both paths
    monkeypatch.setenv(lut.LUT_ENV, "off")
    layer.set_int8_act(True)
    assert layer.decode_lin([]).kind == decode.LIN_INTK


def _lut_tiny(family="llama", seed=0):
    """A tiny model whose linears are ternary (sym and asym) and 2-bit int-k, one with a bias."""
    hf = tiny_family(family)
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(hf.model.layers):
        mods = [(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mods += [(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        for j, (parent, name) in enumerate(mods):
            out_f, in_f = getattr(parent, name).weight.shape
            new = (ternary(out_f, in_f, -1, (i + j) % 2 == 0, g, 0.03) if j % 3 != 2 else
                   intk2(out_f, in_f, 32, g, scale=0.02))
            if name == "q_proj":
                new.bias = torch.randn(out_f, generator=g) * 0.1
            setattr(parent, name, new)
    return hf


def _greedy(rt, prompt: torch.Tensor, steps: int):
    """(logits of every step, greedy tokens) of decoding from `prompt` [B, P]."""
    logits = [rt(prompt, 0)[:, -1:]]
    tokens = []
    for t in range(steps):
        tokens.append(logits[-1][:, -1].argmax(-1, keepdim=True))
        logits.append(rt(tokens[-1], prompt.shape[1] + t))
    return torch.cat(logits, 1).float(), torch.cat(tokens, 1)


@pytest.mark.parametrize("batch,dtype", [(1, torch.float32), (2, torch.float32), (1, torch.bfloat16)])
def test_engine_equals_op_by_op_path_with_lut_layers(batch, dtype):
    hf = _lut_tiny()
    prompt = torch.randint(1, 300, (batch, 5), generator=torch.Generator().manual_seed(3))
    outs = []
    for engine in (True, False):
        rt = RuntimeModel.from_hf(hf, dtype)
        rt.use_step_engine = engine
        rt.setup_cache(batch, 16)
        assert rt._step is not None  # every layer is describable (the engine runs when enabled)
        outs.append(_greedy(rt, prompt, 8))
    (le, te), (lo, to) = outs
    tol = (1e-5 if dtype == torch.float32 else 0.02) * lo.abs().max().item()
    assert (le - lo).abs().max().item() <= tol
    assert torch.equal(te, to)


def test_engine_runs_moe_blocks_with_ternary_experts():
    """QMoE's ternary experts in the dense-layout (peakllm) format: the engine's MoE phase reads their tables."""
    from test_runtime_moe import _moe_model

    from peakllm.runtime.experts import PackedExperts

    hf = _moe_model(experts=4, top_k=2, seed=5)
    g = torch.Generator().manual_seed(6)
    for layer in hf.model.layers:
        ex = layer.mlp.experts
        E, two_i, H = ex.gate_up_proj.shape
        layer.mlp.experts = PackedExperts([ternary(two_i, H, -1, e % 2 == 0, g) for e in range(E)],
                                          [ternary(H, two_i // 2, 16, True, g) for _ in range(E)], ex.act_fn)
    prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(7))
    outs = []
    for engine in (True, False):
        rt = RuntimeModel.from_hf(hf)
        rt.use_step_engine = engine
        rt.setup_cache(1, 32)
        assert rt._step is not None  # the MoE layers are described to the engine (used when enabled)
        with torch.no_grad():
            outs.append(_greedy(rt, prompt, 10))
    (le, te), (lo, to) = outs
    torch.testing.assert_close(le, lo, atol=1e-5 * lo.abs().max().item(), rtol=1e-5)
    assert torch.equal(te, to)
