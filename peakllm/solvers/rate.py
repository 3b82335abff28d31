"""Rate-controlled ternary GPTQ: the share of zero codes as a controlled quantity (QMoE's size lever).

The sub-1-bit code (formats/sub1.py) spends its bits on nonzero codes: ~0.8 bits/param needs ~87% zeros,
while plain GPTQ's error feedback leaves ~84%. `gptq` with a `rate` > 0 keeps a nonzero code only where it
lowers the column's OBS loss by more than the rate (a dead zone scaled by each column's sensitivity), so
GPTQ still spreads every rounding error over the columns not yet quantized. `gptq_at_zero_share` finds,
by bisection, the smallest rate whose codes reach a requested share of zeros; the caller derives that
share from a bits/param target with the format's own accounting.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from peakllm.errors import PeakError
from peakllm.solvers.common import SolveInfo
from peakllm.solvers.gptq import gptq
from peakllm.solvers.grids import Grid, QuantizedWeight

ZERO_CODE = 1  # ternary codes {0, 1, 2} = {-, 0, +}
MAX_STEPS = 14  # bisection steps on log(rate): the share is met within ~0.2% of the rate's range
ZERO_SHARE_MAX = 255 / 256  # the sub1 accounting's largest share (its probabilities are multiples of 1/256)


def zero_share(qw: QuantizedWeight) -> float:
    return float((qw.codes == ZERO_CODE).float().mean())


def gptq_at_zero_share(W: torch.Tensor, H: torch.Tensor, grid: Grid, share: float, *, tolerance: float = 0.002,
                       rate_hint: float | None = None, **kw) -> tuple[QuantizedWeight, SolveInfo, float]:
    """GPTQ ternary codes of W with at least `share` zero codes, at the smallest rate found that gives them
    (within `tolerance` above the share when the search converges); returns (codes, info, rate).
    Without a hint, a share plain GPTQ already reaches costs one solve (rate 0, exactly plain GPTQ).
    `rate_hint` (e.g. the rate a similar matrix needed) starts the search there: fewer solves."""
    if grid.kind != "ternary":
        raise PeakError("a zero-share target needs a ternary grid")
    if not 0.0 <= share < 1.0:
        raise PeakError(f"zero share must be in [0, 1), got {share}")

    def solve(rate: float):
        q, info = gptq(W, H, grid, rate=rate, **kw)
        return q, info, zero_share(q) >= share

    if rate_hint is None or rate_hint <= 0:
        q, info, ok = solve(0.0)
        if ok or info.fallback_rtn:
            return q, info, 0.0
        lo, hi = None, 1.0
    else:
        lo, hi = None, rate_hint
    # Bracket: hi must reach the share, lo must not (None: not found yet); steps of 4x in rate.
    q, info, ok = solve(hi)
    if info.fallback_rtn:  # H could not be factored: RTN codes, which no rate changes
        return q, info, 0.0
    if ok:
        best, start = (q, info), hi
        lo = hi / 4
        while True:
            if lo < start / 4 ** 5:  # five steps down without failing: see whether plain GPTQ already does it
                q, info, ok = solve(0.0)
                if ok:
                    return q, info, 0.0
            q, info, ok = solve(lo)
            if not ok:
                break
            hi, best = lo, (q, info)
            if zero_share(q) - share <= tolerance:
                return q, info, hi
            lo /= 4
            if lo < 1e-9:  # every positive rate reaches it: the smallest tried will do
                return best[0], best[1], hi
    else:
        while True:
            lo, hi = hi, hi * 4
            if hi > 1e9:
                raise PeakError(f"no rate reaches {share:.3f} zero codes (at most {zero_share(q):.3f})")
            q, info, ok = solve(hi)
            if ok:
                best = (q, info)
                break
    rate = hi
    for _ in range(MAX_STEPS):
        if zero_share(best[0]) - share <= tolerance:
            break
        mid = math.sqrt(lo * hi)
        q, info = gptq(W, H, grid, rate=mid, **kw)
        if zero_share(q) >= share:
            hi, best, rate = mid, (q, info), mid
        else:
            lo = mid
    return best[0], best[1], rate


def allocate_at_price(problems: list, bits_of: Callable[[int, float], float], budget: float, *,
                      price_hint: float | None = None, tolerance: float = 0.005, map_fn=map,
                      **kw) -> tuple[list, float]:
    """Bit allocation across matrices by their output error: one price for a nonzero code in all of them.

    `problems`: (W, H, weight, grid) per matrix; `weight` scales its OBS loss into common units (H being a
    per-token mean, a MoE expert's weight is its calibration token count, so the loss is the error summed
    over the tokens it serves). A code is kept only where it saves more than the price in those units, so
    the marginal error per nonzero code is equal everywhere: the matrices whose output gains most from
    nonzeros get them (a Lagrangian allocation; GPTQ's error feedback intact in each matrix).
    `bits_of(i, zero_share)`: what matrix i then stores per parameter (the format's accounting). The
    price is the smallest found (bisection on its log) at which the parameter-weighted mean of bits_of is
    <= `budget`, within `tolerance` x budget below it; never above the budget. `map_fn(f, indices)` runs the
    per-matrix solves (e.g. on several workers). Returns ([(codes, info)] per matrix, price)."""
    sizes = [W.numel() for W, _, _, _ in problems]
    total = float(sum(sizes))
    if not problems:
        return [], 0.0
    if any(weight <= 0 for _, _, weight, _ in problems):
        raise PeakError("every matrix's loss weight must be > 0")

    def run(price: float):
        def one(i):
            W, H, weight, grid = problems[i]
            return gptq(W, H, grid, price=price / weight, **kw) if price else gptq(W, H, grid, **kw)
        out = list(map_fn(one, range(len(problems))))
        bits = sum(n * bits_of(i, zero_share(q)) for i, (n, (q, _)) in enumerate(zip(sizes, out))) / total
        return out, bits

    if sum(n * bits_of(i, ZERO_SHARE_MAX) for i, n in enumerate(sizes)) / total > budget:
        raise PeakError(f"these matrices need more than {budget:.3f} bits/param even with (almost) every code zero")
    out, bits = run(0.0)
    if bits <= budget:  # plain GPTQ fits already
        return out, 0.0
    if price_hint is None or price_hint <= 0:  # the order of a code's saving: w^2 H_jj, weighted
        price_hint = float(torch.tensor([weight * float((W.float() ** 2).mean()) * float(torch.diagonal(H).mean())
                                         for W, H, weight, _ in problems]).median())
    lo, hi, best = 0.0, price_hint, None
    while best is None:  # bracket: hi within the budget, lo (0 or a price found over it) not
        res = run(hi)
        if res[1] <= budget:
            best = res
        else:
            lo, hi = hi, hi * 4
            if hi > price_hint * 4 ** 20:
                raise PeakError(f"no price brings these matrices to {budget:.3f} bits/param (at best {res[1]:.3f})")
    while lo == 0.0:  # find a price over the budget below hi
        res = run(hi / 4)
        if res[1] > budget:
            lo = hi / 4
        else:
            hi, best = hi / 4, res
            if hi < price_hint / 4 ** 20:
                return best[0], hi
    for _ in range(MAX_STEPS):
        if best[1] >= budget * (1 - tolerance):
            break
        mid = math.sqrt(lo * hi)
        res = run(mid)
        if res[1] <= budget:
            hi, best = mid, res
        else:
            lo = mid
    return best[0], hi


def thin_nonzeros(codes: torch.Tensor, fraction: float) -> torch.Tensor:
    """Ternary codes with round(fraction x nonzeros) of their nonzero codes set to zero, evenly spaced in
    row-major order (deterministic). The last step of a size target: after the solver and the shared
    dictionary, a few codes may still stand between the stored size and the target, and without the
    calibration statistics there is nothing better to rank them by than their place."""
    if not 0.0 <= fraction <= 1.0:
        raise PeakError(f"thinning fraction must be in [0, 1], got {fraction}")
    nz = (codes != ZERO_CODE).reshape(-1).nonzero().squeeze(1)
    k = math.floor(fraction * nz.numel() + 0.5)
    if k == 0:
        return codes
    pick = nz[((torch.arange(k, dtype=torch.float64) + 0.5) * nz.numel() / k).long()]
    out = codes.clone().reshape(-1)
    out[pick] = ZERO_CODE
    return out.reshape(codes.shape)
