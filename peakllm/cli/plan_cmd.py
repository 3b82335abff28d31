"""peakllm plan: the candidate ways to compress and run a model, with what each costs on this machine."""

from __future__ import annotations

import contextlib
import io
import json

from peakllm import memory
from peakllm.cli.common import add_model_option
from peakllm.errors import PeakError

GOALS = ("quality", "speed", "size")


def register(sub) -> None:
    p = sub.add_parser(
        "plan", help="what each way of compressing and running a model costs here, and the best one for your limits",
        description="Before any work: a table of candidate plans (GPTQ or RTN at 8, 4, 3 and 2 bits, groups of 128, "
        "the peakllm format, run in memory or with layers streamed under --memory), each with its output size "
        "(exact tensor bytes from the shapes), the compression's peak RSS (the planner `quantize --max-memory` "
        "keeps), its minutes and the decode tok/s on this machine (from a short probe of the int-k kernel's rate, "
        "the matmul rate and the disk, measured once and cached per CPU and thread count), and its predicted "
        "perplexity change: every plan's setting solved on a few layers' matrices with its own solver on half of a few "
        "calibration segments, each matrix's output error on the other half relative to its output, summed, and scaled to log "
        "perplexity by one measured anchor (RTN 4-bit on every matrix). The recommended plan comes first, with "
        "why; --run executes it and records the prediction beside the measured perplexity.")
    add_model_option(p)
    p.add_argument("--memory", metavar="SIZE", default=None,
                   help="memory the compression and the decoding may take, e.g. 8GB (default: no limit)")
    p.add_argument("--disk", metavar="SIZE", default=None, help="disk the output may take (default: no limit)")
    p.add_argument("--goal", choices=GOALS, default="quality", help="what to favour among plans that fit "
                   "(default: %(default)s)")
    p.add_argument("--max-bits", type=int, choices=(2, 3, 4, 8), default=None, help="no plan above this many bits")
    p.add_argument("--calib-samples", type=int, default=32, help="as quantize's (default: %(default)s)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="as quantize's (default: %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="as quantize's (default: %(default)s)")
    p.add_argument("--no-quality", action="store_true", help="skip the quality probe (it loads the weights); "
                   "--goal quality then ranks by bits")
    p.add_argument("--quality-samples", type=int, default=4, help="calibration segments the quality probe measures "
                   "on: each setting solved on the first half, scored on the other (default: %(default)s)")
    p.add_argument("--quality-seqlen", type=int, default=128, help="tokens per quality-probe segment "
                   "(default: %(default)s)")
    p.add_argument("--quality-layers", type=int, default=3, help="evenly spaced decoder layers the quality probe "
                   "scores, scaled to all; 0: every layer (default: %(default)s)")
    p.add_argument("--refresh-probe", action="store_true", help="measure this machine again")
    p.add_argument("--run", action="store_true", help="execute the recommended plan (needs --output)")
    p.add_argument("--output", metavar="DIR", default=None, help="with --run: where the compressed model goes")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.set_defaults(func=run)


def plan_spec(args):
    """The typed question, built at the door: malformed sizes and limits fail here, before the probe."""
    from peakllm.plan.plans import PlanSpec

    if args.run and not args.output:
        raise PeakError("--run writes the recommended plan's output: give --output DIR")
    for name in ("calib_samples", "calib_seqlen"):
        if getattr(args, name) < 1:
            raise PeakError(f"--{name.replace('_', '-')} must be at least 1")
    if args.eval_tokens < 0:
        raise PeakError("--eval-tokens must be >= 0")
    if args.quality_samples < 1 or args.quality_seqlen < 2 or args.quality_layers < 0:
        raise PeakError("--quality-samples must be at least 1, --quality-seqlen at least 2 and --quality-layers "
                        "at least 0")
    return PlanSpec(model=args.model, memory_bytes=memory.parse_size(args.memory) if args.memory else None,
                    disk_bytes=memory.parse_size(args.disk) if args.disk else None, goal=args.goal,
                    max_bits=args.max_bits, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                    eval_tokens=args.eval_tokens, quality=not args.no_quality,
                    quality_samples=args.quality_samples, quality_layers=args.quality_layers or None,
                    quality_seqlen=args.quality_seqlen)


def run(args) -> int:
    spec = plan_spec(args)
    from peakllm.plan.plans import candidate_plans, candidate_settings, why
    from peakllm.plan.probe import probe
    from peakllm.plan.quality import probe_quality

    machine = probe(refresh=args.refresh_probe)
    quality = None
    if spec.quality:
        quality = probe_quality(spec.model, candidate_settings(), samples=spec.quality_samples,
                                seqlen=spec.quality_seqlen, layers=spec.quality_layers)
    plans = candidate_plans(spec, machine, quality)
    best = plans[0]
    rows = [{**p.row(), "command_line": ["peakllm", *p.argv(spec, "OUT")]} for p in plans]
    result = {"model": spec.model, "goal": spec.goal, "recommended": rows[0], "why": why(spec, best),
              "command_line": ["peakllm", *best.argv(spec, args.output or "OUT")], "plans": rows,
              "probe": machine.__dict__, "quality_probe": quality.facts() if quality else None}
    if args.run:
        if not best.fits:
            raise PeakError(f"no plan fits: {why(spec, best)}")
        return run_best(spec, best, args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(table(plans))
    print(f"\nrecommended: {' '.join(result['command_line'])}\n  why: {result['why']}")
    return 0


def run_best(spec, best, args) -> int:
    """The recommended plan's quantize command, its result JSON holding the plan's predictions beside what
    it measured."""
    from peakllm.cli import main

    predicted = {k: getattr(best, k) for k in ("predicted_dlog_ppl", "predicted_ppl_ratio", "quality_score",
                                               "output_bytes", "compression_peak_bytes", "compression_minutes",
                                               "decode_tok_s")}
    if not args.json:
        code = main(best.argv(spec, args.output))
        print(f"plan predicted: {json.dumps(predicted)}")
        return code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(best.argv(spec, args.output) + ["--json"])
    lines = out.getvalue().strip().splitlines()
    if code != 0 or not lines:
        print(out.getvalue(), end="")
        return code
    result = json.loads(lines[-1])
    result["plan_predicted"] = predicted
    if predicted["predicted_ppl_ratio"] is not None and result.get("ppl") and result.get("dense_ppl"):
        result["plan_measured_ppl_ratio"] = result["ppl"] / result["dense_ppl"]
    for line in lines[:-1]:  # anything the command printed before its JSON
        print(line)
    print(json.dumps(result))
    return code


def table(plans) -> str:
    head = (f"{'plan':<16}{'output':>11}{'peak RSS':>11}{'path':>10}{'minutes':>9}{'tok/s':>8}{'ppl x':>8}"
            "  runtime / why not")
    lines = [head]
    for p in plans:
        peak = memory.gb(p.compression_peak_bytes) if p.compression_peak_bytes else "-"
        lines.append(f"{p.method + ' ' + str(p.bits) + '-bit g' + str(p.group_size):<16}"
                     f"{memory.gb(p.output_bytes):>11}{peak:>11}{'streamed' if p.compression_streamed else 'memory':>10}"
                     f"{p.compression_minutes:>9.1f}{p.decode_tok_s:>8.1f}"
                     f"{format(p.predicted_ppl_ratio, '.3f') if p.predicted_ppl_ratio is not None else '-':>8}  "
                     f"{p.runtime if p.fits else 'no: ' + '; '.join(p.why_not)}")
    return "\n".join(lines)
