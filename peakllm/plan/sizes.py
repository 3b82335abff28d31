"""Exact bytes of a peakllm folder's weights, from the model's shapes and the format (docs/DESIGN.md "Packed
layouts"): each int-k matrix's codes bitstream, fp16 scales and uint8 zeros (calibrate/intk_plan.intk_bytes); the
embedding (and an untied lm_head) on their own symmetric int-k grid, which stores no zeros; everything else in
fp32, as the compressed model holds it."""

from __future__ import annotations

from peakllm.calibrate.intk_plan import intk_bytes
from peakllm.calibrate.preflight import matrix_shapes
from peakllm.solvers.grids import Grid
from peakllm.models.anatomy import outer_modules


def weight_bytes(model, *, bits: int, group_size: int, embed_bits: int | None, embed_group_size: int = 64) -> dict:
    """{"decoder": the decoder's packed matrices, "outer": embedding and untied lm_head, "dense": the rest
    in fp32, "total"}: the tensor bytes of the weight file(s), exactly."""
    shapes, compressed = matrix_shapes(model)
    decoder = sum(intk_bytes(Grid("affine", bits, group_size), shape, rotate=False) for shape in shapes.values())
    outer_params = outer = 0
    if embed_bits is not None:
        for mod in outer_modules(model).values():
            rows, cols = mod.weight.shape
            outer += intk_bytes(Grid("affine", embed_bits, embed_group_size, sym=True), (rows, cols), rotate=False)
            outer_params += rows * cols
    params = sum(p.numel() for p in model.parameters())  # a tied lm_head once
    dense = 4 * (params - compressed - outer_params)
    return {"decoder": decoder, "outer": outer, "dense": dense, "total": decoder + outer + dense}


def read_per_token(model, sizes: dict) -> int:
    """Bytes one decode step reads: every decoder matrix, the lm_head (a tied one is the embedding's bytes,
    all of them), the fp32 norms and biases; one embedding row, which is nothing beside them."""
    head = sizes["outer"] if len(outer_modules(model)) == 1 else sizes["outer"] // 2
    return sizes["decoder"] + head + sizes["dense"]
