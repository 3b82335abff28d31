"""Each plan's quality predicted from a cheap measurement on a few calibration segments.

The measuring pass (calibrate/quality_probe.py) solves the matrices of a few evenly spaced decoder layers at
every candidate setting with that setting's own solver, on the first half of the segments, and scores each by
the layer-wise objective on the other half, relative to the matrix's output energy there:
r_i = ||(W_i - Q_i) X_i||^2 / ||W_i X_i||^2. Scoring on tokens the solver did not see matters: in-sample, GPTQ
one width down looked as good as RTN (it fits its calibration tokens), and the runs are judged on unseen text.
A plan's score is the sum over the matrices, scaled to every layer, S = sum_i r_i (each matrix's output
perturbed by a relative error r_i; to first order, small independent perturbations of the residual stream add).
The predicted change of log perplexity is k * S, with one k per model measured, not fitted to any run: the
anchor setting (RTN 4-bit g128 on every decoder matrix) is applied to ANCHOR_TOKENS tokens of the first segment
run through the model beside the dense stream, and k = (their loss difference) / S_anchor. The order of the
plans depends on S alone (k > 0 scales every prediction alike); k turns it into a perplexity ratio exp(k * S),
linear in S and so optimistic where errors compound (2-bit rows).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from peakllm.calibrate.quality_probe import LOSS_ROWS, Setting, measure_settings
from peakllm.data import calibration_segments
from peakllm.errors import PeakError
from peakllm.models import load_model
from peakllm.models.anatomy import base_model
from peakllm.solvers import Grid

ANCHOR = Setting("rtn", Grid(bits=4, group_size=128))
# the probe's calibration segments and the layers it scores; its settings are solved on half the segments and
# scored on the other half (HOLDOUT); the anchor's loss change is measured on the first ANCHOR_TOKENS tokens
SAMPLES, SEQLEN, LAYERS, HOLDOUT, ANCHOR_TOKENS = 4, 128, 3, True, 128
HEAD_POSITIONS = None  # positions of the anchor tokens the loss is taken at (None: every one)


@dataclass
class QualityProbe:
    """What the measuring pass found: one score per setting, and the scale that turns scores into log ppl."""
    scores: dict[Setting, float]
    k: float
    anchor_dlog_ppl: float
    calib_tokens: int
    layers: int | None
    seconds: dict = field(default_factory=dict)
    holdout: bool = HOLDOUT
    anchor_tokens: int = ANCHOR_TOKENS
    rows: int | None = LOSS_ROWS

    def predicted_dlog_ppl(self, setting: Setting) -> float:
        return self.k * self.scores[setting]

    def facts(self) -> dict:
        """What the plan JSON records of the probe."""
        return {"calib_tokens": self.calib_tokens, "rows_per_matrix": self.rows, "layers_scored": self.layers,
                "holdout": self.holdout, "anchor": setting_name(ANCHOR), "anchor_tokens": self.anchor_tokens,
                "anchor_dlog_ppl": self.anchor_dlog_ppl, "anchor_score": self.scores[ANCHOR], "k": self.k,
                "seconds": self.seconds}


def setting_name(s: Setting) -> str:
    return f"{s.method} {s.grid.bits}-bit g{s.grid.group_size}"


@torch.inference_mode()
def head_nll(model, hidden: torch.Tensor, tokens: torch.Tensor, positions: int | None = None) -> float:
    """Mean next-token loss (nats) of ``tokens`` [1, T] from the last decoder layer's hidden states [1, T, d]:
    the final norm and the output head, as the model applies them; at ``positions`` evenly spaced positions
    when given (the head of a large vocabulary is most of the cost), else at every one."""
    at = torch.arange(tokens.shape[1] - 1)
    if positions is not None and positions < len(at):
        at = torch.linspace(0, len(at) - 1, positions).round().long()
    logits = model.get_output_embeddings()(base_model(model).norm(hidden[:, at]))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return float(torch.nn.functional.cross_entropy(logits[0].float(), tokens[0, at + 1]))


def probe_quality(model_spec: str, settings, *, samples: int = SAMPLES, seqlen: int = SEQLEN,
                  layers: int | None = LAYERS, holdout: bool = HOLDOUT, anchor_tokens: int = ANCHOR_TOKENS,
                  rows: int | None = LOSS_ROWS, head_positions: int | None = HEAD_POSITIONS,
                  seed: int = 0) -> QualityProbe:
    """Load the model, score every setting on ``samples`` calibration segments, measure k on the anchor."""
    if samples < 1 or seqlen < 2:
        raise PeakError(f"the quality probe needs at least 1 segment of 2 tokens, got {samples} x {seqlen}")
    t0, c0 = time.perf_counter(), time.process_time()
    model, tokenizer = load_model(model_spec)
    segments = calibration_segments(tokenizer, samples, seqlen, seed=seed)
    t_load = time.perf_counter()
    wanted = list(dict.fromkeys([*settings, ANCHOR]))
    anchor_tokens, holdout = min(anchor_tokens, seqlen), holdout and samples >= 2
    m = measure_settings(model, segments, wanted, max_rows=rows, layers=layers, holdout=holdout, anchor=ANCHOR,
                         anchor_tokens=anchor_tokens)
    t_pass = time.perf_counter()
    on = segments[:1, :anchor_tokens]
    dense, rounded = m.anchor_hidden
    anchor_dlog_ppl = head_nll(model, rounded, on, head_positions) - head_nll(model, dense, on, head_positions)
    if m.scores[ANCHOR] <= 0:
        raise PeakError("the quality probe found no output error at its anchor setting: nothing to scale by")
    # a loss change at or below zero on one segment is noise: the scale is then taken as none (all plans equal)
    k = max(anchor_dlog_ppl, 0.0) / m.scores[ANCHOR]
    done = time.perf_counter()
    return QualityProbe(m.scores, k, anchor_dlog_ppl, int(segments.numel()), layers,
                        {"load": round(t_load - t0, 2), **m.seconds, "head": round(done - t_pass, 2),
                         "total": round(done - t0, 2), "cpu": round(time.process_time() - c0, 2)},
                        holdout, anchor_tokens, rows)
