"""One compression run, from a `RunSpec` and a recipe to a written folder and its JSON result.

load → checks → dense perplexity → outer matrices → calibrate → (size target held) → save → perplexity.
A model whose in-memory run is predicted over the memory limit (`--stream`, or auto: memory_plan.py) takes
the same steps layer by layer from disk (run_streamed.py); both go through `calibrate()`, with an in-memory or
a streamed layer I/O.
"""

from __future__ import annotations

import time

from peakllm import memory
from peakllm.calibrate.distributed import workers
from peakllm.calibrate.embeddings import quantize_outer
from peakllm.calibrate.loop import calibrate, CalibrationReport
from peakllm.calibrate.memory_plan import MemoryPlan, check_loaded, choose_path
from peakllm.calibrate.preflight import check_run
from peakllm.calibrate.run_streamed import run_streamed
from peakllm.calibrate.spec import EVAL_SEQLEN, RunSpec
from peakllm.calibrate.target import hold_sub1_target
from peakllm.data import calibration_segments, protocol_bos
from peakllm.errors import PeakError
from peakllm.eval import cached_evaluate, evaluate
from peakllm.formats.writer import check_destination, check_writable, save_compressed
from peakllm.models import load_model, model_bytes
from peakllm.models.anatomy import is_moe


def wants_stream(spec: RunSpec, recipe) -> tuple[bool, MemoryPlan | None]:
    """--stream on/off, or auto: stream when the in-memory run's predicted peak is over the limit
    (memory_plan.choose_path); the in-memory plan when one was made."""
    if spec.resume and spec.stream == "off":
        raise PeakError("--resume continues a streamed run: it cannot be combined with --stream off")
    return choose_path(spec, recipe)


def run_compression(spec: RunSpec, recipe, *, extra: dict, before_calibrate=None, before_stream=None) -> dict:
    """The run; returns the JSON result. `before_calibrate(model, segments)`, when given, runs on the loaded
    dense model and its calibration segments just before calibration (e.g. OWL's per-layer sparsity
    allocation), inside the timed part; `before_stream(streamed_model, segments, offload_bytes)` is its
    counterpart for a streamed run. `extra`: what the caller adds to the result and the folder's run record."""
    if spec.eval_tokens < 0:
        raise PeakError(f"--eval-tokens must be >= 0, got {spec.eval_tokens}")
    if 0 < spec.eval_tokens < EVAL_SEQLEN:  # before the model is loaded, not after the dense evaluation
        raise PeakError(f"--eval-tokens ({spec.eval_tokens}) is smaller than one evaluation window of {EVAL_SEQLEN} "
                        "tokens; use 0 to skip evaluation")
    streamed, plan = wants_stream(spec, recipe)
    if streamed:
        if before_calibrate is not None and before_stream is None:
            raise PeakError("this option needs the whole model in memory; use --stream off")
        result = run_streamed(spec, recipe, extra=extra, before_calibrate=before_stream)
        if plan is not None:  # why it streamed
            result["in_memory_predicted_peak_rss_bytes"] = plan.prediction["predicted_peak_bytes"]
        return result
    return run_in_memory(spec, recipe, extra=extra, before_calibrate=before_calibrate, plan=plan)


def run_in_memory(spec: RunSpec, recipe, *, extra: dict, before_calibrate=None, plan: MemoryPlan | None = None) -> dict:
    check_destination(spec.output, spec.format, spec.overwrite)
    start = time.perf_counter()
    memory.release_free_heap(setup=True, budget=spec.max_memory_bytes is not None)
    model, tokenizer = load_model(spec.model)
    check_writable(model, tokenizer, spec.output, spec.format)  # fail now, not after the compression
    if hasattr(recipe, "moe"):
        recipe.moe = is_moe(model)
    check_run(model, spec, recipe, tokenizer=tokenizer)  # every check the shapes allow, before evaluation and calibration
    plan = check_loaded(model, spec, recipe, plan)
    dense_size_bytes = model_bytes(model)
    dense_ppl = None
    if spec.eval_tokens:
        dense_ppl = cached_evaluate(model, tokenizer, spec.model, spec.eval_dataset, seqlen=EVAL_SEQLEN,
                                    max_tokens=spec.eval_tokens, progress=spec.progress, bos=spec.bos)["ppl"]
    outer = quantize_outer(model, spec.embed_grid)  # before calibration: layers see them
    segments = calibration_segments(tokenizer, spec.calib_samples, spec.calib_seqlen, source=spec.calib_dataset,
                                    seed=spec.seed, bos=spec.bos)
    if before_calibrate is not None:
        before_calibrate(model, segments)
    report = calibrate(model, segments, recipe, batch_size=spec.batch_size, sequential=spec.sequential,
                       sink_weight=spec.sink_weight, offload_bytes=plan.offload_bytes, progress=spec.progress)
    report.modules.update(outer)
    held = {}
    if spec.target_bits is not None and spec.format == "sub1":
        held = hold_sub1_target(model, report.modules, spec.target_bits)  # before it is written or evaluated
    bos = protocol_bos(tokenizer, spec.bos) is not None
    result = {**extra, **held, "seconds": time.perf_counter() - start, "dense_size_bytes": dense_size_bytes,
              **_report_facts(report), "bos": bos, "sink_weight": spec.sink_weight,
              **report.expert_facts()}
    sparsity = measured_sparsity(report.modules)
    if sparsity is not None:
        result["sparsity"] = sparsity
    if workers().is_writer:  # with torchrun, worker 0 alone writes
        result.update(save_compressed(model, tokenizer, report.modules, spec.output, fmt=spec.format,
                                      run_info=spec.run_info(extra, bos), overwrite=spec.overwrite))
    if spec.eval_tokens:
        after = evaluate(model, tokenizer, spec.eval_dataset, seqlen=EVAL_SEQLEN, max_tokens=spec.eval_tokens,
                         progress=spec.progress, bos=spec.bos)
        result["ppl"], result["dense_ppl"] = after["ppl"], dense_ppl
    result.update({"output": str(spec.output), "format": spec.format, "model": spec.model, "streamed": False,
                   **plan.facts(), "peak_rss_bytes": memory.peak_rss_bytes()})
    return result


def _report_facts(report: CalibrationReport) -> dict:
    return {"calib_tokens": report.calib_tokens,
            "time_breakdown": {k: round(v, 2) for k, v in report.seconds.items()},
            "damping_escalations": report.damping_escalations, "solver_fallbacks": report.fallbacks}


def measured_sparsity(modules: dict) -> float | None:
    """Fraction of zeros over all pruned matrices."""
    masks = [r.mask for r in modules.values() if getattr(r, "mask", None) is not None]
    if not masks:
        return None
    total = sum(m.numel() for m in masks)
    return float(sum((~m).sum().item() for m in masks) / total)
