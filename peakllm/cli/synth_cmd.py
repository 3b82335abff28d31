"""peakllm synth: write a randomly initialised model of a real architecture's shape (bf16 shards)."""

from __future__ import annotations

from peakllm.cli.common import add_output_options, emit, show_progress


def register(sub) -> None:
    from peakllm.models.synth import SHAPES

    p = sub.add_parser(
        "synth", help="write a random model of a real shape (e.g. llama-2-7b) to measure memory and time",
        description="Write a randomly initialised model with the shapes of a real architecture as safetensors "
        "shards (one per decoder layer), so that compression and decoding of big models can be measured on "
        "this machine. RANDOM WEIGHTS: the numbers they give are about memory and time, never quality. "
        "The tokenizer is the default model's; a smaller vocabulary is widened to its 49152 tokens. "
        "Free disk space is checked first; the folder is written to a temporary name and renamed.")
    p.add_argument("--shape", required=True, choices=sorted(SHAPES), help="architecture shape")
    p.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="stored dtype (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    add_output_options(p, progress=True)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from peakllm.models import load_tokenizer
    from peakllm.models.synth import synthesize
    from peakllm.formats.writer import check_output

    check_output(args.output, args.overwrite)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    result = synthesize(args.shape, args.output, tokenizer=load_tokenizer("default"), dtype=dtype, seed=args.seed,
                        overwrite=args.overwrite, progress=show_progress(args))
    emit(result, args, f"wrote a random {args.shape} (random weights: memory and time only)")
    return 0
