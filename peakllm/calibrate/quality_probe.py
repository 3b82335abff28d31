"""A measuring pass for `peakllm plan`'s quality prediction: a sample of decoder matrices solved at every candidate
setting with the run's own solver, scored by the layer-wise objective that solver minimises.

For an [out, in] matrix W with calibration Hessian H (= sum of x x^T over the tokens), a setting's solver gives
Q and its loss is tr((W - Q) H (W - Q)^T) = ||(W - Q) X||^2, the output error GPTQ minimises and RTN ignores.
The pass keeps it relative to the matrix's output energy tr(W H W^T) = ||W X||^2, so that matrices of any scale
and any number of calibration tokens add up. Rows are solved independently given H, so an evenly spaced
sample of them (LOSS_ROWS) estimates both sums without bias, as intk_plan.GridProbe scores its grids, and all
GPTQ settings of a matrix share one sweep (solvers.gptq.gptq_grids). An evenly spaced sample of layers is
scored and the sum scaled by the layers' ratio. The weights are left as they are: the pass sees the original
model's inputs at every layer, in one forward that stops after the last sampled layer.

``holdout``: the settings are solved on the Hessian of the first half of the segments and scored on the
other half's. A solver fitted to its calibration tokens looks better on them than on text it has not seen
(GPTQ more than RTN, which fits nothing), and the real run is judged on unseen text.

The anchor stream (optional): ``anchor_tokens`` positions of the first segment run through every layer twice,
as they are and with every matrix rounded onto the anchor setting (RTN), for the caller to measure what that
rounding costs in loss (plan/quality.py) from the two streams' last hidden states.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from peakllm.calibrate.stats import Stats, capture_inputs
from peakllm.errors import PeakError
from peakllm.models.anatomy import compressible_linears, decoder_layers, fused_experts, is_moe, layer_output
from peakllm.solvers.allocate import layer_loss, sample_rows
from peakllm.solvers.grids import Grid
from peakllm.solvers.gptq import gptq, gptq_grids
from peakllm.solvers.rtn import rtn

LOSS_ROWS = 64
METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class Setting:
    """One way a plan compresses every decoder matrix: a quantization method on an int-k grid."""
    method: str
    grid: Grid

    def __post_init__(self):
        if self.method not in METHODS:
            raise PeakError(f"the quality probe scores {', '.join(METHODS)}, not {self.method!r}")


def solve_all(settings, W: torch.Tensor, H: torch.Tensor, *, act_order: str = "static",
              damp: float = 0.01) -> dict[Setting, torch.Tensor]:
    """The dense weights each setting's solver makes of W, as recipes.QuantRecipe.compress makes them; the GPTQ
    settings of one group size in one shared sweep when the order is "static" (the run's default)."""
    out: dict[Setting, torch.Tensor] = {}
    gptqs = [s for s in settings if s.method == "gptq"]
    if act_order == "static" and gptqs and all(s.grid.kind == "affine" for s in gptqs):
        for gs in dict.fromkeys(s.grid.group_size for s in gptqs):
            same = [s for s in gptqs if s.grid.group_size == gs]
            out.update(zip(same, gptq_grids(W, H, [s.grid for s in same], damp=damp)))
    for s in settings:
        if s not in out:
            out[s] = (gptq(W, H, s.grid, act_order=act_order, damp=damp)[0].weight if s.method == "gptq"
                      else rtn(W, s.grid).weight)
    return out


def relative_losses(W: torch.Tensor, H: torch.Tensor, settings, *, max_rows: int | None = LOSS_ROWS,
                    act_order: str = "static", damp: float = 0.01,
                    H_score: torch.Tensor | None = None) -> dict[Setting, float]:
    """tr((W - Q) Hs (W - Q)^T) / tr(W Hs W^T) for each setting's Q solved with H, on an evenly spaced sample of
    W's rows; Hs is ``H_score`` (held-out tokens) when given, else H."""
    W, H = W.detach().float(), H.detach().float()
    Hs = H if H_score is None else H_score.detach().float()
    idx = sample_rows(W.shape[0], max_rows)
    Ws = W if idx is None else W[idx]
    energy = layer_loss(Ws, torch.zeros_like(Ws), Hs)
    if energy <= 0:  # a matrix no calibration token reaches (or all zero) cannot add output error
        return {s: 0.0 for s in settings}
    solved = solve_all(settings, Ws, H, act_order=act_order, damp=damp)
    return {s: layer_loss(Ws, solved[s], Hs) / energy for s in settings}


def layer_sample(n_layers: int, wanted: int | None) -> set[int] | None:
    """``wanted`` evenly spaced layer indices, the first and the last included (None: every layer)."""
    if wanted is None or wanted >= n_layers:
        return None
    if wanted < 1:
        raise PeakError(f"the quality probe scores at least 1 layer, got {wanted}")
    return set(torch.linspace(0, n_layers - 1, wanted).round().long().tolist())


@dataclass
class Measurement:
    """Each setting's score (relative losses summed over the matrices, scaled to every layer), the per-matrix
    losses it came from, and with an anchor the anchor stream's last hidden states (as is, rounded)."""
    scores: dict[Setting, float]
    losses: dict[str, dict[Setting, float]]
    anchor_hidden: tuple[torch.Tensor, torch.Tensor] | None = None
    seconds: dict = field(default_factory=dict)


def _hessians(layer, linears: dict, x: torch.Tensor, kwargs: dict, split: int | None):
    """Run the layer on x once: its output, and each linear's Hessian over the segments [:split] and [split:]
    (split None: one Hessian over all of them)."""
    stats: dict[str, list[Stats]] = {}

    def hook(name):
        def pre(mod, args):
            inp = args[0]
            parts = [inp] if split is None else [inp[:split], inp[split:]]
            st = stats.setdefault(name, [Stats(inp.shape[-1], {"hessian"}, inp.device) for _ in parts])
            for s, p in zip(st, parts):
                s.add(p)
        return pre

    handles = [mod.register_forward_pre_hook(hook(n)) for n, mod in linears.items()]
    try:
        out = layer_output(layer(x, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return out, {n: [s.finish()["hessian"] for s in st] for n, st in stats.items()}


def _anchor_forward(layer, linears: dict, grid: Grid, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The layer run on x with every matrix rounded onto ``grid`` (RTN), its own weights put back after."""
    kept = {n: mod.weight.data for n, mod in linears.items()}
    try:
        for n, mod in linears.items():
            mod.weight.data = rtn(kept[n], grid).weight.to(kept[n].dtype)
        return layer_output(layer(x, **kwargs))
    finally:
        for n, mod in linears.items():
            mod.weight.data = kept[n]


@torch.inference_mode()
def measure_settings(model, segments: torch.Tensor, settings, *, max_rows: int | None = LOSS_ROWS,
                     layers: int | None = None, holdout: bool = False, anchor: Setting | None = None,
                     anchor_tokens: int = 0, act_order: str = "static", damp: float = 0.01) -> Measurement:
    """Score every setting on ``segments`` [n, seqlen] (``layers`` evenly spaced layers, scaled to all; None:
    every layer); with ``anchor`` (an RTN setting) and ``anchor_tokens``, also the anchor stream."""
    settings = tuple(settings)
    if segments.ndim != 2 or segments.shape[0] == 0:
        raise PeakError("the quality probe needs at least one calibration segment")
    if holdout and segments.shape[0] < 2:
        raise PeakError("the quality probe's held-out scoring needs at least 2 segments")
    if anchor is not None and (anchor.method != "rtn" or anchor_tokens < 2):
        raise PeakError("the quality probe's anchor is an RTN setting run on at least 2 tokens")
    decoder, prefix = decoder_layers(model)
    moe = is_moe(model)
    if moe or any(fused_experts(layer) for layer in decoder):
        raise PeakError("the quality probe does not score mixture-of-experts models")
    n_layers = len(decoder)
    sample = layer_sample(n_layers, layers)
    scored = set(range(n_layers)) if sample is None else sample
    split = segments.shape[0] // 2 if holdout else None
    t0 = time.perf_counter()
    acts, kw = capture_inputs(model, segments, segments.shape[0], None)
    x, kw = acts[0], kw[0]
    dense = rounded = kw_a = None
    if anchor is not None:
        a_acts, kw_a = capture_inputs(model, segments[:1, :anchor_tokens], 1, None)
        rounded, kw_a = a_acts[0], kw_a[0]
    seconds = {"forward": 0.0, "solve": 0.0}
    losses: dict[str, dict[Setting, float]] = {}
    last = max(scored)
    for li, layer in enumerate(decoder):
        linears = compressible_linears(layer, moe)
        t1 = time.perf_counter()
        if li <= last:
            if li in scored:
                x, hs = _hessians(layer, linears, x, kw[li], split)
            else:
                x, hs = layer_output(layer(x, **kw[li])), {}
            if li == last and anchor is not None:
                dense = x[:1, :anchor_tokens]
        elif anchor is not None:
            dense = layer_output(layer(dense, **kw_a[li]))
        if anchor is not None:
            rounded = _anchor_forward(layer, linears, anchor.grid, rounded, kw_a[li])
        t2 = time.perf_counter()
        seconds["forward"] += t2 - t1
        for name, h in hs.items():
            losses[f"{prefix}.{li}.{name}"] = relative_losses(
                linears[name].weight.data, h[0], settings, max_rows=max_rows, act_order=act_order, damp=damp,
                H_score=h[1] if len(h) > 1 else None)
        hs = {}
        seconds["solve"] += time.perf_counter() - t2
        if li >= last and anchor is None:
            break
    scale = n_layers / len(scored)
    scores = {s: scale * sum(per.get(s, 0.0) for per in losses.values()) for s in settings}
    seconds = {k: round(v, 2) for k, v in seconds.items()} | {"pass": round(time.perf_counter() - t0, 2)}
    return Measurement(scores, losses, None if anchor is None else (dense, rounded), seconds)
