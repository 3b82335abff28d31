"""peakllm recover: fine-tune a compressed model against its original (LoRA through PEFT, or LOMO)."""

from __future__ import annotations

from pathlib import Path

from peakllm.cli.common import (
    add_bos_option,
    add_output_options,
    add_threads_option,
    emit,
    show_progress,
)


def register(sub) -> None:
    p = sub.add_parser(
        "recover", help="win back what compression lost: LoRA or LOMO fine-tuning distilled from the original",
        description="Fine-tune a compressed model (a sparse HF folder from `peakllm prune`, a peakllm int-k / "
        "sparse-packed folder, a .gguf file) on calibration text with next-token loss plus KL distillation from "
        "the teacher's logits. --method lora trains PEFT adapters on the frozen base (packed linears stay packed, "
        "dequantized on the fly; saved in PEFT's layout); lomo updates every weight inside its gradient hook "
        "(lomo-optim: no stored gradients, no optimizer state); adamw is full fine-tuning, LOMO's memory "
        "baseline. Pruned weights stay exactly zero. Prints perplexity before and after on wiki, shakespeare "
        "and bible.")
    p.add_argument("--model", required=True, help="the compressed model: HF folder, peakllm folder or .gguf file")
    p.add_argument("--teacher", default=None,
                   help="the original model (default: the model the compressed folder records as its source)")
    p.add_argument("--method", choices=("lora", "lomo", "adamw"), default="lora", help="(default: %(default)s)")
    p.add_argument("--output", required=True, type=Path,
                   help="folder: the adapter (lora), or the whole model (lomo, adamw, lora --merge)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--steps", type=int, default=None, help="training steps (with --minutes: whichever ends first)")
    p.add_argument("--minutes", type=float, default=None, help="training time budget in minutes")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 5e-4 lora, 1e-2 lomo, 2e-5 adamw), after --warmup-steps")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="segments per step (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per training segment (default: %(default)s)")
    p.add_argument("--train-samples", type=int, default=256,
                   help="calibration segments drawn once; steps cycle through them (default: %(default)s)")
    p.add_argument("--train-dataset", default="calib",
                   help="text to train on: a source name of `peakllm eval --dataset` or a text file (default: calib)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term in [0, 1] (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default: %(default)s)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default: %(default)s)")
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated leaf names of the linears that get adapters (default: %(default)s)")
    p.add_argument("--merge", action="store_true",
                   help="lora: fold the adapter into the model and write the model (sparse: re-masked); refused "
                   "for packed int-k / sparse-packed folders (their grids would need a re-solve)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from <output>.recover-ckpt after a kill")
    p.add_argument("--seed", type=int, default=0, help="training segments, their order, adapter init (default: 0)")
    p.add_argument("--eval-tokens", type=int, default=4096,
                   help="perplexity budget per text before and after; 0 skips it (default: %(default)s)")
    p.add_argument("--eval-sets", default="wiki,shakespeare,bible",
                   help="comma-separated texts for the before/after perplexity: source names or text files "
                   "(default: %(default)s)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="window of the perplexity (default: %(default)s)")
    add_bos_option(p)
    add_threads_option(p)
    add_output_options(p, progress=True)
    p.set_defaults(func=run)


def spec_from_args(args):
    """The typed run description; argparse's namespace goes no further."""
    from peakllm.recover import RecoverSpec

    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    return RecoverSpec(model=args.model, output=args.output, method=args.method, teacher=args.teacher,
                       overwrite=args.overwrite, steps=args.steps, minutes=args.minutes,
                       train_dataset=args.train_dataset, train_samples=args.train_samples, seqlen=args.seqlen,
                       batch_size=args.batch_size, seed=args.seed, alpha=args.alpha, temperature=args.temperature,
                       lr=args.lr, warmup_steps=args.warmup_steps, bos=not args.no_bos, rank=args.rank,
                       lora_alpha=args.lora_alpha, target_modules=targets, merge=args.merge,
                       checkpoint_every=args.checkpoint_every, resume=args.resume, eval_tokens=args.eval_tokens,
                       eval_sets=tuple(d.strip() for d in args.eval_sets.split(",") if d.strip()),
                       eval_seqlen=args.eval_seqlen,
                       progress=show_progress(args), threads=args.threads)


def run(args) -> int:
    spec = spec_from_args(args)  # every argument error before torch is imported
    from peakllm.cli.common import set_threads
    from peakllm.recover import recover

    if args.threads is not None:
        set_threads(args.threads)
    result = recover(spec)
    emit(result, args, f"recover {args.model} ({args.method})")
    return 0
