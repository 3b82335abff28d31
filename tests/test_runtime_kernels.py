"""The compiled dense matvec and fused decode helpers against plain torch on random data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peakllm.kernels import dense

pytestmark = pytest.mark.skipif(not dense.available(), reason="C++ kernels could not be built")

# Shapes not divisible by the SIMD widths (16 / 8 lanes) or by the 4-row blocks.
SHAPES = [(1, 1, 1), (1, 7, 33), (3, 130, 77), (2, 4, 16), (5, 513, 129), (8, 61, 1000), (1, 1030, 576)]


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_linear_matches_f_linear(M, N, K, wdtype, xdtype, with_bias):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    W = torch.randn(N, K, generator=g).to(wdtype)
    x = torch.randn(M, K, generator=g).to(xdtype)
    bias = torch.randn(N, generator=g) if with_bias else None
    y = dense.dense_linear(x, W, bias)
    assert y.dtype == xdtype and y.shape == (M, N)
    # Reference in float64 on the same (rounded) inputs; the kernel accumulates in fp32.
    ref = F.linear(x.double(), W.double(), None if bias is None else bias.double())
    tol = 1e-5 * K**0.5 * (ref.abs().max().item() + 1)
    if xdtype == torch.bfloat16:  # only the output rounding differs
        tol = 2 * 2**-8 * ref.abs().max().item() + tol
    assert (y.double() - ref).abs().max().item() <= tol


def test_dense_linear_batched_leading_dims_and_fallback_rows():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(45, 70, generator=g)
    for shape in [(2, 3, 70), (dense.MAX_ROWS + 5, 70)]:  # 6 rows via the kernel; more via torch
        x = torch.randn(*shape, generator=g)
        torch.testing.assert_close(dense.dense_linear(x, W), F.linear(x, W), rtol=1e-5, atol=1e-5)


def test_reference_matches_kernel_in_bf16_weights():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(37, 91, generator=g).to(torch.bfloat16)
    x = torch.randn(2, 91, generator=g)
    torch.testing.assert_close(dense.dense_linear(x, W), dense.dense_reference(x, W), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rmsnorm_and_silu_mul(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 50, generator=g).to(dtype)
    delta = torch.randn(3, 1, 50, generator=g).to(dtype)
    w = torch.randn(50, generator=g).to(dtype)
    expect_x = x + delta
    h = expect_x.float()
    expect = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)  # HF's rounding points
    x_inout = x.clone()
    out = dense.add_rmsnorm(x_inout, delta, w, 1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x_inout, expect_x, rtol=tol, atol=tol)
    torch.testing.assert_close(out, expect, rtol=tol, atol=tol)
    gate, up = torch.randn(2, 77, generator=g).to(dtype), torch.randn(2, 77, generator=g).to(dtype)
    torch.testing.assert_close(dense.silu_mul(gate, up), F.silu(gate) * up, rtol=tol, atol=tol)
    gelu = F.gelu(gate.float(), approximate="tanh").to(dtype) * up  # GeGLU, rounded where HF rounds
    torch.testing.assert_close(dense.gated_act(gate, up, dense.ACT_GELU_TANH), gelu, rtol=tol, atol=tol)


@pytest.mark.parametrize("window", [0, 5, 18, 40])  # 5: the last 5 keys; 18 = pos + 1 and 40: all of them
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attn_decode_matches_sdpa(qk_norm, window):
    g = torch.Generator().manual_seed(4)
    B, H, KV, D, S, pos = 2, 6, 2, 16, 40, 17
    k_cache = torch.randn(B, KV, S, D, generator=g)
    v_cache = torch.randn(B, KV, S, D, generator=g)
    q, k, v = (torch.randn(B, n * D, generator=g) for n in (H, KV, KV))
    angle = torch.rand(D // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    sin_signed = torch.cat([-sin[: D // 2], sin[D // 2:]])
    qn, kn = (torch.randn(D, generator=g), torch.randn(D, generator=g)) if qk_norm else (None, None)

    def rope(t):  # [..., D], the HF rotate-half convention
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    qh, kh = q.view(B, H, D), k.view(B, KV, D)
    if qk_norm:
        qh, kh = F.rms_norm(qh, (D,), qn, 1e-6), F.rms_norm(kh, (D,), kn, 1e-6)
    keys, values = k_cache.clone(), v_cache.clone()
    keys[:, :, pos], values[:, :, pos] = rope(kh), v.view(B, KV, D)
    first = max(0, pos + 1 - window) if window else 0  # a sliding window: keys j with pos - j < window
    expect = F.scaled_dot_product_attention(
        rope(qh)[:, :, None], keys[:, :, first: pos + 1], values[:, :, first: pos + 1], scale=0.3, enable_gqa=True
    ).reshape(B, H * D)
    out = dense.attn_decode(q, k, v, qn, kn, 1e-6, cos, sin_signed, k_cache, v_cache, pos, 0.3, H, window)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_cache, values)


def test_bandwidth_reader_sees_every_byte():
    """The probe's reader splits each thread's share into interleaved streams across buffer boundaries:
    a single non-zero byte anywhere, at any stream count, must be read."""
    sizes = [1, 63, 64, 65, 4096, 100003, 0, 7, 1 << 16]
    buffers = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    assert dense.read_buffers_or(buffers) == 0
    g = torch.Generator().manual_seed(12)
    total = sum(sizes)
    for pos in list(range(200)) + torch.randint(0, total, (100,), generator=g).tolist() + [total - 1]:
        i, off = 0, pos
        while off >= sizes[i]:
            off, i = off - sizes[i], i + 1
        buffers[i][off] = 1
        assert all(dense.read_buffers_or(buffers, streams) for streams in (1, 3, 8)), pos
        buffers[i][off] = 0


def test_read_bandwidth_is_positive():
    assert dense.read_bandwidth_gb_s(size_bytes=1 << 22, repeats=2) > 0.1
    tensors = [torch.randn(1000, 37), torch.randn(3).to(torch.bfloat16), torch.randn(70000)]  # odd byte sizes
    assert dense.read_tensors_gb_s(tensors) > 0.1


@pytest.mark.build
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])  # scalar fallback; AVX2 + FMA
def test_portable_builds_agree(tmp_path, march):
    """The non-native code paths of dense.cpp, built by hand, against F.linear and attention."""
    import ctypes
    import platform
    import shutil
    import subprocess

    from peakllm.kernels.build import HERE

    cxx = shutil.which("g++")
    if cxx is None or platform.machine() != "x86_64":
        pytest.skip("needs g++ on x86-64")
    lib_path = tmp_path / f"dense_{march}.so"
    flags = ["-O2", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    subprocess.run([cxx, *flags, str(HERE / "dense.cpp"), "-o", str(lib_path)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    g = torch.Generator().manual_seed(9)
    for wd, ws in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
        fn = getattr(lib, f"dense_{ws}w_f32x")
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
        M, N, K = 3, 41, 83
        W, x, bias = torch.randn(N, K, generator=g).to(wd), torch.randn(M, K, generator=g), torch.randn(N, generator=g)
        y = torch.empty(M, N)
        fn(x.data_ptr(), W.data_ptr(), bias.data_ptr(), y.data_ptr(), M, N, K, 2)
        torch.testing.assert_close(y, F.linear(x, W.float(), bias), rtol=1e-5, atol=1e-5)
