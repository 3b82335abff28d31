"""GPTQ and RTN in a rotated basis (formats/rotation.py): solve W R^T against R H R^T, then keep the rotation
with the codes so that formats and kernels can apply R to the activations instead of un-rotating weights."""

from __future__ import annotations

from dataclasses import replace

import torch

from peakllm.solvers.common import SolveInfo
from peakllm.solvers.gptq import gptq
from peakllm.solvers.grids import Grid, QuantizedWeight
from peakllm.formats.rotation import Rotation, rotate_problem, rotate_rows, unrotate_rows
from peakllm.solvers.rtn import rtn


def _back(q: QuantizedWeight, rot: Rotation) -> QuantizedWeight:
    return replace(q, weight=unrotate_rows(q.weight, rot).contiguous(), rotation=rot)


def gptq_rotated(W: torch.Tensor, H: torch.Tensor, grid: Grid, rot: Rotation | None,
                 **kw) -> tuple[QuantizedWeight, SolveInfo]:
    """GPTQ of ``W`` on ``grid`` after rotating the problem by ``rot`` (plain GPTQ when ``rot`` is None).
    act_order "group" would reorder rotated columns: the kernels rotate x before any gather, so use static."""
    if rot is None:
        return gptq(W, H, grid, **kw)
    Wr, Hr = rotate_problem(W.float(), H.float(), rot)
    q, info = gptq(Wr, Hr, grid, **kw)
    return _back(q, rot), info


def rtn_rotated(W: torch.Tensor, grid: Grid, rot: Rotation | None) -> QuantizedWeight:
    """Round-to-nearest of W R^T on ``grid`` (plain RTN when ``rot`` is None)."""
    if rot is None:
        return rtn(W, grid)
    return _back(rtn(rotate_rows(W.float(), rot), grid), rot)
