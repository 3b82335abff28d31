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
                       **kw) -> tuple[QuantizedWeight, SolveInfo, float]:
    """GPTQ ternary codes of W with at least `share` zero codes, at the smallest rate found that gives them
    (within `tolerance` above the share when the search converges); returns (codes, info, rate).
    A share plain GPTQ already reaches costs one solve (rate 0, exactly plain GPTQ)."""
    if grid.kind != "ternary":
        raise PeakError("a zero-share target needs a ternary grid")
    if not 0.0 <= share < 1.0:
        raise PeakError(f"zero share must be in [0, 1), got {share}")
    best = gptq(W, H, grid, rate=0.0, **kw)
    if zero_share(best[0]) >= share or best[1].fallback_rtn:
        return best[0], best[1], 0.0
    lo, hi = None, 1.0  # log-space bisection: lo fails (too few zeros), hi must pass
    while True:
        q, info = gptq(W, H, grid, rate=hi, **kw)
        if zero_share(q) >= share:
            best = (q, info)
            break
        lo, hi = hi, hi * 8
        if hi > 1e9:
            raise PeakError(f"no rate reaches {share:.3f} zero codes (at most {zero_share(q):.3f})")
    lo = lo if lo is not None else hi / 1e4
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
