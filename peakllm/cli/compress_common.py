"""What `peakllm prune` and `peakllm quantize` share: calibration, evaluation and big-model options, and the
typed run description (calibrate/spec.py) built from them; the run itself is calibrate/run.py."""

from __future__ import annotations

from pathlib import Path

from peakllm import memory
from peakllm.calibrate.spec import RunSpec
from peakllm.cli.common import (add_bos_option, add_model_option, add_output_options, add_threads_option, set_threads,
                                show_progress)
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
    g.add_argument("--sink-weight", type=float, default=None, metavar="W",
                   help="weight of each calibration segment's first position (the attention sink, whose activations "
                   "are tens of times the others') in the matrices' input statistics: the layer-wise objective "
                   "counts one token there, but the model's output depends on it far more; 1 = plain GPTQ "
                   "(default: 10 for --format gguf, where it was measured, 1 otherwise)")
    add_bos_option(g)


FORMAT_HELP = {
    "hf": "dense Hugging Face folder (zeros stored; loads anywhere)",
    "peakllm": "packed, run by peakllm's kernels",
    "sub1": "ternary codes (--bits ternary) under 1 bit per weight, run by peakllm's kernels",
    "compressed-tensors": "pack-quantized int 2/3/4/8 for transformers, which unpacks it to dense weights on load; "
                          "vLLM's kernels run only the 4- and 8-bit ones",
    "gguf": "one .gguf file in llama.cpp's block types (--type), for llama.cpp, ollama, LM Studio, llama-cpp-python "
            "and transformers; llama-family models, in memory",
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


def sink_weight(args) -> float:
    """--sink-weight, or its default for the format (benchmarks/bench_gguf_quality.py measured it on GGUF grids)."""
    w = args.sink_weight if args.sink_weight is not None else (10.0 if args.format == "gguf" else 1.0)
    if not 0 < w <= 1e4:
        raise PeakError(f"--sink-weight must be above 0 and at most 10000, got {w}")
    return w


def run_spec(args, *, embed_grid=None, target_bits: float | None = None) -> RunSpec:
    """The typed description of the run, built from the parsed arguments at the door: nothing past this point
    reads argparse's namespace. Malformed sizes fail here, before any work."""
    set_threads(args.threads)
    return RunSpec(
        command=args.command, model=args.model, output=Path(args.output), format=args.format,
        overwrite=args.overwrite, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
        calib_dataset=args.calib_dataset, seed=args.seed, batch_size=args.batch_size,
        sequential=not args.no_sequential, blocksize=args.blocksize, damp=args.damp, bos=not args.no_bos,
        sink_weight=sink_weight(args),
        eval_tokens=args.eval_tokens, eval_dataset=args.eval_dataset, embed_grid=embed_grid,
        target_bits=target_bits, stream=args.stream,
        max_memory_bytes=memory.parse_size(args.max_memory) if args.max_memory else None,
        resume=args.resume, progress=show_progress(args))
