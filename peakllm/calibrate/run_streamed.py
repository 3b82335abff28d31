"""A compression run over a model read one decoder layer at a time (models bigger than memory).

`run_streamed` drives `calibrate()` with a `stream.StreamIO` that reads each layer from the input's shards
just before it is needed, writes it to the output's shard as soon as it is compressed, checkpoints what a
restart needs and drops it: peak memory is one layer plus the calibration activations, whatever the model's
size. The numbers are those of the in-memory run: the same fp32 weights, the same layer calls in the same
order.

Output goes to `.<name>.partial` beside the output folder, renamed into place at the end (formats/folder.py).
After every layer `.resume/` in it holds what `--resume` needs (checkpoint.py); `--resume` continues from
the last committed layer, after checking that the input files and the run's description are unchanged.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from peakllm import memory
from peakllm.calibrate import budget
from peakllm.calibrate.checkpoint import STATE_VERSION, Checkpoint, restore_report
from peakllm.calibrate.distributed import workers
from peakllm.calibrate.embeddings import grid_of, quantize_outer
from peakllm.calibrate.loop import calibrate
from peakllm.calibrate.memory_plan import DEFAULT_OFFLOAD, MemoryPlan, limit_of
from peakllm.calibrate.preflight import check_disk, check_run
from peakllm.calibrate.recipes import ggml_type_for
from peakllm.calibrate.spec import EVAL_SEQLEN, RunSpec
from peakllm.calibrate.stats import capture_inputs
from peakllm.calibrate.stream import GGUFLayers, partial_dir, StreamIO
from peakllm.data import calibration_segments, eval_windows, protocol_bos, tokenize_source
from peakllm.errors import PeakError
from peakllm.eval.stream import head_nll, ppl_of
from peakllm.formats.folder import rename_into_place
from peakllm.formats.gguf.vocab import save_tokenizer
from peakllm.formats.gguf.writer import HEADER_BYTES, GGUFStreamWriter, plan_tensors
from peakllm.formats.shards import ShardWriter, ternary_to_sub1
from peakllm.formats.sub1_code import Sub1Dictionary
from peakllm.formats.sub1_size import SYM_BITS
from peakllm.formats.writer import (RUN_FILE, check_destination, check_writable, ct_actorder, folder_bytes, gguf_sizes,
                                    packed_module, weight_file_bytes)
from peakllm.models.anatomy import compressible_linears, is_moe, outer_modules
from peakllm.models.stream import StreamedModel


def plan_memory(sm, spec: RunSpec, recipe) -> MemoryPlan:
    """The run's predicted peak (calibrate/budget.py); over the budget, spill activations until it fits or refuse."""
    hessian = "hessian" in recipe.stats
    needs_data = bool(set(recipe.stats) - {"tokens"})
    calib_tokens = spec.calib_samples * spec.calib_seqlen if needs_data else 0
    limit = limit_of(spec)
    offload = DEFAULT_OFFLOAD
    gguf_outer = intk_outer = None
    if spec.format == "gguf":
        types = gguf_types(sm, spec, recipe)
        gguf_outer = [mod.weight.numel() for name, mod in outer_modules(sm.model).items() if f"{name}.weight" in types]
    elif spec.embed_grid is not None:
        intk_outer = ([mod.weight.numel() for mod in outer_modules(sm.model).values()], spec.embed_grid.bits)
    kw = dict(calib_tokens=calib_tokens, calib_seqlen=spec.calib_seqlen, batch_size=spec.batch_size,
              hessian=hessian, eval_tokens=spec.eval_tokens, gguf_outer=gguf_outer, intk_outer=intk_outer)
    pred = budget.predict(sm, offload_bytes=offload, **kw)
    if limit is not None and pred["predicted_peak_bytes"] > limit:
        spill = budget.predict(sm, offload_bytes=0, **kw)
        room = limit - spill["predicted_peak_bytes"]
        if room < 0:
            raise PeakError(
                f"this run needs about {memory.gb(spill['predicted_peak_bytes'])} at its peak "
                f"({spill['peak_phase']}), more than the {memory.gb(limit)} budget even with every calibration "
                f"activation spilled to disk:\n{budget.describe(spill)}\nfewer tokens per forward (--batch-size), "
                "a shorter --calib-seqlen, --eval-tokens 0, or a larger --max-memory would help")
        offload = room // 2
        pred = budget.predict(sm, offload_bytes=offload, **kw)
    return MemoryPlan(spec.max_memory_bytes, limit, offload, pred)


def output_estimate(sm, recipe, fmt: str) -> int:
    """Bytes the output will take, roughly (+10%): linears at the recipe's bits (and density), the rest fp32."""
    total = sm.num_params()
    if fmt == "hf":
        return int(1.1 * sm.source_dtype.itemsize * total)
    in_layers = sum(sm.layer_params)
    grid = getattr(recipe, "grid", None)
    per_param = (grid.bits + 0.5) / 8 if grid is not None else 4.0
    if getattr(recipe, "sparsity", None) is not None:
        per_param = per_param * (1 - recipe.sparsity) + 1 / 8
    return int(1.1 * (4 * (total - in_layers) + per_param * in_layers))


def gguf_types(sm, spec: RunSpec, recipe) -> dict[str, str]:
    """HF name -> block type of every tensor a streamed GGUF run stores quantized, from the meta skeleton: the
    file's header, written first, lists them all. As calibrate() names the matrices and quantize_outer types
    the embedding (and an untied lm_head); a solved matrix of another type is refused when it is written."""
    moe = is_moe(sm.model)
    types = {}
    for li, layer in enumerate(sm.layers):
        for n, m in compressible_linears(layer, moe).items():
            types[f"{sm.prefix}.{li}.{n}.weight"] = recipe.type_for(f"{sm.prefix}.{li}.{n}", tuple(m.weight.shape))
    if spec.embed_grid is not None:
        for name, mod in outer_modules(sm.model).items():
            own = grid_of(spec.embed_grid, name)
            t = "F16" if own is None else ggml_type_for(own, mod.weight.shape[1])  # a preset names each one
            if t != "F16":
                types[f"{name}.weight"] = t
    return types


def start_partial(out: Path, partial: Path, resume: bool, overwrite: bool, fmt: str) -> bool:
    """Check the output and the unfinished-run folder; True when a fresh partial folder is to be made."""
    if resume:
        if not (partial / ".resume" / "state.json").is_file():
            raise PeakError(f"nothing to resume: {partial} holds no checkpoint of an unfinished run")
        return False
    check_destination(out, fmt, overwrite)
    if partial.exists():
        if not overwrite:
            raise PeakError(f"an unfinished run of {out} is in {partial}: pass --resume to continue it, or "
                            "--overwrite to start again")
        shutil.rmtree(partial)
    return True


def run_streamed(spec: RunSpec, recipe, *, extra: dict, before_calibrate=None) -> dict:
    """prune/quantize of a model read layer by layer (see the module doc); returns the JSON result.
    `before_calibrate(streamed_model, segments, offload_bytes)` runs before the first layer (e.g. OWL's
    dense statistics pass)."""
    start = time.perf_counter()
    memory.release_free_heap(setup=True, budget=spec.max_memory_bytes is not None)
    out = Path(spec.output)
    partial = partial_dir(out)
    fresh = start_partial(out, partial, spec.resume, spec.overwrite, spec.format)
    sm = StreamedModel.open(spec.model)  # every shard's header checked here, before any work
    if hasattr(recipe, "moe"):
        recipe.moe = is_moe(sm.model)
    if spec.format == "hf" and getattr(recipe, "grid", None) is not None:
        raise PeakError("quantized weights need --format peakllm or compressed-tensors")
    check_run(sm.model, spec, recipe, disk=False)  # before the partial folder exists; disk is checked below
    check_writable(sm.model, sm.tokenizer, out, spec.format)
    if spec.format == "gguf" and workers().world > 1:
        raise PeakError("--format gguf is written by one process: run it without torchrun")
    plan = plan_memory(sm, spec, recipe)
    if spec.format == "gguf":
        check_disk(out, HEADER_BYTES + sum(t.nbytes for t in plan_tensors(sm.model, gguf_types(sm, spec, recipe), "F16")))
    else:
        check_disk(out, output_estimate(sm, recipe, spec.format))
    run_state = {"version": STATE_VERSION, "args": spec.resume_key(extra, torch.get_num_threads()),
                 "input": sm.source.fingerprint()}
    ckpt = Checkpoint(partial)
    state = ckpt.load_for(run_state, spec.model) if spec.resume else None
    if workers().world > 1:
        dist.barrier()  # every worker has checked the output folder before worker 0 creates anything
    if fresh and workers().is_writer:
        partial.mkdir(parents=True)
    try:
        result, report, io, writer = _compress(sm, spec, recipe, extra, plan, ckpt, state, run_state,
                                               partial, before_calibrate)
        writer = _finish_folder(sm, spec, extra, writer, io, result["bos"], partial, out)
    except BaseException:
        if workers().is_writer and fresh and not (partial / ".resume" / "state.json").is_file():
            shutil.rmtree(partial, ignore_errors=True)  # nothing worth resuming yet
        raise
    seconds = time.perf_counter() - start
    result.update(_streamed_facts(sm, spec, report, io, writer, plan, state, seconds, out))
    return result


def _compress(sm, spec: RunSpec, recipe, extra: dict, plan: MemoryPlan, ckpt: Checkpoint, state, run_state: dict,
              partial: Path, before_calibrate):
    """Calibrate every layer through a StreamIO, then the outer modules; the perplexities before and after."""
    model, tokenizer = sm.model, sm.tokenizer
    bos_id = protocol_bos(tokenizer, spec.bos)
    segments = calibration_segments(tokenizer, spec.calib_samples, spec.calib_seqlen, source=spec.calib_dataset,
                                    seed=spec.seed, bos=spec.bos)
    total = len(sm.layers) + 1
    if spec.format == "gguf":  # one file, its header written first: every tensor's type is known up front
        writer = GGUFLayers(GGUFStreamWriter(model, tokenizer, spec.output, gguf_types(sm, spec, recipe),
                                             tmp=partial / f"{Path(spec.output).name}.tmp",
                                             file_type=extra.get("file_type"),  # a preset's name, as in memory
                                             written=state["writer"]["written"] if state else None))
    else:
        writer = (ShardWriter.from_state(partial, state["writer"], sm.source_dtype) if state
                  else ShardWriter(partial, spec.format, total, sm.source_dtype))
    if before_calibrate is not None:
        before_calibrate(sm, segments, plan.offload_bytes)
    sm.load_outer("input")
    windows, eval_kwargs, eval_dense, eval_comp = None, None, [], []
    if spec.eval_tokens:
        windows = eval_windows(tokenize_source(tokenizer, spec.eval_dataset), EVAL_SEQLEN, spec.eval_tokens, bos_id=bos_id)
        eacts, eval_kwargs = capture_inputs(model, windows, 1, None)
        eval_dense = [eacts[w] for w in range(len(eacts))]
    # calibration, and the compressed model's evaluation windows, start from the quantized embedding
    quantize_outer(model, spec.embed_grid, loaded_only=True)
    if spec.eval_tokens:
        eval_comp = list(eval_dense)
        if spec.embed_grid is not None:
            eacts, _ = capture_inputs(model, windows, 1, None)
            eval_comp = [eacts[w] for w in range(len(eacts))]
        if state:
            eval_dense, eval_comp = ckpt.tensors(state, "evald"), ckpt.tensors(state, "evalc")
    io = StreamIO(sm, writer, ckpt, spec.format, state, run_state, eval_kwargs, eval_dense, eval_comp,
                  plan.offload_bytes)
    report = calibrate(model, segments, recipe, batch_size=spec.batch_size, sequential=spec.sequential,
                       sink_weight=spec.sink_weight, offload_bytes=plan.offload_bytes, progress=spec.progress, io=io)
    if state:
        restore_report(report, state["report"])
    result = {**extra, "bos": bos_id is not None, "sink_weight": spec.sink_weight}
    result.update(_write_outer(sm, spec, writer, io, windows, total))
    return result, report, io, writer


def _write_outer(sm, spec: RunSpec, writer, io: StreamIO, windows, total: int) -> dict:
    """The rest (embeddings, final norm, lm_head; tied: stored once, as the embedding): the dense model's
    perplexity needs them as they were, the compressed model's as --embed-bits makes them."""
    model = sm.model
    sm.load_outer("all")
    ppls = {}
    if spec.eval_tokens:
        t0 = time.perf_counter()
        ppls["dense_ppl"] = ppl_of(head_nll(model, io.eval_dense, windows), windows)
        io.seconds["evaluation"] += time.perf_counter() - t0
    outer_packed = {name: r.ggml if spec.format == "gguf" else packed_module(r)
                    for name, r in quantize_outer(model, spec.embed_grid).items()}
    if spec.eval_tokens:
        t0 = time.perf_counter()
        ppls["ppl"] = ppl_of(head_nll(model, io.eval_comp, windows), windows)
        io.seconds["evaluation"] += time.perf_counter() - t0
    outer = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, mod in sm.outer_modules():
        for n, t in mod.state_dict().items():
            full = f"{name}.{n}" if name else n
            if full.endswith(".weight") and full[: -len(".weight")] in outer_packed:
                continue
            if not (tied and full == "lm_head.weight"):
                outer[full] = t.detach().contiguous()
    if workers().is_writer:
        writer.write(total - 1, outer, outer_packed, outer=True)
    return ppls


def _finish_folder(sm, spec: RunSpec, extra: dict, writer: ShardWriter, io: StreamIO, bos: bool, partial: Path,
                   out: Path) -> ShardWriter:
    """Re-encode ternary shards as sub1 once the model-wide dictionary is known, write the index, config,
    tokenizer and run file, and rename the partial folder into place; the writer that wrote the last shards.
    GGUF: the finished file is renamed into place and the partial folder removed."""
    if spec.format == "gguf":
        sm.release_outer()
        writer.out.close()
        shutil.rmtree(partial)
        return writer
    if spec.format == "sub1" and io.ternary_counts[0] and workers().is_writer:
        writer = ternary_to_sub1(writer, Sub1Dictionary.from_counts(*io.ternary_counts, SYM_BITS))
    sm.release_outer()
    run_info = spec.run_info(extra, bos, streamed=True)
    config = sm.model.config.to_dict()
    if spec.format in ("hf", "compressed-tensors"):
        config["dtype"] = sm.stored_dtype_name()
    if workers().is_writer:
        writer.finish(config, {"method": run_info.get("method"), "run": run_info}, ct_actorder(run_info))
        save_tokenizer(sm.tokenizer, partial)
        (partial / RUN_FILE).write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
        io.ckpt.remove()
        rename_into_place(partial, out)
    if workers().world > 1:
        dist.barrier()  # the folder is in place before any worker reports
    return writer


def _streamed_facts(sm, spec: RunSpec, report, io: StreamIO, writer, plan: MemoryPlan, state, seconds: float,
                    out: Path) -> dict:
    facts = {"seconds": seconds, "calib_tokens": report.calib_tokens, "streamed": True,
             "resumed_at_layer": state["layers_done"] if state else None,
             "time_breakdown": {**{k: round(v, 2) for k, v in report.seconds.items()},
                                **{k: round(v, 2) for k, v in io.seconds.items()}},
             "seconds_per_layer": round(seconds / len(sm.layers), 2),
             "damping_escalations": report.damping_escalations, "solver_fallbacks": report.fallbacks,
             "params": sm.num_params(), "input_bytes": sm.bytes_on_disk(),
             "random_weights": (sm.folder / "PEAKLLM_SYNTH.json").is_file(),
             **plan.facts(), "peak_rss_bytes": memory.peak_rss_bytes(),
             "rss_after_layer_bytes": [io.rss_after_layer[0], io.rss_after_layer[-1]] if io.rss_after_layer else None,
             "output": str(out), "format": spec.format, "model": spec.model}
    if io.mask_total:
        facts["sparsity"] = io.mask_zeros / io.mask_total
    facts.update(report.expert_facts())
    if spec.format == "gguf":
        facts.update(gguf_sizes(writer.out.written, sm.num_params(), out))
        return facts
    facts.update(size_bytes=folder_bytes(out), bits_per_param=writer.bits_per_param())
    if workers().is_writer:  # other torchrun workers wrote nothing to count
        facts["bits_per_param_total"] = 8 * weight_file_bytes(out) / (writer.dense_params + writer.all_packed_params)
    if writer.expert_params:  # as save_compressed reports them for MoE models
        facts["bits_per_param_experts"] = writer.expert_bits / writer.expert_params
    return facts
