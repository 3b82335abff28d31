"""Round-to-nearest: fit each group's grid on the original weights and round, with no error feedback.
The baseline every Hessian-based solver must beat, and GPTQ's last resort when H cannot be factored."""

from __future__ import annotations

import torch

from peakllm.solvers.common import check_weight, compute_dtype
from peakllm.solvers.grids import Grid, QuantizedWeight, assemble, dequantize, fit, quantize


def rtn(W: torch.Tensor, grid: Grid) -> QuantizedWeight:
    """Quantize ``W [out, in]`` onto ``grid`` group by group (contiguous groups of ``grid.group_size``)."""
    check_weight(W)
    W = W.detach().to(compute_dtype(W))
    cols = W.shape[1]
    gs = cols if grid.group_size == -1 else grid.group_size
    codes = torch.empty(W.shape, dtype=torch.uint8, device=W.device)
    Q = torch.empty(W.shape, dtype=torch.float32, device=W.device)
    group_params = []
    for g1 in range(0, cols, gs):
        g2 = min(g1 + gs, cols)
        params = fit(W[:, g1:g2], grid)
        codes[:, g1:g2] = quantize(W[:, g1:g2], params, grid)
        Q[:, g1:g2] = dequantize(codes[:, g1:g2], params, grid)
        group_params.append(params)
    return assemble(Q, codes, group_params, grid)
