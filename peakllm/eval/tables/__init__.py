"""The tables that docs/results/*.md and README.md publish, each named, with its results file and columns.

`peakllm report --docs` renders every `<!-- table: NAME -->` block from `TABLES` (see `peakllm.eval.results`).
A column is (header, function of one results line; helpers in `columns.py`); rounds are shown as median
(min–max) and a ratio between two tools as the median of per-round ratios (min–max), both from `results`.
`compression.py` holds the tables of compressing (SparseGPT, quantization, GGUF, QMoE), `runtime.py` those of
running (decode speed, big models, serving, recovery, sparse models); `lut.py` the LUT kernel's (kernel and end-to-end MoE decode), `ggml_fit.py` the GGUF fit kernel's, `plan.py` plan's quality predictions.
"""

from __future__ import annotations

from peakllm.eval.tables import compression, runtime
from peakllm.eval.tables.lut import LUT_KERNEL, LUT_MOE
from peakllm.eval.tables.plan import PLAN_QUALITY, PLAN_QUALITY_RANKING

from peakllm.eval.tables.ggml_fit import GGML_FIT

TABLES = {**compression.TABLES, **runtime.TABLES, "lut-kernel": LUT_KERNEL, "lut-moe": LUT_MOE, "ggml-fit": GGML_FIT,
          "plan-quality": PLAN_QUALITY, "plan-quality-ranking": PLAN_QUALITY_RANKING}
