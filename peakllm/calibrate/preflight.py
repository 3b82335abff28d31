"""Checks that need the model's shapes, run once it is loaded (or its meta skeleton built) and before any
evaluation or calibration: a compression that cannot be written must fail in seconds, not after an hour.

Each message names what would work instead (group sizes that divide every width, the format that takes
the option, how much disk is missing).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path

from peakllm import memory
from peakllm.calibrate.loop import check_method
from peakllm.calibrate.spec import RunSpec
from peakllm.errors import PeakError
from peakllm.formats.gguf.blocks import block_type
from peakllm.models.anatomy import PARTS, compressible_linears, decoder_layers, fused_experts, is_moe
from peakllm.solvers.rate import ZERO_SHARE_MAX

COMMON_GROUPS = (256, 128, 64, 32, 16)


def matrix_shapes(model) -> tuple[dict[str, tuple[int, int]], int]:
    """({name: (out, in)} of every matrix the calibration pipeline compresses (a fused MoE part once for all
    its experts), their parameter count); meta tensors suffice."""

    layers, prefix = decoder_layers(model)
    moe = is_moe(model)
    shapes, params = {}, 0
    for li, layer in enumerate(layers):
        for name, mod in compressible_linears(layer, moe).items():
            shapes[f"{prefix}.{li}.{name}"] = tuple(mod.weight.shape)
            params += mod.weight.numel()
        for name, mod in fused_experts(layer).items():
            for part in PARTS:
                shapes[f"{prefix}.{li}.{name}.{part}"] = tuple(getattr(mod, part).shape[1:])
                params += getattr(mod, part).numel()
    return shapes, params


def group_hint(widths) -> str:
    """'64, 32, or -1': the usual group sizes that divide every width."""
    g = 0
    for w in widths:
        g = math.gcd(g, w)
    fits = [str(s) for s in COMMON_GROUPS if g % s == 0]
    return (", ".join(fits) + ", or -1") if fits else "-1 (one group per row)"


def check_groups(shapes: dict, group_size: int, fmt: str) -> None:
    """compressed-tensors stores whole groups only; peakllm's own layouts take a partial last group."""
    if group_size == -1 or fmt != "compressed-tensors":
        return
    widths = sorted({inn for _, inn in shapes.values()})
    bad = [w for w in widths if w % group_size]
    if bad:
        which = next(n for n, (_, inn) in shapes.items() if inn == bad[0])
        raise PeakError(f"--group-size {group_size} does not divide the input width {bad[0]} of {which} (and "
                        f"{len(bad) - 1} other widths), and compressed-tensors needs whole groups: group sizes that "
                        f"divide {' and '.join(map(str, widths))}: {group_hint(widths)}; or --format peakllm, "
                        "which stores a partial last group")


def check_act_order_format(act_order: str | None, fmt: str) -> None:
    if act_order == "group" and fmt in ("compressed-tensors", "sub1"):
        raise PeakError(f"--act-order group stores a g_idx per matrix, which --format {fmt} cannot hold: use "
                        "--act-order static (the default: the same column order, groups kept contiguous) or "
                        "--format peakllm")


def check_embed_group(hidden: int, grid) -> None:
    """The embedding's group size must divide its width (its rows are looked up whole groups at a time)."""
    if grid is None or isinstance(grid, (str, Mapping)) or grid.group_size == -1 or hidden % grid.group_size == 0:
        return
    raise PeakError(f"--embed-group-size {grid.group_size} does not divide the embedding width {hidden}; "
                    f"use {group_hint([hidden])}")


def output_estimate(model, compressed_params: int, grid, fmt: str, sparsity: float | None, embed_grid) -> int:
    """Bytes the output will take, roughly (+10%): compressed matrices at their bits (and density), the
    embedding at its bits, the rest in fp32 (a loaded model's dtype)."""
    total = sum(p.numel() for p in model.parameters())  # a tied lm_head is the embedding's parameter
    if fmt == "hf":
        return int(1.1 * 4 * total)
    per_param = _bytes_per_param(grid) if grid is not None else 4.0
    if sparsity is not None:
        per_param = per_param * (1 - sparsity) + 1 / 8
    embed = model.get_input_embeddings().weight.numel() if embed_grid is not None else 0
    embed_per_param = _bytes_per_param(embed_grid) if embed_grid is not None else 0.0
    rest = total - compressed_params - embed
    return int(1.1 * (4 * rest + embed_per_param * embed + per_param * compressed_params))


def _bytes_per_param(grid) -> float:
    """An int-k grid's bits plus its scales (~0.5 bit), or a GGUF block type's exact size."""
    if isinstance(grid, Mapping):  # GGUF types per outer module
        return max((_bytes_per_param(t) for t in grid.values() if t), default=0.0)
    if isinstance(grid, str):
        t = block_type(grid)
        return t.type_size / t.block
    return (grid.bits + 0.5) / 8


def check_disk(out: Path, need: int) -> None:
    where = Path(out).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise PeakError(f"not enough free disk in {where.resolve()} for the output: about {memory.gb(need)} needed, "
                        f"{memory.gb(free)} free")


def check_size_target(model, recipe, shapes: dict) -> None:
    """A bits/param target that some ternary matrix (or a MoE block's experts together) cannot reach even
    with every code zero, and a shared expert budget on a model without experts, fail here, not mid-run."""
    share_for, budget = getattr(recipe, "zero_share_for", None), getattr(recipe, "expert_budget", None)
    if budget is not None and not is_moe(model):
        raise PeakError("--bit-allocation experts shares a budget among a MoE block's experts; this model has none")
    if share_for is None:
        return
    moe = is_moe(model)
    for name, (out_f, in_f) in shapes.items():
        expert = moe and ".experts." in name and name.endswith((".gate_up_proj", ".down_proj"))
        if moe and not expert:  # attention and the like: not ternary in a MoE run (--dense-bits)
            continue
        member = f"{name}.0" if expert else name
        if budget is not None and expert:
            need = budget[1](member, out_f, in_f, ZERO_SHARE_MAX)
            if need > budget[0]:
                raise PeakError(f"{name}: [{out_f}, {in_f}] experts need {need:.3f} bits/param even with (almost) "
                                f"every code zero, over the {budget[0]:.3f} the target leaves them: raise --target-bits")
        else:
            share_for(member, out_f, in_f)  # a PeakError names the shape and the smallest size it takes


def check_run(model, spec: RunSpec, recipe, *, disk: bool = True, tokenizer=None) -> None:
    """Every check on a compression run that the loaded model (or its meta skeleton) allows."""
    fmt = spec.format
    if hasattr(recipe, "prepare"):  # what the recipe resolves on the model (e.g. each GGUF tensor's type)
        recipe.prepare(model, tokenizer)
    shapes, compressed_params = matrix_shapes(model)
    grid = getattr(recipe, "grid", None) or getattr(recipe, "type", None)
    if grid is not None and not isinstance(grid, str):
        check_groups(shapes, grid.group_size, fmt)
    check_act_order_format(getattr(recipe, "act_order", None), fmt)
    embed_grid = spec.embed_grid
    if embed_grid is not None:
        check_embed_group(model.get_input_embeddings().weight.shape[1], embed_grid)
    check_method(model, recipe)
    check_size_target(model, recipe, shapes)
    if disk:
        check_disk(spec.output, output_estimate(model, compressed_params, grid, fmt, getattr(recipe, "sparsity", None),
                                                embed_grid))
