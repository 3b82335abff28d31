"""Which block type each tensor of a GGUF run gets: llama-quantize's preset rules, or a --target-bits allocation.

Both are resolved on the loaded model before any work (``GGMLRecipe.prepare``): the tensors and their GGUF
names come from the writer's own plan, the rules from ``formats/gguf/presets.py``. A size target also fixes
what it does not allocate (the header with the tokenizer, norms in F32, token_embd/output in their type,
tensors pinned by --tensor-type), and checks that the candidates can reach it. Then ``allocate_types`` runs a
first, measuring pass over the layers (the original model's Hessians, one group at a time, dropped after use;
no weight changes), scores every decoder matrix at every candidate type with the run's solver on a sample of
rows (solvers/allocate.type_losses) and
chooses the types (solvers/allocate.allocate); the normal GPTQ run follows with them.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from peakllm.calibrate.loop import calibrate
from peakllm.errors import PeakError
from peakllm.formats.gguf.blocks import BLOCK_TYPES
from peakllm.formats.gguf.presets import ModelShape, preset_types
from peakllm.formats.gguf.writer import GGUFStreamWriter, plan_tensors
from peakllm.models.anatomy import outer_modules
from peakllm.solvers.allocate import allocate, type_losses

ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT: every tensor's data starts on it (gguf's writer pads each one)
LOSS_ROWS = 128  # rows of each matrix the measuring pass scores (an unbiased sample, scaled to all rows)


def model_shape(model) -> ModelShape:
    cfg = model.config
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
    return ModelShape(cfg.num_hidden_layers, cfg.num_attention_heads,
                      getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, int(experts),
                      cfg.model_type)


def tensor_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes one tensor takes in the file, its padding included."""
    if type_name in BLOCK_TYPES:
        nbytes = shape[0] * BLOCK_TYPES[type_name].row_bytes(shape[1])
    else:
        nbytes = 4 * shape[0] * (shape[1] if len(shape) > 1 else 1) // (2 if type_name == "F16" else 1)
    return -(-nbytes // ALIGN) * ALIGN


def header_bytes(model, tokenizer) -> int:
    """The bytes before the first tensor (metadata, tokenizer, tensor infos; aligned): the same for any types."""
    with tempfile.TemporaryDirectory(prefix="peakllm-gguf-header-") as tmp:
        w = GGUFStreamWriter(model, tokenizer, Path(tmp) / "header.gguf", check_disk=False)  # never written
        try:  # the file is already sized for every tensor: the first one's offset is where the header ends
            size = min(w.offsets.values(), default=os.path.getsize(w.tmp))
        finally:
            w.abort()
    return -(-size // ALIGN) * ALIGN


@dataclass
class TypePlan:
    """The resolved types: HF module name -> block type, for the decoder's matrices and the outer ones."""

    decoder: dict[str, str] = field(default_factory=dict)
    outer: dict[str, str | None] = field(default_factory=dict)
    free: dict[str, tuple[int, int]] = field(default_factory=dict)   # --target-bits: matrices left to allocate
    budget_bytes: int = 0                                            # what they may take together
    params: int = 0


def resolve_types(model, recipe) -> TypePlan:
    """The preset's (or single type's) type of every tensor, with the overrides and llama.cpp's fallbacks."""
    plan = plan_tensors(model, {}, "F16")
    tensors = {t.name: t.shape for t in plan}
    base = recipe.type if recipe.preset is None else None
    types = preset_types(recipe.preset, tensors, model_shape(model), overrides=recipe.overrides,
                         embed_type=recipe.embed_type, base=base)
    by_module = {t.hf_name.removesuffix(".weight"): types[t.name] for t in plan if t.name in types}
    outer = set(outer_modules(model))
    result = TypePlan(params=sum(p.numel() for p in model.parameters()))
    for name, t in by_module.items():
        (result.outer if name in outer else result.decoder)[name] = t
    if recipe.keep_outer:
        result.outer = {}
    return result


def size_target(model, tokenizer, recipe, plan: TypePlan) -> None:
    """Fill ``plan.free`` and ``plan.budget_bytes`` for ``recipe.target_bits``; one error when the candidates
    cannot reach it."""
    if tokenizer is None:
        raise PeakError("--target-bits with --format gguf needs the model and tokenizer in memory: use --stream off")
    tensors = plan_tensors(model, {}, "F16")
    names = {t.hf_name.removesuffix(".weight"): t.name for t in tensors}
    pinned = {n for n in plan.decoder if any(re.search(p, names[n]) for p, _ in recipe.overrides)}
    params = dict(model.named_parameters())
    fixed = header_bytes(model, tokenizer)
    for t in tensors:
        module = t.hf_name.removesuffix(".weight")
        if module in plan.decoder and module not in pinned:
            plan.free[module] = tuple(params[t.hf_name].shape)
        else:
            type_name = plan.decoder.get(module) or plan.outer.get(module) or t.type
            fixed += tensor_bytes(type_name, t.shape)
    budget = int(recipe.target_bits * plan.params / 8)
    smallest = sum(min(tensor_bytes(c, s) for c in recipe.candidates_for(s)) for s in plan.free.values())
    largest = sum(max(tensor_bytes(c, s) for c in recipe.candidates_for(s)) for s in plan.free.values())
    low, high = 8 * (fixed + smallest) / plan.params, 8 * (fixed + largest) / plan.params
    if not low <= recipe.target_bits <= high:
        raise PeakError(f"--target-bits {recipe.target_bits} is outside what the candidate types reach for this "
                        f"model: {low:.3f} to {high:.3f} bits/param over the whole file (token_embd/output and "
                        "--tensor-type tensors fixed)")
    plan.budget_bytes = budget - fixed


class LossProbe:
    """A recipe that changes nothing: it scores each matrix at each candidate type (the measuring pass)."""

    name = "measuring types"
    stats = frozenset({"hessian", "tokens"})

    def __init__(self, candidates: dict[str, list[str]], solver: str = "rtn", max_rows: int | None = LOSS_ROWS):
        self.candidates, self.solver, self.max_rows = candidates, solver, max_rows
        self.losses: dict[str, dict[str, float]] = {}

    def compress(self, name: str, layer_index: int, W, stats: dict):
        # returns None: the weights stay as they are, the next layer sees the original model's outputs
        if name in self.candidates:
            self.losses[name] = type_losses(W, stats.pop("hessian"), self.candidates[name], max_rows=self.max_rows,
                                            solver=self.solver)


def allocate_types(model, segments, recipe, spec) -> dict:
    """The measuring pass and the allocation; sets ``recipe.plan.decoder`` for the free matrices. Returns what
    the JSON result records of it."""
    plan = recipe.plan
    candidates = {n: recipe.candidates_for(s) for n, s in plan.free.items()}
    # the run's own solver on a sample of rows: GPTQ's losses order the types as the whole matrix's GPTQ does,
    # RTN's (the cheaper proxy) less well (benchmarks/bench_gguf_allocation.py)
    probe = LossProbe(candidates, "gptq" if recipe.method == "gptq" else "rtn")
    report = calibrate(model, segments, probe, batch_size=spec.batch_size, sequential=spec.sequential,
                       sink_weight=spec.sink_weight, progress=spec.progress)
    options = {n: [(t, tensor_bytes(t, plan.free[n]), probe.losses[n][t]) for t in candidates[n]] for n in candidates}
    chosen = allocate(options, plan.budget_bytes)
    plan.decoder.update(chosen)
    loss = sum(probe.losses[n][t] for n, t in chosen.items())
    return {"allocation_seconds": round(report.seconds["total"], 2), "allocation_loss": loss,
            "allocation_budget_bytes": plan.budget_bytes,
            "allocation_bytes": sum(tensor_bytes(t, plan.free[n]) for n, t in chosen.items())}
