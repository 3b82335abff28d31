"""Compressing a model bigger than memory: the calibration pipeline over layers streamed from disk.

`run_streamed` drives `calibrate()` with an `io` that reads each decoder layer from the input's shards
just before it is needed (models/stream.py), writes it to the output's shard as soon as it is compressed
(formats/shards.py), checkpoints what a restart needs, and drops it: peak memory is one layer plus the
calibration activations, whatever the model's size. The numbers are those of the in-memory run: the
same fp32 weights, the same layer calls in the same order.

Output goes to `.<name>.partial` beside the output folder, renamed into place at the end. After every
layer `.resume/` in it holds the layer's output activations (calibration and evaluation), the report's
counters and the writer's state, committed by an atomic rename of `state.json`; `--resume` continues from
the last committed layer, after checking that the input files and the run's arguments are unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import torch

from peakllm import memory
from peakllm.distributed import workers
from peakllm.calibrate_resume import STATE_VERSION, Checkpoint, report_state, restore_report, run_args
from peakllm.errors import PeakError

KILL_ENV = "PEAKLLM_KILL_AFTER_LAYER"  # fault injection for tests: SIGKILL self once this layer is committed


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


class StreamIO:
    """What calibrate() calls around each layer in streaming mode."""

    def __init__(self, streamed, writer, ckpt: Checkpoint, fmt: str, state: dict | None, run_state: dict,
                 eval_kwargs, eval_dense: list, eval_comp: list, offload_bytes):
        self.sm, self.writer, self.ckpt, self.fmt = streamed, writer, ckpt, fmt
        self.state, self.run_state = state, run_state
        self.start_layer = state["layers_done"] if state else 0
        self.eval_kwargs, self.eval_dense, self.eval_comp = eval_kwargs, eval_dense, eval_comp
        self.offload_bytes = offload_bytes
        self.seconds = {"read": 0.0, "write": 0.0, "evaluation": 0.0}
        self._outer_loaded = True
        self.mask_zeros, self.mask_total = (state or {}).get("mask", (0, 0))
        self.ternary_counts = (state or {}).get("ternary_counts", [0, 0, 0])
        self.rss_after_layer = (state or {}).get("rss_after_layer", [])
        self.is_writer = workers().is_writer  # with torchrun, worker 0 alone writes shards and checkpoints

    def resume_acts(self, acts):
        from peakllm.calibrate import Activations

        acts.close()
        out = Activations(self.offload_bytes)
        for t in self.ckpt.tensors(self.state, "calib"):
            out.append(t)
        return out

    def _eval_through(self, layer, li: int, acts: list) -> list:
        from peakllm.calibrate import _layer_out

        t0 = time.perf_counter()
        out = [_layer_out(layer(x, **self.eval_kwargs[w][li])) for w, x in enumerate(acts)]
        self.seconds["evaluation"] += time.perf_counter() - t0
        return out

    def load(self, li: int):
        if self._outer_loaded:  # the embedding was needed only to capture the inputs of layer 0
            self.sm.release_outer()
            self._outer_loaded = False
        t0 = time.perf_counter()
        layer = self.sm.load_layer(li)
        self.seconds["read"] += time.perf_counter() - t0
        if self.eval_dense:
            self.eval_dense = self._eval_through(layer, li, self.eval_dense)
        return layer

    def keep(self, name: str, result):
        """The packed form of a compressed matrix (its dense weight is already in the layer)."""
        from peakllm.save import packed_module

        if getattr(result, "mask", None) is not None:
            self.mask_zeros += int((~result.mask).sum())
            self.mask_total += result.mask.numel()
        quant = getattr(result, "quant", None)
        if self.fmt == "sub1" and quant is not None and quant.grid["kind"] == "ternary":
            from peakllm.formats.sub1_code import code_counts

            # stored as 2-bit ternary for now; re-encoded once the model-wide dictionary is known
            self.ternary_counts = [a + b for a, b in zip(self.ternary_counts, code_counts(quant.codes))]
        return _Kept(None if self.fmt == "hf" else packed_module(result, "peakllm" if self.fmt == "sub1" else self.fmt))

    def done(self, li: int, layer, acts, report) -> None:
        from peakllm.save import layer_tensors

        if self.eval_comp:
            self.eval_comp = self._eval_through(layer, li, self.eval_comp)
        t0 = time.perf_counter()
        prefix = f"{self.sm.prefix}.{li}."
        results = {n: report.modules.pop(n) for n in [n for n in report.modules if n.startswith(prefix)]}
        kept = {n: r for n, r in results.items() if isinstance(r, _Kept)}
        for n, r in results.items():  # fused experts' results come straight from calibrate_moe
            if n not in kept:
                kept[n] = self.keep(n, r)
        dense, packed = layer_tensors(layer, prefix, {n: r.packed for n, r in kept.items()}, self.fmt)
        if self.is_writer:
            self.writer.write(li, dense, packed)
        self.sm.release_layer(li)
        del dense, packed, results, kept
        memory.release_free_heap()
        self.seconds["write"] += time.perf_counter() - t0
        # a generator: activations spilled to disk are read back one batch at a time, not all at once
        tensors = {"calib": (acts[b] for b in range(len(acts))) if acts is not None else [],
                   "evald": self.eval_dense, "evalc": self.eval_comp}
        self.rss_after_layer.append(memory.rss_bytes())
        state = {**self.run_state, "writer": self.writer.state(), "report": report_state(report),
                 "rss_after_layer": self.rss_after_layer,
                 "io_seconds": self.seconds, "mask": (self.mask_zeros, self.mask_total),
                 "ternary_counts": self.ternary_counts}
        if self.is_writer:
            self.ckpt.save(li, tensors, state)
        if os.environ.get(KILL_ENV) == str(li):
            os.kill(os.getpid(), signal.SIGKILL)


class _Kept:
    """What report.modules holds of a streamed matrix until its layer is written."""
    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


@torch.inference_mode()
def streamed_layer_sqnorms(sm, segments: torch.Tensor, batch_size: int, offload_bytes, on_layer,
                           progress: bool = True) -> None:
    """One pass of the calibration data through the dense model, layer by layer from disk:
    `on_layer(li, layer, {name: sum_t x^2 of its inputs})` while each layer is loaded (OWL's statistics;
    the same batches and calls as `calibrate.input_sqnorms` on the whole model)."""
    from peakllm.progress import tqdm

    from peakllm.calibrate import Activations, Stats, _layer_out, capture_inputs, compressible_linears, is_moe

    sm.load_outer("input")
    acts, kwargs = capture_inputs(sm.model, segments, batch_size, offload_bytes)
    sm.release_outer()
    moe = is_moe(sm.model)
    try:
        for li in tqdm(range(len(sm.layers)), desc="outlier statistics (streamed)", unit="layer",
                       disable=not progress, leave=False):
            layer = sm.load_layer(li)
            stats = {n: Stats(m.in_features, {"sqnorm"}, "cpu") for n, m in compressible_linears(layer, moe).items()}
            hooks = [m.register_forward_pre_hook(lambda mod, a, s=stats[n]: s.add(a[0]))
                     for n, m in compressible_linears(layer, moe).items()]
            nxt = Activations(offload_bytes)
            try:
                for b in range(len(acts)):
                    nxt.append(_layer_out(layer(acts[b], **kwargs[b][li])))
            finally:
                for h in hooks:
                    h.remove()
            acts.close()
            acts = nxt
            on_layer(li, layer, {f"{sm.prefix}.{li}.{n}": s.finish()["sqnorm"] for n, s in stats.items()})
            sm.release_layer(li)
    finally:
        acts.close()


def _output_estimate(sm, recipe, fmt: str) -> int:
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


def _start(out: Path, partial: Path, resume: bool, overwrite: bool) -> bool:
    """Check the output and the unfinished-run folder; True when a fresh partial folder is to be made."""
    from peakllm.save import check_output

    if resume:
        if not (partial / ".resume" / "state.json").is_file():
            raise PeakError(f"nothing to resume: {partial} holds no checkpoint of an unfinished run")
        return False
    check_output(out, overwrite)
    if partial.exists():
        if not overwrite:
            raise PeakError(f"an unfinished run of {out} is in {partial}: pass --resume to continue it, or "
                            "--overwrite to start again")
        shutil.rmtree(partial)
    return True


def run_streamed(args, recipe, *, extra_result: dict, progress: bool, before_calibrate=None) -> dict:
    """prune/quantize of a model read layer by layer (see the module doc); returns the JSON result.
    `before_calibrate(streamed_model, segments, offload_bytes)` runs before the first layer (e.g. OWL's
    dense statistics pass)."""
    from peakllm.calibrate import calibrate, capture_inputs, is_moe
    from peakllm.data import calibration_segments, eval_windows, protocol_bos, tokenize_source
    from peakllm.embeddings import quantize_outer
    from peakllm.eval.stream import head_nll, ppl_of
    from peakllm.formats.shards import ShardWriter
    from peakllm.models.stream import StreamedModel
    from peakllm.preflight import check_run
    from peakllm.save import RUN_FILE, _replace_dir, check_writable, ct_actorder, folder_bytes

    start = time.perf_counter()
    memory.release_free_heap(setup=True, budget=bool(getattr(args, "max_memory", None)))
    out = Path(args.output)
    partial = partial_dir(out)
    resume = bool(getattr(args, "resume", False))
    fresh = _start(out, partial, resume, args.overwrite)
    sm = StreamedModel.open(args.model)  # every shard's header checked here, before any work
    model, tokenizer = sm.model, sm.tokenizer
    if hasattr(recipe, "moe"):
        recipe.moe = is_moe(model)
    if args.format == "hf" and getattr(recipe, "grid", None) is not None:
        raise PeakError("quantized weights need --format peakllm or compressed-tensors")
    check_run(model, args, recipe, disk=False)  # before the partial folder exists; disk is checked below
    check_writable(model, tokenizer, out, args.format)
    hessian = "hessian" in recipe.stats
    needs_data = bool(set(recipe.stats) - {"tokens"})
    calib_tokens = args.calib_samples * args.calib_seqlen if needs_data else 0
    budget = memory.parse_size(args.max_memory) if args.max_memory else memory.available_bytes()
    offload = 2 << 30
    kw = dict(calib_tokens=calib_tokens, calib_seqlen=args.calib_seqlen, batch_size=args.batch_size,
              hessian=hessian, eval_tokens=args.eval_tokens)
    pred = memory.predict(sm, offload_bytes=offload, **kw)
    if budget is not None and pred["predicted_peak_bytes"] > budget:
        spill = memory.predict(sm, offload_bytes=0, **kw)
        room = budget - spill["predicted_peak_bytes"]
        if room < 0:
            raise PeakError(
                f"this run needs about {memory.gb(spill['predicted_peak_bytes'])} at its peak "
                f"({spill['peak_phase']}), more than the {memory.gb(budget)} budget even with every calibration "
                f"activation spilled to disk:\n{memory.describe(spill)}\nfewer tokens per forward (--batch-size), "
                "a shorter --calib-seqlen, --eval-tokens 0, or a larger --max-memory would help")
        offload = room // 2
        pred = memory.predict(sm, offload_bytes=offload, **kw)
    need = _output_estimate(sm, recipe, args.format)
    where = out.parent if out.parent.exists() else Path(".")
    free = shutil.disk_usage(where).free
    if free < need:
        raise PeakError(f"not enough free disk in {where.resolve()} for the output: about {memory.gb(need)} needed, "
                        f"{memory.gb(free)} free")
    run_state = {"version": STATE_VERSION, "args": run_args(args, extra_result), "input": sm.source.fingerprint()}
    ckpt = Checkpoint(partial)
    state = ckpt.load_for(run_state, args.model) if resume else None
    if workers().world > 1:
        import torch.distributed as dist

        dist.barrier()  # every worker has checked the output folder before worker 0 creates anything
    if fresh and workers().is_writer:
        partial.mkdir(parents=True)
    try:
        segments = calibration_segments(tokenizer, args.calib_samples, args.calib_seqlen, source=args.calib_dataset,
                                        seed=args.seed, bos=not args.no_bos)
        total = len(sm.layers) + 1
        writer = (ShardWriter.from_state(partial, state["writer"], sm.source_dtype) if state
                  else ShardWriter(partial, args.format, total, sm.source_dtype))
        if before_calibrate is not None:
            before_calibrate(sm, segments, offload)
        sm.load_outer("input")
        embed = getattr(args, "embed_grid", None)
        windows, eval_kwargs, eval_dense, eval_comp = None, None, [], []
        if args.eval_tokens:
            windows = eval_windows(tokenize_source(tokenizer, args.eval_dataset), 512, args.eval_tokens,
                                   bos_id=protocol_bos(tokenizer, not args.no_bos))
            eacts, eval_kwargs = capture_inputs(model, windows, 1, None)
            eval_dense = [eacts[w] for w in range(len(eacts))]
        # calibration, and the compressed model's evaluation windows, start from the quantized embedding
        quantize_outer(model, embed, loaded_only=True)
        if args.eval_tokens:
            eval_comp = list(eval_dense)
            if embed is not None:
                eacts, _ = capture_inputs(model, windows, 1, None)
                eval_comp = [eacts[w] for w in range(len(eacts))]
            if state:
                eval_dense, eval_comp = ckpt.tensors(state, "evald"), ckpt.tensors(state, "evalc")
        io = StreamIO(sm, writer, ckpt, args.format, state, run_state, eval_kwargs, eval_dense, eval_comp, offload)
        report = calibrate(model, segments, recipe, batch_size=args.batch_size, sequential=not args.no_sequential,
                           offload_bytes=offload, progress=progress, io=io)
        if state:
            restore_report(report, state["report"])
        # the rest: embeddings, final norm, lm_head (tied: stored once, as the embedding); the dense model's
        # perplexity needs them as they were, the compressed model's as --embed-bits makes them
        sm.load_outer("all")
        result = {**extra_result, "bos": protocol_bos(tokenizer, not args.no_bos) is not None}
        if args.eval_tokens:
            t0 = time.perf_counter()
            result["dense_ppl"] = ppl_of(head_nll(model, io.eval_dense, windows), windows)
            io.seconds["evaluation"] += time.perf_counter() - t0
        from peakllm.save import packed_module

        outer_packed = {name: packed_module(r) for name, r in quantize_outer(model, embed).items()}
        if args.eval_tokens:
            t0 = time.perf_counter()
            result["ppl"] = ppl_of(head_nll(model, io.eval_comp, windows), windows)
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
        if args.format == "sub1" and io.ternary_counts[0] and workers().is_writer:
            from peakllm.formats.shards import ternary_to_sub1
            from peakllm.formats.sub1_code import Sub1Dictionary
            from peakllm.save import SUB1_SYM_BITS

            writer = ternary_to_sub1(writer, Sub1Dictionary.from_counts(*io.ternary_counts, SUB1_SYM_BITS))
        sm.release_outer()
        run_info = {"command": args.command, "model": args.model, **extra_result, "calib_samples": args.calib_samples,
                    "calib_seqlen": args.calib_seqlen, "calib_dataset": args.calib_dataset, "seed": args.seed,
                    "streamed": True, "bos": result["bos"]}
        config = model.config.to_dict()
        if args.format in ("hf", "compressed-tensors"):
            config["dtype"] = sm.stored_dtype_name()
        if workers().is_writer:
            writer.finish(config, {"method": run_info.get("method"), "run": run_info}, ct_actorder(run_info))
            tokenizer.save_pretrained(partial)
            (partial / RUN_FILE).write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
            ckpt.remove()
            if out.exists():
                _replace_dir(partial, out)
            else:
                os.replace(partial, out)
        if workers().world > 1:
            import torch.distributed as dist

            dist.barrier()  # the folder is in place before any worker reports
    except BaseException:
        if workers().is_writer and fresh and not (partial / ".resume" / "state.json").is_file():
            shutil.rmtree(partial, ignore_errors=True)  # nothing worth resuming yet
        raise
    seconds = time.perf_counter() - start
    result.update({"seconds": seconds, "calib_tokens": report.calib_tokens, "streamed": True,
                   "resumed_at_layer": state["layers_done"] if state else None,
                   "time_breakdown": {**{k: round(v, 2) for k, v in report.seconds.items()},
                                      **{k: round(v, 2) for k, v in io.seconds.items()}},
                   "seconds_per_layer": round(seconds / len(sm.layers), 2),
                   "damping_escalations": report.damping_escalations, "solver_fallbacks": report.fallbacks,
                   "params": sm.num_params(), "input_bytes": sm.bytes_on_disk(),
                   "random_weights": (sm.folder / "PEAKLLM_SYNTH.json").is_file(),
                   "max_memory_bytes": budget, "predicted_peak_rss_bytes": pred["predicted_peak_bytes"],
                   "predicted_peak_phase": pred["peak_phase"], "peak_rss_bytes": memory.peak_rss_bytes(),
                   "rss_after_layer_bytes": [io.rss_after_layer[0], io.rss_after_layer[-1]] if io.rss_after_layer else None,
                   "size_bytes": folder_bytes(out), "bits_per_param": writer.bits_per_param(),
                   "output": str(out), "format": args.format, "model": args.model})
    from peakllm.save import weight_file_bytes

    if workers().is_writer:  # other torchrun workers wrote nothing to count
        result["bits_per_param_total"] = 8 * weight_file_bytes(out) / (writer.dense_params + writer.all_packed_params)
    if writer.expert_params:  # as save_compressed reports them for MoE models
        result["bits_per_param_experts"] = writer.expert_bits / writer.expert_params
    if io.mask_total:
        result["sparsity"] = io.mask_zeros / io.mask_total
    if report.expert_tokens:
        tokens = sorted(report.expert_tokens)
        result.update(experts_fallback=report.experts_fallback, expert_tokens_min=tokens[0],
                      expert_tokens_median=tokens[len(tokens) // 2])
    return result
