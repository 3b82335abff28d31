"""Wanda (Sun, Liu, Bair, Kolter, ICLR 2024): prune by |W| times the input's activation norm.

Score S_ij = |W_ij| * ||X_j||_2, compared within each output row (the paper's "per-output" group), or
within every group of M columns for N:M. No weight update: the mask is the whole method.
"""

from __future__ import annotations

import torch

from peakllm.errors import PeakError
from peakllm.solvers.common import check_sparsity, check_weight, nm_mask


def wanda_score(W: torch.Tensor, act_sqnorm: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(act_sqnorm) with ``act_sqnorm[j]`` = sum over tokens of x_j^2."""
    check_weight(W)
    if not isinstance(act_sqnorm, torch.Tensor) or tuple(act_sqnorm.shape) != (W.shape[1],):
        raise PeakError(f"act_sqnorm must have shape [{W.shape[1]}], got {tuple(getattr(act_sqnorm, 'shape', ()))}")
    if not torch.isfinite(act_sqnorm).all() or (act_sqnorm < 0).any():
        raise PeakError("act_sqnorm must be finite and nonnegative (a sum of squares)")
    W = W.detach()
    return W.abs() * act_sqnorm.to(device=W.device, dtype=W.dtype).sqrt().unsqueeze(0)


def wanda(W: torch.Tensor, act_sqnorm: torch.Tensor, sparsity: float, *, prunen: int = 0,
          prunem: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (pruned weight, mask bool ``[out, in]`` True = kept). Unstructured prunes floor(in * sparsity)
    weights in every row; N:M prunes ``prunen`` in every group of ``prunem`` (``sparsity`` ignored)."""
    check_weight(W)
    check_sparsity(sparsity, prunen, prunem, W.shape[1])
    score = wanda_score(W, act_sqnorm)
    if prunem:
        pruned = nm_mask(score, prunen, prunem)
    else:
        pruned = _row_lowest(score, sparsity)
    return W.detach().masked_fill(pruned, 0), ~pruned


def _row_lowest(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(score.shape[1] * sparsity)
    idx = torch.argsort(score, dim=1, stable=True)[:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
