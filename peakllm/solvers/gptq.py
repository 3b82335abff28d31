"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023), Algorithm 1.

Quantize the columns of W one at a time, in a fixed order, and after each column spread its rounding
error over the columns not yet quantized using the inverse Hessian of the layer's reconstruction loss
||WX - QX||^2 (H = 2/n X X^T). The three ideas of the paper map onto the code as:
  - arbitrary (fixed) order  -> one sweep over columns, optionally in act-order (descending diag H);
  - lazy batch updates       -> errors of a block of ``blocksize`` columns are applied to the rest at once;
  - Cholesky reformulation   -> the rows of the inverse Hessian come from the upper Cholesky factor.
"""

from __future__ import annotations

import torch

from peakllm.errors import PeakError
from peakllm.solvers.common import (SolveInfo, check_blocksize, check_hessian, check_weight, current_columns,
                                    prepare, upper_inverse)
from peakllm.solvers.grids import Grid, QuantizedWeight, assemble, dequantize, fit, quantize
from peakllm.solvers.rtn import rtn


def gptq(W: torch.Tensor, H: torch.Tensor, grid: Grid, *, blocksize: int = 128, damp: float = 0.01,
         act_order: bool = False) -> tuple[QuantizedWeight, SolveInfo]:
    """Quantize ``W [out, in]`` onto ``grid`` minimising ||WX - QX||^2 given ``H [in, in]``.

    A group's parameters are fitted when the sweep reaches the group's first column, on the weights as
    updated so far. With ``act_order`` the groups are consecutive in the permuted order, so ``g_idx`` maps
    each original column to its group; weight and codes come back in the original column order.
    If H + damping cannot be factored even after raising damping, falls back to RTN (info.fallback_rtn).
    """
    check_weight(W)
    check_hessian(H, W.shape[1])
    check_blocksize(blocksize)
    if not isinstance(grid, Grid):
        raise PeakError(f"grid must be a peakllm.solvers.Grid, got {type(grid).__name__}")
    W, H = prepare(W, H)
    rows, cols = W.shape

    perm = None
    if act_order:
        # Columns with large activations first, while many columns remain to absorb their error.
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    Hinv, damp_used, retries = upper_inverse(H, damp)
    if Hinv is None:
        return rtn(W if perm is None else W[:, torch.argsort(perm)], grid), SolveInfo(damp_used, retries, True,
                                                                                      float("nan"))

    gs = cols if grid.group_size == -1 else grid.group_size
    Q = torch.zeros_like(W)
    codes = torch.zeros(W.shape, dtype=torch.uint8, device=W.device)
    Losses = torch.zeros(rows, dtype=W.dtype, device=W.device)
    group_params = []

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(i2 - i1):
            j = i1 + i
            if j % gs == 0:
                params = fit(current_columns(W, W1, Err1, Hinv, i1, j, min(j + gs, cols)), grid)
                group_params.append(params)
            w = W1[:, i]
            d = Hinv1[i, i]
            c = quantize(w.unsqueeze(1), params, grid)
            q = dequantize(c, params, grid).flatten().to(W.dtype)
            codes[:, j] = c.flatten()
            Q[:, j] = q
            Losses += (w - q) ** 2 / d**2

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1

        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    qw = assemble(Q, codes, group_params, grid, perm)
    return qw, SolveInfo(damp_used, retries, False, float(Losses.sum()))
