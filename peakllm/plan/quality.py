"""Each plan's quality predicted from a cheap measurement on a few calibration segments.

The measuring pass (calibrate/quality_probe.py) solves every decoder matrix at every candidate setting with
that setting's own solver and scores it by the layer-wise objective, relative to the matrix's output energy:
r_i = ||(W_i - Q_i) X_i||^2 / ||W_i X_i||^2. A plan's score is the sum over the matrices, S = sum_i r_i (each
matrix's output perturbed by a relative error r_i; to first order, small independent perturbations of the
residual stream add). The predicted change of log perplexity is k * S, with one k per model measured, not fitted
to any run: the anchor setting (RTN 4-bit g128 on every decoder matrix) is applied to the probe's own copy of
the model, and k = (its loss on the probe's segments - the dense model's) / S_anchor. The order of the plans
depends on S alone (k > 0 scales every prediction alike); k only turns it into a perplexity ratio,
exp(k * S), which is linear in S and so optimistic where errors compound (2-bit rows).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from peakllm.calibrate.loop import calibrate
from peakllm.calibrate.quality_probe import LOSS_ROWS, Setting, measure_settings
from peakllm.calibrate.recipes import QuantRecipe
from peakllm.data import calibration_segments
from peakllm.errors import PeakError
from peakllm.models import load_model
from peakllm.solvers import Grid

ANCHOR = Setting("rtn", Grid(bits=4, group_size=128))
SAMPLES, SEQLEN, LAYERS = 4, 512, 5  # the probe's calibration segments, and the layers it scores
ANCHOR_SEGMENTS = 1  # segments the anchor's loss change is measured on (two forwards of the whole model)


@dataclass
class QualityProbe:
    """What the measuring pass found: one score per setting, and the scale that turns scores into log ppl."""
    scores: dict[Setting, float]
    k: float
    anchor_dlog_ppl: float
    calib_tokens: int
    layers: int | None
    seconds: dict = field(default_factory=dict)

    def predicted_dlog_ppl(self, setting: Setting) -> float:
        return self.k * self.scores[setting]

    def facts(self) -> dict:
        """What the plan JSON records of the probe."""
        return {"calib_tokens": self.calib_tokens, "rows_per_matrix": LOSS_ROWS, "layers_scored": self.layers, "anchor": setting_name(ANCHOR),
                "anchor_dlog_ppl": self.anchor_dlog_ppl, "anchor_score": self.scores[ANCHOR], "k": self.k,
                "seconds": self.seconds}


def setting_name(s: Setting) -> str:
    return f"{s.method} {s.grid.bits}-bit g{s.grid.group_size}"


def mean_nll(model, segments: torch.Tensor) -> float:
    """The model's mean next-token loss (nats) over ``segments``."""
    with torch.no_grad():
        return float(sum(model(input_ids=s[None], labels=s[None]).loss for s in segments) / len(segments))


def probe_quality(model_spec: str, settings, *, samples: int = SAMPLES, seqlen: int = SEQLEN,
                  layers: int | None = LAYERS, seed: int = 0, progress: bool = False) -> QualityProbe:
    """Load the model, score every setting on ``samples`` calibration segments, measure k on the anchor."""
    if samples < 1 or seqlen < 2:
        raise PeakError(f"the quality probe needs at least 1 segment of 2 tokens, got {samples} x {seqlen}")
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_spec)
    segments = calibration_segments(tokenizer, samples, seqlen, seed=seed)
    t_load = time.perf_counter()
    wanted = list(dict.fromkeys([*settings, ANCHOR]))
    scores, _ = measure_settings(model, segments, wanted, layers=layers, progress=progress)
    t_pass = time.perf_counter()
    anchor_on = segments[:ANCHOR_SEGMENTS]
    dense = mean_nll(model, anchor_on)
    calibrate(model, anchor_on, QuantRecipe("rtn", ANCHOR.grid, act_order="none"), progress=False)  # in place
    anchor_dlog_ppl = mean_nll(model, anchor_on) - dense
    if scores[ANCHOR] <= 0:
        raise PeakError("the quality probe found no output error at its anchor setting: nothing to scale by")
    # a loss change at or below zero on one segment is noise: the scale is then taken as none (all plans equal)
    k = max(anchor_dlog_ppl, 0.0) / scores[ANCHOR]
    done = time.perf_counter()
    return QualityProbe(scores, k, anchor_dlog_ppl, int(segments.numel()), layers,
                        {"load": round(t_load - t0, 2), "pass": round(t_pass - t_load, 2),
                         "anchor": round(done - t_pass, 2), "total": round(done - t0, 2)})
