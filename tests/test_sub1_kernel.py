"""The sub-1-bit kernel against decode-then-matmul, its fallback, and Sub1Linear.

Tolerance: the kernel sums in a different order (the gather path in 8 interleaved lanes, the fused
batch-1 path word by word into 4 rotating accumulators, and for asymmetric scales through sum+ and sum-
recombined), so each output may differ from the fp64 reference by a few fp32 ulps of sum_c |w_c x_c|:
a sum of n terms in any order is within (n - 1) eps of sum |terms|, and fp32 eps is 1.2e-7 while rows
here have at most ~2000 nonzero terms, of which the fp64 reference shows ~1e-7 in practice; we allow
1e-5 of that magnitude.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peakllm.errors import PeakError
from peakllm.formats.sub1 import PackedSub1
from peakllm.formats.sub1_code import Sub1Dictionary
from peakllm.kernels import sub1 as K
from peakllm.runtime.sub1 import Sub1Linear

D8 = Sub1Dictionary(8, 225, 128)
D16 = Sub1Dictionary(16, 230, 128)
RTOL = 1e-5

needs_kernel = pytest.mark.skipif(not K.available(), reason="no C++ compiler: the kernel cannot be built")


def random_packed(rows, cols, p_zero, group_size, sym, dictionary, seed, block_rows=16):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=g)
    codes = torch.ones(rows, cols, dtype=torch.uint8)
    codes[u < (1 - p_zero) / 2] = 0
    codes[u > 1 - (1 - p_zero) / 2] = 2
    codes[rows // 2] = 1  # one row all zero
    n_groups = 1 if group_size == -1 else math.ceil(cols / group_size)
    s_pos = (torch.rand(rows, n_groups, generator=g) + 0.1).half()
    s_neg = s_pos if sym else (torch.rand(rows, n_groups, generator=g) + 0.1).half()
    return PackedSub1.encode(codes, s_neg, s_pos, group_size, dictionary, block_rows=block_rows)


def check(packed, x, W=None, n_threads=1):
    # one thread by default: on a shared, oversubscribed machine every 2-thread region can wait a time slice
    y = K.sub1_matmul(x, packed, n_threads=n_threads)
    W = packed.dequantize().double() if W is None else W
    ref = x.double() @ W.T
    scale = x.double().abs() @ W.abs().T + 1e-30
    assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], packed.out_features)
    err = ((y.double() - ref).abs() / scale).max().item()
    assert err < RTOL, err


CASES = [  # rows, cols, p_zero, group_size
    (1, 1, 0.5, -1), (5, 7, 0.3, -1), (40, 129, 0.9, -1), (19, 300, 0.98, 64), (33, 250, 0.6, 1),
    (64, 576, 0.92, -1), (24, 192, 0.8, 128), (3, 2000, 0.95, 100),
]


@needs_kernel
@pytest.mark.parametrize("dictionary", [D8, D16], ids=["8bit", "16bit"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}_p{c[2]}_g{c[3]}" for c in CASES])
def test_kernel_matches_dequantize_then_matmul(case, sym, dictionary):
    rows, cols, p_zero, group_size = case
    packed = random_packed(rows, cols, p_zero, group_size, sym, dictionary, seed=rows + cols, block_rows=5)
    g = torch.Generator().manual_seed(cols)
    W = packed.dequantize().double()
    for batch in range(1, 33):
        check(packed, torch.randn(batch, cols, generator=g), W, n_threads=2 if batch in (1, 9, 32) else 1)


DENSITY_SHAPES = [(1, 1), (3, 5), (37, 129), (17, 1001), (130, 67)]  # rows, cols


@needs_kernel
@pytest.mark.parametrize("sym_bits", [8, 16])
@pytest.mark.parametrize("p_zero", [0.0, 0.3, 0.7, 0.9, 0.97, 1.0])
def test_fused_and_gather_paths_match_the_reference_at_every_density(p_zero, sym_bits):
    """Batch 1 with one group per row runs the fused path (kernels/sub1_fused.h), other batches gather;
    both, and the gather path forced at batch 1, equal dequantize-then-matmul from all-nonzero to all-zero
    codes, on odd shapes, with dictionaries fitted to each matrix (so the fused entries' slot count K runs
    from 1 to 6) and with fixed ones, symmetric and asymmetric scales, one and two threads."""
    ks = set()
    for i, (rows, cols) in enumerate(DENSITY_SHAPES):
        for sym in (True, False):
            base = random_packed(rows, cols, p_zero, -1, sym, D8, seed=100 + i, block_rows=1 + i * 4)
            codes = base.decode()
            for dictionary in (Sub1Dictionary.fit(codes, sym_bits), D8 if sym_bits == 8 else D16):
                packed = PackedSub1.encode(codes, base.scale_neg, base.scale_pos, -1, dictionary,
                                           block_rows=base.block_rows)
                W = packed.dequantize().double()
                fused, gather = K.operands(packed), K.operands(packed, fused=False)
                ks.add(int(fused.matrix.fused_k))
                g = torch.Generator().manual_seed(rows * cols)
                for batch in (1, 2, 5):
                    x = torch.randn(batch, cols, generator=g)
                    ref = x.double() @ W.T
                    scale = x.double().abs() @ W.abs().T + 1e-30
                    for ops in (fused, gather):
                        for threads in (1, 2):
                            y = K.sub1_matmul(x, packed, ops, n_threads=threads)
                            assert ((y.double() - ref).abs() / scale).max().item() < RTOL
    if p_zero == 0.0:
        assert len(ks) >= 2, ks  # the sweep reaches more than one entry layout


@needs_kernel
@pytest.mark.parametrize("p_zero", [0.0, 0.5, 0.95, 1.0])
def test_fused_path_in_the_decode_engine_row_split(p_zero):
    """The engine's bands (rows_b1) start inside blocks: the fused path skips the rows before the band."""
    from peakllm.kernels import decode

    for rows, cols, block_rows, dictionary in ((37, 129, 16, D8), (23, 77, 5, D16), (9, 300, 4, None)):
        for sym in (True, False):
            base = random_packed(rows, cols, p_zero, -1, sym, D8, seed=rows, block_rows=block_rows)
            codes = base.decode()
            packed = PackedSub1.encode(codes, base.scale_neg, base.scale_pos, -1,
                                       dictionary or Sub1Dictionary.fit(codes, 8), block_rows=block_rows)
            keep: list = []
            lin = decode.sub1_lin(K.operands(packed), None, cols, rows, keep)
            W = packed.dequantize().double()
            x = torch.randn(2, cols, generator=torch.Generator().manual_seed(cols))
            for threads in (1, 2, 3):
                y = decode.lin_apply(lin, x, threads)
                err = ((y.double() - x.double() @ W.T).abs() / (x.double().abs() @ W.abs().T + 1e-30)).max()
                assert err < RTOL, (rows, cols, threads, err)


@needs_kernel
def test_equal_scales_run_symmetric_with_the_same_products():
    """encode stores equal scales as sym; a container written with sym false and equal scales runs the
    symmetric kernels too (0.5 (p + p) s + 0.5 (p - p) a = p s exactly)."""
    import dataclasses

    packed = random_packed(40, 200, 0.9, -1, True, D8, seed=11)
    asym = dataclasses.replace(packed, sym=False, scale_neg=packed.scale_pos.clone())
    assert K.operands(asym).scale_neg is None
    x = torch.randn(3, 200)
    assert torch.equal(K.sub1_matmul(x, asym), K.sub1_matmul(x, packed))


@needs_kernel
def test_kernel_batches_beyond_32_and_leading_dims():
    packed = random_packed(48, 100, 0.85, 32, False, D8, seed=1)
    g = torch.Generator().manual_seed(2)
    for batch in (33, 64, 70):
        check(packed, torch.randn(batch, 100, generator=g))
    check(packed, torch.randn(2, 3, 100, generator=g))
    check(packed, torch.randn(100, generator=g))
    assert K.sub1_matmul(torch.randn(0, 100), packed).shape == (0, 48)


@needs_kernel
def test_kernel_thread_counts_agree():
    packed = random_packed(256, 512, 0.9, -1, True, D16, seed=3)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(4))
    one = K.sub1_matmul(x, packed, n_threads=1)
    two = K.sub1_matmul(x, packed, n_threads=2)
    assert torch.equal(one, two)  # rows are never split between threads, so sums are bit-identical


def test_kernel_takes_bf16_activations():
    packed = random_packed(16, 64, 0.8, -1, True, D8, seed=5)
    x = torch.randn(3, 64).bfloat16()
    assert torch.allclose(K.sub1_matmul(x, packed), K.sub1_matmul(x.float(), packed))


def test_wrong_width_is_peak_error():
    packed = random_packed(8, 20, 0.8, -1, True, D8, seed=6)
    with pytest.raises(PeakError):
        K.sub1_matmul(torch.randn(1, 21), packed)


def test_fallback_without_kernel_is_the_reference(monkeypatch):
    packed = random_packed(20, 70, 0.9, 16, False, D8, seed=7)
    x = torch.randn(5, 70)
    fast = K.sub1_matmul(x, packed)
    monkeypatch.setattr(K, "_kernel", lambda: None)
    slow = K.sub1_matmul(x, packed)
    assert torch.equal(slow, K.sub1_reference(x, packed))
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5)


def test_sub1_linear_forward():
    packed = random_packed(30, 90, 0.9, -1, False, D8, seed=8)
    bias = torch.randn(30)
    layer = Sub1Linear(packed, bias)
    assert set(dict(layer.named_buffers())) == {"stream", "block_offsets", "scale_pos", "scale_neg", "bias"}
    x = torch.randn(2, 5, 90)
    ref = F.linear(x.double(), packed.dequantize().double(), bias.double())
    y = layer(x)
    assert y.shape == (2, 5, 30) and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(PeakError):
        layer(torch.randn(2, 91))
    with pytest.raises(PeakError):
        Sub1Linear(packed, torch.randn(31))


@pytest.mark.build
def test_portable_build_without_avx2_agrees(tmp_path):
    """The scalar fallback (machines without AVX2) computes the same products as the AVX2 path."""
    import ctypes
    import shutil
    import subprocess

    from peakllm.kernels.build import HERE

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++")
    lib_path = tmp_path / "libsub1_portable.so"
    flags = ["-O2", "-march=x86-64", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    subprocess.run([cxx, *flags, str(HERE / "sub1.cpp"), "-o", str(lib_path)], check=True, capture_output=True)
    fn = ctypes.CDLL(str(lib_path)).sub1_matmul_f32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    cases = [(D8, -1, True, 0.85), (D16, 32, False, 0.85), (D8, 7, False, 0.85), (D16, -1, False, 0.9),
             (Sub1Dictionary(8, 3, 128), -1, False, 0.0), (D8, -1, True, 1.0)]  # -1: the fused path at batch 1
    for dictionary, group_size, sym, p_zero in cases:
        packed = random_packed(21, 100, p_zero, group_size, sym, dictionary, seed=9)
        W = packed.dequantize().double()
        for ops in (K.operands(packed), K.operands(packed, fused=False)):
            for batch in (1, 3, 17):
                x = torch.randn(batch, 100, generator=torch.Generator().manual_seed(batch))
                y = torch.empty(batch, 21)
                assert fn(ctypes.addressof(ops.matrix), x.data_ptr(), batch, y.data_ptr(), 1) == 0
                ref = x.double() @ W.T
                assert ((y.double() - ref).abs() / (x.double().abs() @ W.abs().T + 1e-30)).max() < RTOL
