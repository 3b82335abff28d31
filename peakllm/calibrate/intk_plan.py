"""Per-matrix int-k grids for a size target: ``quantize --target-bits B`` with ``--format peakllm`` and int-k bits.

B is bits/param over the decoder's matrices, their bytes counted as formats/intk.py stores them (codes, fp16
scales, uint8 zeros unless the grid is symmetric, the rotation's signs). ``QuantRecipe.prepare`` checks
before any work that the candidate grids can reach B; ``allocate_grids`` then runs a measuring pass over the
layers (the original model's Hessians, no weight changes), scores every matrix at every candidate with the
run's own solver on an evenly spaced sample of rows (in the rotated basis when the run rotates) and picks one
grid per matrix with solvers/allocate.allocate (the multiple-choice knapsack the GGUF allocation uses); the
normal run follows with those grids.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from peakllm.calibrate.loop import calibrate
from peakllm.calibrate.preflight import matrix_shapes
from peakllm.errors import PeakError
from peakllm.formats.bitpack import packed_row_bytes
from peakllm.formats.rotation import block_for, rotation_for
from peakllm.solvers.allocate import allocate, layer_loss, sample_rows
from peakllm.solvers.grids import Grid
from peakllm.solvers.rotated import gptq_rotated, rtn_rotated

LOSS_ROWS = 128  # rows of each matrix the measuring pass solves (rows are independent given H)
# 2 to 4 bits, groups of 32 to 128, symmetric (no zeros stored), each with its clipping range searched: the
# choice the allocation has unless --target-grids narrows or widens it. The search is what makes 2 bits usable:
# on the default model at 2.5 bits/param, rotated, 76 wiki ppl with it against 1113 with min-max grids
# (docs/results/quantization.md, "Below 4 bits")
DEFAULT_GRIDS = "2g32sm,2g64sm,2g128sm,3g64sm,3g128sm,4g64sm,4g128sm"
_TOKEN = re.compile(r"^([2348])g(-1|\d+)(s?)(m?)$")


def parse_grids(text: str) -> tuple[Grid, ...]:
    """'3g128s,4g64m' -> the int-k grids an allocation chooses from: bits, group size, s = symmetric, m = the
    clipping range searched for the least squared error (--mse) instead of min-max."""
    grids = []
    for token in (t.strip() for t in text.split(",")):
        m = _TOKEN.match(token)
        if not m or m.group(2) == "0":
            raise PeakError(f"--target-grids takes BITSgGROUP[s][m] items such as 3g128s or 4g64m (bits 2, 3, 4 or "
                            f"8; group -1 for one per row; s: symmetric; m: clipping searched), got {token!r}")
        grids.append(Grid("affine", int(m.group(1)), int(m.group(2)), sym=bool(m.group(3)), mse=bool(m.group(4))))
    return tuple(dict.fromkeys(grids))


def grid_name(grid: Grid) -> str:
    return f"{grid.bits}g{grid.group_size}{'s' if grid.sym else ''}{'m' if grid.mse else ''}"


def intk_bytes(grid: Grid, shape: tuple[int, int], rotate: bool) -> int:
    """Bytes formats/intk.PackedIntK stores for an [out, in] matrix on ``grid``."""
    out, cols = shape
    groups = 1 if grid.group_size == -1 else math.ceil(cols / grid.group_size)
    signs = (cols + 7) // 8 if rotate and block_for(cols) else 0
    return out * packed_row_bytes(cols, grid.bits) + out * groups * (2 if grid.sym else 3) + signs


@dataclass
class GridPlan:
    """What the target leaves to allocate: the matrices, their candidates and the bytes they may take."""

    target_bits: float
    candidates: tuple[Grid, ...]
    rotate: bool = False
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    budget_bytes: int = 0

    def check(self, model) -> None:
        """Fill shapes and the budget; one error when the candidates cannot reach the target."""
        self.shapes, params = matrix_shapes(model)
        usable = {n: self.usable(s) for n, s in self.shapes.items()}
        empty = [n for n, c in usable.items() if not c]
        if empty:
            raise PeakError(f"{empty[0]} {self.shapes[empty[0]]} takes none of the --target-grids (a group size "
                            "must not exceed the matrix's width)")
        self.budget_bytes = int(self.target_bits * params / 8)
        low = sum(min(intk_bytes(g, self.shapes[n], self.rotate) for g in c) for n, c in usable.items())
        high = sum(max(intk_bytes(g, self.shapes[n], self.rotate) for g in c) for n, c in usable.items())
        if not low <= self.budget_bytes:
            raise PeakError(f"--target-bits {self.target_bits} is below what the candidate grids reach: "
                            f"{8 * low / params:.3f} to {8 * high / params:.3f} bits/param over the decoder's matrices")
        if self.budget_bytes > high:
            raise PeakError(f"--target-bits {self.target_bits} is above the largest candidate grids "
                            f"({8 * high / params:.3f} bits/param): add wider ones to --target-grids")

    def usable(self, shape: tuple[int, int]) -> list[Grid]:
        return [g for g in self.candidates if g.group_size == -1 or g.group_size <= shape[1]]


class GridProbe:
    """A recipe that changes nothing: it scores each matrix at each candidate grid (the measuring pass)."""

    name = "measuring grids"
    stats = frozenset({"hessian", "tokens"})

    def __init__(self, plan: GridPlan, method: str, seed: int, act_order: str, damp: float):
        self.plan, self.method, self.seed, self.act_order, self.damp = plan, method, seed, act_order, damp
        self.losses: dict[str, dict[Grid, float]] = {}

    def compress(self, name: str, layer_index: int, W, stats: dict):
        H = stats.pop("hessian").float()
        W = W.detach().float()
        idx = sample_rows(W.shape[0], LOSS_ROWS)
        Ws = W if idx is None else W[idx]
        scale = W.shape[0] / Ws.shape[0]
        rot = rotation_for(name, W.shape[1], self.seed) if self.plan.rotate else None
        losses = {}
        for g in self.plan.usable(tuple(W.shape)):
            if self.method == "gptq":
                q, _ = gptq_rotated(Ws, H, g, rot, act_order=self.act_order, damp=self.damp)
            else:
                q = rtn_rotated(Ws, g, rot)
            losses[g] = scale * layer_loss(Ws, q.weight, H)
        self.losses[name] = losses  # returns None: the weights stay as they are


def allocate_grids(model, segments, recipe, spec) -> dict:
    """The measuring pass and the allocation; fills ``recipe.grids``. Returns what the JSON result records."""
    plan = recipe.target
    probe = GridProbe(plan, recipe.method, recipe.seed, recipe.act_order, recipe.damp)
    report = calibrate(model, segments, probe, batch_size=spec.batch_size, sequential=spec.sequential,
                       sink_weight=spec.sink_weight, progress=spec.progress)
    options = {n: [(g, intk_bytes(g, plan.shapes[n], plan.rotate), loss) for g, loss in probe.losses[n].items()]
               for n in plan.shapes}
    chosen = allocate(options, plan.budget_bytes)
    recipe.grids.update(chosen)
    stored = sum(intk_bytes(g, plan.shapes[n], plan.rotate) for n, g in chosen.items())
    params = sum(math.prod(s) for s in plan.shapes.values())
    counts: dict[str, int] = {}
    for g in chosen.values():
        counts[grid_name(g)] = counts.get(grid_name(g), 0) + 1
    return {"allocation_seconds": round(report.seconds["total"], 2),
            "allocation_loss": sum(probe.losses[n][g] for n, g in chosen.items()),
            "allocation_budget_bytes": plan.budget_bytes, "allocation_bytes": stored,
            "allocation_bits": 8 * stored / params, "allocation_counts": dict(sorted(counts.items())),
            "allocation": {n: grid_name(g) for n, g in chosen.items()}}
