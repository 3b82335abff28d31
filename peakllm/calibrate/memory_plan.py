"""In memory or streamed: a compression's path chosen before any work, on predicted peaks (budget.py).

The limit is `--max-memory`, else the memory the machine has available. An input a meta skeleton can be built
for (a safetensors folder, a built-in model) has its in-memory peak predicted before it is loaded; `--stream
auto` runs it in memory when that fits (spilling calibration activations if that makes it fit) and streams it
otherwise, where the streamed run plans again and refuses if even that cannot fit (run_streamed.plan_memory).
`--stream off` with a plan that cannot fit is refused here, saying what would help. A GGUF or peakllm input is
predicted once loaded, before any evaluation or calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

from peakllm import memory
from peakllm.calibrate import budget
from peakllm.calibrate.embeddings import grid_of
from peakllm.calibrate.preflight import matrix_shapes, output_estimate
from peakllm.calibrate.spec import RunSpec
from peakllm.errors import PeakError
from peakllm.models import resolve
from peakllm.models.anatomy import is_moe, outer_modules
from peakllm.models.stream import StreamedModel

DEFAULT_OFFLOAD = 2 << 30  # calibration activations held in RAM before they spill, when nothing forces less


@dataclass
class MemoryPlan:
    budget_bytes: int | None    # --max-memory
    limit_bytes: int | None     # what the run must fit: the budget, else the memory available when planned
    offload_bytes: int          # calibration activations held in RAM before they spill to disk
    prediction: dict            # budget.predict / predict_in_memory

    @property
    def fits(self) -> bool:
        return self.limit_bytes is None or self.prediction["predicted_peak_bytes"] <= self.limit_bytes

    def facts(self) -> dict:
        """What a run's JSON reports of its plan (the measured peak is added beside it)."""
        return {"max_memory_bytes": self.budget_bytes, "memory_limit_bytes": self.limit_bytes,
                "predicted_peak_rss_bytes": self.prediction["predicted_peak_bytes"],
                "predicted_peak_phase": self.prediction["peak_phase"]}


def limit_of(spec: RunSpec) -> int | None:
    return spec.max_memory_bytes if spec.max_memory_bytes is not None else memory.available_bytes()


def needs_data(recipe) -> bool:
    return bool(set(recipe.stats) - {"tokens"})


def in_memory_prediction(model, spec: RunSpec, recipe, *, source_bytes: int | None, offload: int | None) -> dict:
    """budget.predict_in_memory for this run: `model` its meta skeleton (`source_bytes`: the input's weight
    files) or the loaded model (None)."""
    _, compressed = matrix_shapes(model)
    grid = getattr(recipe, "grid", None) or getattr(recipe, "type", None)
    out_bytes = output_estimate(model, compressed, grid, spec.format, getattr(recipe, "sparsity", None),
                                spec.embed_grid)
    outer = [m.weight.numel() for name, m in outer_modules(model).items()
             if spec.embed_grid is not None and grid_of(spec.embed_grid, name) is not None]
    data = needs_data(recipe)
    return budget.predict_in_memory(
        model, source_bytes=source_bytes, compressed_params=compressed,
        kept_per_param=budget.kept_bytes_per_param(recipe), output_bytes=out_bytes, outer_quantized=outer,
        calib_tokens=spec.calib_samples * spec.calib_seqlen if data else 0, calib_seqlen=spec.calib_seqlen,
        batch_size=spec.batch_size, hessian="hessian" in recipe.stats, eval_tokens=spec.eval_tokens,
        offload_bytes=offload)


def plan_in_memory(model, spec: RunSpec, recipe, *, source_bytes: int | None) -> MemoryPlan:
    """The in-memory plan: activations held up to 2 GB, or fewer (spilled to disk) when that makes it fit."""
    limit = limit_of(spec)
    plan = MemoryPlan(spec.max_memory_bytes, limit, DEFAULT_OFFLOAD,
                      in_memory_prediction(model, spec, recipe, source_bytes=source_bytes, offload=DEFAULT_OFFLOAD))
    if plan.fits or not needs_data(recipe):
        return plan
    spill = in_memory_prediction(model, spec, recipe, source_bytes=source_bytes, offload=0)
    room = limit - spill["predicted_peak_bytes"]
    if room < 0:
        return MemoryPlan(spec.max_memory_bytes, limit, 0, spill)
    offload = room // 2
    return MemoryPlan(spec.max_memory_bytes, limit, offload,
                      in_memory_prediction(model, spec, recipe, source_bytes=source_bytes, offload=offload))


def choose_path(spec: RunSpec, recipe) -> tuple[bool, MemoryPlan | None]:
    """(stream?, the in-memory plan when one was made before loading). Refuses `--stream off` when the
    in-memory run is predicted over the limit."""
    if spec.resume or spec.stream == "on":
        return True, None
    kind, _ = resolve(spec.model)
    if kind not in ("hf", "default"):
        return False, None  # predicted once loaded (run.run_in_memory)
    try:
        sm = StreamedModel.open(spec.model)
    except PeakError:  # no skeleton (e.g. a layout transformers renames on load), so it cannot stream either:
        return False, None  # loaded, then predicted (check_loaded)
    if hasattr(recipe, "moe"):
        recipe.moe = is_moe(sm.model)
    plan = plan_in_memory(sm.model, spec, recipe, source_bytes=sm.bytes_on_disk())
    if plan.fits:
        return False, plan
    if spec.stream == "auto":
        return True, plan
    refuse_in_memory(plan, streamed_hint(sm, spec, recipe))


def streamed_hint(sm, spec: RunSpec, recipe) -> str:
    pred = budget.predict(sm, calib_tokens=spec.calib_samples * spec.calib_seqlen if needs_data(recipe) else 0,
                          calib_seqlen=spec.calib_seqlen, batch_size=spec.batch_size,
                          hessian="hessian" in recipe.stats, eval_tokens=spec.eval_tokens, offload_bytes=0)
    return f"--stream on (predicted peak {memory.gb(pred['predicted_peak_bytes'])}, activations spilled to disk)"


def refuse_in_memory(plan: MemoryPlan, stream_hint: str | None) -> None:
    pred, limit = plan.prediction, plan.limit_bytes
    what = f"the {memory.gb(limit)} budget" if plan.budget_bytes is not None else \
        f"the {memory.gb(limit)} this machine has available"
    helps = ([stream_hint] if stream_hint else []) + ["--eval-tokens 0" if pred["terms"].get("evaluation logits")
                                                      else None, "a larger --max-memory"]
    raise PeakError(f"in memory this run needs about {memory.gb(pred['predicted_peak_bytes'])} at its peak "
                    f"({pred['peak_phase']}), more than {what}:\n{budget.describe(pred)}\n"
                    f"{', '.join(h for h in helps if h)} would help")


def check_loaded(model, spec: RunSpec, recipe, plan: MemoryPlan | None) -> MemoryPlan:
    """The plan of a run whose model is loaded: the one made before loading, or one made now (a GGUF or
    peakllm input, which cannot stream), refused when it cannot fit."""
    if plan is None:
        plan = plan_in_memory(model, spec, recipe, source_bytes=None)
        if not plan.fits:
            refuse_in_memory(plan, None)
    return plan
