"""Wanda, magnitude and OWL against slow references, and the error ordering SparseGPT < Wanda < magnitude."""

import pytest
import torch

from peakllm.errors import PeakError
from peakllm.solvers import magnitude, outlier_ratio, owl_sparsities, sparsegpt, wanda


def outlier_data(rows=64, cols=128, n=1024, seed=0):
    """Correlated inputs (random @ random) with a few channels 20x larger, like LLM activation outliers."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5)
    X[:, torch.randperm(cols, generator=g)[:6]] *= 20
    return W, X


def test_wanda_matches_per_row_reference():
    W, X = outlier_data(8, 32)
    act = (X**2).sum(0)
    weight, mask = wanda(W, act, 0.4)
    for r in range(8):
        score = [abs(W[r, j].item()) * act[j].sqrt().item() for j in range(32)]
        lowest = sorted(range(32), key=lambda j: score[j])[: int(32 * 0.4)]
        assert sorted(torch.nonzero(~mask[r]).flatten().tolist()) == sorted(lowest)
    assert torch.equal(weight, W * mask)


def test_magnitude_matches_global_reference():
    W, _ = outlier_data(8, 32)
    weight, mask = magnitude(W, 0.6)
    flat = W.abs().flatten().tolist()
    lowest = set(sorted(range(len(flat)), key=lambda i: flat[i])[: int(len(flat) * 0.6)])
    assert set(torch.nonzero(~mask.flatten()).flatten().tolist()) == lowest
    assert torch.equal(weight, W * mask)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 4)])
def test_nm_patterns(n, m):
    W, X = outlier_data(16, 64)
    act = (X**2).sum(0)
    for method, score in [(lambda: wanda(W, act, 0.5, prunen=n, prunem=m), W.abs() * act.sqrt()),
                          (lambda: magnitude(W, 0.5, prunen=n, prunem=m), W.abs())]:
        weight, mask = method()
        assert ((~mask).reshape(16, -1, m).sum(2) == n).all()
        assert torch.equal(weight, W * mask)
        # every pruned score is no larger than every kept score of its group
        s = score.reshape(16, -1, m)
        pr = (~mask).reshape(16, -1, m)
        max_pruned = torch.where(pr, s, torch.full_like(s, -1)).amax(2)
        min_kept = torch.where(pr, torch.full_like(s, float("inf")), s).amin(2)
        assert (max_pruned <= min_kept).all()


def test_error_ordering_sparsegpt_wanda_magnitude():
    W, X = outlier_data()
    W0 = W.clone()
    H = 2 / X.shape[0] * X.T @ X
    act = (X**2).sum(0)

    def err(What):
        return float(((W - What) @ X.T).pow(2).sum())

    for nm in [(0, 0), (2, 4)]:
        e_sgpt = err(sparsegpt(W, H, 0.5, prunen=nm[0], prunem=nm[1]).weight)
        e_wanda = err(wanda(W, act, 0.5, prunen=nm[0], prunem=nm[1])[0])
        e_mag = err(magnitude(W, 0.5, prunen=nm[0], prunem=nm[1])[0])
        assert e_sgpt < e_wanda < e_mag, (nm, e_sgpt, e_wanda, e_mag)
    assert torch.equal(W, W0)


def test_outlier_ratio_reference():
    W, X = outlier_data(16, 64)
    act = (X**2).sum(0)
    score = (W.abs() * act.sqrt()).double()
    expected = sum(1 for s in score.flatten().tolist() if s > 5.0 * score.mean().item()) / score.numel()
    assert outlier_ratio(W, act) == pytest.approx(expected, abs=1e-12)
    assert outlier_ratio(W, act, M=2.0) > outlier_ratio(W, act, M=5.0)


@pytest.mark.parametrize("target,lam", [(0.5, 0.08), (0.7, 0.2), (0.05, 0.08), (0.95, 0.08), (0.0, 0.08)])
def test_owl_sparsities(target, lam):
    ratios = [0.001, 0.02, 0.005, 0.04, 0.01, 0.0, 0.03]
    s = owl_sparsities(ratios, target, lam)
    assert len(s) == len(ratios)
    assert sum(s) / len(s) == pytest.approx(target, abs=1e-12)
    assert all(0 <= x <= 0.99 for x in s)
    assert all(abs(x - target) <= lam + 1e-12 for x in s)
    # higher outlier ratio -> lower sparsity
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert all(s[a] >= s[b] for a, b in zip(order, order[1:]))
    if 0 < target and target + lam <= 0.99 and target - lam >= 0:
        assert max(abs(x - target) for x in s) == pytest.approx(lam)
    assert owl_sparsities([0.01, 0.01, 0.01], target, lam) == [target] * 3


def test_validation_errors():
    W, X = outlier_data(4, 8)
    act = (X**2).sum(0)
    for fn in [lambda **k: wanda(W, act, **k), lambda **k: magnitude(W, **k)]:
        for kwargs in [dict(sparsity=1.0), dict(sparsity=-0.5), dict(sparsity=0.5, prunen=4, prunem=4),
                       dict(sparsity=0.5, prunen=-1, prunem=4), dict(sparsity=0.5, prunen=2, prunem=3),
                       dict(sparsity=0.5, prunen=0, prunem=4), dict(sparsity=0.5, prunen=1, prunem=0)]:
            with pytest.raises(PeakError):
                fn(**kwargs)
    for bad_act in [act[:7], -act, act * float("nan")]:
        with pytest.raises(PeakError):
            wanda(W, bad_act, 0.5)
    with pytest.raises(PeakError):
        outlier_ratio(W, act, M=0)
    for args in [([], 0.5), ([0.1], 1.0), ([0.1], -0.1), ([0.1, float("nan")], 0.5)]:
        with pytest.raises(PeakError):
            owl_sparsities(*args)
    with pytest.raises(PeakError):
        owl_sparsities([0.1, 0.2], 0.5, lam=-0.1)
