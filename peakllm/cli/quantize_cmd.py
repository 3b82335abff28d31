"""peakllm quantize: GPTQ or round-to-nearest weight quantization, stored packed."""

from __future__ import annotations

from peakllm.cli.common import emit
from peakllm.cli.compress_common import add_calibration_options, add_run_options, run_compression
from peakllm.errors import PeakError


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", help="weight quantization: GPTQ or RTN to 2/3/4/8 bits or ternary, stored packed",
        description="Quantize every linear layer of the decoder onto a k-bit grid with one scale (and zero point) "
        "per --group-size input columns. gptq minimises each layer's output error using the inputs' Hessian over "
        "calibration data (Frantar et al. 2023); rtn rounds each weight to its nearest grid point. The output "
        "is stored packed (codes + scales), not as fake-quantized floats.")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="(default: %(default)s)")
    p.add_argument("--bits", choices=("2", "3", "4", "8", "ternary"), default="4",
                   help="code width, or ternary {-a, 0, +b} (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=128,
                   help="input columns per scale; -1 = one scale per output row (default: %(default)s)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (zero point fixed at the middle)")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ: quantize columns in order of decreasing Hessian diagonal (helps at 2-3 bits)")
    p.add_argument("--mse", action="store_true",
                   help="affine grids: search the clipping range that minimises squared error; ternary: least-squares "
                   "levels instead of QMoE's min-max grid (lower error, far fewer zeros, so no sub-1-bit storage)")
    p.add_argument("--dense-bits", choices=("2", "3", "4", "8", "keep"), default=None,
                   help="MoE models: grid of the non-expert matrices (attention, shared experts); 'keep' leaves them "
                   "as they are (default: the same as --bits; routers and embeddings always stay dense)")
    add_calibration_options(p)
    add_run_options(p, ("peakllm", "sub1", "compressed-tensors"), "peakllm")
    p.set_defaults(func=run)


def run(args) -> int:
    from peakllm.recipes import QuantRecipe
    from peakllm.solvers import Grid

    ternary = args.bits == "ternary"
    grid = Grid(kind="ternary" if ternary else "affine", bits=2 if ternary else int(args.bits),
                group_size=args.group_size, sym=args.sym, mse=args.mse)
    if args.act_order and args.method != "gptq":
        raise PeakError("--act-order only applies to --method gptq")
    if args.format == "compressed-tensors" and ternary:  # its pack-quantized format holds 1..8-bit integers
        raise PeakError("compressed-tensors has no ternary format; use --format peakllm or sub1 for --bits ternary")
    if args.format == "sub1" and not ternary:
        raise PeakError("--format sub1 stores ternary codes: use --bits ternary")
    dense_grid = None
    if args.dense_bits not in (None, "keep"):
        dense_grid = Grid(bits=int(args.dense_bits), group_size=args.group_size if args.group_size > 0 else 128,
                          sym=args.sym, mse=args.mse)
    recipe = QuantRecipe(args.method, grid, act_order=args.act_order, blocksize=args.blocksize, damp=args.damp,
                         dense_grid=dense_grid, keep_dense=args.dense_bits == "keep")
    extra = {"method": args.method, "bits": args.bits if ternary else int(args.bits), "group_size": args.group_size,
             "sym": args.sym, "act_order": args.act_order, "dense_bits": args.dense_bits}
    result = run_compression(args, recipe, extra_result=extra)
    emit(result, args, f"quantized {args.model} with {args.method}")
    return 0
