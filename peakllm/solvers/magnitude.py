"""Magnitude pruning: drop the smallest |W| over the whole matrix (or per group of M for N:M).
The baseline with no data at all."""

from __future__ import annotations

import torch

from peakllm.solvers.common import check_sparsity, check_weight, lowest_mask, nm_mask


def magnitude(W: torch.Tensor, sparsity: float, *, prunen: int = 0, prunem: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (pruned weight, mask bool ``[out, in]`` True = kept). Unstructured prunes the
    floor(numel * sparsity) smallest magnitudes of the matrix; N:M prunes ``prunen`` per ``prunem`` columns."""
    check_weight(W)
    check_sparsity(sparsity, prunen, prunem, W.shape[1])
    W = W.detach()
    score = W.abs()
    pruned = nm_mask(score, prunen, prunem) if prunem else lowest_mask(score, sparsity)
    return W.masked_fill(pruned, 0), ~pruned
