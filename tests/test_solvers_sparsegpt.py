"""SparseGPT against a per-column OBS reference with explicit inverses, lazy batching, exact sparsity.

With unstructured sparsity the mask is chosen per block of ``maskblock`` columns, so comparing different
``blocksize`` values fixes ``maskblock``; N:M masks are chosen per M columns and need no such care.
"""

import pytest
import torch

from peakllm.errors import PeakError
from peakllm.solvers import Grid, dequantize, fit, quantize, sparsegpt, wanda


def correlated(rows, cols, n=256, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    X = torch.randn(n, cols, generator=g, dtype=dtype) @ torch.randn(cols, cols, generator=g, dtype=dtype)
    return W, X, 2 / n * X.T @ X


def sparsegpt_reference(W, H, sparsity, prunen=0, prunem=0, grid=None, damp=0.01):
    """Column by column with Hinv_j = inverse(H[j:, j:]): choose column j's mask (unstructured: the
    floor(rows * sparsity) lowest w^2 / Hinv_j[0,0]; N:M at each group's first column from the updated
    weights and each column's own Hinv_k[0,0]), prune (and quantize), then
    W[:, j:] -= (w - q) / Hinv_j[0,0] * Hinv_j[0, :]."""
    W, H = W.double().clone(), H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    rows, cols = W.shape
    H = H + damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    h = [torch.linalg.inv(H[k:, k:])[0, 0] for k in range(cols)]
    gs = cols if grid is None or grid.group_size == -1 else grid.group_size
    Q, pruned, codes = torch.zeros_like(W), torch.zeros(rows, cols, dtype=torch.bool), torch.zeros(rows, cols)
    for j in range(cols):
        Hinv_j = torch.linalg.inv(H[j:, j:])
        if prunem == 0:
            score = W[:, j] ** 2 / h[j]
            pruned[torch.argsort(score, stable=True)[: int(rows * sparsity)], j] = True
        elif j % prunem == 0:
            for r in range(rows):
                score = torch.stack([W[r, k] ** 2 / h[k] for k in range(j, j + prunem)])
                pruned[r, j + torch.argsort(score, stable=True)[:prunen]] = True
        if grid is not None and j % gs == 0:
            params = fit(W[:, j:j + gs], grid)
        w = W[:, j].clone()
        q = torch.where(pruned[:, j], 0.0, w)
        if grid is not None:
            c = quantize(q[:, None], params, grid)
            q = dequantize(c, params, grid)[:, 0].double()
            codes[:, j] = c[:, 0].double()
        Q[:, j] = q
        W[:, j:] -= torch.outer((w - q) / Hinv_j[0, 0], Hinv_j[0, :])
    return Q, ~pruned, codes


@pytest.mark.parametrize("case", [dict(sparsity=0.5), dict(sparsity=0.3), dict(sparsity=0.9, prunen=2, prunem=4),
                                  dict(sparsity=0.0, prunen=1, prunem=4), dict(sparsity=0.5, prunen=4, prunem=8)],
                         ids=str)
def test_matches_per_column_reference(case):
    W, _, H = correlated(16, 16, seed=1)
    Q, mask, _ = sparsegpt_reference(W, H, **case)
    for blocksize in (1, 3, 4, 8, 128):
        res = sparsegpt(W, H, blocksize=blocksize, maskblock=1, **case)
        assert not res.info.fallback_rtn and res.quant is None
        assert torch.equal(res.mask, mask), blocksize
        assert torch.allclose(res.weight, Q, rtol=0, atol=1e-9), blocksize
        assert (res.weight[~res.mask] == 0).all()


@pytest.mark.parametrize("grid", [Grid(bits=4), Grid(bits=3, group_size=8, sym=True), Grid(kind="ternary", group_size=5),
                                  Grid(bits=2, group_size=4, mse=True)], ids=str)
@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_joint_quantization_matches_reference(grid, nm):
    W, _, H = correlated(12, 16, seed=2)
    Q, mask, codes = sparsegpt_reference(W, H, 0.5, *nm, grid=grid)
    for blocksize in (1, 6, 128):
        res = sparsegpt(W, H, 0.5, prunen=nm[0], prunem=nm[1], blocksize=blocksize, maskblock=1, grid=grid)
        assert torch.equal(res.mask, mask)
        assert torch.equal(res.quant.codes.double(), codes)
        assert torch.equal(res.weight, res.quant.weight) and torch.equal(res.quant.dequantize(), res.weight)
        assert torch.allclose(res.weight.double(), Q, rtol=0, atol=1e-6)
        # pruned weights are exactly 0 and carry the code of 0
        assert (res.weight[~res.mask] == 0).all()
        zero_code = res.quant.codes[~res.mask]
        if grid.kind == "affine":
            zeros = res.quant.params["zero"][:, res.quant.groups()]
            assert torch.equal(zero_code.float(), zeros[~res.mask])
        else:
            assert (zero_code == 1).all()


def test_lazy_batching_with_fixed_mask_blocks():
    W, X, H = correlated(24, 64, n=512, seed=3)
    base = sparsegpt(W, H, 0.5, blocksize=1, maskblock=12)
    for blocksize in (4, 8, 12, 30, 128):
        res = sparsegpt(W, H, 0.5, blocksize=blocksize, maskblock=12)
        assert torch.equal(res.mask, base.mask)
        assert torch.allclose(res.weight, base.weight, rtol=0, atol=1e-9)
    for blocksize in (1, 8, 128):
        nm = sparsegpt(W, H, 0.5, prunen=2, prunem=4, blocksize=blocksize)
        nm1 = sparsegpt(W, H, 0.5, prunen=2, prunem=4, blocksize=1)
        assert torch.equal(nm.mask, nm1.mask) and torch.allclose(nm.weight, nm1.weight, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_exact_sparsity_fp32(sparsity):
    W, X, H = correlated(40, 100, n=512, seed=4, dtype=torch.float32)
    W0, H0 = W.clone(), H.clone()
    for blocksize in (32, 128):
        res = sparsegpt(W, H, sparsity, blocksize=blocksize)
        assert torch.equal(W, W0) and torch.equal(H, H0)
        assert res.weight.dtype == torch.float32 and res.mask.dtype == torch.bool
        n_blocks = -(-100 // blocksize)
        assert abs(int((~res.mask).sum()) - sparsity * W.numel()) <= n_blocks
        assert (res.weight[~res.mask] == 0).all()
        # the OBS update must beat merely zeroing the same weights
        assert ((W - res.weight) @ X.T).pow(2).sum() < ((W - W * res.mask) @ X.T).pow(2).sum()
    res = sparsegpt(W, H, 0.5, prunen=2, prunem=4)
    zeros = (~res.mask).reshape(40, 25, 4).sum(2)
    assert (zeros == 2).all()
    assert (res.weight[~res.mask] == 0).all()


def test_dead_inputs_and_fallback():
    W, X, _ = correlated(8, 16, seed=5)
    X[:, 5] = 0
    H = 2 / X.shape[0] * X.T @ X
    res = sparsegpt(W, H, 0.5)
    assert not res.info.fallback_rtn and (res.weight[:, 5] == 0).all() and torch.isfinite(res.weight).all()

    # unit diagonal, but an eigenvalue of -149: no damping up to 100 x mean diag makes it positive definite
    bad = 11 * torch.eye(16, dtype=torch.float64) - 10 * torch.ones(16, 16, dtype=torch.float64)
    res = sparsegpt(W, bad, 0.5, prunen=2, prunem=4, grid=Grid(bits=4))
    assert res.info.fallback_rtn
    w_ref, m_ref = wanda(W, torch.ones(16, dtype=torch.float64), 0.5, prunen=2, prunem=4)
    assert torch.equal(res.mask, m_ref)
    assert (res.weight[~res.mask] == 0).all() and torch.equal(res.quant.dequantize(), res.weight)


def test_validation():
    W, _, H = correlated(4, 8, seed=6)
    for kwargs in [dict(sparsity=1.0), dict(sparsity=-0.1), dict(sparsity=0.5, prunen=4, prunem=4),
                   dict(sparsity=0.5, prunen=-1, prunem=4), dict(sparsity=0.5, prunen=2, prunem=3),
                   dict(sparsity=0.5, prunen=2, prunem=0), dict(sparsity=0.5, blocksize=0),
                   dict(sparsity=0.5, maskblock=0), dict(sparsity=0.5, grid="int4")]:
        with pytest.raises(PeakError):
            sparsegpt(W, H, **kwargs)
    with pytest.raises(PeakError):
        sparsegpt(W, H[:, :7], 0.5)
