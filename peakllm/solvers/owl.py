"""OWL: outlier-weighted layer-wise sparsity (Yin et al., ICML 2024).

Layers with more "outliers" (Wanda scores far above their layer's mean) are pruned less. The paper
constrains every layer's sparsity to [S - lam, S + lam] with mean S.
"""

from __future__ import annotations

import torch

from peakllm.errors import PeakError
from peakllm.solvers.wanda import wanda_score

MAX_SPARSITY = 0.99


def outlier_ratio(W: torch.Tensor, act_sqnorm: torch.Tensor, M: float = 5.0) -> float:
    """Fraction of the layer's Wanda scores |W_ij| * ||X_j|| greater than M times their mean."""
    if not M > 0:
        raise PeakError(f"outlier threshold M must be > 0, got {M!r}")
    score = wanda_score(W, act_sqnorm).double()
    return float((score > M * score.mean()).double().mean())


def owl_sparsities(ratios: list[float], target: float, lam: float = 0.08) -> list[float]:
    """Per-layer sparsities from per-layer outlier ratios: higher ratio -> lower sparsity.

    The centred ratios are scaled so the largest deviation from ``target`` is ``lam`` (the paper's
    [S - lam, S + lam]; the authors' code maps min..max onto a 2*lam-wide range and then centres it, which can
    stray further than lam on one side). The mean is ``target`` exactly (up to float rounding). So that
    clipping to [0, 0.99] never moves the mean, lam shrinks to fit inside that range instead.
    """
    if not isinstance(target, (int, float)) or not 0 <= target <= MAX_SPARSITY:
        raise PeakError(f"target sparsity must be in [0, {MAX_SPARSITY}], got {target!r}")
    if not isinstance(lam, (int, float)) or not lam >= 0:
        raise PeakError(f"lam must be >= 0, got {lam!r}")
    if len(ratios) == 0:
        raise PeakError("owl_sparsities needs at least one layer's outlier ratio")
    r = torch.tensor([float(x) for x in ratios], dtype=torch.float64)
    if not torch.isfinite(r).all():
        raise PeakError("outlier ratios must be finite")
    dev = r - r.mean()
    span = float(dev.abs().max())
    lam = min(lam, target, MAX_SPARSITY - target)
    if span == 0 or lam <= 0:
        return [float(target)] * len(ratios)
    s = target - dev * (lam / span)
    s = s - (s.mean() - target)  # absorb rounding in the mean
    return [min(max(float(x), 0.0), MAX_SPARSITY) for x in s]
