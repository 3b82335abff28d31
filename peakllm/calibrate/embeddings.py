"""Quantizing the outer matrices: the token embedding and an untied lm_head (loop.py does the decoder's).

On small models they are a large share of the file and of what decoding reads per token: SmolLM2-135M's tied
embedding is 28M of its 135M parameters, 113 MB in fp32. They are rounded to nearest on a per-row grid in
groups of columns (one fp16 scale per group of a row, as the decoder's int-k layers), so the runtime's int-k
kernels run the lm_head and a lookup dequantizes only the rows it needs. A tied embedding is quantized once
and serves as both. At 8 bits round-to-nearest costs next to nothing; GPTQ on the lm_head (with the final
hidden states' Hessian) is not done here.

Quantizing happens before calibration, in place, so the decoder's layers are calibrated on what the
compressed model will feed them and the perplexity after compression includes these matrices.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from peakllm.calibrate.recipes import ModuleResult, ggml_type_for
from peakllm.errors import PeakError
from peakllm.models.anatomy import outer_modules
from peakllm.solvers import Grid, rtn
from peakllm.solvers.ggml import rtn_ggml

EMBED_BITS = ("keep", "8", "4")
DEFAULT_EMBED_GROUP = 64


def embed_grid(bits: str | None, group_size: int = DEFAULT_EMBED_GROUP) -> Grid | None:
    """The grid for ``--embed-bits`` (None for 'keep'): symmetric, ``group_size`` columns per scale."""
    if bits in (None, "keep"):
        return None
    if str(bits) not in EMBED_BITS:
        raise PeakError(f"--embed-bits must be one of {', '.join(EMBED_BITS)}, got {bits!r}")
    return Grid(bits=int(bits), group_size=group_size, sym=True)


def quantize_matrix(weight, grid: Grid | str) -> ModuleResult | None:
    """Round-to-nearest of one [rows, cols] matrix onto ``grid`` (deterministic: a streamed run redoes it): an
    int-k grid, or the name of a GGUF block type (llama.cpp's fallback when its blocks do not divide the rows;
    None when that is F16: the matrix stays as it is)."""
    if isinstance(grid, str):
        t = ggml_type_for(grid, weight.shape[1])
        if t == "F16":
            return None
        q = rtn_ggml(weight.detach().float(), t)
        return ModuleResult(q.dequantize(), ggml=q)
    q = rtn(weight.detach().float(), grid)
    return ModuleResult(q.weight, None, q, None)


def grid_of(grid, name: str):
    """One outer module's grid: ``grid`` itself, or its entry when ``grid`` maps module names to GGUF types (a
    preset names each one; None: left as it is)."""
    return grid.get(name) if isinstance(grid, Mapping) else grid


def quantize_outer(model: nn.Module, grid: Grid | str | None, *, loaded_only: bool = False) -> dict[str, ModuleResult]:
    """Quantize the embedding (and an untied lm_head) of ``model`` in place; their results by module name.
    ``grid``: an int-k grid, a GGUF block type name, or module name -> GGUF type (None or absent: left as it
    is). ``loaded_only``: skip those a streamed model has not read (meta tensors)."""
    if grid is None:
        return {}
    results = {}
    for name, mod in outer_modules(model).items():
        own = grid_of(grid, name)
        if own is None:
            continue
        weight = mod.weight
        if weight.is_meta:
            if loaded_only:
                continue
            raise PeakError(f"{name} is not loaded")
        result = quantize_matrix(weight, own)
        if result is None:
            continue
        weight.data.copy_(result.weight.to(weight.dtype))  # a tied lm_head shares this tensor
        results[name] = result.held_in(weight.data)  # one copy of a 7B model's 0.8 GB embedding, not two
    return results
