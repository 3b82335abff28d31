"""SparseGPT (Frantar & Alistarh, ICML 2023), Algorithm 1, with optional joint quantization.

Sweep the columns of W in order. For each column, zero the weights the mask prunes (and round the kept
ones onto the grid, if any), then compensate the error on the columns not yet visited with the OBS update
from the inverse Hessian of ||WX - ŴX||^2 -- the same machinery as GPTQ, with pruning as the "rounding".
  - adaptive mask selection: the mask of a block of ``maskblock`` columns is chosen when the sweep reaches
    it, on the updated weights, by the OBS saliency w^2 / [H^-1]_jj, lowest ``sparsity`` fraction pruned;
  - N:M: at the first column of every group of M columns, prune the N lowest-saliency weights of each row;
  - lazy batch updates and the Cholesky form of H^-1 exactly as in GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peakllm.errors import PeakError
from peakllm.solvers.common import (SolveInfo, check_blocksize, check_hessian, check_sparsity, check_weight,
                                    current_columns, lowest_mask, nm_mask, prepare, upper_inverse)
from peakllm.solvers.grids import Grid, QuantizedWeight, assemble, dequantize, fit, quantize
from peakllm.solvers.rtn import rtn
from peakllm.solvers.wanda import wanda


@dataclass
class SparseResult:
    """weight: pruned and updated weights (fp32, float64 for float64 input; the dequantized fp32 weights
    when quantized); mask: bool ``[out, in]``, True = kept; quant: the QuantizedWeight when a grid was given,
    else None; info: how the solve went."""

    weight: torch.Tensor
    mask: torch.Tensor
    quant: QuantizedWeight | None
    info: SolveInfo


def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float, *, prunen: int = 0, prunem: int = 0,
              blocksize: int = 128, damp: float = 0.01, grid: Grid | None = None,
              maskblock: int | None = None) -> SparseResult:
    """Prune ``W [out, in]`` to ``sparsity`` (or ``prunen`` zeros per ``prunem`` columns) given ``H [in, in]``.

    ``sparsity`` is ignored when N:M is asked for. ``maskblock`` (default: ``blocksize``, as in the paper
    and the reference code) is the width of the column blocks over which the unstructured mask is chosen;
    setting it apart from ``blocksize`` shows that lazy batching alone does not change the result.
    With ``grid``, kept weights are quantized jointly; every grid here represents 0 exactly, so pruned
    weights are exactly 0 and their code is the code of 0 (the zero point / the ternary middle code).
    If H + damping cannot be factored, falls back to Wanda's mask with diag(H) as activation statistics,
    no weight update, and RTN for the kept weights (info.fallback_rtn).
    """
    check_weight(W)
    check_hessian(H, W.shape[1])
    check_sparsity(sparsity, prunen, prunem, W.shape[1])
    check_blocksize(blocksize)
    maskblock = blocksize if maskblock is None else maskblock
    check_blocksize(maskblock, "maskblock")
    if grid is not None and not isinstance(grid, Grid):
        raise PeakError(f"grid must be a peakllm.solvers.Grid or None, got {type(grid).__name__}")
    W, H = prepare(W, H)
    rows, cols = W.shape

    Hinv, damp_used, retries = upper_inverse(H, damp)
    if Hinv is None:
        return _fallback(W, H, sparsity, prunen, prunem, grid, SolveInfo(damp_used, retries, True, float("nan")))

    gs = cols if grid is None or grid.group_size == -1 else grid.group_size
    diag = torch.diagonal(Hinv)
    pruned = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    Q = torch.zeros_like(W)
    codes = torch.zeros(W.shape, dtype=torch.uint8, device=W.device) if grid is not None else None
    Losses = torch.zeros(rows, dtype=W.dtype, device=W.device)
    group_params = []

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(i2 - i1):
            j = i1 + i
            if prunem == 0 and j % maskblock == 0:
                end = min(j + maskblock, cols)
                cur = current_columns(W, W1, Err1, Hinv, i1, j, end)
                pruned[:, j:end] = lowest_mask(cur**2 / diag[j:end] ** 2, sparsity)
            if prunem and j % prunem == 0:
                cur = current_columns(W, W1, Err1, Hinv, i1, j, j + prunem)
                pruned[:, j:j + prunem] = nm_mask(cur**2 / diag[j:j + prunem] ** 2, prunen, prunem)
            if grid is not None and j % gs == 0:
                params = fit(current_columns(W, W1, Err1, Hinv, i1, j, min(j + gs, cols)), grid)
                group_params.append(params)

            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.masked_fill(pruned[:, j], 0)
            if grid is not None:
                c = quantize(q.unsqueeze(1), params, grid)
                q = dequantize(c, params, grid).flatten().to(W.dtype)
                codes[:, j] = c.flatten()
            Q[:, j] = q
            Losses += (w - q) ** 2 / d**2

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1

        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    info = SolveInfo(damp_used, retries, False, float(Losses.sum()))
    if grid is None:
        return SparseResult(Q, ~pruned, None, info)
    qw = assemble(Q, codes, group_params, grid)
    return SparseResult(qw.weight, ~pruned, qw, info)


def _fallback(W, H, sparsity, prunen, prunem, grid, info) -> SparseResult:
    # diag(H) is proportional to Wanda's per-input sum of squared activations.
    weight, mask = wanda(W, torch.diagonal(H).clamp_min(0), sparsity, prunen=prunen, prunem=prunem)
    if grid is None:
        return SparseResult(weight, mask, None, info)
    qw = rtn(weight, grid)
    return SparseResult(qw.weight, mask, qw, info)
