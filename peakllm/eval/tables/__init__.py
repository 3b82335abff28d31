"""The tables that docs/results/*.md and README.md publish, each named, with its results file and columns.

`peakllm report --docs` renders every `<!-- table: NAME -->` block from `TABLES` (see `peakllm.eval.results`).
A column is (header, function of one results line; helpers in `columns.py`); rounds are shown as median
(min–max) and a ratio between two tools as the median of per-round ratios (min–max), both from `results`.
`compression.py` holds the tables of compressing (SparseGPT, quantization, GGUF, QMoE), `runtime.py` those of
running (decode speed, big models, serving, recovery, sparse models).
"""

from __future__ import annotations

from peakllm.eval.tables import compression, runtime

# fitkern branch: registered here for the docs test until the lead gives it its place
from peakllm.eval.tables_ggml_fit import GGML_FIT

TABLES = {**compression.TABLES, **runtime.TABLES, "ggml-fit": GGML_FIT}
