"""peakllm info: architecture, parameter count, bytes and per-layer shapes of a model."""

from __future__ import annotations

from peakllm.cli.common import add_model_option, add_output_options, emit


def register(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameters, bytes and layer shapes of a model",
                       description="Show what a model is made of: architecture, parameter count, bytes of weights "
                       "(packed modules counted as stored), and the shape and kind of every linear module. A "
                       "compressed-tensors folder (llm-compressor's output) is read from its config and file headers "
                       "without loading it: logical parameters, its scheme(s), and bits per parameter of the quantized "
                       "linears (bits_per_param) and of the whole weight files (bits_per_param_total).")
    add_model_option(p)
    p.add_argument("--layers", action="store_true", help="list every linear module (default: first decoder layer only)")
    add_output_options(p)
    p.set_defaults(func=run)


def _is_packed(mod) -> bool:
    """A runtime module holding packed weights: linear-shaped, not nn.Linear, with buffers of its own."""
    import torch.nn as nn

    return (hasattr(mod, "in_features") and hasattr(mod, "out_features") and not isinstance(mod, nn.Linear)
            and any(True for _ in mod.buffers(recurse=False)))


def _stored_bytes(mod) -> int:
    """Bytes of a module's own parameters and persistent buffers (derived caches are not stored)."""
    tensors = list(mod.parameters(recurse=False))
    tensors += [b for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def module_table(model) -> list[dict]:
    """One row per weight-bearing leaf module (dense or packed): name, kind, shape, bytes as stored."""
    import torch.nn as nn

    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Embedding, nn.Linear)) or _is_packed(mod):
            weight = getattr(mod, "weight", None)
            shape = list(weight.shape) if isinstance(weight, nn.Parameter) else [mod.out_features, mod.in_features]
            rows.append({"name": name, "kind": type(mod).__name__, "shape": shape, "bytes": _stored_bytes(mod)})
    return rows


def decode_read(model) -> dict:
    """What decoding one token reads of the weights as loaded (every linear module, the lm_head included; an
    int-k embedding's linear only when it is the tied lm_head), the same model's linears in bf16, and their
    ratio: the speed-up over bf16 a bandwidth-bound decode would reach (`peakllm bench` measures the real one)."""
    import torch.nn as nn

    head = model.get_output_embeddings()
    embed_linear = getattr(model.get_input_embeddings(), "linear", None)
    read, params = 0, 0
    for mod in model.modules():
        if not (isinstance(mod, nn.Linear) or _is_packed(mod)) or (mod is embed_linear and mod is not head):
            continue
        if isinstance(mod, nn.Linear):
            read += mod.weight.numel() * mod.weight.element_size()
        else:
            read += _stored_bytes(mod)
        params += mod.out_features * mod.in_features
    if not params:
        return {}
    return {"decode_bytes_per_token": read, "decode_bytes_per_token_bf16": 2 * params,
            "roofline_speedup_vs_bf16": round(2 * params / read, 3)}


def logical_params(model) -> int:
    """Parameters of the uncompressed model: dense parameters plus out x in of every packed matrix."""
    return sum(p.numel() for p in model.parameters()) + sum(
        mod.out_features * mod.in_features for mod in model.modules() if _is_packed(mod))


def scheme_text(scheme: dict) -> str:
    """One compressed-tensors scheme in a few words, e.g. 'int4 sym group 128, actorder static (210 modules)'."""
    words = [f"{scheme.get('type') or 'int'}{scheme.get('num_bits')}", "sym" if scheme.get("symmetric") else "asym",
             str(scheme.get("strategy"))]
    if scheme.get("group_size"):
        words.append(str(scheme["group_size"]))
    text = " ".join(words) + (f", actorder {scheme['actorder']}" if scheme.get("actorder") else "")
    return f"{text} ({scheme['modules']} modules)"


def compressed_tensors_info(args) -> tuple[dict, list[dict]] | None:
    """A compressed-tensors folder, described from its config and headers (it is not loaded: transformers
    would hold its packed int32 words as parameters and count those)."""
    import json

    from peakllm.formats.compressed_tensors_info import describe_folder
    from peakllm.models import resolve

    kind, path = resolve(args.model)
    ct = describe_folder(path) if kind == "hf" else None
    if ct is None:
        return None
    cfg = json.loads((path / "config.json").read_text())
    text_cfg = cfg.get("text_config") or cfg
    result = {
        "model": args.model,
        "architecture": (cfg.get("architectures") or [None])[0],
        "model_type": cfg.get("model_type"),
        "layers": text_cfg.get("num_hidden_layers"),
        "hidden_size": text_cfg.get("hidden_size"),
        "vocab_size": text_cfg.get("vocab_size"),
        "parameters": ct["parameters"],
        "bytes": ct["bytes"],
        "compression": "compressed-tensors",
        "format": ct["format"],
        "schemes": ct["schemes"],
        "quantized_parameters": ct["quantized_parameters"],
        "bits_per_param": ct["bits_per_param"],
        "bits_per_param_total": ct["bits_per_param_total"],
    }
    return result, ct["modules"]


def _packed_bits(spec: str, model, parameters: int) -> dict:
    """bits_per_param of a peakllm folder's decoder linears (from its manifest, as `quantize` counts them)
    and bits_per_param_total of its weight files."""
    from peakllm.models.anatomy import outer_modules
    from peakllm.formats.container import manifest_bits_per_param
    from peakllm.models import resolve
    from peakllm.formats.writer import weight_file_bytes

    _kind, path = resolve(spec)
    outer = set(outer_modules(model))
    linears = {n: e for n, e in model.peakllm_manifest["modules"].items() if n not in outer}
    by_grid: dict[str, dict] = {}  # int-k matrices by grid (a --target-bits allocation mixes them)
    for name, entry in linears.items():
        m = entry["metadata"]
        if entry.get("kind") == "intk":
            key = f"{m['bits']}g{m['group_size']}{'s' if m['sym'] else ''}{' rotated' if 'rotate_block' in m else ''}"
            by_grid.setdefault(key, {})[name] = entry
    grids = {key: {"matrices": len(entries),
                   "params": sum(e["metadata"]["out_features"] * e["metadata"]["in_features"] for e in entries.values()),
                   "bits_per_param": manifest_bits_per_param(entries)} for key, entries in sorted(by_grid.items())}
    return {"bits_per_param": manifest_bits_per_param(linears) if linears else None,
            "bits_per_param_total": 8 * weight_file_bytes(path) / parameters, "intk_grids": grids}


def run(args) -> int:
    from peakllm.models import load_model, model_bytes

    described = compressed_tensors_info(args)
    if described is not None:
        result, rows = described
    else:
        model, _tok = load_model(args.model)
        cfg = model.config
        rows = module_table(model)
        result = {
            "model": args.model,
            "architecture": type(model).__name__,
            "model_type": cfg.model_type,
            "layers": getattr(cfg, "num_hidden_layers", None),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "vocab_size": getattr(cfg, "vocab_size", None),
            "parameters": logical_params(model),
            "bytes": model_bytes(model),
            "compression": getattr(model, "peakllm_manifest", {}).get("method", "none"),
        }
        if hasattr(model, "peakllm_manifest"):
            result.update(_packed_bits(args.model, model, result["parameters"]))
        result.update(decode_read(model))
        if str(args.model).endswith(".gguf"):  # the block type of each tensor as the file stores it
            from peakllm.formats.gguf.presets import file_allocation

            result.update(file_allocation(args.model))
    shown = rows if args.layers else [r for r in rows if ".layers." not in r["name"] or ".layers.0." in r["name"]]
    if args.json:
        emit({**result, "modules": shown}, args, "")
        return 0
    table = {**result, "schemes": "; ".join(map(scheme_text, result["schemes"]))} if "schemes" in result else result
    if table.get("intk_grids"):  # per int-k grid in one line each
        table = {k: v for k, v in table.items() if k != "intk_grids"}
        table.update({f"int-k {g}": f"{s['matrices']} matrices, {s['params']:,} params, {s['bits_per_param']:.3f} bits/param"
                      for g, s in result["intk_grids"].items()})
    if "gguf_types" in table:  # per type in one line each; the map of every tensor only in --json
        table = {k: v for k, v in table.items() if k not in ("gguf_types", "gguf_tensor_map")}
        table.update({f"gguf {t}": f"{s['tensors']} tensors, {s['params']:,} params, {s['bits_per_param']:.3f} bits/param"
                      for t, s in result["gguf_types"].items()})
    emit(table, args, f"model {args.model}")
    width = max(len(r["name"]) for r in shown) if shown else 0
    kinds = max([14] + [len(r["kind"]) for r in shown])
    print(f"\n{'module'.ljust(width)}  {'kind'.ljust(kinds)} {'shape':<14} bytes")
    for r in shown:
        print(f"{r['name'].ljust(width)}  {r['kind'].ljust(kinds)} {'x'.join(map(str, r['shape'])):<14} {r['bytes']:,}")
    if not args.layers:
        print("(first decoder layer shown; --layers lists all)")
    return 0
