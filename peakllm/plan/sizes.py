"""Exact bytes of a peakllm folder's weights, from the model's shapes and the format (docs/DESIGN.md "Packed
layouts"): each int-k matrix's codes bitstream, fp16 scales and uint8 zeros; the embedding (and an untied
lm_head) on their own int-k grid; everything else in fp32, as the compressed model holds it."""

from __future__ import annotations

import math

from peakllm.calibrate.preflight import matrix_shapes
from peakllm.models.anatomy import outer_modules


def intk_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """qweight [out, ceil(in * bits / 8)] + scales fp16 and zeros uint8 [out, n_groups] (no g_idx)."""
    groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    return out_features * (math.ceil(in_features * bits / 8) + 3 * groups)


def weight_bytes(model, *, bits: int, group_size: int, embed_bits: int | None, embed_group_size: int = 64) -> dict:
    """{"decoder": the decoder's packed matrices, "outer": embedding and untied lm_head, "dense": the rest
    in fp32, "total"}: the tensor bytes of the weight file(s), exactly."""
    shapes, compressed = matrix_shapes(model)
    decoder = sum(intk_bytes(o, i, bits, group_size) for o, i in shapes.values())
    outer_params = outer = 0
    if embed_bits is not None:
        for mod in outer_modules(model).values():
            rows, cols = mod.weight.shape
            outer += intk_bytes(rows, cols, embed_bits, embed_group_size)
            outer_params += rows * cols
    params = sum(p.numel() for p in model.parameters())  # a tied lm_head once
    dense = 4 * (params - compressed - outer_params)
    return {"decoder": decoder, "outer": outer, "dense": dense, "total": decoder + outer + dense}


def read_per_token(model, sizes: dict) -> int:
    """Bytes one decode step reads: every decoder matrix, the lm_head (a tied one is the embedding's bytes,
    all of them), the fp32 norms and biases; one embedding row, which is nothing beside them."""
    head = sizes["outer"] if len(outer_modules(model)) == 1 else sizes["outer"] // 2
    return sizes["decoder"] + head + sizes["dense"]
