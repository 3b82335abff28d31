"""The N:M and bitmask sparse kernels (sparse.cpp) against their pure-torch references.

Layouts are built here from random dense weights with the DESIGN.md rules (independently of the
formats room), with float values (fp32 / bf16 / fp16) or affine int-k codes. Tolerance: fp32
accumulation order, 1e-5 of M = |x| @ |W|.T (codes: of |x| @ (scale * (q + zero)).T, since the
kernel dequantizes as q * scale - zero * scale); bf16 activations are compared on the same rounded inputs.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess

import pytest
import torch

from peakllm.errors import PeakError
from peakllm.kernels import build, ops, sparse_ops
from peakllm.kernels import reference as ref


def assert_close_to(y, y_ref, mag):
    err = (y - y_ref).abs()
    bound = 1e-5 * mag + 1e-6
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}"


def nm_layout(out, inn, n, m, g):
    """Random N:M kept positions (ascending in each group) and their index bitstream."""
    keep = m - n
    pos = torch.rand(out, inn // m, m, generator=g).topk(keep, dim=-1).indices.sort(-1).values.reshape(out, -1)
    return pos, ref.pack_bitstream(pos, max(1, math.ceil(math.log2(m))))


def random_codes(out, count, bits, inn, group_size, g):
    n_groups = math.ceil(inn / (inn if group_size == -1 else group_size))
    codes = torch.randint(0, 2**bits, (out, count), dtype=torch.uint8, generator=g)
    scales = ((torch.rand(out, n_groups, generator=g) + 0.5) / 2**bits).half()
    zeros = torch.randint(0, 2**bits, (out, n_groups), dtype=torch.uint8, generator=g)
    return codes, scales, zeros


def code_magnitude(kept_cols, codes_rows, scales, zeros, inn, group_size):
    """scale * (q + zero) at the kept columns, dense [out, in]: the magnitudes the kernel adds up."""
    big = torch.zeros(len(codes_rows), inn)
    size = inn if group_size == -1 else group_size
    for r, (cols, q) in enumerate(zip(kept_cols, codes_rows)):
        big[r, cols] = scales[r].float()[cols // size] * (q.float() + zeros[r].float()[cols // size])
    return big


NM_SHAPES = [(1, 16), (7, 100), (33, 576), (9, 1540), (64, 256)]


@pytest.mark.parametrize("out,inn", [s if s not in ((33, 576), (9, 1540)) else pytest.param(*s, marks=pytest.mark.slow)
                                     for s in NM_SHAPES])  # make test-fast: all but the two widest
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (1, 3)])
def test_nm_matmul_matches_reference(out, inn, n, m):
    if inn % m:
        inn -= inn % m
    g = torch.Generator().manual_seed(out * inn + m)
    pos, indices = nm_layout(out, inn, n, m, g)
    per_row = inn // m * (m - n)
    cols = (torch.arange(per_row) // (m - n)) * m + pos
    xs = [torch.randn(b, inn, generator=g) for b in (1, 2, 4, 7, 32)] + [torch.randn(3, inn).bfloat16()]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        values = torch.randn(out, per_row, generator=g).to(dtype)
        W = ref.dequantize_nm(indices, n, m, inn, values=values)
        for x in xs:
            assert_close_to(sparse_ops.nm_matmul(x, indices, n, m, values=values), ref.matmul_ref(x.float(), W),
                            x.float().abs() @ W.abs().T)
    for bits, group_size in [(4, 32), (4, 16), (4, 24), (8, 64), (3, 32), (2, -1)]:
        codes, scales, zeros = random_codes(out, per_row, bits, inn, group_size, g)
        kw = dict(qweight=ref.pack_bitstream(codes, bits), scales=scales, zeros=zeros, bits=bits,
                  group_size=group_size)
        W = ref.dequantize_nm(indices, n, m, inn, **kw)
        big = code_magnitude(list(cols), list(codes), scales, zeros, inn, group_size)
        for x in xs:
            mag = x.float().abs() @ big.T
            assert_close_to(sparse_ops.nm_matmul(x, indices, n, m, **kw), ref.matmul_ref(x.float(), W), mag)
        assert torch.equal(sparse_ops.nm_dequantize(indices, n, m, inn, **kw), W)


def bitmask_layout(out, inn, density, g):
    keep = torch.rand(out, inn, generator=g) < density
    counts = keep.sum(1)
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return keep, ref.pack_bitstream(keep.to(torch.uint8), 1), row_offsets


@pytest.mark.parametrize("out,inn", [(1, 8), (5, 16), (17, 100), pytest.param(33, 576, marks=pytest.mark.slow),
                                     pytest.param(9, 1541, marks=pytest.mark.slow), (64, 256)])
@pytest.mark.parametrize("density", [0.5, 0.15])
def test_bitmask_matmul_matches_reference(out, inn, density):
    g = torch.Generator().manual_seed(out * inn)
    keep, mask, row_offsets = bitmask_layout(out, inn, density, g)
    xs = [torch.randn(b, inn, generator=g) for b in (1, 3, 4, 9, 32)] + [torch.randn(2, inn).bfloat16()]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        values = torch.randn(int(row_offsets[-1]), generator=g).to(dtype)
        W = ref.dequantize_bitmask(mask, row_offsets, inn, values=values)
        for x in xs:
            assert_close_to(sparse_ops.bitmask_matmul(x, mask, row_offsets, values=values), ref.matmul_ref(x.float(), W),
                            x.float().abs() @ W.abs().T)
    kept_cols = [row.nonzero().reshape(-1) for row in keep]
    for bits, group_size in [(4, 32), (4, 12), (8, 64), (2, 16), (3, -1)]:
        codes, scales, zeros = random_codes(out, inn, bits, inn, group_size, g)
        rows = [codes[r, : len(c)] for r, c in enumerate(kept_cols)]
        flat = torch.cat([ref.pack_bitstream(r.reshape(1, -1), bits).reshape(-1) for r in rows])
        kw = dict(qweight=flat, scales=scales, zeros=zeros, bits=bits, group_size=group_size)
        W = ref.dequantize_bitmask(mask, row_offsets, inn, **kw)
        big = code_magnitude(kept_cols, rows, scales, zeros, inn, group_size)
        for x in xs:
            assert_close_to(sparse_ops.bitmask_matmul(x, mask, row_offsets, **kw), ref.matmul_ref(x.float(), W),
                            x.float().abs() @ big.T)
        assert torch.equal(sparse_ops.bitmask_dequantize(mask, row_offsets, inn, **kw), W)


def test_sparse_fallback_without_kernels(monkeypatch):
    monkeypatch.setenv("PEAKLLM_NO_KERNELS", "1")
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_warned", set())
    monkeypatch.setattr(ops, "_fns", {})
    g = torch.Generator().manual_seed(3)
    _, indices = nm_layout(6, 32, 2, 4, g)
    values = torch.randn(6, 16, generator=g)
    x = torch.randn(2, 32, generator=g)
    with pytest.warns(RuntimeWarning, match="PEAKLLM_NO_KERNELS"):
        y = sparse_ops.nm_matmul(x, indices, 2, 4, values=values)
    assert ops._fns["sparse"] is None
    W = ref.dequantize_nm(indices, 2, 4, 32, values=values)
    assert_close_to(y, ref.matmul_ref(x, W), x.abs() @ W.abs().T)
    _, mask, row_offsets = bitmask_layout(6, 30, 0.4, g)
    vals = torch.randn(int(row_offsets[-1]), generator=g)
    W = ref.dequantize_bitmask(mask, row_offsets, 30, values=vals)
    x = torch.randn(2, 30, generator=g)
    assert_close_to(sparse_ops.bitmask_matmul(x, mask, row_offsets, values=vals), ref.matmul_ref(x, W), x.abs() @ W.abs().T)


@pytest.mark.build
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_scalar_build_matches_reference(tmp_path, monkeypatch):
    """sparse.cpp compiled without AVX2 exercises the scalar code (and fp16 conversion) other CPUs run."""
    lib_path = tmp_path / "libsparse_scalar.so"
    subprocess.run(["g++", "-O2", "-march=x86-64", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
                    str(build.HERE / "sparse.cpp"), "-o", str(lib_path)], check=True, capture_output=True)
    monkeypatch.setitem(ops._fns, "sparse", ops.bind(ctypes.CDLL(str(lib_path)), "sparse"))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 96, generator=g)
    _, indices = nm_layout(11, 96, 2, 4, g)
    values = torch.randn(11, 48, generator=g).half()
    W = ref.dequantize_nm(indices, 2, 4, 96, values=values)
    assert_close_to(sparse_ops.nm_matmul(x, indices, 2, 4, values=values), ref.matmul_ref(x, W), x.abs() @ W.abs().T)
    keep, mask, row_offsets = bitmask_layout(11, 96, 0.4, g)
    codes, scales, zeros = random_codes(11, 96, 4, 96, 32, g)
    rows = [codes[r, : int(c)] for r, c in enumerate(keep.sum(1))]
    kw = dict(qweight=torch.cat([ref.pack_bitstream(r.reshape(1, -1), 4).reshape(-1) for r in rows]), scales=scales,
              zeros=zeros, bits=4, group_size=32)
    W = ref.dequantize_bitmask(mask, row_offsets, 96, **kw)
    big = code_magnitude([row.nonzero().reshape(-1) for row in keep], rows, scales, zeros, 96, 32)
    assert_close_to(sparse_ops.bitmask_matmul(x, mask, row_offsets, **kw), ref.matmul_ref(x, W), x.abs() @ big.T)
    assert torch.equal(sparse_ops.bitmask_dequantize(mask, row_offsets, 96, **kw), W)


def test_sparse_rejects_inconsistent_layouts():
    g = torch.Generator().manual_seed(4)
    _, mask, row_offsets = bitmask_layout(4, 40, 0.5, g)
    values = torch.randn(int(row_offsets[-1]), generator=g)
    x = torch.randn(1, 40)
    shifted = row_offsets.clone()
    shifted[1] += 1  # row 0 claims one more value than its mask keeps
    with pytest.raises(PeakError, match="disagree"):
        sparse_ops.bitmask_matmul(x, mask, shifted, values=values)
    with pytest.raises(PeakError, match="disagree"):
        sparse_ops.bitmask_matmul(x, mask, row_offsets, values=values[:-1])
    with pytest.raises(PeakError, match="exactly one"):
        sparse_ops.bitmask_matmul(x, mask, row_offsets)
    with pytest.raises(PeakError, match="positions must be < M"):  # a 2-bit position of 3 in a group of 3
        sparse_ops.nm_matmul(torch.randn(1, 6), torch.full((1, 1), 0xFF, dtype=torch.uint8), 1, 3,
                      values=torch.randn(1, 4))
    with pytest.raises(PeakError, match="in % M"):
        sparse_ops.nm_matmul(torch.randn(1, 6), torch.zeros(1, 1, dtype=torch.uint8), 2, 4, values=torch.randn(1, 3))
    with pytest.raises(PeakError, match="scales"):
        sparse_ops.nm_matmul(torch.randn(1, 8), torch.zeros(1, 1, dtype=torch.uint8), 2, 4,
                      qweight=torch.zeros(1, 2, dtype=torch.uint8), scales=torch.ones(1, 2), zeros=torch.zeros(1, 1),
                      bits=4, group_size=8)
