"""peakllm moefy: turn a dense Llama into a top-k mixture of experts (MoEfication), without training."""

from __future__ import annotations

import time
from pathlib import Path

from peakllm.cli.common import (add_model_option, add_output_options, add_threads_option, emit, set_threads,
                                show_progress, stderr)
from peakllm.errors import PeakError


def register(sub) -> None:
    p = sub.add_parser(
        "moefy",
        help="split a dense model's MLPs into experts with a router (MoEfication)",
        description="Split every MLP's intermediate neurons into --experts equal groups by clustering their "
        "activation patterns on calibration text, and fit a router that picks --top-k experts per token; the "
        "layer output is the sum of the chosen experts (with --top-k equal to --experts it is the dense MLP). "
        "Writes a Hugging Face folder (model_type peakllm_moe) that `peakllm eval --model DIR` loads.",
    )
    add_model_option(p)
    p.add_argument("--experts", type=int, required=True, help="experts per MLP; must divide the MLP width")
    p.add_argument("--top-k", type=int, required=True, help="experts active per token (1..--experts)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration segments (default: %(default)s)")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration segment (default: %(default)s)")
    p.add_argument("--calib-dataset", default="calib", help="calibration text source (default: %(default)s)")
    p.add_argument("--router-hidden", type=int, default=0,
                   help="router hidden width; 0 = linear router fitted by least squares (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and clustering (default: %(default)s)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--eval-tokens", type=int, default=0,
                   help="also measure wiki perplexity (seqlen 512) of the dense and the MoE model on this many tokens; "
                   "0 = skip (default: %(default)s)")
    add_threads_option(p)
    add_output_options(p, progress=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from peakllm.formats.folder import check_output
    from peakllm.models import load_model
    from peakllm.models.moe import active_params_fraction
    from peakllm.models.moefy import moefy

    set_threads(args.threads)
    output = check_output(Path(args.output).expanduser(), args.overwrite)
    if args.eval_tokens < 0:
        raise PeakError(f"--eval-tokens must be >= 0, got {args.eval_tokens}")
    if args.calib_samples < 1 or args.calib_seqlen < 2:
        raise PeakError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
    model, tokenizer = load_model(args.model)
    progress = show_progress(args)
    start = time.perf_counter()
    moe = moefy(model, tokenizer, experts=args.experts, top_k=args.top_k, calib_samples=args.calib_samples,
                calib_seqlen=args.calib_seqlen, calib_source=args.calib_dataset, seed=args.seed,
                router_hidden=args.router_hidden, progress=progress)
    seconds = time.perf_counter() - start
    ppl = dense_ppl = None
    if args.eval_tokens:
        from peakllm.eval import evaluate

        dense_ppl = evaluate(model, tokenizer, "wiki", seqlen=512, max_tokens=args.eval_tokens,
                             progress=progress)["ppl"]
        ppl = evaluate(moe, tokenizer, "wiki", seqlen=512, max_tokens=args.eval_tokens, progress=progress)["ppl"]
    save_folder(moe, tokenizer, output, args.overwrite)
    if not args.json:
        stderr(f"wrote {output}")
    out = {
        "experts": args.experts, "top_k": args.top_k, "ppl": ppl, "dense_ppl": dense_ppl, "seconds": seconds,
        "calib_tokens": args.calib_samples * args.calib_seqlen, "output": str(output),
        "active_params_fraction": active_params_fraction(moe), "model": args.model,
        "kept_share": sum(moe.moefy_stats["kept_share"]) / len(moe.moefy_stats["kept_share"]),
    }
    emit(out, args, f"moefy {args.model}: {args.experts} experts, top {args.top_k}")
    return 0


def save_folder(model, tokenizer, output: Path, overwrite: bool) -> None:
    """save_pretrained into a temp folder beside `output`, then rename; nothing is left behind on failure."""
    from peakllm.formats.folder import staged_dir
    from peakllm.formats.gguf.vocab import save_tokenizer

    try:
        with staged_dir(output, overwrite) as tmp:
            model.save_pretrained(tmp)
            save_tokenizer(tokenizer, tmp)
    except OSError as exc:
        raise PeakError(f"cannot write {output}: {exc.strerror or exc}") from None
