"""peakllm bench: prefill and decode speed, and how close decoding gets to the memory-bandwidth roofline."""

from __future__ import annotations

from peakllm.cli.common import (add_act_option, add_adapter_option, add_max_memory_run_option, add_model_option,
                                add_output_options, add_threads_option, apply_act, emit, read_adapter_arg, set_threads)
from peakllm.errors import PeakError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def register(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode tokens per second and the bandwidth roofline",
                       description="Time prefill and decode of the lean runtime (or of transformers' generate with "
                       "--hf) on random prompt tokens, measure the machine's read bandwidth in the same run, and "
                       "report roofline_fraction = decode steps/s x weight bytes per step / bandwidth.")
    add_model_option(p)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up; medians (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weights and activations of dense layers (default: %(default)s)")
    p.add_argument("--hf", action="store_true", help="benchmark transformers' model.generate instead (a baseline)")
    add_adapter_option(p)
    add_max_memory_run_option(p)  # reports bytes read from disk per token and the expert cache's hit rate
    add_act_option(p)
    add_threads_option(p)
    add_output_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    import torch

    from peakllm.models import load_model
    from peakllm.runtime.bench import bench

    set_threads(args.threads)
    apply_act(args.act)
    if args.repeats < 1 or args.batch < 1 or args.prompt_tokens < 1 or args.new_tokens < 2:
        raise PeakError("need --prompt-tokens >= 1, --new-tokens >= 2, --batch >= 1 and --repeats >= 1")
    from peakllm import memory

    budget = memory.parse_size(args.max_memory) if args.max_memory else None
    if budget is not None and args.hf:
        raise PeakError("--max-memory runs the lean runtime only (not --hf)")
    adapter = read_adapter_arg(args)
    started = time.perf_counter()
    import transformers  # noqa: F401 - the libraries every load needs, timed apart from the model's own load

    import peakllm.models.moe  # noqa: F401 (imports transformers' Llama modelling)
    import_s = time.perf_counter() - started
    base_rss = memory.rss_bytes()  # Python, torch and transformers before the model
    started = time.perf_counter()
    model, _tokenizer = load_model(args.model)
    load_s = time.perf_counter() - started  # config, tokenizer, checksums, weights (packed folders: memory-mapped)
    adapted = {}
    if adapter is not None:
        from peakllm.runtime.adapter import attach_adapter

        adapted = {"adapter": args.adapter, "adapter_layers": attach_adapter(model, adapter), "adapter_rank": adapter.rank,
                   "adapter_dtype": args.adapter_dtype}
    result = bench(model, dtype=getattr(torch, DTYPES[args.dtype]), prompt_tokens=args.prompt_tokens,
                   new_tokens=args.new_tokens, batch=args.batch, repeats=args.repeats,
                   engine="transformers" if args.hf else "peakllm", max_memory=budget)
    from peakllm.runtime.linear import int8_act_default

    emit({"model": args.model, **adapted, "import_s": import_s, "load_s": load_s, "base_rss_bytes": base_rss, **result, "intk_act": "int8" if int8_act_default() else "f32"}, args,
         "bench")
    return 0
