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

import torch

from peakllm.errors import PeakError
from peakllm.solvers.common import SolveInfo
from peakllm.solvers.gptq import gptq
from peakllm.solvers.grids import Grid, QuantizedWeight

ZERO_CODE = 1  # ternary codes {0, 1, 2} = {-, 0, +}
MAX_STEPS = 14  # bisection steps on log(rate): the share is met within ~0.2% of the rate's range


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
