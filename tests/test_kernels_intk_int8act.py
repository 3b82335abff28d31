"""int-k kernels with int8 activations (intk_a8_impl.h) against the fp32-activation reference.

The stated bound: x is quantized per block of 32 stored columns to sx * xq with |x - sx * xq| <= sx / 2,
and the kernel's integer sums are exact, so against y = x @ W.T
    |y_int8 - y| <= 1/2 * sum_c |W[o, c]| * sx[b, block of c]   (+ fp32 rounding: 1e-5 * M as in
tests/test_kernels_intk.py). Each case also checks the kernel against the same product computed in float64
on the quantized x (ops.quantize_act_int8), to fp32 rounding: that pins the path that ran. Every
instruction-set path is built and run here: scalar, AVX2 (no VNNI) and the machine's own (-march=native).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from peakllm.errors import PeakError
from peakllm.kernels import build, decode, ops
from peakllm.kernels import reference as ref
from peakllm.runtime.linear import INTK_ACT_ENV, IntKLinear
from test_kernels_intk import assert_close_to, magnitude, random_intk

# out not a multiple of 4, in with whole and partial chunks of 8 blocks, several groups, one group per row
SHAPES = [(1, 32, 32), (7, 96, 32), (13, 576, 32), (9, 256, 64), (5, 320, 96), (11, 512, 128), (6, 160, -1),
          (3, 1024, 256)]
BATCHES = (1, 2, 3, 4, 5, 8)


def stored(x, perm):
    return x if perm is None else x[:, perm.long()]


def int8_bound(x, W, perm):
    """1/2 * sum_c |W[o, c]| * sx[b, block of c], blocks over the stored column order ([B, out])."""
    xs, Ws = stored(x, perm), stored(W, perm)
    _, sx = ops.quantize_act_int8(xs)
    per_col = sx.repeat_interleave(32, dim=1)  # [B, in]
    return 0.5 * per_col.double() @ Ws.abs().double().T


def exact_int8_product(x, W, perm):
    """The product the int8 path computes, in float64 on the quantized x."""
    xs, Ws = stored(x, perm), stored(W, perm)
    xq, sx = ops.quantize_act_int8(xs)
    xhat = (xq.double().reshape(xs.shape[0], -1, 32) * sx.double().unsqueeze(-1)).reshape(xs.shape)
    return xhat @ Ws.double().T


def check_case(bits, out, inn, group_size, act_order, seed):
    codes, qweight, scales, zeros, g_idx = random_intk(out, inn, bits, group_size, act_order, seed=seed)
    W = ref.dequantize_intk(qweight, scales, zeros, bits, inn, group_size, g_idx)
    starts, perm = ops.intk_groups(inn, group_size, g_idx)
    assert ops.int8_act_applies(bits, starts)
    q = qweight if perm is None else ops.permute_columns(qweight, bits, inn, perm)
    for batch in BATCHES:
        x = torch.randn(batch, inn) * torch.rand(batch, inn) * 3  # uneven magnitudes across blocks
        y = ops.intk_matmul(x, q, scales, zeros, bits, starts, perm, int8_act=True)
        mag = magnitude(x, codes, scales, zeros, group_size, g_idx)
        err = (y.double() - ref.matmul_ref(x, W).double()).abs()
        allowed = int8_bound(x, W, perm) + 1e-5 * mag.double() + 1e-6
        assert bool((err <= allowed).all()), f"int8 error {err.max():.3g} above the bound (bits {bits}, B {batch})"
        assert_close_to(y, exact_int8_product(x, W, perm).float(), mag)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("out,inn,group_size", SHAPES)
def test_int8_act_within_bound(bits, out, inn, group_size):
    for act_order in (False, True):
        check_case(bits, out, inn, group_size, act_order, seed=out + inn + bits)


def test_int8_act_path_falls_back_where_it_does_not_apply():
    """3-bit codes and groups that are not whole 32-column blocks take the fp32-activation path."""
    for bits, out, inn, group_size in [(3, 7, 96, 32), (4, 5, 96, 16), (4, 6, 100, 32), (8, 4, 40, 7)]:
        _, qweight, scales, zeros, _ = random_intk(out, inn, bits, group_size, False, seed=inn)
        starts, _ = ops.intk_groups(inn, group_size)
        assert not ops.int8_act_applies(bits, starts)
        x = torch.randn(3, inn)
        assert torch.equal(ops.intk_matmul(x, qweight, scales, zeros, bits, starts, int8_act=True),
                           ops.intk_matmul(x, qweight, scales, zeros, bits, starts))
    # an empty group (act-order g_idx that never names group 1): eight blocks could span nine groups
    _, qweight, scales, zeros, _ = random_intk(5, 320, 4, 32, False, seed=3)
    g_idx = torch.arange(320, dtype=torch.int32) // 32
    g_idx[g_idx == 1] = 0
    starts, perm = ops.intk_groups(320, 32, g_idx)
    assert not ops.int8_act_applies(4, starts)
    x = torch.randn(2, 320)
    assert torch.equal(ops.intk_matmul(x, qweight, scales, zeros, 4, starts, perm, int8_act=True),
                       ops.intk_matmul(x, qweight, scales, zeros, 4, starts, perm))


def test_int8_act_zero_and_bf16_inputs():
    codes, qweight, scales, zeros, _ = random_intk(9, 128, 4, 32, False, seed=5)
    starts, _ = ops.intk_groups(128, 32)
    x = torch.randn(2, 128)
    x[0, 32:64] = 0  # an all-zero block: scale 0, codes 0
    y = ops.intk_matmul(x, qweight, scales, zeros, 4, starts, int8_act=True)
    W = ref.dequantize_intk(qweight, scales, zeros, 4, 128, 32)
    assert_close_to(y, exact_int8_product(x, W, None).float(), magnitude(x, codes, scales, zeros, 32, None))
    xb = torch.randn(3, 128).bfloat16()
    yb = ops.intk_matmul(xb, qweight, scales, zeros, 4, starts, int8_act=True)
    assert torch.equal(yb, ops.intk_matmul(xb.float(), qweight, scales, zeros, 4, starts, int8_act=True))


def test_int8_act_rounds_half_to_even_as_the_reference():
    """Ties x / sx = k + 1/2 are common near |x| = max (fp32 spacing 2^-17 there): C and torch must agree."""
    codes, qweight, scales, zeros, _ = random_intk(5, 64, 4, 32, False, seed=7)
    starts, _ = ops.intk_groups(64, 32)
    x = torch.zeros(2, 64)
    x[:, 0] = 127.0  # sx = 1: x / sx = x
    x[:, 1:9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, -126.5])
    x[:, 32:] = torch.randn(2, 32)
    xq, _ = ops.quantize_act_int8(x)
    assert xq[0, 1:9].tolist() == [0, 2, 2, 0, -2, -2, 126, -126]
    W = ref.dequantize_intk(qweight, scales, zeros, 4, 64, 32)
    y = ops.intk_matmul(x, qweight, scales, zeros, 4, starts, int8_act=True)
    assert_close_to(y, exact_int8_product(x, W, None).float(), magnitude(x, codes, scales, zeros, 32, None))


def _build_variant(tmp_path, name, flags):
    lib_path = tmp_path / f"libintk_{name}.so"
    proc = subprocess.run(["g++", "-O2", *flags, "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=fast",
                           str(build.HERE / "intk.cpp"), "-o", str(lib_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ops.bind(ctypes.CDLL(str(lib_path)), "intk")


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        return set()


# (name, g++ flags, path intk_a8_path must report, cpu flags needed to run it)
VARIANTS = [("scalar", ["-march=x86-64"], 0, set()),
            ("avx2", ["-march=haswell"], 1, {"avx2", "fma", "f16c"}),
            ("avx512vnni", ["-march=icelake-server"], 2, {"avx512_vnni", "avx512vl", "avx512bw", "avx2", "f16c"}),
            ("avxvnni", ["-march=alderlake"], 3, {"avx_vnni", "avx2", "fma", "f16c"})]


@pytest.mark.build
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("name,flags,path,needs", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_every_instruction_set_path(tmp_path, monkeypatch, name, flags, path, needs):
    fns = _build_variant(tmp_path, name, flags)  # every variant must compile, wherever the tests run
    assert fns["intk_a8_path"]() == path  # a plain return: safe to call even without the instructions
    if not needs <= _cpu_flags():
        pytest.skip(f"built; not run: this CPU lacks {sorted(needs - _cpu_flags())}")
    monkeypatch.setitem(ops._fns, "intk", fns)
    for bits in (2, 4, 8):
        for out, inn, group_size in [(7, 96, 32), (13, 576, 32), (5, 320, 96), (6, 160, -1)]:
            check_case(bits, out, inn, group_size, act_order=bits == 4, seed=out * bits)


def test_native_build_reports_its_path():
    fns = ops.library_fns("intk")
    if fns is None:
        pytest.skip("no compiler")
    flags = _cpu_flags()
    expected = 2 if {"avx512_vnni", "avx512vl"} <= flags else 3 if "avx_vnni" in flags else 1 if "avx2" in flags else 0
    assert fns["intk_a8_path"]() == expected


def test_reference_path_without_kernels(monkeypatch):
    """Without a compiler the pure-torch path computes the same int8 product."""
    monkeypatch.setitem(ops._fns, "intk", None)
    check_case(4, 7, 96, 32, act_order=True, seed=1)


@pytest.mark.skipif(not decode.available(torch.float32), reason="decode engine not built")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_decode_engine_int8_lin_equals_the_op(bits):
    """decode.cpp's LIN_INTK branch with act_bits = 8 runs the op's arithmetic (3 bits: the fp32 path)."""
    for out, inn, group_size in [(13, 576, 32), (9, 256, 64), (6, 100, 32)]:
        _, qweight, scales, zeros, g_idx = random_intk(out, inn, bits, group_size, True, seed=out)
        starts, perm = ops.intk_groups(inn, group_size, g_idx)
        q = ops.permute_columns(qweight, bits, inn, perm)
        bias = torch.randn(out)
        lin = decode.intk_lin(q, scales, zeros, bits, starts, perm, bias, inn, out, [], int8_act=True)
        for batch in (1, 3, 8):
            x = torch.randn(batch, inn)
            y_op = ops.intk_matmul(x, q, scales, zeros, bits, starts, perm, int8_act=True) + bias
            for threads in (1, 2, 3):
                y = decode.lin_apply(lin, x, threads)
                if bits == 3:  # the fp32-activation path, whose tiles depend on the row split
                    torch.testing.assert_close(y, y_op, rtol=1e-5, atol=1e-5)
                else:  # the int8 path computes each row alone: the same numbers whatever the split
                    assert torch.equal(y, y_op)


def test_intk_linear_option(monkeypatch):
    _, qweight, scales, zeros, _ = random_intk(9, 128, 4, 32, False, seed=2)
    monkeypatch.setenv(INTK_ACT_ENV, "int8")
    layer = IntKLinear(128, 9, 4, 32, qweight, scales, zeros)
    assert layer.int8_act
    starts, _ = ops.intk_groups(128, 32)
    x = torch.randn(2, 128)
    assert torch.equal(layer(x), ops.intk_matmul(x, qweight, scales, zeros, 4, starts, int8_act=True))
    layer.set_int8_act(False)
    assert torch.equal(layer(x), ops.intk_matmul(x, qweight, scales, zeros, 4, starts))
    monkeypatch.setenv(INTK_ACT_ENV, "int4")
    with pytest.raises(PeakError, match=INTK_ACT_ENV):
        IntKLinear(128, 9, 4, 32, qweight, scales, zeros)


@pytest.mark.skipif(not decode.available(torch.float32), reason="decode engine not built")
def test_engine_equals_op_by_op_path_with_int8_act(monkeypatch):
    from test_kernels_decode import _packed_tiny

    from peakllm.runtime.model import RuntimeModel

    monkeypatch.setenv(INTK_ACT_ENV, "int8")
    hf = _packed_tiny()
    assert all(m.int8_act for m in hf.modules() if isinstance(m, IntKLinear))
    ids = torch.randint(1, 300, (2, 10), generator=torch.Generator().manual_seed(3))
    outs = []
    for engine in (True, False):
        rt = RuntimeModel.from_hf(hf, torch.float32)
        rt.use_step_engine = engine
        rt.setup_cache(2, 12)
        assert rt._step is not None
        outs.append(torch.cat([rt(ids[:, :4], 0)] + [rt(ids[:, t:t + 1], t) for t in range(4, 10)], 1))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5 * outs[1].abs().max().item()
    monkeypatch.setenv(INTK_ACT_ENV, "f32")
    rt = RuntimeModel.from_hf(_packed_tiny(), torch.float32)
    rt.setup_cache(2, 12)
    f32 = torch.cat([rt(ids[:, :4], 0)] + [rt(ids[:, t:t + 1], t) for t in range(4, 10)], 1)
    assert not torch.equal(f32[:, 4:], outs[0][:, 4:])  # the decode steps did run on int8 activations


def test_int8_is_the_default_and_the_cli_chooses(monkeypatch):
    """Unset, $PEAKLLM_INTK_ACT means int8 (what measured best); `--act` sets it for one command and the old
    `--int8-act` flag still means int8."""
    import argparse

    from peakllm.cli.common import add_act_option, apply_act
    from peakllm.runtime.linear import int8_act_default

    monkeypatch.delenv(INTK_ACT_ENV, raising=False)
    assert int8_act_default()
    _, qweight, scales, zeros, _ = random_intk(9, 128, 4, 32, False, seed=2)
    assert IntKLinear(128, 9, 4, 32, qweight, scales, zeros).int8_act
    parser = argparse.ArgumentParser()
    add_act_option(parser)
    assert parser.parse_args([]).act is None
    assert parser.parse_args(["--int8-act"]).act == "int8"
    apply_act(parser.parse_args(["--act", "f32"]).act)
    assert not int8_act_default()
    apply_act(None)  # no option: the environment decides
    assert not int8_act_default()
    apply_act("int8")
    assert int8_act_default()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rows_taken_over_by_other_threads_equal_the_op(bits):
    """The decode step's row claims: a thread done with its band takes chunks from the back of the others'.
    Forced here by holding one thread back until the others are done (they take its whole band), and run
    freely; every row must still equal the op's exactly (3 bits: the fp32 path, which keeps its static
    bands)."""
    for out, inn, group_size in [(1000, 576, 32), (37, 256, 64), (500, 2048, 128)]:
        _, qweight, scales, zeros, g_idx = random_intk(out, inn, bits, group_size, True, seed=out + bits)
        starts, perm = ops.intk_groups(inn, group_size, g_idx)
        q = ops.permute_columns(qweight, bits, inn, perm)
        bias = torch.randn(out)
        lin = decode.intk_lin(q, scales, zeros, bits, starts, perm, bias, inn, out, [], int8_act=True)
        for batch in (1, 3):
            x = torch.randn(batch, inn)
            y_op = ops.intk_matmul(x, q, scales, zeros, bits, starts, perm, int8_act=True) + bias
            for threads, idle in [(2, -1), (2, 0), (2, 1), (3, 1), (3, 2)]:
                y = decode.lin_apply_claims(lin, x, threads, idle)
                if bits == 3:
                    torch.testing.assert_close(y, y_op, rtol=1e-5, atol=1e-5)
                else:
                    assert torch.equal(y, y_op), (out, inn, bits, batch, threads, idle)
