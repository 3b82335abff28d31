"""The whole-step decode engine (kernels/decode.cpp) against the op-by-op kernels and torch.

Each linear kind through the engine's per-thread row split must equal its reference (same tolerance as
tests/test_kernels_intk.py: a few fp32 ulps of M = |x| @ |W|.T, since sums are split and reordered), and
a whole model decoded by the engine must give the logits of the op-by-op path to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peakllm.kernels import decode, ops
from peakllm.kernels import reference as ref
from peakllm.runtime.linear import IntKLinear
from peakllm.runtime.model import RuntimeModel
from test_kernels_intk import assert_close_to, magnitude, random_intk
from test_runtime_model import _tiny

pytestmark = pytest.mark.skipif(not decode.available(torch.float32), reason="decode engine not built")

SHAPES = [(1, 32, 32), (7, 100, 32), (33, 576, 128), (20, 256, 64), (13, 96, -1), (5, 40, 7)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("out,inn,group_size", SHAPES)
def test_intk_lin_matches_reference(bits, out, inn, group_size):
    for act_order in (False, True):
        codes, qweight, scales, zeros, g_idx = random_intk(out, inn, bits, group_size, act_order, seed=out * bits)
        W = ref.dequantize_intk(qweight, scales, zeros, bits, inn, group_size, g_idx)
        starts, perm = ops.intk_groups(inn, group_size, g_idx)
        q = qweight if perm is None else ops.permute_columns(qweight, bits, inn, perm)
        bias = torch.randn(out)
        keep: list = []
        lin = decode.intk_lin(q, scales, zeros, bits, starts, perm, bias, inn, out, keep)
        for batch in (1, 2, 5):
            x = torch.randn(batch, inn)
            mag = magnitude(x, codes, scales, zeros, group_size, g_idx)
            for threads in (1, 2, 3):
                assert_close_to(decode.lin_apply(lin, x, threads), ref.matmul_ref(x, W) + bias, mag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_lin_matches_torch(dtype):
    for out, inn in [(1, 8), (7, 100), (33, 576), (64, 17)]:
        W = torch.randn(out, inn).to(dtype)
        bias = torch.randn(out)
        lin = decode.dense_lin(W, bias, [])
        for batch in (1, 3):
            x = torch.randn(batch, inn)
            y_ref = F.linear(x, W.float(), bias)
            mag = x.abs() @ W.float().abs().T
            for threads in (1, 2):
                assert_close_to(decode.lin_apply(lin, x, threads), y_ref, mag)


def _packed_tiny(seed=0):
    """A tiny Llama whose linears are int-k of mixed widths, one with act-order and bias."""
    hf = _tiny("llama")
    g = torch.Generator().manual_seed(seed)
    widths = iter([4, 3, 2, 8, 4, 4, 3] * 4)
    for layer in hf.model.layers:
        mods = [(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mods += [(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        for parent, name in mods:
            out_f, in_f = getattr(parent, name).weight.shape
            bits = next(widths)
            _, qweight, scales, zeros, g_idx = random_intk(out_f, in_f, bits, 32, name == "v_proj",
                                                          seed=int(torch.randint(0, 1000, (1,), generator=g)))
            scales = (scales.float() * 0.1).half()
            bias = torch.randn(out_f, generator=g) * 0.1 if name == "q_proj" else None
            setattr(parent, name, IntKLinear(in_f, out_f, bits, 32, qweight, scales, zeros, g_idx=g_idx, bias=bias))
    return hf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_engine_equals_op_by_op_path_on_packed_model(batch, dtype):
    hf = _packed_tiny()
    ids = torch.randint(1, 300, (batch, 12), generator=torch.Generator().manual_seed(3))
    outs = []
    for engine in (True, False):
        rt = RuntimeModel.from_hf(hf, dtype)
        rt.use_step_engine = engine
        rt.setup_cache(batch, 16)
        assert (rt._step is not None) is True  # every layer is describable: the engine runs when enabled
        outs.append(torch.cat([rt(ids[:, :4], 0)] + [rt(ids[:, t:t + 1], t) for t in range(4, 12)], 1).float())
    scale = outs[1].abs().max().item()
    tol = 1e-5 * scale if dtype == torch.float32 else 0.02 * scale  # bf16: one rounding of differently summed values
    assert (outs[0] - outs[1]).abs().max().item() <= tol
    assert torch.equal(outs[0][:, -1].argmax(-1), outs[1][:, -1].argmax(-1))


def test_engine_runs_with_more_threads_than_cores():
    # Oversubscribed threads meet at the spin barrier, which yields the core after a while: still correct.
    hf = _packed_tiny(seed=1)
    ids = torch.randint(1, 300, (1, 8), generator=torch.Generator().manual_seed(4))
    rt = RuntimeModel.from_hf(hf)
    rt.setup_cache(1, 8)
    rt(ids[:, :4], 0)
    x = rt(ids[:, 4:5], 4)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(5)
        rt.setup_cache(1, 8)
        rt(ids[:, :4], 0)
        y = rt(ids[:, 4:5], 4)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _sparse_packs(out, inn, group_size, seed):
    from test_kernels_linear import affine_qw, sparse_weights

    from peakllm.formats.sparse import PackedBitmask, PackedNM

    weight, nm_mask = sparse_weights(out, inn, n=2, m=4, seed=seed)
    _, nm48 = sparse_weights(out, inn, n=4, m=8, seed=seed + 1)
    _, bm_mask = sparse_weights(out, inn, density=0.45, seed=seed + 2)
    qw = affine_qw(weight, 4, group_size)
    qw8 = affine_qw(weight, 8, group_size)
    return [PackedNM.pack(weight, nm_mask, 2, 4), PackedNM.pack(weight, nm_mask, 2, 4, qw=qw),
            PackedNM.pack(weight, nm48, 4, 8, qw=qw8), PackedNM.pack(weight.bfloat16(), nm48, 4, 8),
            PackedBitmask.pack(weight, bm_mask), PackedBitmask.pack(weight, bm_mask, qw=qw)]


@pytest.mark.parametrize("out,inn,group_size", [(20, 64, 16), (37, 576, 128), (9, 200, 40)])
def test_sparse_lins_match_the_modules_and_the_dense_reference(out, inn, group_size):
    from peakllm.runtime.linear import packed_linear

    bias = torch.randn(out)
    for pack in _sparse_packs(out, inn, group_size, seed=out):
        layer = packed_linear(pack.kind, pack.to_tensors(), pack.metadata(), bias=bias)
        lin = layer.decode_lin([])
        assert lin is not None
        W = layer.dequantize()
        for batch in (1, 2, 5):
            x = torch.randn(batch, inn)
            mag = x.abs() @ W.abs().T + bias.abs()
            for threads in (1, 2):
                y = decode.lin_apply(lin, x, threads)
                assert_close_to(y, F.linear(x, W, bias), mag)
                assert_close_to(y, layer(x), mag)


def test_sparse_model_runs_in_the_engine():
    from peakllm.runtime.linear import packed_linear

    hf = _tiny("llama")
    for i, layer in enumerate(hf.model.layers):
        for parent, name in [(layer.self_attn, "o_proj"), (layer.mlp, "up_proj"), (layer.mlp, "down_proj")]:
            out_f, in_f = getattr(parent, name).weight.shape
            pack = _sparse_packs(out_f, in_f, 32, seed=i)[1 if name == "up_proj" else 5 if name == "down_proj" else 0]
            setattr(parent, name, packed_linear(pack.kind, pack.to_tensors(), pack.metadata()))
    ids = torch.randint(1, 300, (2, 10), generator=torch.Generator().manual_seed(9))
    outs = []
    for engine in (True, False):
        rt = RuntimeModel.from_hf(hf)
        rt.use_step_engine = engine
        rt.setup_cache(2, 12)
        assert rt._step is not None
        outs.append(torch.cat([rt(ids[:, :3], 0)] + [rt(ids[:, t:t + 1], t) for t in range(3, 10)], 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5 * outs[1].abs().max().item())


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_sub1_lin_matches_the_dense_reference(sym):
    """Sub-1-bit rows through the engine's row split: bands that start inside a block of rows decode
    that block's earlier rows and drop them."""
    from test_sub1_kernel import D8, D16, random_packed

    from peakllm.kernels import sub1 as K

    for dictionary, (rows, cols, p_zero, group_size, block_rows) in [
            (D8, (37, 129, 0.9, -1, 16)), (D16, (19, 300, 0.98, 64, 8)), (D8, (64, 576, 0.92, 128, 16)),
            (D16, (5, 7, 0.3, -1, 2))]:
        packed = random_packed(rows, cols, p_zero, group_size, sym, dictionary, seed=rows, block_rows=block_rows)
        bias = torch.randn(rows)
        keep: list = []  # holds the operands the descriptor points into
        lin = decode.sub1_lin(K.operands(packed), bias, cols, rows, keep)
        W = packed.dequantize()
        for batch in (1, 3):
            x = torch.randn(batch, cols)
            for threads in (1, 2, 3):
                assert_close_to(decode.lin_apply(lin, x, threads), F.linear(x, W, bias),
                                x.abs() @ W.abs().T + bias.abs())
