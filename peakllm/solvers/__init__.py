"""Solvers: pure functions on a weight matrix and its statistics (no models, hooks, files or devices).

Each returns new tensors and never modifies its inputs. Masks are bool [out, in] with True = kept.
"""

from peakllm.solvers.common import SolveInfo
from peakllm.solvers.gptq import gptq
from peakllm.solvers.grids import Grid, QuantizedWeight, dequantize, fit, quantize
from peakllm.solvers.magnitude import magnitude
from peakllm.solvers.owl import outlier_ratio, owl_sparsities
from peakllm.solvers.rtn import rtn
from peakllm.solvers.sparsegpt import SparseResult, sparsegpt
from peakllm.solvers.wanda import wanda, wanda_score

__all__ = [
    "Grid", "QuantizedWeight", "SolveInfo", "SparseResult",
    "fit", "quantize", "dequantize",
    "rtn", "gptq", "sparsegpt", "wanda", "wanda_score", "magnitude", "outlier_ratio", "owl_sparsities",
]
