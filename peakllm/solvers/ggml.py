"""RTN and GPTQ onto a llama.cpp block type's exact grid.

The type's parameters (scales, mins, the K-quants' integer sub-block scales under an fp16 d) are fitted on
W before anything is rounded (``ggml_fit.fit_params``, weighted by the importance vector, diag(H) for GPTQ),
so every column has a fixed grid ``scale[group] * level + bias[group]``; RTN rounds each weight to its
nearest point, GPTQ sweeps the columns in act-order (static groups, as ``gptq(act_order="static")``) with
gptq's own sweep, rounding each column onto its group's fixed grid. The returned ``GGMLWeight`` packs to the
bytes llama.cpp reads, and its ``dequantize()`` is the weight llama.cpp computes with.
"""

from __future__ import annotations

import torch

from peakllm.errors import PeakError
from peakllm.formats.gguf.blocks import (ROW_CHUNK_WEIGHTS, BlockType, GGMLWeight, check_width, grid_values,
                                         per_column, scale_bias)
from peakllm.solvers.common import SolveInfo, check_blocksize, check_hessian, check_weight, prepare, upper_inverse
from peakllm.solvers.ggml_fit import fit_params, nearest_value
from peakllm.solvers.gptq import sweep


def nearest_codes(t: BlockType, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """uint8 codes of the grid points nearest ``w``, with ``scale``/``bias`` broadcast against ``w``."""
    s = scale.to(w.dtype)
    target = w if bias is None else w - bias.to(w.dtype)
    zero = s == 0
    target = torch.where(zero, 0, target / torch.where(zero, 1, s))  # a zero scale: every code is the same
    if t.values is not None:
        values = torch.tensor(t.values, dtype=w.dtype, device=w.device)
        return nearest_value(target, values).to(torch.uint8)
    level = torch.round(target).clamp(*t.solve_levels)
    return (level - t.level_min).to(torch.uint8)


def check_importance(importance: torch.Tensor | None, cols: int) -> None:
    if importance is not None and (not isinstance(importance, torch.Tensor) or tuple(importance.shape) != (cols,)
                                   or not torch.isfinite(importance).all() or bool((importance < 0).any())):
        raise PeakError(f"importance must be a finite nonnegative tensor [{cols}], got "
                        f"{tuple(getattr(importance, 'shape', ()))}")


def grid_params(W: torch.Tensor, t: BlockType, importance: torch.Tensor | None,
                params: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``params`` checked against W's shape and the type's ranges, or fitted on W when None."""
    if params is None:
        return fit_params(W, t, importance)
    GGMLWeight(t.name, torch.zeros(W.shape, dtype=torch.uint8), params)  # one error: wrong shape, dtype or range
    return {k: v.to(W.device) for k, v in params.items()}


def rtn_ggml(W: torch.Tensor, type_name: str, importance: torch.Tensor | None = None, *,
             params: dict[str, torch.Tensor] | None = None) -> GGMLWeight:
    """``W [out, in]`` in block type ``type_name``: fitted parameters, every weight rounded to the nearest point.
    ``params``: a grid given instead of fitted (e.g. the one a GGUF file already stores for this weight)."""
    check_weight(W)
    t = check_width(type_name, W.shape[1])
    check_importance(importance, W.shape[1])
    W = W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    params = grid_params(W, t, importance, params)
    scale, bias = scale_bias(t, params)
    codes = torch.empty(W.shape, dtype=torch.uint8, device=W.device)
    step = max(1, ROW_CHUNK_WEIGHTS // W.shape[1])  # rows at a time: ~20 bytes a weight of temporaries
    for i in range(0, W.shape[0], step):
        b = None if bias is None else per_column(t, bias[i:i + step])
        codes[i:i + step] = nearest_codes(t, W[i:i + step], per_column(t, scale[i:i + step]), b)
    return GGMLWeight(t.name, codes, params)


def gptq_ggml(W: torch.Tensor, H: torch.Tensor, type_name: str, *, blocksize: int = 128, damp: float = 0.01,
              act_order: bool = True, importance: torch.Tensor | None = None,
              params: dict[str, torch.Tensor] | None = None, fit_as_swept: bool = False,
              mask: torch.Tensor | None = None) -> tuple[GGMLWeight, SolveInfo]:
    """GPTQ of ``W [out, in]`` onto block type ``type_name`` minimising ||WX - QX||^2 given ``H [in, in]``.

    The grid is fitted on W up front with ``importance`` (default diag(H)) weighting each column's error;
    columns are then swept in order of decreasing diag(H) (``act_order``) or in their own order, each rounded
    onto its group's fixed grid with the error spread over the columns not yet rounded.
    ``fit_as_swept`` (own column order only): each block's grid is fitted when the sweep reaches the block, on
    its weights as the errors of the columns before it left them (the GPTQ paper's groups), instead of on W.
    ``params``: a grid given instead of fitted (``GGMLWeight.params`` of this shape and type).
    ``mask`` (bool ``[out, in]``, False = pruned, e.g. SparseGPT's): pruned weights are rounded as 0 (the
    code nearest 0: exactly 0 on the symmetric types, whose levels hold 0) and their error spread like any other.
    If H + damping cannot be factored, falls back to RTN on the same grid (info.fallback_rtn).
    """
    if mask is not None and (fit_as_swept or mask.dtype != torch.bool or tuple(mask.shape) != tuple(W.shape)):
        raise PeakError(f"mask must be bool {list(W.shape)} (and no fit_as_swept)")
    if fit_as_swept and (act_order or params is not None):
        raise PeakError("fit_as_swept fits each block's grid in the sweep: it needs act_order=False and no params")
    check_weight(W)
    check_hessian(H, W.shape[1])
    check_blocksize(blocksize)
    t = check_width(type_name, W.shape[1])
    check_importance(importance, W.shape[1])
    W, H = prepare(W, H)
    diag = torch.diagonal(H).clone()
    if fit_as_swept:
        return _gptq_fit_as_swept(W, H, t, blocksize, damp, diag if importance is None else importance.to(W))
    params = grid_params(W, t, diag if importance is None else importance, params)
    scale, bias = scale_bias(t, params)
    group = torch.arange(W.shape[1], device=W.device) // t.group

    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    keep = None if mask is None else mask.to(W.device)
    if perm is not None:
        W, H, group = W[:, perm], H[perm][:, perm], group[perm]
        keep = None if keep is None else keep[:, perm]
    Hinv, damp_used, retries = upper_inverse(H, damp)
    if Hinv is None:
        W = W if keep is None else W * keep
        W = W if perm is None else W[:, torch.argsort(perm)]
        codes = nearest_codes(t, W, per_column(t, scale), per_column(t, bias))
        return GGMLWeight(t.name, codes, params), SolveInfo(damp_used, retries, True, float("nan"))

    group_of = group.tolist()

    def round_column(j, w, d, upcoming):
        g = group_of[j]
        s, b = scale[:, g:g + 1], None if bias is None else bias[:, g:g + 1]
        if keep is not None:
            w = torch.where(keep[:, j], w, 0)
        c = nearest_codes(t, w.unsqueeze(1), s, b)
        return c.flatten(), grid_values(t, c, s, b).flatten().to(W.dtype)

    _, codes, Losses = sweep(W, Hinv, round_column, blocksize)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return GGMLWeight(t.name, codes.contiguous(), params), SolveInfo(damp_used, retries, False, float(Losses.sum()))


def _gptq_fit_as_swept(W: torch.Tensor, H: torch.Tensor, t: BlockType, blocksize: int, damp: float,
                       imp: torch.Tensor) -> tuple[GGMLWeight, SolveInfo]:
    """gptq_ggml's sweep with each block's grid fitted on its columns as the sweep reaches them (checked input)."""
    Hinv, damp_used, retries = upper_inverse(H, damp)
    if Hinv is None:
        return rtn_ggml(W, t.name, imp), SolveInfo(damp_used, retries, True, float("nan"))
    fitted: list[dict[str, torch.Tensor]] = []
    grid: list = [None, None]  # the current block's (scale, bias) per group

    def round_column(j, w, d, upcoming):
        if j % t.block == 0:
            block = fit_params(upcoming(j + t.block), t, imp[j:j + t.block])
            fitted.append(block)
            grid[:] = scale_bias(t, block)
        g = (j % t.block) // t.group
        s, b = grid[0][:, g:g + 1], None if grid[1] is None else grid[1][:, g:g + 1]
        c = nearest_codes(t, w.unsqueeze(1), s, b)
        return c.flatten(), grid_values(t, c, s, b).flatten().to(W.dtype)

    _, codes, Losses = sweep(W, Hinv, round_column, blocksize)
    params = {k: torch.cat([block[k] for block in fitted], dim=1) for k in fitted[0]}
    return GGMLWeight(t.name, codes.contiguous(), params), SolveInfo(damp_used, retries, False, float(Losses.sum()))
