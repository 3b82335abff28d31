"""peakllm quantize: GPTQ or round-to-nearest weight quantization, stored packed."""

from __future__ import annotations

from peakllm.cli.common import emit
from peakllm.cli.compress_common import add_calibration_options, add_run_options, run_spec
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
    p.add_argument("--act-order", choices=("static", "group", "none"), nargs="?", const="group", default=None,
                   help="GPTQ column order. static: columns solved in order of decreasing Hessian diagonal, groups "
                   "kept contiguous with their parameters fitted before the sweep (no g_idx, no run-time cost; "
                   "llm-compressor's default); group: groups formed in that order (g_idx stored; the GPTQ paper's "
                   "act-order; peakllm format only); none: original column order "
                   "(default: static for gptq; a bare --act-order means group)")
    p.add_argument("--mse", action="store_true",
                   help="affine grids: search the clipping range that minimises squared error (GPTQ weighs each input "
                   "column's error by its activations, diag H, as llama.cpp's importance matrix does); ternary: least-squares "
                   "levels instead of QMoE's min-max grid (lower error, far fewer zeros, so no sub-1-bit storage)")
    p.add_argument("--target-bits", type=float, default=None, metavar="B",
                   help="ternary GPTQ into the sub1 format: hold every ternary matrix to about B bits/param as the "
                   "format stores it (stream, offsets, scales) by pricing nonzero codes inside GPTQ, which keeps "
                   "its error feedback; each matrix gets the share of zero codes its shape needs at B. In memory "
                   "the matrices' total is then held at or below B exactly: if the shared dictionary leaves it over, an "
                   "evenly spaced few of the nonzero codes are zeroed (reported as thinned_codes); streamed runs aim "
                   "1%% below B (e.g. 0.8; default: plain GPTQ, whatever size its codes come to). With --format gguf: "
                   "B bits/param over the whole file (its bytes * 8 / parameters), each decoder matrix's block type "
                   "chosen to minimise the summed layer loss within that size (see --target-types). With int-k "
                   "--bits and --format peakllm: B bits/param over the decoder's matrices as stored (codes, scales, "
                   "zeros, rotation signs), each matrix's grid chosen from --target-grids the same way")
    p.add_argument("--target-grids", default=None, metavar="G,G,...",
                   help="with --target-bits and int-k --format peakllm: the grids the allocation chooses from, each "
                   "BITSgGROUP[s][m] (s: symmetric, stored without zeros; m: clipping range searched as --mse does), e.g. "
                   "2g64sm,3g128s,4g128 (default: "
                   "2g32sm,2g64sm,2g128sm,3g64sm,3g128sm,4g64sm,4g128sm)")
    p.add_argument("--matrix-grid", action="append", default=None, metavar="PATTERN=GRID",
                   help="repeatable, int-k --format peakllm without --target-bits: the grid of every decoder matrix "
                   "whose name the regular expression PATTERN matches (searched; the first matching pattern wins), "
                   "as BITSgGROUP[s][m] like --target-grids, e.g. 'down_proj=3g-1m'; the other matrices take "
                   "--bits, --group-size, --sym and --mse (a fixed per-tensor rule, no measuring pass)")
    p.add_argument("--rotate", action="store_true",
                   help="int-k, --format peakllm: solve every matrix in a randomly rotated input basis (block "
                   "Hadamard with random signs: QuIP#'s incoherence processing), which spreads outlier columns "
                   "over their block before rounding; the kernels rotate the activations instead (O(n log b) "
                   "adds per token, no extra weight bytes but the signs). Matters most at 2-3 bits")
    p.add_argument("--levels", choices=("minmax", "matched"), default=None,
                   help="with --target-bits, the level s of each ternary row {-s, 0, +s}. minmax: QMoE's s = (max - min) / 2; "
                   "matched: the mean |w| of the weights the target keeps nonzero, i.e. the row's largest (1 - z) "
                   "share for the z zeros its size needs (lower reconstruction error per matrix, but a higher perplexity "
                   "on the moefied default model: see the README's QMoE section) (default: minmax)")
    p.add_argument("--bit-allocation", choices=("matrix", "experts"), default="matrix",
                   help="with --target-bits on a MoE model. matrix: every ternary matrix held to B; experts: the "
                   "experts of each MoE block (gate/up, then down) share B bits/param and one price per nonzero "
                   "code, each expert's error weighted by the calibration tokens it serves, so the experts whose "
                   "output gains most get more bits; the block's total never exceeds B (default: %(default)s)")
    p.add_argument("--dense-bits", choices=("2", "3", "4", "8", "keep"), default=None,
                   help="MoE models: grid of the non-expert matrices (attention, shared experts); 'keep' leaves them "
                   "as they are (default: the same as --bits; routers and embeddings always stay dense)")
    g = p.add_argument_group("embedding and lm_head")
    g.add_argument("--embed-bits", choices=("keep", "8", "4"), default=None,
                   help="round the token embedding (and an untied lm_head) to this many bits per weight, symmetric, "
                   "one fp16 scale per --embed-group-size columns; a tied lm_head is the same stored matrix and the "
                   "runtime's int-k kernels read it. keep: leave them in the model's dtype (default: 8 for the "
                   "peakllm and sub1 formats, keep for compressed-tensors, which stores them dense)")
    g.add_argument("--embed-group-size", type=int, default=64,
                   help="columns per scale of the embedding grid; -1 = one per row (default: %(default)s)")
    g = p.add_argument_group("GGUF output (--format gguf: one .gguf file for llama.cpp, ollama, LM Studio)")
    g.add_argument("--type", default=None, metavar="TYPE",
                   help="llama-quantize's preset, with its per-tensor rules (attn_v and ffn_down in more bits in some "
                   "layers, token_embd/output in Q6_K or Q8_0; as llama-quantize applies them with --imatrix): Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, "
                   "Q5_K_M, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL; or Q3_K, Q4_K, Q5_K: that block type on every "
                   "decoder matrix (llama-quantize reads these as the _M presets). Every matrix is solved on its "
                   "type's exact grid (GPTQ, or RTN with an imatrix-style weighted grid); a matrix whose rows a type's "
                   "blocks do not divide falls back as llama-quantize does (K-quants need multiples of 256; e.g. "
                   "Q4_K -> Q5_0) (default: Q4_K)")
    g.add_argument("--tensor-type", action="append", default=None, metavar="PATTERN=TYPE",
                   help="repeatable: the block type of every tensor whose GGUF name the regular expression PATTERN "
                   "matches (searched, as llama-quantize's --tensor-type; the first matching pattern wins), "
                   "instead of the preset's rule, e.g. 'attn_v=Q8_0' or 'blk\\.[0-3]\\.ffn_down=Q6_K'")
    g.add_argument("--target-types", default=None, metavar="T,T,...",
                   help="with --target-bits: the block types the allocation chooses from (default: every type whose "
                   "blocks divide the matrix's rows)")
    g.add_argument("--embed-type", default=None, metavar="TYPE",
                   help="block type of the token embedding and lm_head (rounded to nearest, with the same fallbacks); "
                   "--embed-bits keep stores them in F16 (default: llama-quantize's rule for the output: Q6_K, or "
                   "Q8_0 where the type's blocks do not divide the width; an untied embedding in the preset's type)")
    add_calibration_options(p)
    add_run_options(p, ("peakllm", "sub1", "compressed-tensors", "gguf"), "peakllm")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.format == "gguf":
        return _run_gguf(args)
    if args.type is not None:
        raise PeakError("--type names a GGUF block type: add --format gguf (or use --bits for the other formats)")
    if args.tensor_type or args.target_types or args.embed_type:
        raise PeakError("--tensor-type, --target-types and --embed-type choose GGUF block types: add --format gguf")
    from peakllm.calibrate.embeddings import embed_grid
    from peakllm.calibrate.recipes import QuantRecipe
    from peakllm.calibrate.run import run_compression
    from peakllm.solvers import Grid

    ternary = args.bits == "ternary"
    grid = Grid(kind="ternary" if ternary else "affine", bits=2 if ternary else int(args.bits),
                group_size=args.group_size, sym=args.sym, mse=args.mse)
    if args.act_order is not None and args.method != "gptq":
        raise PeakError("--act-order only applies to --method gptq")
    act_order = args.act_order or ("static" if args.method == "gptq" else "none")
    if args.format == "compressed-tensors" and ternary:  # its pack-quantized format holds 1..8-bit integers
        raise PeakError("compressed-tensors has no ternary format; use --format peakllm or sub1 for --bits ternary")
    if args.format == "sub1" and not ternary:
        raise PeakError("--format sub1 stores ternary codes: use --bits ternary")
    zero_share_for = expert_budget = None
    if (args.levels is not None or args.bit_allocation != "matrix") and args.target_bits is None:
        raise PeakError("--levels and --bit-allocation shape a --target-bits run; add --target-bits B")
    intk_target = args.target_bits is not None and not ternary and args.format == "peakllm"
    if args.rotate and (ternary or args.format != "peakllm" or act_order == "group"):
        raise PeakError("--rotate applies to int-k --bits in --format peakllm, with --act-order static or none "
                        "(the kernels rotate x before any column gather)")
    if args.target_grids is not None and not intk_target:
        raise PeakError("--target-grids is the choice of an int-k --target-bits allocation (--format peakllm)")
    rules = matrix_grid_rules(args.matrix_grid or [])
    if rules and (ternary or args.format != "peakllm" or args.target_bits is not None):
        raise PeakError("--matrix-grid sets int-k grids in --format peakllm; with --target-bits the allocation "
                        "chooses every grid (--target-grids)")
    target = None
    if intk_target:
        from peakllm.calibrate.intk_plan import DEFAULT_GRIDS, GridPlan, parse_grids

        if args.bits != "4" or args.group_size != 128 or args.sym or args.mse or args.dense_bits is not None:
            raise PeakError("with --target-bits each matrix's grid comes from --target-grids: drop --bits, "
                            "--group-size, --sym, --mse and --dense-bits")
        if not 1.0 <= args.target_bits <= 16.0:
            raise PeakError(f"--target-bits {args.target_bits}: int-k grids (--format peakllm) take 1 to 16 bits/param; "
                            "below 1 bit, --target-bits needs --method gptq --bits ternary --format sub1")
        target = GridPlan(args.target_bits, parse_grids(args.target_grids or DEFAULT_GRIDS), rotate=args.rotate)
    elif args.target_bits is not None:
        if not (ternary and args.method == "gptq" and args.format == "sub1" and not args.mse):
            raise PeakError("--target-bits needs --method gptq --bits ternary --format sub1 (and no --mse: its "
                            "least-squares levels leave too few zeros for the sub-1-bit code)")
        if not 0.05 <= args.target_bits <= 2.0:
            raise PeakError(f"--target-bits must be between 0.05 and 2.0 bits/param, got {args.target_bits}")
        from functools import partial

        from peakllm.formats import sub1_size

        aim = args.target_bits * (1 - sub1_size.SHARED_DICTIONARY_MARGIN)  # the stored size lands at or below B
        zero_share_for = partial(sub1_size.zero_share_for_target, aim, args.group_size)
        if args.bit_allocation == "experts":
            expert_budget = (aim, partial(sub1_size.bits_per_param, args.group_size))
    embed_bits = args.embed_bits or ("keep" if args.format == "compressed-tensors" else "8")
    if embed_bits != "keep" and args.format == "compressed-tensors":
        raise PeakError("--format compressed-tensors keeps the embedding and lm_head dense: use --embed-bits keep, "
                        "or --format peakllm to store them quantized")
    outer_grid = embed_grid(embed_bits, args.embed_group_size)
    dense_grid = None
    if args.dense_bits not in (None, "keep"):
        dense_grid = Grid(bits=int(args.dense_bits), group_size=args.group_size if args.group_size > 0 else 128,
                          sym=args.sym, mse=args.mse)
    recipe = QuantRecipe(args.method, grid, act_order=act_order, blocksize=args.blocksize, damp=args.damp,
                         dense_grid=dense_grid, keep_dense=args.dense_bits == "keep", zero_share_for=zero_share_for,
                         matched_levels=args.levels == "matched", expert_budget=expert_budget, rotate=args.rotate,
                         seed=args.seed, target=target, grid_rules=rules)
    extra = {"method": args.method, "bits": args.bits if ternary else int(args.bits), "group_size": args.group_size,
             "sym": args.sym, "act_order": act_order, "dense_bits": args.dense_bits,
             "embed_bits": embed_bits, "embed_group_size": args.embed_group_size if outer_grid else None,
             "target_bits": args.target_bits, "levels": args.levels,
             "bit_allocation": args.bit_allocation if args.target_bits is not None else None,
             "rotate": args.rotate, "target_grids": args.target_grids if intk_target else None,
             "matrix_grid": list(args.matrix_grid or []) or None}
    spec = run_spec(args, embed_grid=outer_grid, target_bits=None if intk_target else args.target_bits)
    hook = None
    if intk_target:
        from peakllm.calibrate.intk_plan import allocate_grids

        def hook(model, segments):
            if recipe.moe:
                raise PeakError("an int-k --target-bits allocation is for dense models; MoE models take --bits")
            extra.update(allocate_grids(model, segments, recipe, spec))
    result = run_compression(spec, recipe, extra=extra, before_calibrate=hook)
    emit(result, args, f"quantized {args.model} with {args.method}")
    return 0


def matrix_grid_rules(items: list[str]) -> tuple:
    """['down_proj=3g-1m', ...] -> ((compiled PATTERN, Grid), ...) for QuantRecipe.grid_rules; one error for a
    malformed item before any work."""
    import re

    from peakllm.calibrate.intk_plan import parse_grids

    rules = []
    for item in items:
        pattern, sep, grid = item.rpartition("=")
        if not sep or not pattern or "," in grid:
            raise PeakError(f"--matrix-grid takes PATTERN=GRID with one grid such as 3g-1m, got {item!r}")
        try:
            rules.append((re.compile(pattern), parse_grids(grid)[0]))
        except (re.error, PeakError) as exc:
            raise PeakError(f"--matrix-grid {item!r}: {exc}") from None
    return tuple(rules)


def _run_gguf(args) -> int:
    """quantize --format gguf: the decoder's matrices onto llama.cpp block types (a preset's per-tensor rules, one
    type, overrides, or a size target allocated per matrix), written as one .gguf file."""
    from peakllm.calibrate.gguf_plan import allocate_types
    from peakllm.calibrate.recipes import GGMLRecipe
    from peakllm.calibrate.run import run_compression
    from peakllm.formats.gguf.presets import PRESETS, canonical_type, parse_overrides

    fixed = {"--bits": args.bits != "4", "--group-size": args.group_size != 128, "--sym": args.sym,
             "--mse": args.mse, "--dense-bits": args.dense_bits, "--levels": args.levels,
             "--embed-group-size": args.embed_group_size != 64, "--act-order group": args.act_order == "group",
             "--bit-allocation": args.bit_allocation != "matrix"}
    given = [flag for flag, set_ in fixed.items() if set_]
    if given:
        raise PeakError(f"{', '.join(given)} do not apply to --format gguf: its block type (--type) fixes the grid")
    if args.embed_bits not in (None, "keep"):
        raise PeakError("with --format gguf, choose the embedding's block type with --embed-type (or --embed-bits keep)")
    if args.embed_bits == "keep" and args.embed_type is not None:
        raise PeakError("--embed-bits keep stores the embedding in F16: drop --embed-type")
    if args.act_order is not None and args.method != "gptq":
        raise PeakError("--act-order only applies to --method gptq")
    if args.target_bits is not None and args.type is not None:
        raise PeakError("--target-bits chooses each matrix's type: drop --type (--target-types limits the choice)")
    if args.target_types is not None and args.target_bits is None:
        raise PeakError("--target-types is the choice of a --target-bits allocation: add --target-bits B")
    if args.target_bits is not None and not 1.0 <= args.target_bits <= 32.0:
        raise PeakError(f"--target-bits for a GGUF file is bits/param over the whole file, got {args.target_bits}")
    name = canonical_type(args.type or "Q4_K", presets=True)
    preset = name if name in PRESETS else None
    candidates = None
    if args.target_types is not None:
        candidates = tuple(dict.fromkeys(canonical_type(t) for t in args.target_types.split(",") if t.strip()))
        if not candidates:
            raise PeakError("--target-types needs at least one block type")
    act_order = args.act_order or ("static" if args.method == "gptq" else "none")
    recipe = GGMLRecipe(args.method, PRESETS[preset][0] if preset else name, act_order=act_order,
                        blocksize=args.blocksize, damp=args.damp, preset=preset,
                        overrides=parse_overrides(args.tensor_type),
                        embed_type=canonical_type(args.embed_type) if args.embed_type else None,
                        keep_outer=args.embed_bits == "keep", target_bits=args.target_bits, candidates=candidates)
    described = "target" if args.target_bits is not None else name
    extra = {"method": args.method, "type": described, "embed_type": args.embed_type, "act_order": act_order,
             "tensor_type": list(args.tensor_type or []), "target_bits": args.target_bits,
             "file_type": preset}
    spec = run_spec(args, embed_grid=None if recipe.keep_outer else recipe.plan.outer)
    hook = None
    if args.target_bits is not None:
        def hook(model, segments):
            extra.update(allocate_types(model, segments, recipe, spec))
    result = run_compression(spec, recipe, extra=extra, before_calibrate=hook)
    emit(result, args, f"quantized {args.model} with {args.method} onto {described}")
    return 0
