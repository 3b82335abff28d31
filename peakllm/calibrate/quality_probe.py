"""A measuring pass for `peakllm plan`'s quality prediction: every decoder matrix solved at every candidate
setting with the run's own solver, scored by the layer-wise objective that solver minimises.

For an [out, in] matrix W with calibration Hessian H (= sum of x x^T over the tokens), a setting's solver gives
Q and its loss is tr((W - Q) H (W - Q)^T) = ||(W - Q) X||^2, the output error GPTQ minimises and RTN ignores.
The pass keeps it relative to the matrix's output energy tr(W H W^T) = ||W X||^2, so that matrices of any scale
and any number of calibration tokens add up. Rows are solved independently given H, so an evenly spaced
sample of them (LOSS_ROWS) estimates both sums without bias, as intk_plan.GridProbe scores its grids; and when
the pass is asked for fewer layers than the model has, an evenly spaced sample of layers is scored (the cost is
GPTQ's column sweep, once per matrix and setting) and the plan's sum scaled by the layers' ratio. The weights
are left as they are: the pass sees the original model's inputs at every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peakllm.calibrate.loop import calibrate
from peakllm.errors import PeakError
from peakllm.models.anatomy import decoder_layers
from peakllm.solvers.allocate import layer_loss, sample_rows
from peakllm.solvers.grids import Grid
from peakllm.solvers.gptq import gptq
from peakllm.solvers.rtn import rtn

LOSS_ROWS = 128
METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class Setting:
    """One way a plan compresses every decoder matrix: a quantization method on an int-k grid."""
    method: str
    grid: Grid

    def __post_init__(self):
        if self.method not in METHODS:
            raise PeakError(f"the quality probe scores {', '.join(METHODS)}, not {self.method!r}")


def solve(setting: Setting, W: torch.Tensor, H: torch.Tensor, *, act_order: str = "static",
          damp: float = 0.01) -> torch.Tensor:
    """The dense weights ``setting``'s solver makes of W, as recipes.QuantRecipe.compress makes them."""
    if setting.method == "gptq":
        return gptq(W, H, setting.grid, act_order=act_order, damp=damp)[0].weight
    return rtn(W, setting.grid).weight


def relative_losses(W: torch.Tensor, H: torch.Tensor, settings, *, max_rows: int | None = LOSS_ROWS,
                    act_order: str = "static", damp: float = 0.01) -> dict[Setting, float]:
    """tr((W - Q) H (W - Q)^T) / tr(W H W^T) for each setting's Q, on an evenly spaced sample of W's rows."""
    W, H = W.detach().float(), H.detach().float()
    idx = sample_rows(W.shape[0], max_rows)
    Ws = W if idx is None else W[idx]
    energy = layer_loss(Ws, torch.zeros_like(Ws), H)
    if energy <= 0:  # a matrix no calibration token reaches (or all zero) cannot add output error
        return {s: 0.0 for s in settings}
    return {s: layer_loss(Ws, solve(s, Ws, H, act_order=act_order, damp=damp), H) / energy for s in settings}


class SettingProbe:
    """A recipe that changes nothing: it scores each matrix at each setting (the measuring pass)."""

    name = "measuring plans"
    stats = frozenset({"hessian", "tokens"})

    def __init__(self, settings, *, max_rows: int | None = LOSS_ROWS, layers: set[int] | None = None,
                 act_order: str = "static", damp: float = 0.01):
        self.settings, self.max_rows, self.act_order, self.damp = tuple(settings), max_rows, act_order, damp
        self.layers = layers  # None: every layer
        self.losses: dict[str, dict[Setting, float]] = {}

    def wants_layer(self, layer_index: int) -> bool:
        """The loop collects no statistics for the layers not sampled (calibrate/loop.py)."""
        return self.layers is None or layer_index in self.layers

    def compress(self, name: str, layer_index: int, W, stats: dict):
        # a group wider than the matrix is one group per row, in the solvers as in the run
        self.losses[name] = relative_losses(W, stats.pop("hessian"), self.settings, max_rows=self.max_rows,
                                            act_order=self.act_order, damp=self.damp)


def layer_sample(n_layers: int, wanted: int | None) -> set[int] | None:
    """``wanted`` evenly spaced layer indices, the first and the last included (None: every layer)."""
    if wanted is None or wanted >= n_layers:
        return None
    if wanted < 1:
        raise PeakError(f"the quality probe scores at least 1 layer, got {wanted}")
    return set(torch.linspace(0, n_layers - 1, wanted).round().long().tolist())


def measure_settings(model, segments: torch.Tensor, settings, *, max_rows: int | None = LOSS_ROWS,
                     layers: int | None = None, batch_size: int = 8,
                     progress: bool = False) -> tuple[dict[Setting, float], dict[str, dict[Setting, float]]]:
    """Each setting's score (the relative layer-wise losses summed over the decoder's matrices, estimated from
    ``layers`` evenly spaced layers when given) and the per-matrix losses it came from."""
    n_layers = len(decoder_layers(model)[0])
    sample = layer_sample(n_layers, layers)
    probe = SettingProbe(settings, max_rows=max_rows, layers=sample)
    calibrate(model, segments, probe, batch_size=batch_size, sequential=False, progress=progress)
    scale = 1.0 if sample is None else n_layers / len(sample)
    scores = {s: scale * sum(per.get(s, 0.0) for per in probe.losses.values()) for s in probe.settings}
    return scores, probe.losses
