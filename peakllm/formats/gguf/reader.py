"""Read back the block-typed weights a .gguf file stores, as ``GGMLWeight`` in the model's own row order.

What a solver needs to requantize a model that was distributed as a GGUF onto the grid it came in (its
parameters, ``rtn_ggml(..., params=)``), and what tests need to compare a written file with what was meant.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from peakllm.errors import PeakError
from peakllm.formats.gguf import families
from peakllm.formats.gguf.blocks import BLOCK_TYPES, GGMLWeight, unpack


def hf_row_order(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama.cpp's q/k row order (``writer.llamacpp_row_order``)."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def read_block_weights(path, model) -> dict[str, GGMLWeight]:
    """HF parameter name -> ``GGMLWeight`` for every weight of ``model`` (a transformers model of the file's
    family and shapes) that ``path`` stores in one of ``BLOCK_TYPES``; float tensors are left out."""
    path = Path(path)
    if not path.is_file():
        raise PeakError(f"no GGUF file at {path}")
    cfg = model.config
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    names = families.tensor_names(cfg)
    out = {}
    for hf_name, p in model.named_parameters():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        t = stored.get(name) if name else None
        if t is None or t.tensor_type.name not in BLOCK_TYPES:
            continue
        rows, cols = p.shape
        if t.shape[-1] != rows:  # ggml's shape is (cols, rows); Gemma-3's embedding may be cut short
            continue
        data = np.asarray(t.data).reshape(rows, -1)
        heads = families.qk_heads(cfg, name)
        if heads:
            data = hf_row_order(data, heads)
        out[hf_name] = unpack(t.tensor_type.name, data, (rows, cols))
    return out
