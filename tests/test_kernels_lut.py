"""The lookup-table kernel (kernels/lut.cpp) against dequantize-then-matmul and its torch reference.

Exact mode (fp32 tables) must equal x @ W.T up to fp32 rounding. The default int8 tables round each entry to
half a step of its k-block's scale: the result must lie within `error_bound` of x @ W.T, and equal the torch
reference of the same quantized tables up to fp32 rounding. The scalar build must give the AVX2 build's
results bit for bit (the same integers, the same fp32 operations in the same order).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from peakllm.errors import PeakError
from peakllm.kernels import build
from peakllm.kernels import lut as L
from peakllm.kernels import lut_reference as R

# (out, in, group_size): odd widths and heights, one group a row, groups with a short last one
SHAPES = [(37, 200, 64), (13, 77, -1), (8, 16, 16), (96, 576, -1), (50, 320, 128), (3, 1000, 32)]


def random_int2(out, inn, gs, seed=0):
    g = torch.Generator().manual_seed(seed)
    ng = 1 if gs == -1 else -(-inn // gs)
    codes = torch.randint(0, 4, (out, inn), dtype=torch.uint8, generator=g)
    scales = (torch.rand(out, ng, generator=g) * 0.1 + 0.01).half()
    zeros = torch.randint(0, 4, (out, ng), dtype=torch.uint8, generator=g)
    gi = torch.arange(inn) // (inn if gs == -1 else gs)
    W = scales.float()[:, gi] * (codes.float() - zeros.float()[:, gi])
    return L.pack_intk2(codes, scales, zeros, gs), W


def random_ternary(out, inn, gs, sym, seed=0, p_zero=0.5):
    g = torch.Generator().manual_seed(seed)
    ng = 1 if gs == -1 else -(-inn // gs)
    u = torch.rand(out, inn, generator=g)
    codes = torch.ones(out, inn, dtype=torch.uint8)
    codes[u < (1 - p_zero) / 2] = 0
    codes[u > 1 - (1 - p_zero) / 2] = 2
    sn = (torch.rand(out, ng, generator=g) * 0.1 + 0.01).half()
    sp = sn.clone() if sym else (torch.rand(out, ng, generator=g) * 0.1 + 0.01).half()
    gi = torch.arange(inn) // (inn if gs == -1 else gs)
    W = torch.where(codes == 2, sp.float()[:, gi], torch.where(codes == 0, -sn.float()[:, gi], torch.zeros(())))
    return L.pack_ternary(codes, sn, sp, gs), W


def matrices():
    for i, (out, inn, gs) in enumerate(SHAPES):
        yield f"int2-{out}x{inn}g{gs}", *random_int2(out, inn, gs, seed=i)
        yield f"tsym-{out}x{inn}g{gs}", *random_ternary(out, inn, gs, True, seed=i)
        yield f"tasym-{out}x{inn}g{gs}", *random_ternary(out, inn, gs, False, seed=i)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tol(x, W):
    return 2e-6 * (x.abs() @ W.abs().T) + 1e-6


def test_pack_keeps_every_weight():
    kinds = set()
    for name, w, W in matrices():
        assert torch.equal(R.lut_dequantize(w), W), name
        kinds.add(w.kind)
    assert kinds == {L.INT2, L.TERN_SYM, L.TERN_ASYM}


@pytest.mark.parametrize("batch", [1, 2, 5, 9])
def test_exact_tables_equal_dequantize_then_matmul(batch):
    for name, w, W in matrices():
        x = torch.randn(batch, W.shape[1])
        y = L.lut_matmul(x, w, exact=True)
        assert ((y - x @ W.T).abs() <= tol(x, W)).all(), name


@pytest.mark.parametrize("batch", [1, 3, 4, 7])
def test_int8_tables_within_bound_and_equal_reference(batch):
    for name, w, W in matrices():
        x = torch.randn(batch, W.shape[1])
        y = L.lut_matmul(x, w)
        exact = x @ W.T
        bound = R.error_bound(x, w)
        assert ((y - exact).abs() <= bound).all(), name
        # the worst case adds every entry's rounding in one direction (a fraction of the outputs' size); the
        # typical error is about 0.5% of the outputs' RMS, as with int8 activations
        assert bound.mean() < exact.abs().mean(), name
        assert (y - exact).pow(2).mean().sqrt() < 0.015 * exact.pow(2).mean().sqrt(), name
        assert ((y - R.lut_matmul_ref(x, w)).abs() <= tol(x, W)).all(), name


def test_a_wrong_index_breaks_the_bound():
    _, w, W = next(matrices())
    w.qlut[0] ^= 0x0F  # rows 0-7: one plane of every other 4-column group flipped
    x = torch.randn(1, W.shape[1])
    assert not ((L.lut_matmul(x, w) - x @ W.T).abs() <= R.error_bound(x, w)).all()


def test_bf16_activations():
    w, W = random_int2(40, 256, 64)
    x = torch.randn(3, 256).bfloat16()
    assert ((L.lut_matmul(x, w, exact=True) - x.float() @ W.T).abs() <= tol(x.float(), W)).all()


def test_kblock_choice_and_padding():
    w, _ = random_int2(9, 576, -1)
    assert (w.in_pad, w.group, w.kblock) == (576, 576, 64)
    w, _ = random_int2(9, 2048, 128)
    assert (w.in_pad, w.kblock, w.n_groups) == (2048, 128, 16)
    w, _ = random_int2(9, 200, 64)  # last group of 8 columns padded to one k-block of 64
    assert (w.in_pad, w.n_groups, w.out_pad) == (256, 4, 16)


def test_rejects_bad_inputs():
    codes = torch.zeros(8, 64, dtype=torch.uint8)
    s = torch.ones(8, 2).half()
    with pytest.raises(PeakError, match="multiple of 16"):
        L.pack_intk2(codes, torch.ones(8, 3).half(), torch.ones(8, 3, dtype=torch.uint8), 24)
    with pytest.raises(PeakError, match="2-bit codes"):
        L.pack_intk2(codes + 4, s, s.to(torch.uint8), 32)
    with pytest.raises(PeakError, match="ternary codes"):
        L.pack_ternary(codes + 3, s, s, 32)
    with pytest.raises(PeakError, match=r"\[8, 2\]"):
        L.pack_ternary(codes, s[:, :1], s, 32)
    w = L.pack_ternary(codes, s, s, 32)
    with pytest.raises(PeakError, match="features"):
        L.lut_matmul(torch.randn(1, 63), w)
    w.s1 = w.s1.float()
    with pytest.raises(PeakError, match="s1"):
        L.lut_matmul(torch.randn(1, 64), w)


def test_without_compiler_uses_reference(monkeypatch):
    monkeypatch.setitem(L._fns, "lut", None)
    _, w, W = next(matrices())
    x = torch.randn(2, W.shape[1])
    assert ((L.lut_matmul(x, w, exact=True) - x @ W.T).abs() <= tol(x, W)).all()


@pytest.mark.build
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_scalar_build_is_bit_identical(tmp_path):
    """lut.cpp compiled without AVX2 runs the scalar tile; it must give the native build's floats exactly."""
    lib_path = tmp_path / "liblut_scalar.so"
    subprocess.run(["g++", "-O2", "-march=x86-64", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
                    str(build.HERE / "lut.cpp"), "-o", str(lib_path)], check=True, capture_output=True)
    scalar = L.bind(ctypes.CDLL(str(lib_path)))
    native = L.library_fns()
    assert scalar["lut_path"]() == 0
    for name, w, W in matrices():
        x = torch.randn(5, W.shape[1])
        ys = L.bind_lut(w, fns=scalar)(x)
        assert ((ys - R.lut_matmul_ref(x, w)).abs() <= tol(x, W)).all(), name
        assert ((L.bind_lut(w, True, fns=scalar)(x) - x @ W.T).abs() <= tol(x, W)).all(), name
        if native is not None:
            assert torch.equal(ys, L.bind_lut(w, fns=native)(x)), name


def test_native_build_takes_the_avx2_path_where_there_is_one():
    fns = L.library_fns()
    if fns is None:
        pytest.skip("no compiler")
    flags = open("/proc/cpuinfo").read()
    has_avx2 = all(f" {f}" in flags for f in ("avx2", "fma", "f16c"))
    assert fns["lut_path"]() == int(has_avx2)


def test_two_threads_give_the_one_thread_result():
    """Big enough for the parallel region (tables shared out by k-block, rows by tile): same floats."""
    n = torch.get_num_threads()
    try:
        for w, W in (random_int2(200, 640, 64), random_ternary(192, 576, -1, True)):
            x = torch.randn(3, W.shape[1])
            torch.set_num_threads(1)
            one = L.lut_matmul(x, w)
            torch.set_num_threads(2)
            assert torch.equal(L.lut_matmul(x, w), one)
            assert torch.equal(L.lut_matmul(x[:1], w), one[:1])
    finally:
        torch.set_num_threads(n)
