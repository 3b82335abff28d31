"""What the calibration pipeline does to each matrix: thin adapters from (W, statistics) to a solver.

A recipe names the statistics it needs (`stats`) and implements `compress(name, layer_index, W, stats)`,
returning a `ModuleResult`. No math lives here: it is all in `peakllm.solvers`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from peakllm import solvers
from peakllm.errors import PeakError
from peakllm.models.anatomy import is_expert
from peakllm.calibrate.gguf_plan import TypePlan, resolve_types, size_target
from peakllm.calibrate.intk_plan import GridPlan
from peakllm.formats.gguf.blocks import BLOCK_TYPES, GGMLWeight, block_type, fallback_type
from peakllm.solvers.ggml import gptq_ggml, rtn_ggml
from peakllm.solvers.gptq import check_act_order
from peakllm.formats.rotation import rotation_for
from peakllm.solvers.rate import allocate_at_price, gptq_at_zero_share
from peakllm.solvers.rotated import gptq_rotated, rtn_rotated

PRUNE_METHODS = ("sparsegpt", "wanda", "magnitude")
QUANT_METHODS = ("gptq", "rtn")
VALUE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # sparse kept values


@dataclass
class ModuleResult:
    weight: torch.Tensor                 # the new dense weight (pruned and/or dequantized)
    mask: torch.Tensor | None = None     # bool [out, in], True = kept
    quant: solvers.QuantizedWeight | None = None
    info: solvers.SolveInfo | None = None
    sparsity: float | None = None        # the sparsity asked of this matrix
    pattern: tuple[int, int] | None = None  # (N, M) for N:M
    ggml: GGMLWeight | None = None       # codes and parameters in one of llama.cpp's block types (GGUF out)
    values_dtype: torch.dtype | None = None  # sparse float values: the dtype they are stored in (weight holds them)

    def held_in(self, tensor: torch.Tensor) -> "ModuleResult":
        """Point the result's dense weight (and the solver's, when it is the same tensor) at ``tensor``, the
        module's own weight holding the same values: an in-memory run keeps every result until it is written,
        and two fp32 copies of each matrix were 3.9 GB of the 1B shape's 12.9 GB peak."""
        if tensor.dtype != self.weight.dtype or tensor.shape != self.weight.shape or tensor is self.weight:
            return self
        if self.quant is not None and self.quant.weight is self.weight:
            self.quant.weight = tensor
        self.weight = tensor
        return self


def parse_pattern(text: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): N zeros in every group of M."""
    if not text:
        return None
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise PeakError(f"pattern must look like N:M (e.g. 2:4), got {text!r}") from None
    return check_pattern((n, m))


def check_pattern(pattern: tuple[int, int]) -> tuple[int, int]:
    n, m = pattern
    if not 0 < n < m:
        raise PeakError(f"pattern N:M needs 0 < N < M, got {n}:{m}")
    return n, m


@dataclass
class PruneRecipe:
    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: tuple[int, int] | None = None
    grid: solvers.Grid | None = None     # joint quantization of kept weights (sparsegpt only)
    blocksize: int = 128
    damp: float = 0.01
    layer_sparsity: list[float] | None = None  # per decoder layer (OWL); overrides `sparsity`
    # the dtype the kept values are stored in without a grid (bf16 / fp16 / fp32): the weight is rounded to it
    # after each solve, so later layers are calibrated on, and the perplexity measures, what the file holds
    values: str = "fp32"

    def __post_init__(self):
        if self.method not in PRUNE_METHODS:
            raise PeakError(f"unknown pruning method {self.method!r}; choose from {', '.join(PRUNE_METHODS)}")
        if not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise PeakError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            check_pattern(self.pattern)
        if self.grid is not None and self.method != "sparsegpt":
            raise PeakError("joint quantization (--bits) is only available with --method sparsegpt")
        if self.values not in VALUE_DTYPES:
            raise PeakError(f"kept values are stored as one of {', '.join(VALUE_DTYPES)}, got {self.values!r}")

    @property
    def name(self) -> str:
        return self.method

    @property
    def stats(self) -> set[str]:
        return {"sparsegpt": {"hessian"}, "wanda": {"sqnorm"}, "magnitude": set()}[self.method] | {"tokens"}

    def check(self, name: str, shape: tuple[int, int]) -> None:
        if self.pattern is not None and shape[1] % self.pattern[1]:
            n, m = self.pattern
            raise PeakError(f"{n}:{m} sparsity needs in_features divisible by {m}, but {name} has {shape[1]}")

    def compress(self, name: str, layer_index: int, W: torch.Tensor, stats: dict) -> ModuleResult:
        sparsity = self.layer_sparsity[layer_index] if self.layer_sparsity else self.sparsity
        n, m = self.pattern or (0, 0)
        if self.method == "sparsegpt":
            # popped, not read: the solver's copy then replaces the only reference (one in x in matrix less)
            r = solvers.sparsegpt(W, stats.pop("hessian"), sparsity, prunen=n, prunem=m, blocksize=self.blocksize,
                                  damp=self.damp, grid=self.grid)
            if r.quant is not None:
                return ModuleResult(r.weight, r.mask, r.quant, r.info, sparsity, self.pattern)
            weight, mask, info = r.weight, r.mask, r.info
        elif self.method == "wanda":
            (weight, mask), info = solvers.wanda(W, stats["sqnorm"], sparsity, prunen=n, prunem=m), None
        else:
            (weight, mask), info = solvers.magnitude(W, sparsity, prunen=n, prunem=m), None
        dtype = VALUE_DTYPES[self.values]
        if dtype == torch.float16 and weight.numel() and float(weight.abs().max()) > torch.finfo(dtype).max:
            raise PeakError(f"{name} has weights beyond fp16's range: use --values bf16 or fp32")
        if dtype != torch.float32:
            weight = weight.to(dtype).float()  # pruned zeros stay zeros
        return ModuleResult(weight, mask, None, info, sparsity, self.pattern, values_dtype=dtype)


@dataclass
class QuantRecipe:
    method: str = "gptq"
    grid: solvers.Grid = solvers.Grid()
    act_order: str = "static"              # GPTQ column order: static | group | none (solvers.gptq)
    blocksize: int = 128
    damp: float = 0.01
    dense_grid: solvers.Grid | None = None  # MoE models: grid of the non-expert matrices (None: same as grid)
    keep_dense: bool = False                # MoE models: leave the non-expert matrices as they are
    # Ternary GPTQ under a size target: (name, out, in) -> the share of zero codes that matrix needs (set by
    # the caller from the format's accounting, e.g. formats.sub1_size.zero_share_for_target); None: plain GPTQ.
    zero_share_for: Callable[[str, int, int], float] | None = None
    matched_levels: bool = False            # with zero_share_for: ternary levels fitted to that share (grids.fit)
    # Experts of one MoE block share a bits/param budget (rate.allocate_at_price): (budget, bits_of) with
    # bits_of(name, out, in, zero_share, dictionary_share) the format's accounting (formats.sub1_size.bits_per_param); None:
    # each matrix held to its own share.
    expert_budget: tuple[float, Callable[..., float]] | None = None
    _rates: dict = field(default_factory=dict, repr=False, compare=False)  # last rate per matrix kind
    # int-k incoherence processing: each matrix solved in a randomly rotated input basis (formats/rotation.py),
    # its signs drawn from the matrix's name and `seed`
    rotate: bool = False
    seed: int = 0
    target: GridPlan | None = None          # --target-bits over int-k grids: checked by prepare()
    grids: dict = field(default_factory=dict)  # matrix name -> Grid chosen for it (intk_plan.allocate_grids)
    grid_rules: tuple = ()                  # ((compiled pattern, Grid), ...): --matrix-grid, first match wins

    moe: bool = False                       # set by the caller for MoE models

    def __post_init__(self):
        if self.method not in QUANT_METHODS:
            raise PeakError(f"unknown quantization method {self.method!r}; choose from {', '.join(QUANT_METHODS)}")

        check_act_order(self.act_order)

    @property
    def name(self) -> str:
        return self.method

    @property
    def stats(self) -> set[str]:
        return {"hessian", "tokens"} if self.method == "gptq" else {"tokens"}

    def prepare(self, model, tokenizer=None) -> None:
        """Before any work: a size target's candidates must reach it on this model's matrices."""
        if self.target is not None:
            self.target.check(model)

    def grid_for(self, name: str, moe: bool) -> solvers.Grid | None:
        if name in self.grids:
            return self.grids[name]
        for pattern, grid in self.grid_rules:
            if pattern.search(name):
                return grid
        if not moe or is_expert(name):
            return self.grid
        return None if self.keep_dense else (self.dense_grid or self.grid)

    def compress_group(self, names: list[str], Ws: list[torch.Tensor], stats: list[dict],
                       map_fn=map) -> list[ModuleResult] | None:
        """All experts of one MoE block's part at once, under one bits/param budget (one price for a nonzero
        code, each expert's loss weighted by its calibration tokens); None when no budget is shared."""
        grid = self.grid_for(names[0], self.moe) if names else None
        if self.expert_budget is None or self.method != "gptq" or grid is None or grid.kind != "ternary":
            return None

        budget, bits_of = self.expert_budget
        # The experts' codes share one dictionary, near the share the budget gives their shape: an expert whose
        # share strays from it is coded by a dictionary not its own, and is counted so.
        shares = [self.zero_share_for(name, *W.shape) for name, W in zip(names, Ws)]
        problems = []
        for W, st, share in zip(Ws, stats, shares):
            g = replace(grid, zero_share=share) if self.matched_levels else grid
            # an expert no calibration token reached (pooled statistics, 0 tokens) weighs as one token
            problems.append((W, st["hessian"], float(max(st.get("tokens", 0), 1)), g))
        kind = names[0].rstrip("0123456789").rstrip(".").rsplit(".", 1)[-1]
        solves, price = allocate_at_price(
            problems, lambda i, share: bits_of(names[i], *Ws[i].shape, share, shares[i]), budget,
            price_hint=self._rates.get(("price", kind)), map_fn=map_fn,
            blocksize=self.blocksize, damp=self.damp, act_order=self.act_order)
        self._rates[("price", kind)] = price  # the next block's search starts there
        return [ModuleResult(q.weight, None, q, info) for q, info in solves]

    def compress(self, name: str, layer_index: int, W: torch.Tensor, stats: dict) -> ModuleResult | None:
        grid = self.grid_for(name, self.moe)
        if grid is None:
            return None
        rot = rotation_for(name, W.shape[1], self.seed) if self.rotate and grid.kind == "affine" else None
        if self.method == "gptq":
            kw = {"blocksize": self.blocksize, "damp": self.damp, "act_order": self.act_order}
            if self.zero_share_for is not None and grid.kind == "ternary":
                share = self.zero_share_for(name, *W.shape)
                if self.matched_levels:
                    grid = replace(grid, zero_share=share)
                kind = name.rstrip("0123456789").rstrip(".").rsplit(".", 1)[-1]  # e.g. down_proj (of any expert)
                q, info, rate = gptq_at_zero_share(W, stats.pop("hessian"), grid, share,
                                                   rate_hint=self._rates.get(kind), **kw)
                self._rates[kind] = rate  # the next matrix of this kind starts its search there
                return ModuleResult(q.weight, None, q, info)
            q, info = gptq_rotated(W, stats.pop("hessian"), grid, rot, **kw)
            return ModuleResult(q.weight, None, q, info)
        q = rtn_rotated(W, grid, rot)
        return ModuleResult(q.weight, None, q, None)


def ggml_type_for(type_name: str, cols: int) -> str:
    """The block type a ``cols``-wide matrix is stored in when ``type_name`` is asked for: the type itself, or
    llama.cpp's fallback when its blocks do not divide the rows (K-quants need multiples of 256); "F16" when
    no block type fits."""
    block_type(type_name)  # an unknown name is one error
    return fallback_type(type_name, cols)


@dataclass
class GGMLRecipe:
    """Quantize every decoder matrix onto one of llama.cpp's block types (formats/gguf), solved on that type's
    exact grid: GPTQ with the Hessian, or round-to-nearest with an importance-weighted grid fit (diag of the
    inputs' x x^T, what llama.cpp's imatrix holds).

    Which type each matrix gets is resolved on the loaded model by ``prepare`` (calibrate/gguf_plan.py):
    llama-quantize's rules for ``preset``, or ``type`` on every matrix (a block type that is no preset's
    name), then ``overrides`` (--tensor-type); with ``target_bits``, the matrices not pinned by an override
    are allocated among ``candidates`` after a measuring pass (gguf_plan.allocate_types)."""
    method: str = "gptq"
    type: str = "Q4_K"                      # a single type; with a preset, its default type (for estimates)
    act_order: str = "static"              # static: columns by decreasing diag(H), grids fitted first; none:
    #                                        own order, each block's grid fitted as the sweep reaches it
    blocksize: int = 128
    damp: float = 0.01
    moe: bool = False                       # set by the caller; GGUF output is written for dense models
    preset: str | None = None               # llama-quantize's preset name (formats/gguf/presets.PRESETS)
    overrides: tuple = ()                   # ((regex on the GGUF name, block type), ...): first match wins
    embed_type: str | None = None           # token_embd and output: this type (None: the rules)
    keep_outer: bool = False                # token_embd and output stay F16
    target_bits: float | None = None        # bits/param over the whole file: types allocated per matrix
    candidates: tuple[str, ...] | None = None  # the types an allocation chooses from (None: every type a width takes)
    plan: TypePlan = field(default_factory=TypePlan)  # filled by prepare(); plan.outer is the run's embed grid

    def __post_init__(self):
        if self.method not in QUANT_METHODS:
            raise PeakError(f"unknown quantization method {self.method!r}; choose from {', '.join(QUANT_METHODS)}")
        if self.act_order not in ("static", "none"):
            raise PeakError("GGUF blocks keep columns in their order: --act-order static or none")
        block_type(self.type)
        for t in self.candidates or ():
            block_type(t)

    @property
    def name(self) -> str:
        return f"{self.method} {self.preset or self.type}"

    @property
    def stats(self) -> set[str]:
        return {"hessian", "tokens"} if self.method == "gptq" else {"sqnorm", "tokens"}

    def candidates_for(self, shape: tuple[int, int]) -> list[str]:
        """The block types an allocation may give a matrix of ``shape``: those whose blocks divide its rows."""
        found = [t for t in (self.candidates or BLOCK_TYPES) if shape[1] % BLOCK_TYPES[t].block == 0]
        if not found:
            raise PeakError(f"a [{shape[0]}, {shape[1]}] matrix fits none of the candidate types "
                            f"{', '.join(self.candidates or BLOCK_TYPES)}")
        return found

    def prepare(self, model, tokenizer=None) -> None:
        """Resolve every tensor's type on the loaded model (and, for a size target, the budget), before any work."""
        resolved = resolve_types(model, self)
        self.plan.decoder.clear()
        self.plan.decoder.update(resolved.decoder)
        self.plan.outer.clear()  # the same dict the run quantizes the embedding (and output) with
        self.plan.outer.update(resolved.outer)
        self.plan.params = resolved.params
        if self.target_bits is not None:
            size_target(model, tokenizer, self, self.plan)

    def type_for(self, name: str, shape: tuple[int, int]) -> str:
        return self.plan.decoder.get(name) or ggml_type_for(self.type, shape[1])

    def check(self, name: str, shape: tuple[int, int]) -> None:
        if self.type_for(name, shape) == "F16":
            raise PeakError(f"{name}: [{shape[0]}, {shape[1]}] fits no block type of the {self.type} family "
                            "(rows must be a multiple of 32)")

    def compress(self, name: str, layer_index: int, W: torch.Tensor, stats: dict) -> ModuleResult:
        t = self.type_for(name, tuple(W.shape))
        if self.method == "gptq":
            static = self.act_order == "static"  # none: each block's grid fitted as the sweep reaches it
            q, info = gptq_ggml(W, stats.pop("hessian"), t, blocksize=self.blocksize, damp=self.damp,
                                act_order=static, fit_as_swept=not static)
        else:
            q, info = rtn_ggml(W, t, importance=stats.get("sqnorm")), None
        return ModuleResult(q.dequantize(), info=info, ggml=q)


def keeps_zeros(type_name: str) -> bool:
    """Whether a block type stores 0 exactly whatever its scale: the symmetric types (level 0 is a code: Q8_0,
    Q4_0, Q5_0, Q3_K, Q6_K); not those with a min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K: w = d*q - m) nor IQ4_NL (no
    zero level), where a pruned weight becomes the grid point nearest 0."""
    t = block_type(type_name)
    return t.values is None and not t.has_bias and t.level_min <= 0


@dataclass
class PruneGGMLRecipe:
    """Prune (``prune``: SparseGPT, Wanda or magnitude), then round onto a llama.cpp block type with the mask
    kept (``quant``'s type and column order): after SparseGPT, GPTQ on the type's grid with the same Hessian,
    pruned weights rounded as 0 and their error spread over the columns not yet rounded; after Wanda or
    magnitude, RTN with the type's importance-weighted fit (Wanda's ||x||^2 per column)."""
    prune: PruneRecipe
    quant: GGMLRecipe
    moe: bool = False

    @property
    def name(self) -> str:
        return f"{self.prune.method} + {self.quant.type}"

    @property
    def type(self) -> str:
        return self.quant.type

    @property
    def sparsity(self) -> float:
        return self.prune.sparsity

    @property
    def stats(self) -> set[str]:
        return self.prune.stats

    def type_for(self, name: str, shape: tuple[int, int]) -> str:
        return self.quant.type_for(name, shape)

    def check(self, name: str, shape: tuple[int, int]) -> None:
        self.prune.check(name, shape)
        self.quant.check(name, shape)

    def compress(self, name: str, layer_index: int, W: torch.Tensor, stats: dict) -> ModuleResult:
        H = stats.get("hessian")
        pruned = self.prune.compress(name, layer_index, W, stats)  # pops the Hessian; H still holds it
        t = self.type_for(name, tuple(W.shape))
        if H is not None:
            q, info = gptq_ggml(pruned.weight, H, t, blocksize=self.quant.blocksize, damp=self.quant.damp,
                                act_order=self.quant.act_order == "static", mask=pruned.mask)
        else:
            q, info = rtn_ggml(pruned.weight * pruned.mask, t, importance=stats.get("sqnorm")), pruned.info
        return ModuleResult(q.dequantize(), pruned.mask, info=info, sparsity=pruned.sparsity, pattern=pruned.pattern,
                            ggml=q)
