"""Choosing one storage option per tensor to minimise the total loss within a size: a multiple-choice knapsack.

``type_losses`` measures a matrix's layer-wise loss tr((W - Q) H (W - Q)^T) at each candidate block type, Q
the type's round-to-nearest with the imatrix-weighted grid fit (``rtn_ggml``, importance diag(H)): the cheap
proxy of what GPTQ reaches on that grid (benchmarks/bench_gguf_allocation.py compares their rankings).
``allocate`` picks one option per tensor as EXL2's optimiser does in spirit: every tensor starts at its
smallest option, then the upgrade with the largest loss decrease per byte is taken while it fits (steps along
each tensor's lower convex hull of (bytes, loss)), and the bytes left are spent on the best single jumps that
still fit. Every step is checked against the budget, so the total never exceeds it.
"""

from __future__ import annotations

import heapq
import math

import torch

from peakllm.errors import PeakError
from peakllm.solvers.ggml import gptq_ggml, rtn_ggml


def layer_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's output error summed over the calibration tokens H was built from."""
    E = (W - Q).to(H.dtype)
    return float(((E @ H) * E).sum())


def sample_rows(rows: int, max_rows: int | None) -> torch.Tensor | None:
    """Evenly spaced row indices (None: all rows). Rows are fitted and scored independently, so the loss of
    a row sample times rows / len(sample) estimates the matrix's loss without bias."""
    if max_rows is None or rows <= max_rows:
        return None
    return torch.linspace(0, rows - 1, max_rows).round().long().unique()


def type_losses(W: torch.Tensor, H: torch.Tensor, types, *, max_rows: int | None = None,
                solver: str = "rtn") -> dict[str, float]:
    """The layer-wise loss of ``W [out, in]`` on each of ``types`` (block type names that take its width):
    ``solver`` "rtn" rounds onto the grid rtn_ggml fits with importance diag(H) (the cheap proxy), "gptq"
    solves it as the run will (gptq_ggml). ``max_rows``: score an evenly spaced sample of rows (both solvers
    treat rows independently given H), scaled to all rows."""
    W = W.detach().float()
    H = H.detach().float()
    idx = sample_rows(W.shape[0], max_rows)
    Ws = W if idx is None else W[idx]
    scale = W.shape[0] / Ws.shape[0]
    importance = torch.diagonal(H).clamp_min(0)

    def solve(t: str) -> torch.Tensor:
        if solver == "gptq":
            return gptq_ggml(Ws, H, t)[0].dequantize()
        return rtn_ggml(Ws, t, importance).dequantize()

    if solver not in ("rtn", "gptq"):
        raise PeakError(f"type_losses solves with rtn or gptq, not {solver!r}")
    return {t: scale * layer_loss(Ws, solve(t), H) for t in types}


def hull(options: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """The options no other beats in both size and loss, on their lower convex hull, by increasing size."""
    best: list[tuple[str, int, float]] = []
    for opt in sorted(options, key=lambda o: (o[1], o[2])):
        if best and opt[2] >= best[-1][2]:
            continue  # dominated: no smaller loss for more bytes
        while len(best) >= 2:  # drop the middle point when it lies on or above the chord
            (_, b0, l0), (_, b1, l1) = best[-2], best[-1]
            if (l1 - l0) * (opt[1] - b0) >= (opt[2] - l0) * (b1 - b0):
                best.pop()
            else:
                break
        best.append(opt)
    return best


def allocate(options: dict[str, list[tuple[str, int, float]]], budget_bytes: int) -> dict[str, str]:
    """One option per tensor, minimising the summed loss with the summed bytes <= ``budget_bytes``.

    ``options``: tensor -> [(type, bytes, loss), ...]. One error when even the smallest options exceed the
    budget."""
    if not options:
        return {}
    for name, opts in options.items():
        if not opts or any(b < 0 or not math.isfinite(loss) for _, b, loss in opts):
            raise PeakError(f"{name}: every option needs bytes >= 0 and a finite loss")
    hulls = {name: hull(opts) for name, opts in options.items()}
    pick = {name: 0 for name in hulls}
    used = sum(h[0][1] for h in hulls.values())
    if used > budget_bytes:
        raise PeakError(f"the smallest types take {used:,} bytes, over the {budget_bytes:,} the target leaves")
    heap = []

    def push(name: str) -> None:
        h, i = hulls[name], pick[name]
        if i + 1 < len(h):
            gain, cost = h[i][2] - h[i + 1][2], h[i + 1][1] - h[i][1]
            heapq.heappush(heap, (-gain / max(cost, 1e-9), name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], pick[name]
        cost = h[i + 1][1] - h[i][1]
        if used + cost <= budget_bytes:
            used += cost
            pick[name] = i + 1
            push(name)
    choice = {name: hulls[name][pick[name]] for name in hulls}
    while True:  # the bytes left: the single jump (any option, off the hull too) that lowers the loss most
        best = None
        for name, opts in options.items():
            _, b0, l0 = choice[name]
            for opt in opts:
                if opt[2] < l0 and used - b0 + opt[1] <= budget_bytes and (best is None or l0 - opt[2] > best[0]):
                    best = (l0 - opt[2], name, opt)
        if best is None:
            break
        _, name, opt = best
        used += opt[1] - choice[name][1]
        choice[name] = opt
    return {name: opt[0] for name, opt in choice.items()}
