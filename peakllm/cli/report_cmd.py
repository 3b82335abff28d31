"""peakllm report: Markdown tables and plots from accumulated --log results, or the docs' generated tables."""

from __future__ import annotations

from peakllm.cli.common import emit
from peakllm.errors import PeakError


def register(sub) -> None:
    p = sub.add_parser("report", help="Markdown table and plots from results logged with --log",
                       description="Read a JSONL file of results (written by any command with --log FILE) and "
                       "write DIR/report.md with one table per command plus PNG plots (perplexity vs sparsity, "
                       "perplexity vs bits/param, evaluations, streamed compression at scale, decode under --max-memory). "
                       "DIR is replaced atomically. With --docs, rewrite the generated tables of Markdown pages "
                       "(<!-- table: NAME --> blocks) from the results files in --data instead.")
    p.add_argument("results", nargs="?", metavar="RESULTS.jsonl", help="file of one JSON result per line")
    p.add_argument("--output", metavar="DIR", help="folder to write report.md and plots into (with --docs: write "
                   "the pages there instead of in place)")
    p.add_argument("--docs", nargs="+", metavar="PAGE", help="Markdown pages or folders of them whose generated "
                   "tables to rewrite (make results: docs/results README.md)")
    p.add_argument("--data", default="docs/results", metavar="DIR",
                   help="folder of the results files the --docs tables read (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=run, log=None)


def run(args) -> int:
    if args.docs:
        if args.results:
            raise PeakError("give either RESULTS.jsonl (a report) or --docs (the docs' tables), not both")
        from peakllm.eval.results import regenerate  # lazy, as below: the CLI starts every command, this one rarely
        from peakllm.eval.tables import TABLES

        emit(regenerate(args.docs, args.data, TABLES, args.output), args, "report")
        return 0
    if not args.results or not args.output:
        raise PeakError("peakllm report needs RESULTS.jsonl and --output DIR (or --docs PAGE...)")
    from peakllm.eval.report import write_report

    emit(write_report(args.results, args.output), args, "report")
    return 0
