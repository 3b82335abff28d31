"""What `peakllm prune` and `peakllm quantize` share: calibration and evaluation options, the run itself
(load → dense ppl → calibrate → save → ppl), and the JSON result."""

from __future__ import annotations

import time

from peakllm.cli.common import (add_bos_option, add_model_option, add_output_options, add_threads_option,
                                set_threads, show_progress)
from peakllm.errors import PeakError


def add_calibration_options(p) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-samples", type=int, default=32,
                   help="calibration segments (default: %(default)s; the papers use 128 x 2048 tokens on GPUs)")
    g.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration segment (default: %(default)s)")
    g.add_argument("--calib-dataset", default="calib",
                   help="calib (wiki-calib + news, never overlaps the wiki eval split), wiki-calib, news, "
                   "shakespeare, bible, or a text file (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=8, help="calibration segments per forward (default: %(default)s)")
    g.add_argument("--no-sequential", action="store_true",
                   help="collect all of a layer's statistics from its dense inputs in one pass (faster, less accurate) "
                   "instead of re-running the layer after each group of matrices is compressed")
    g.add_argument("--blocksize", type=int, default=128, help="solver column block size (default: %(default)s)")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian damping, fraction of mean diag(H) (default: %(default)s)")
    add_bos_option(g)


FORMAT_HELP = {
    "hf": "dense Hugging Face folder (zeros stored; loads anywhere)",
    "peakllm": "packed, run by peakllm's kernels",
    "sub1": "ternary codes (--bits ternary) under 1 bit per weight, run by peakllm's kernels",
    "compressed-tensors": "pack-quantized int 2/3/4/8 for transformers, which unpacks it to dense weights on load; "
                          "vLLM's kernels run only the 4- and 8-bit ones",
}


def add_run_options(p, formats: tuple[str, ...], default_format: str) -> None:
    add_model_option(p)
    p.add_argument("--output", required=True, metavar="DIR", help="folder to write the compressed model to")
    p.add_argument("--format", choices=formats, default=default_format,  # help: exactly the formats offered
                   help="; ".join(f"{f}: {FORMAT_HELP[f]}" for f in formats) + " (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--eval-tokens", type=int, default=4096,
                   help="wiki perplexity budget before and after (tokens, seqlen 512); 0 skips evaluation (default: %(default)s)")
    p.add_argument("--eval-dataset", default="wiki", help="dataset for the before/after perplexity (default: %(default)s)")
    g = p.add_argument_group("big models (streaming)")
    g.add_argument("--stream", choices=("auto", "on", "off"), default="auto",
                   help="read the model one decoder layer at a time from its safetensors shards and write the output "
                   "shard by shard, so peak memory is one layer plus activations whatever the model's size; auto: "
                   "when the model in fp32 would take more than half of --max-memory (default: %(default)s)")
    g.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="memory budget, e.g. 4GB (binary units: 4GB = 4 GiB); a streamed run predicts its peak from the "
                   "shapes first, spills calibration activations to disk if that makes it fit, and refuses to start "
                   "if nothing does; with a budget it also fixes malloc's mmap threshold at 1 MiB (less heap fragmentation, "
                   "~17%% more wall time; PEAKLLM_MMAP_THRESHOLD=0 keeps glibc's) (default: what the machine has "
                   "available)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted streamed run of the same --output from its last finished layer "
                   "(same input and arguments required; the result is identical to an uninterrupted run)")
    add_threads_option(p)
    add_output_options(p, progress=True)


def wants_stream(args) -> bool:
    """--stream on/off, or auto: stream when the input is a safetensors folder too big to hold in fp32."""
    from peakllm import memory
    from peakllm.models import resolve

    mode = getattr(args, "stream", "off")
    if getattr(args, "resume", False):
        if mode == "off":
            raise PeakError("--resume continues a streamed run: it cannot be combined with --stream off")
        return True
    if mode != "auto":
        return mode == "on"
    kind, path = resolve(args.model)
    if kind != "hf":
        return False
    from peakllm.models.stream import SOURCE_DTYPES, SourceFiles

    src = SourceFiles.scan(path)
    fp32 = sum(4 * _numel(shape) for _, dtype, shape in src.tensors.values() if dtype in SOURCE_DTYPES)
    budget = memory.parse_size(args.max_memory) if args.max_memory else memory.available_bytes()
    return budget is not None and fp32 > budget // 2


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def run_compression(args, recipe, *, extra_result: dict, before_calibrate=None, before_stream=None) -> dict:
    """Everything after argument parsing; returns the JSON result. `before_calibrate(model, segments)`,
    when given, runs on the loaded dense model and its calibration segments just before calibration
    (e.g. OWL's per-layer sparsity allocation), inside the timed part; `before_stream(streamed_model,
    segments, offload_bytes)` is its counterpart for a streamed run."""
    from peakllm.calibrate import calibrate
    from peakllm.data import calibration_segments, protocol_bos
    from peakllm.eval import cached_evaluate, evaluate
    from peakllm.models import load_model, model_bytes
    from peakllm.preflight import check_run
    from peakllm.save import check_output, check_writable, save_compressed

    set_threads(args.threads)
    if args.eval_tokens < 0:
        raise PeakError(f"--eval-tokens must be >= 0, got {args.eval_tokens}")
    if wants_stream(args):
        from peakllm.calibrate_stream import run_streamed

        if before_calibrate is not None and before_stream is None:
            raise PeakError("this option needs the whole model in memory; use --stream off")
        return run_streamed(args, recipe, extra_result=extra_result, progress=show_progress(args),
                            before_calibrate=before_stream)
    if getattr(args, "max_memory", None):
        from peakllm import memory

        memory.parse_size(args.max_memory)  # a malformed size fails before the work
    check_output(args.output, args.overwrite)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    check_writable(model, tokenizer, args.output, args.format)  # fail now, not after the compression
    if hasattr(recipe, "moe"):
        from peakllm.calibrate import is_moe

        recipe.moe = is_moe(model)
    check_run(model, args, recipe)  # every check the shapes allow, before evaluation and calibration
    dense_size_bytes = model_bytes(model)
    progress = show_progress(args)
    dense_ppl = None
    if args.eval_tokens:
        dense_ppl = cached_evaluate(model, tokenizer, args.model, args.eval_dataset, seqlen=512,
                                    max_tokens=args.eval_tokens, progress=progress, bos=not args.no_bos)["ppl"]
    from peakllm.embeddings import quantize_outer

    outer = quantize_outer(model, getattr(args, "embed_grid", None))  # before calibration: layers see them
    segments = calibration_segments(tokenizer, args.calib_samples, args.calib_seqlen, source=args.calib_dataset,
                                    seed=args.seed, bos=not args.no_bos)
    if before_calibrate is not None:
        before_calibrate(model, segments)
    report = calibrate(model, segments, recipe, batch_size=args.batch_size, sequential=not args.no_sequential,
                       progress=progress)
    report.modules.update(outer)
    held = {}
    if getattr(args, "target_bits", None) is not None and args.format == "sub1":
        from peakllm.calibrate_target import hold_sub1_target

        held = hold_sub1_target(model, report.modules, args.target_bits)  # before it is written or evaluated
    compress_seconds = time.perf_counter() - start
    result = {**extra_result, **held, "seconds": compress_seconds, "dense_size_bytes": dense_size_bytes, "calib_tokens": report.calib_tokens,
              "time_breakdown": {k: round(v, 2) for k, v in report.seconds.items()},
              "damping_escalations": report.damping_escalations, "solver_fallbacks": report.fallbacks,
              "bos": protocol_bos(tokenizer, not args.no_bos) is not None}
    if report.expert_tokens:
        tokens = sorted(report.expert_tokens)
        result.update(experts_fallback=report.experts_fallback, expert_tokens_min=tokens[0],
                      expert_tokens_median=tokens[len(tokens) // 2])
    sparsity = measured_sparsity(report.modules)
    if sparsity is not None:
        result["sparsity"] = sparsity
    run_info = {"command": args.command, "model": args.model, **extra_result,
                "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen,
                "calib_dataset": args.calib_dataset, "seed": args.seed, "bos": result["bos"]}
    from peakllm.distributed import workers

    if workers().is_writer:  # with torchrun, worker 0 alone writes
        sizes = save_compressed(model, tokenizer, report.modules, args.output, fmt=args.format, run_info=run_info,
                                overwrite=args.overwrite)
        result.update(sizes)
    if args.eval_tokens:
        after = evaluate(model, tokenizer, args.eval_dataset, seqlen=512, max_tokens=args.eval_tokens, progress=progress,
                         bos=not args.no_bos)
        result["ppl"], result["dense_ppl"] = after["ppl"], dense_ppl
    result.update({"output": str(args.output), "format": args.format, "model": args.model})
    return result


def measured_sparsity(modules: dict) -> float | None:
    """Fraction of zeros over all pruned matrices."""
    masks = [r.mask for r in modules.values() if getattr(r, "mask", None) is not None]
    if not masks:
        return None
    total = sum(m.numel() for m in masks)
    return float(sum((~m).sum().item() for m in masks) / total)
