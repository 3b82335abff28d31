"""peakllm report: Markdown tables and plots from accumulated --log results."""

from __future__ import annotations

from peakllm.cli.common import emit


def register(sub) -> None:
    p = sub.add_parser("report", help="Markdown table and plots from results logged with --log",
                       description="Read a JSONL file of results (written by any command with --log FILE) and "
                       "write DIR/report.md with one table per command plus PNG plots (perplexity vs sparsity, "
                       "perplexity vs bits/param, evaluations, streamed compression at scale, decode under --max-memory). "
                       "DIR is replaced atomically.")
    p.add_argument("results", metavar="RESULTS.jsonl", help="file of one JSON result per line")
    p.add_argument("--output", required=True, metavar="DIR", help="folder to write report.md and plots into")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=run, log=None)


def run(args) -> int:
    from peakllm.eval.report import write_report

    emit(write_report(args.results, args.output), args, "report")
    return 0
