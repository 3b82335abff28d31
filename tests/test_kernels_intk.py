"""The int-k kernels (intk.cpp) against their pure-torch reference, on random codes and activations.

Tolerance: the kernel splits each group's sum into sum(q * x) - zero * sum(x) and accumulates in a
different order than torch, so results agree to a few fp32 ulps of the magnitude
M = |x| @ (scale * (q + zero)).T; bf16 activations are compared with the reference on the same
bf16-rounded inputs (the kernel converts them exactly).
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess

import pytest
import torch

from peakllm.errors import PeakError
from peakllm.kernels import build, ops
from peakllm.kernels import reference as ref


def random_intk(out, inn, bits, group_size, act_order, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_groups = math.ceil(inn / (inn if group_size == -1 else group_size))
    codes = torch.randint(0, 2**bits, (out, inn), dtype=torch.uint8, generator=g)
    scales = ((torch.rand(out, n_groups, generator=g) + 0.5) / 2**bits).half()
    zeros = torch.randint(0, 2**bits, (out, n_groups), dtype=torch.uint8, generator=g)
    g_idx = None
    if act_order:  # groups of group_size columns formed in a random column order, as GPTQ's act-order does
        size = inn if group_size == -1 else group_size
        g_idx = torch.empty(inn, dtype=torch.int32)
        g_idx[torch.randperm(inn, generator=g)] = (torch.arange(inn) // size).to(torch.int32)
    return codes, ref.pack_bitstream(codes, bits), scales, zeros, g_idx


def magnitude(x, codes, scales, zeros, group_size, g_idx):
    groups = ref.column_groups(codes.shape[1], group_size, g_idx)
    big = scales.float()[:, groups] * (codes.float() + zeros.float()[:, groups])
    return x.float().abs() @ big.T


def assert_close_to(y, y_ref, mag):
    err = (y - y_ref).abs()
    bound = 1e-5 * mag + 1e-6
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, max allowed {bound.min().item():.3g}"


def run_kernel(x, qweight, scales, zeros, bits, inn, group_size, g_idx):
    starts, perm = ops.intk_groups(inn, group_size, g_idx)
    q = qweight if perm is None else ops.permute_columns(qweight, bits, inn, perm)
    return ops.intk_matmul(x, q, scales, zeros, bits, starts, perm)


def test_pack_bitstream_follows_the_design_bit_order():
    codes4 = torch.tensor([[1, 2, 3, 4, 15]], dtype=torch.uint8)
    assert ref.pack_bitstream(codes4, 4).tolist() == [[1 | 2 << 4, 3 | 4 << 4, 15]]
    codes2 = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert ref.pack_bitstream(codes2, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]
    codes3 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes3[0]))
    assert ref.pack_bitstream(codes3, 3).tolist() == [[word & 255, word >> 8 & 255, word >> 16]]
    for bits in (2, 3, 4, 8):
        codes = torch.randint(0, 2**bits, (3, 37), dtype=torch.uint8)
        assert torch.equal(ref.unpack_bitstream(ref.pack_bitstream(codes, bits), bits, 37), codes.long())


def test_reference_matches_formats_bitpack():
    bitpack = pytest.importorskip("peakllm.formats.bitpack")
    for bits in (2, 3, 4, 8):
        codes = torch.randint(0, 2**bits, (5, 43), dtype=torch.uint8)
        assert torch.equal(bitpack.pack_bits(codes, bits), ref.pack_bitstream(codes, bits))


SHAPES = [(1, 32, 32), (7, 100, 32), (33, 576, 64), (16, 130, -1), (20, 256, 128), (9, 77, 16), (48, 1536, 128),
          (5, 96, 24), (3, 40, 7)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("out,inn,group_size", [s if s[0] * s[1] < 5000 else pytest.param(*s, marks=pytest.mark.slow)
                                                for s in SHAPES])  # make test-fast: the small and odd shapes
def test_intk_matmul_matches_reference(bits, out, inn, group_size):
    for act_order in (False, True):
        codes, qweight, scales, zeros, g_idx = random_intk(out, inn, bits, group_size, act_order, seed=out + inn)
        W = ref.dequantize_intk(qweight, scales, zeros, bits, inn, group_size, g_idx)
        starts, perm = ops.intk_groups(inn, group_size, g_idx)
        q = qweight if perm is None else ops.permute_columns(qweight, bits, inn, perm)
        for batch in (1, 2, 3, 5, 8, 17, 32):
            x = torch.randn(batch, inn)
            mag = magnitude(x, codes, scales, zeros, group_size, g_idx)
            assert_close_to(ops.intk_matmul(x, q, scales, zeros, bits, starts, perm), ref.matmul_ref(x, W), mag)
        xb = torch.randn(4, inn).bfloat16()
        assert_close_to(ops.intk_matmul(xb, q, scales, zeros, bits, starts, perm), ref.matmul_ref(xb.float(), W),
                        magnitude(xb, codes, scales, zeros, group_size, g_idx))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_intk_dequantize_is_exact(bits):
    for out, inn, group_size in SHAPES[:6]:
        _, qweight, scales, zeros, g_idx = random_intk(out, inn, bits, group_size, act_order=True)
        starts, perm = ops.intk_groups(inn, group_size, g_idx)
        sorted_codes = ops.permute_columns(qweight, bits, inn, perm)
        W = ref.dequantize_intk(qweight, scales, zeros, bits, inn, group_size, g_idx)[:, perm.long()]
        assert torch.equal(ops.intk_dequantize(sorted_codes, scales, zeros, bits, starts, inn), W)
        Wb = ops.intk_dequantize(sorted_codes, scales, zeros, bits, starts, inn, torch.bfloat16)
        assert torch.equal(Wb, W.bfloat16())


def test_fallback_without_kernels(monkeypatch):
    """PEAKLLM_NO_KERNELS=1: one warning, then the reference path gives the same results."""
    monkeypatch.setenv("PEAKLLM_NO_KERNELS", "1")
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_warned", set())
    monkeypatch.setattr(ops, "_fns", {})
    codes, qweight, scales, zeros, g_idx = random_intk(12, 80, 4, 32, act_order=True)
    x = torch.randn(3, 80)
    with pytest.warns(RuntimeWarning, match="PEAKLLM_NO_KERNELS"):
        y = run_kernel(x, qweight, scales, zeros, 4, 80, 32, g_idx)
    assert ops._fns["intk"] is None
    W = ref.dequantize_intk(qweight, scales, zeros, 4, 80, 32, g_idx)
    assert_close_to(y, ref.matmul_ref(x, W), magnitude(x, codes, scales, zeros, 32, g_idx))


@pytest.mark.build
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_scalar_build_matches_reference(tmp_path, monkeypatch):
    """The same source compiled without AVX2 exercises the scalar code that other CPUs run."""
    lib_path = tmp_path / "libintk_scalar.so"
    src = build.HERE / "intk.cpp"
    subprocess.run(["g++", "-O2", "-march=x86-64", "-fopenmp", "-shared", "-fPIC", "-std=c++17", str(src), "-o",
                    str(lib_path)], check=True, capture_output=True)
    monkeypatch.setitem(ops._fns, "intk", ops.bind(ctypes.CDLL(str(lib_path)), "intk"))
    for bits in (3, 4):
        codes, qweight, scales, zeros, g_idx = random_intk(21, 200, bits, 32, act_order=True)
        W = ref.dequantize_intk(qweight, scales, zeros, bits, 200, 32, g_idx)
        x = torch.randn(6, 200)
        assert_close_to(run_kernel(x, qweight, scales, zeros, bits, 200, 32, g_idx), ref.matmul_ref(x, W),
                        magnitude(x, codes, scales, zeros, 32, g_idx))


def test_intk_rejects_bad_inputs():
    _, qweight, scales, zeros, _ = random_intk(8, 64, 4, 32, act_order=False)
    starts, _ = ops.intk_groups(64, 32)
    x = torch.randn(2, 64)
    with pytest.raises(PeakError, match="float32 or bfloat16"):
        ops.intk_matmul(x.half(), qweight, scales, zeros, 4, starts)
    with pytest.raises(PeakError, match="features"):
        ops.intk_matmul(torch.randn(2, 63), qweight, scales, zeros, 4, starts)
    with pytest.raises(PeakError, match="qweight"):
        ops.intk_matmul(x, qweight[:, :-1], scales, zeros, 4, starts)
    with pytest.raises(PeakError, match="scales"):
        ops.intk_matmul(x, qweight, scales.float(), zeros, 4, starts)
    with pytest.raises(PeakError, match="contiguous"):
        ops.intk_matmul(torch.randn(64, 2).T, qweight, scales, zeros, 4, starts)
    with pytest.raises(PeakError, match="bits"):
        ops.intk_matmul(x, qweight, scales, zeros, 5, starts)
    bad_starts = torch.tensor([0, 40, 64], dtype=torch.int32)
    bad_starts[1] = 70  # groups must not run backwards
    with pytest.raises(PeakError, match="intk_gemm"):
        ops.intk_matmul(x, qweight, scales, zeros, 4, bad_starts)
    with pytest.raises(PeakError, match="intk_dequant"):
        ops.intk_dequantize(qweight, scales, zeros, 4, bad_starts, 64)
    with pytest.raises(PeakError, match="g_idx"):
        ops.intk_groups(64, 32, torch.full((64,), 5, dtype=torch.int32))
