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
from peakllm.solvers.grids import (Grid, QuantizedWeight, assemble, contiguous_groups, dequantize, fit,
                                   quantize)
from peakllm.solvers.rtn import rtn

# "static": act-order sweep, groups contiguous in the original order with parameters fitted up front (no
# g_idx, nothing to pay at run time; llm-compressor's default). "group": groups formed in the sweep order
# (g_idx stored; the GPTQ paper's act-order). "none": the original column order.
ACT_ORDERS = ("static", "group", "none")


def check_act_order(act_order) -> str:
    if act_order not in ACT_ORDERS:
        raise PeakError(f"act_order must be one of {', '.join(ACT_ORDERS)}, got {act_order!r}")
    return act_order


def gptq(W: torch.Tensor, H: torch.Tensor, grid: Grid, *, blocksize: int = 128, damp: float = 0.01,
         act_order: str = "static", rate: float = 0.0, price: float | None = None) -> tuple[QuantizedWeight, SolveInfo]:
    """Quantize ``W [out, in]`` onto ``grid`` minimising ||WX - QX||^2 given ``H [in, in]``.

    Columns are swept in order of decreasing diag(H) unless ``act_order`` is "none": columns with large
    activations go first, while many columns remain to absorb their error.
    ``act_order`` "static": groups are the contiguous column ranges of the original order and their
    parameters are fitted on W before the sweep, so no ``g_idx`` is needed. "group" and "none": a group's
    parameters are fitted when the sweep reaches its first column, on the weights as updated so far; with
    "group" the groups are consecutive in the permuted order, so ``g_idx`` maps each column to its group.
    Weight and codes come back in the original column order.
    If H + damping cannot be factored even after raising damping, falls back to RTN (info.fallback_rtn).

    ``rate`` (ternary grids): the price of a nonzero code. Each weight takes its nonzero level v only if
    that lowers the column's OBS loss, (w^2 - (w - v)^2) / d^2 with d^2 = [H^-1]_jj, by more than
    rate * lam0 (lam0: the matrix's mean v^2 / d^2, so rate is unitless), else 0: a dead zone that widens
    where the layer's output is least sensitive, with GPTQ's error feedback intact. rate = 0 is plain GPTQ;
    larger rates give more zero codes (cheaper for the sub-1-bit code), see solvers/rate.py.
    ``price``: the same in the loss's own units (lam itself, replacing rate * lam0), so that one price
    means the same trade of error for nonzero codes in every matrix it is given to (rate.allocate_at_price).
    """
    check_weight(W)
    check_hessian(H, W.shape[1])
    check_blocksize(blocksize)
    check_act_order(act_order)
    if not isinstance(grid, Grid):
        raise PeakError(f"grid must be a peakllm.solvers.Grid, got {type(grid).__name__}")
    W, H = prepare(W, H)
    rows, cols = W.shape
    gs = cols if grid.group_size == -1 else grid.group_size

    static_params = sweep_group = None
    diag = torch.diagonal(H).clone()  # the mse search weighs each column's error by its activations
    if act_order == "static":
        static_params = [fit(W[:, g0:g0 + gs], grid, diag[g0:g0 + gs]) for g0 in range(0, cols, gs)]
    perm = None
    diag_sweep = diag
    if act_order != "none":
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        diag_sweep = diag[perm]
        W = W[:, perm]
        H = H[perm][:, perm]
        if static_params is not None:
            sweep_group = contiguous_groups(cols, grid.group_size)[perm].tolist()

    Hinv, damp_used, retries = upper_inverse(H, damp)
    if Hinv is None:
        return rtn(W if perm is None else W[:, torch.argsort(perm)], grid), SolveInfo(damp_used, retries, True,
                                                                                      float("nan"))

    if rate < 0 or (rate and grid.kind != "ternary"):
        raise PeakError(f"rate must be >= 0 and applies to ternary grids only, got {rate} on {grid.kind}")
    if price is not None and (price < 0 or rate or grid.kind != "ternary"):
        raise PeakError(f"price must be >= 0, without a rate, on a ternary grid; got {price} on {grid.kind}")
    lam = price or 0.0
    if rate:
        levels = torch.stack([p[k] for p in static_params for k in ("scale_pos", "scale_neg")]) if static_params \
            else fit(W, grid)["scale_pos"]
        lam = rate * float((levels.float() ** 2).mean()) * float((1.0 / torch.diagonal(Hinv) ** 2).mean())

    group_params = []

    def round_column(j, w, d, upcoming):
        if sweep_group is not None:
            params = static_params[sweep_group[j]]
        elif j % gs == 0:
            params = fit(upcoming(min(j + gs, cols)), grid, diag_sweep[j:j + gs])
            group_params.append(params)
        else:
            params = group_params[-1]
        c = quantize(w.unsqueeze(1), params, grid)
        q = dequantize(c, params, grid).flatten().to(W.dtype)
        if lam:  # the nonzero code must pay for itself: keep it only where it saves more than lam
            keep = (w * w - (w - q) ** 2) > lam * d * d
            c = torch.where(keep.unsqueeze(1), c, torch.ones_like(c))
            q = torch.where(keep, q, torch.zeros_like(q))
        return c.flatten(), q

    Q, codes, Losses = sweep(W, Hinv, round_column, blocksize)
    qw = assemble(Q, codes, static_params or group_params, grid, perm, static=static_params is not None)
    return qw, SolveInfo(damp_used, retries, False, float(Losses.sum()))


def sweep(W: torch.Tensor, Hinv: torch.Tensor, round_column, blocksize: int = 128
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's sweep over the columns of ``W`` (modified in place) in their order, with lazy block updates.

    ``Hinv``: the upper Cholesky factor of the damped inverse Hessian, in the same column order.
    ``round_column(j, w, d, upcoming)`` rounds column j (``w [rows]``, its weights as updated so far; ``d``:
    Hinv[j, j]) and returns (uint8 codes [rows], values [rows]); ``upcoming(end)`` gives the up-to-date
    columns [j, end), for a grid fitted when the sweep reaches a group. Returns (Q, codes, Losses) in the
    sweep's column order; Losses[r] = sum over columns of (w - q)^2 / d^2.
    """
    rows, cols = W.shape
    Q = torch.zeros_like(W)
    codes = torch.zeros(W.shape, dtype=torch.uint8, device=W.device)
    Losses = torch.zeros(rows, dtype=W.dtype, device=W.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(i2 - i1):
            j = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            c, q = round_column(j, w, d, lambda end: current_columns(W, W1, Err1, Hinv, i1, j, end))
            codes[:, j] = c
            Q[:, j] = q
            Losses += (w - q) ** 2 / d**2

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1

        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, codes, Losses


def gptq_grids(W: torch.Tensor, H: torch.Tensor, grids, *, blocksize: int = 128,
               damp: float = 0.01) -> list[torch.Tensor]:
    """The dense weights ``gptq(W, H, grid, act_order="static")`` makes of W for each of ``grids``, in one sweep.

    Rows are solved independently given H, so the problems for several affine grids (of one group size) are
    the rows of W stacked once per grid: one factorisation of H and one column loop serve them all, each row
    block rounded onto its own grid with parameters fitted up front as "static" does. For measuring many
    settings on one matrix (calibrate/quality_probe.py); the same numbers as one gptq call per grid, up to
    floating-point summation order.
    """
    grids = list(grids)
    check_weight(W)
    check_hessian(H, W.shape[1])
    check_blocksize(blocksize)
    if not grids or any(not isinstance(g, Grid) or g.kind != "affine" or g.group_size != grids[0].group_size
                        for g in grids):
        raise PeakError("gptq_grids takes one or more affine grids of one group size")
    W, H = prepare(W, H)
    rows, cols = W.shape
    gs = cols if grids[0].group_size == -1 else grids[0].group_size
    diag = torch.diagonal(H).clone()
    fitted = [[fit(W[:, g0:g0 + gs], g, diag[g0:g0 + gs]) for g0 in range(0, cols, gs)] for g in grids]
    maxq = torch.cat([torch.full((rows, 1), float(g.maxq), dtype=W.dtype, device=W.device) for g in grids])
    stacked = [{k: torch.cat([f[gi][k] for f in fitted]) for k in ("scale", "zero")}
               for gi in range(len(fitted[0]))]
    perm = torch.argsort(diag, descending=True, stable=True)
    sweep_group = contiguous_groups(cols, grids[0].group_size)[perm].tolist()
    Hinv, _, _ = upper_inverse(H[perm][:, perm], damp)
    if Hinv is None:  # as gptq: RTN when no damping makes H factorable
        return [rtn(W, g).weight for g in grids]

    def round_column(j, w, d, upcoming):  # quantize() and dequantize() with one grid per row block
        p = stacked[sweep_group[j]]
        c = (torch.round(w.unsqueeze(1) / p["scale"]) + p["zero"]).clamp(min=torch.zeros_like(maxq), max=maxq)
        return c.flatten().to(torch.uint8), (p["scale"] * (c - p["zero"])).flatten().to(W.dtype)

    Q = sweep(W[:, perm].repeat(len(grids), 1), Hinv, round_column, blocksize)[0]
    Q = Q[:, torch.argsort(perm)].float()
    return list(Q.split(rows))
