"""peakllm prune: one-shot pruning (SparseGPT, Wanda, magnitude), unstructured or N:M."""

from __future__ import annotations

from peakllm.cli.common import emit, show_progress
from peakllm.cli.compress_common import add_calibration_options, add_run_options, run_spec
from peakllm.errors import PeakError


def register(sub) -> None:
    p = sub.add_parser(
        "prune", help="one-shot pruning: SparseGPT, Wanda or magnitude; unstructured or N:M",
        description="Prune every linear layer of the decoder to --sparsity (unstructured) or --pattern N:M "
        "(N zeros in every M weights), one layer at a time over calibration data, without retraining. "
        "sparsegpt solves a Hessian-based reconstruction per layer and updates the kept weights; wanda scores "
        "|W|*||x||; magnitude scores |W|. With --bits, SparseGPT also quantizes the kept weights in the same pass.")
    p.add_argument("--method", choices=("sparsegpt", "wanda", "magnitude"), default="sparsegpt",
                   help="(default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sparsity", type=float, default=None, help="fraction of weights to zero, in [0, 1) (default: 0.5)")
    g.add_argument("--pattern", default=None, help="N:M semi-structured sparsity, e.g. 2:4 or 4:8")
    p.add_argument("--owl", action="store_true",
                   help="outlier-weighted layer-wise sparsity (Yin et al. 2024): layers with more outliers are pruned "
                   "less; the average stays --sparsity")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="max deviation from --sparsity per layer (default: %(default)s)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=None,
                   help="also quantize the kept weights (sparsegpt only; needs --format peakllm)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size with --bits; -1 = per row (default: %(default)s)")
    p.add_argument("--values", choices=("bf16", "fp16", "fp32"), default=None,
                   help="--format peakllm without --bits: the dtype the kept weights are stored in, beside a bitmask "
                   "(1 bit a weight) or N:M positions (2 bits a kept weight for 2:4); the model is rounded to it, so the "
                   "perplexity after is the stored model's. bf16 at 50%% is ~9.1 bits/param (default: bf16)")
    g = p.add_argument_group("embedding and lm_head (--format peakllm)")
    g.add_argument("--embed-bits", choices=("keep", "8", "4"), default=None,
                   help="round the token embedding (and an untied lm_head) to this many bits per weight, as quantize "
                   "does (symmetric, one fp16 scale per --embed-group-size columns; the runtime's int-k kernels read a "
                   "tied lm_head); not pruned. keep: the model's dtype (default: 8 for --format peakllm, else keep)")
    g.add_argument("--embed-group-size", type=int, default=64,
                   help="columns per scale of the embedding grid; -1 = one per row (default: %(default)s)")
    g = p.add_argument_group(
        "GGUF output (--format gguf: pruned, then rounded onto a llama.cpp block type, one .gguf file)",
        "Each matrix is pruned, then its kept weights are rounded onto --type's exact grid with the mask kept: "
        "after sparsegpt by GPTQ with the same Hessian (pruned weights rounded as 0, their error spread over the "
        "columns not yet rounded), after wanda or magnitude by RTN with the type's importance-weighted fit. "
        "Only the symmetric types keep pruned weights exactly 0: Q8_0, Q4_0, Q5_0, Q3_K, Q6_K (level 0 is one of "
        "their codes). Types with a min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K: w = d*q - m) and IQ4_NL (no zero level) "
        "store a pruned weight as its block's grid point nearest 0, which is rarely 0. GGUF stores every block "
        "dense either way: pruning lowers the error budget at a size, not the file size.")
    g.add_argument("--type", default=None, metavar="TYPE",
                   help="block type of the decoder's matrices, with llama.cpp's fallbacks for widths it cannot take "
                   "(default: Q4_0, which keeps zeros)")
    g.add_argument("--embed-type", default="Q6_K", metavar="TYPE",
                   help="block type of the token embedding and lm_head, rounded to nearest (not pruned); keep: "
                   "F16 (default: %(default)s)")
    add_calibration_options(p)
    add_run_options(p, ("hf", "peakllm", "gguf"), "peakllm")
    p.set_defaults(func=run)


def run(args) -> int:
    from peakllm.calibrate.recipes import PruneRecipe, parse_pattern
    from peakllm.calibrate.run import run_compression
    from peakllm.solvers import Grid

    pattern = parse_pattern(args.pattern)
    sparsity = args.sparsity if args.sparsity is not None else (pattern[0] / pattern[1] if pattern else 0.5)
    if args.owl and pattern:
        raise PeakError("--owl allocates unstructured sparsity per layer; it does not combine with --pattern")
    grid = Grid(bits=args.bits, group_size=args.group_size) if args.bits else None
    if args.format != "peakllm" and (args.values not in (None, "fp32") or args.embed_bits not in (None, "keep")):
        raise PeakError(f"--values and --embed-bits choose what the packed format stores: use --format peakllm "
                        f"(--format {args.format} stores {'fp32 weights' if args.format == 'hf' else 'block types'})")
    if args.format == "gguf":
        return _run_gguf(args, sparsity, pattern)
    if args.type is not None:
        raise PeakError("--type names a GGUF block type: add --format gguf")
    if grid is not None and args.format != "peakllm":
        raise PeakError("--bits stores codes and masks together: add --format peakllm")
    if grid is not None and args.values is not None:
        raise PeakError("--bits stores the kept weights as int-k codes: drop --values")
    from peakllm.calibrate.embeddings import embed_grid

    values = args.values or ("bf16" if args.format == "peakllm" and grid is None else "fp32")
    embed_bits = args.embed_bits or ("8" if args.format == "peakllm" else "keep")
    outer_grid = embed_grid(embed_bits, args.embed_group_size)
    recipe = PruneRecipe(args.method, sparsity, pattern, grid, blocksize=args.blocksize, damp=args.damp, values=values)
    extra = {"method": args.method, "sparsity_target": sparsity, "pattern": args.pattern, "bits": args.bits,
             "owl": args.owl, "values": None if grid is not None else values, "embed_bits": embed_bits,
             "embed_group_size": args.embed_group_size if outer_grid else None}

    def owl(model, segments):
        recipe.layer_sparsity = _owl_allocation(model, segments, args, sparsity)

    def owl_streamed(streamed, segments, offload_bytes):
        from peakllm.calibrate.stream import streamed_layer_sqnorms
        from peakllm.solvers import owl_sparsities

        ratios = []
        streamed_layer_sqnorms(streamed, segments, args.batch_size, offload_bytes,
                               lambda li, layer, sq: ratios.append(_layer_outlier_ratio(layer, streamed.prefix, li, sq)),
                               progress=show_progress(args))
        recipe.layer_sparsity = owl_sparsities(ratios, sparsity, args.owl_lambda)

    result = run_compression(run_spec(args, embed_grid=outer_grid), recipe, extra=extra,
                             before_calibrate=owl if args.owl else None,
                             before_stream=owl_streamed if args.owl else None)
    emit(result, args, f"pruned {args.model} with {args.method}")
    return 0


def _run_gguf(args, sparsity: float, pattern) -> int:
    """prune --format gguf: each matrix pruned, then rounded onto a block type with its mask kept."""
    from peakllm.calibrate.recipes import GGMLRecipe, PruneGGMLRecipe, PruneRecipe, keeps_zeros
    from peakllm.calibrate.run import run_compression
    from peakllm.formats.gguf import block_type

    if args.bits is not None or args.group_size != 128:
        raise PeakError("--bits and --group-size do not apply to --format gguf: its block type (--type) fixes the grid")
    if args.owl:
        raise PeakError("--owl with --format gguf is not done yet")
    qtype = args.type or "Q4_0"
    quant = GGMLRecipe("gptq" if args.method == "sparsegpt" else "rtn", qtype, blocksize=args.blocksize, damp=args.damp)
    recipe = PruneGGMLRecipe(PruneRecipe(args.method, sparsity, pattern, blocksize=args.blocksize, damp=args.damp),
                             quant)
    embed_type = None if args.embed_type == "keep" else block_type(args.embed_type).name  # a bad name: now
    extra = {"method": args.method, "sparsity_target": sparsity, "pattern": args.pattern, "type": quant.type,
             "embed_type": embed_type, "then": quant.method, "zeros_exact": keeps_zeros(quant.type)}
    result = run_compression(run_spec(args, embed_grid=embed_type), recipe, extra=extra)
    emit(result, args, f"pruned {args.model} with {args.method}, then {quant.method} onto {quant.type}")
    return 0


def _owl_allocation(model, segments, args, sparsity: float) -> list[float]:
    """Per-layer sparsities from the dense model's outlier ratios (one extra pass over the calibration data,
    on the model the pipeline then prunes: it is loaded once)."""
    from peakllm.calibrate.stats import input_sqnorms
    from peakllm.models.anatomy import decoder_layers
    from peakllm.solvers import owl_sparsities

    sqnorms = input_sqnorms(model, segments, batch_size=args.batch_size, progress=show_progress(args))
    layers, prefix = decoder_layers(model)
    ratios = [_layer_outlier_ratio(layer, prefix, li, sqnorms) for li, layer in enumerate(layers)]
    return owl_sparsities(ratios, sparsity, args.owl_lambda)


def _layer_outlier_ratio(layer, prefix: str, li: int, sqnorms: dict) -> float:
    """The layer's outlier ratio over all its matrices, weighted by their sizes."""
    from peakllm.solvers import outlier_ratio

    start = f"{prefix}.{li}."
    names = [n for n in sqnorms if n.startswith(start)]
    weights = {n: layer.get_submodule(n[len(start):]).weight for n in names}
    total = sum(w.numel() for w in weights.values())
    return sum(outlier_ratio(weights[n], sqnorms[n]) * weights[n].numel() for n in names) / total
