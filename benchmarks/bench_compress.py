"""Perplexity / size / time table for pruning and quantization methods on one model, in one process.

  python benchmarks/bench_compress.py --suite prune    [--model default] [--calib-samples 32] [--eval-tokens 8192]
  python benchmarks/bench_compress.py --suite quantize [...]
  python benchmarks/bench_compress.py --suite scaling  (SparseGPT 50% wall time vs calibration tokens)

The model is loaded once and restored from a copy of its weights before each run, so every row starts
from the same dense model; the calibration segments and the evaluation windows are the same for every
row. Prints a Markdown table and appends one JSON line per row to --log (for `peakllm report`).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from peakllm.calibrate.loop import calibrate
from peakllm.data import calibration_segments, eval_windows, protocol_bos, tokenize_source
from peakllm.eval import perplexity
from peakllm.models import load_model
from peakllm.calibrate.recipes import PruneRecipe, QuantRecipe
from peakllm.formats.writer import packed_module
from peakllm.solvers import Grid

from results_line import append as append_result  # benchmarks/results_line.py: commit, machine, command

# the rows that decide the headline claims first (50% and 2:4), then the rest
PRUNE_ROWS = [(m, s, p) for s, p in ((0.5, None), (0.5, (2, 4)), (0.6, None), (0.5, (4, 8)), (0.7, None))
              for m in ("sparsegpt", "wanda", "magnitude")]
QUANT_ROWS = ([("rtn", b, g, "none") for b in (3, 2) for g in (-1, 128, 64, 32)]
              + [("gptq", b, g, ao) for b in (3, 2) for g in (-1, 128, 64, 32) for ao in ("none", "group", "static")]
              + [(m, b, g, "none" if m == "rtn" else "static") for m in ("rtn", "gptq") for b in (8, 4)
                 for g in (-1, 128, 32)])


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bits_per_param(modules) -> float | None:
    packed = [packed_module(r) for r in modules.values()]
    if not packed:
        return None
    return 8 * sum(p.nbytes for p in packed) / sum(p.num_params for p in packed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("prune", "quantize", "scaling"), required=True)
    ap.add_argument("--table-from", metavar="LOG", help="only print the table of the rows already in LOG")
    ap.add_argument("--model", default="default")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated row indices to run")
    ap.add_argument("--log", default=None, help="append JSON lines here")
    args = ap.parse_args()
    if args.table_from:
        rows = [json.loads(line) for line in open(args.table_from) if line.strip()]
        print(markdown([r for r in rows if r.get("command") == f"bench-{args.suite}"], args.suite))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    windows = eval_windows(tokenize_source(tokenizer, "wiki"), 512, args.eval_tokens, bos_id=protocol_bos(tokenizer))
    dense = perplexity(model, windows, progress=False)
    print(f"dense: ppl {dense['ppl']:.3f} over {dense['tokens']} wiki tokens, eval {dense['tokens_per_second']:.0f} tok/s",
          file=sys.stderr, flush=True)

    def record(row: dict) -> None:
        row.update(model=args.model, dense_ppl=dense["ppl"], eval_tokens=dense["tokens"])
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.log:
            append_result(args.log, {"command": f"bench-{args.suite}", **row}, threads=args.threads)
        rows.append(row)

    rows: list[dict] = []
    if args.suite == "scaling":
        plan = [("sparsegpt", 0.5, None, n) for n in (32, 64, 128)]
    elif args.suite == "prune":
        plan = PRUNE_ROWS
    else:
        plan = QUANT_ROWS
    if args.only:
        plan = [plan[int(i)] for i in args.only.split(",")]
    for entry in plan:
        model.load_state_dict(original)
        n_calib = args.calib_samples
        if args.suite == "quantize":
            method, bits, group, act_order = entry
            recipe = QuantRecipe(method, Grid(bits=bits, group_size=group), act_order=act_order)
        else:
            if args.suite == "scaling":
                method, sparsity, pattern, n_calib = entry
            else:
                method, sparsity, pattern = entry
            recipe = PruneRecipe(method, sparsity, pattern)
        segments = calibration_segments(tokenizer, n_calib, args.calib_seqlen, seed=0)
        start = time.perf_counter()
        report = calibrate(model, segments, recipe, progress=False)
        seconds = time.perf_counter() - start
        after = perplexity(model, windows, progress=False)
        row = {"method": method, "ppl": after["ppl"], "seconds": seconds, "calib_tokens": report.calib_tokens,
               "time_breakdown": {k: round(v, 1) for k, v in report.seconds.items()},
               "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads()}
        if args.suite == "quantize":
            row.update(bits=bits, group_size=group, act_order=act_order, bits_per_param=bits_per_param(report.modules),
                       fallbacks=report.fallbacks)
        else:
            masks = [r.mask for r in report.modules.values()]
            row.update(sparsity_target=sparsity, pattern=f"{pattern[0]}:{pattern[1]}" if pattern else None,
                       sparsity=float(sum((~m).sum().item() for m in masks) / sum(m.numel() for m in masks)))
        record(row)
    print(markdown(rows, args.suite))
    return 0


def _order(act_order) -> str:
    """Rows logged before static act-order existed stored a bool (True meant the g_idx kind)."""
    return {True: "group", False: "none"}.get(act_order, act_order)


def markdown(rows: list[dict], suite: str) -> str:
    if suite == "quantize":
        head = "| method | bits | group | act-order | bits/param | wiki ppl | dense ppl | seconds |\n|---|---|---|---|---|---|---|---|"
        body = [f"| {r['method']} | {r['bits']} | {'row' if r['group_size'] == -1 else r['group_size']} | "
                f"{_order(r['act_order'])} | {r['bits_per_param']:.3f} | {r['ppl']:.2f} | {r['dense_ppl']:.2f} | "
                f"{r['seconds']:.0f} |" for r in rows]
    else:
        head = ("| method | target | measured sparsity | wiki ppl | dense ppl | calib tokens | seconds | forward / stats / solver s "
                "| peak RSS GB |\n|---|---|---|---|---|---|---|---|---|")
        body = [f"| {r['method']} | {r['pattern'] or r['sparsity_target']} | {r['sparsity']:.3f} | {r['ppl']:.2f} | "
                f"{r['dense_ppl']:.2f} | {r['calib_tokens']} | {r['seconds']:.0f} | "
                f"{r['time_breakdown']['forward']:.0f} / {r['time_breakdown']['statistics']:.0f} / "
                f"{r['time_breakdown']['solver']:.0f} | {r['peak_rss_bytes'] / 1e9:.2f} |" for r in rows]
    return "\n".join([head, *body])


if __name__ == "__main__":
    sys.exit(main())
