"""peakllm info: architecture, parameter count, bytes and per-layer shapes of a model."""

from __future__ import annotations

from peakllm.cli.common import add_model_option, add_output_options, emit


def register(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameters, bytes and layer shapes of a model",
                       description="Show what a model is made of: architecture, parameter count, bytes of weights "
                       "(packed modules counted as stored), and the shape and kind of every linear module.")
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


def logical_params(model) -> int:
    """Parameters of the uncompressed model: dense parameters plus out x in of every packed matrix."""
    return sum(p.numel() for p in model.parameters()) + sum(
        mod.out_features * mod.in_features for mod in model.modules() if _is_packed(mod))


def run(args) -> int:
    from peakllm.models import load_model, model_bytes

    model, _tok = load_model(args.model)
    cfg = model.config
    rows = module_table(model)
    shown = rows if args.layers else [r for r in rows if ".layers." not in r["name"] or ".layers.0." in r["name"]]
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
    if args.json:
        emit({**result, "modules": shown}, args, "")
        return 0
    emit(result, args, f"model {args.model}")
    width = max(len(r["name"]) for r in shown) if shown else 0
    print(f"\n{'module'.ljust(width)}  {'kind':<14} {'shape':<14} bytes")
    for r in shown:
        print(f"{r['name'].ljust(width)}  {r['kind']:<14} {'x'.join(map(str, r['shape'])):<14} {r['bytes']:,}")
    if not args.layers:
        print("(first decoder layer shown; --layers lists all)")
    return 0
