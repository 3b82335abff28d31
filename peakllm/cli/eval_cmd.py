"""peakllm eval: perplexity of a model on a text source, with a token budget."""

from __future__ import annotations

from peakllm.cli.common import (add_bos_option, add_model_option, add_output_options, add_threads_option, emit,
                                set_threads, show_progress)
from peakllm.errors import PeakError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of a model on a dataset",
        description="Perplexity with the GPTQ/SparseGPT protocol: the dataset's text is concatenated, cut into "
        "non-overlapping windows of --seqlen tokens (remainder dropped), ppl = exp(mean NLL) over all predicted "
        "tokens. --max-tokens keeps only the first windows so a CPU run stays short.",
    )
    add_model_option(p)
    add_dataset_option(p)
    p.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=16384,
                   help="evaluate only the first windows within this many tokens; 0 = the whole text (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of dense weights and compute (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--stream", choices=("auto", "on", "off"), default="auto",
                   help="run one decoder layer at a time, read from the safetensors shards, so a model bigger than "
                   "memory can be evaluated (same perplexity; fp32, batch 1); auto: when the model in fp32 would "
                   "take more than half of the available memory (default: %(default)s)")
    add_bos_option(p)
    add_threads_option(p)
    add_output_options(p, progress=True)
    p.set_defaults(func=run)


def add_dataset_option(p) -> None:
    p.add_argument("--dataset", default="wiki",
                   help="wiki (held-out Wikipedia split), wiki-calib, news, calib, shakespeare, bible, or a UTF-8 text file "
                   "(default: %(default)s)")


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def run(args) -> int:
    from peakllm.eval import evaluate
    from peakllm.models import load_model
    from peakllm.models.stream import should_stream

    set_threads(args.threads)
    if args.max_tokens < 0:
        raise PeakError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.seqlen < 2:  # checked here, before the model is loaded, not when the windows are cut
        raise PeakError(f"--seqlen must be >= 2, got {args.seqlen}")
    if 0 < args.max_tokens < args.seqlen:
        raise PeakError(f"--max-tokens ({args.max_tokens}) is smaller than one window of --seqlen {args.seqlen}")
    if should_stream(args.model, args.stream, None):
        from peakllm.eval.stream import stream_evaluate

        if args.dtype != "fp32" or args.batch_size != 1:
            raise PeakError("a streamed evaluation runs in fp32 with one window per forward (--dtype fp32 --batch-size 1)")
        result = stream_evaluate(args.model, args.dataset, seqlen=args.seqlen, max_tokens=args.max_tokens or None,
                                 progress=show_progress(args), bos=not args.no_bos)
    else:
        model, tokenizer = load_model(args.model, dtype=torch_dtype(args.dtype))
        result = evaluate(model, tokenizer, args.dataset, seqlen=args.seqlen, max_tokens=args.max_tokens or None,
                          batch_size=args.batch_size, progress=show_progress(args), bos=not args.no_bos)
    out = {
        "ppl": result["ppl"], "tokens": result["tokens"], "seqlen": result["seqlen"], "seconds": result["seconds"],
        "tokens_per_second": result["tokens_per_second"], "model": args.model, "dataset": args.dataset,
        "dtype": args.dtype, "streamed": bool(result.get("streamed")), "bos": result["bos"],
    }
    emit(out, args, f"perplexity of {args.model} on {args.dataset}")
    return 0
