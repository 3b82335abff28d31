"""Loading a peakllm folder: dense tensors into a model built from config.json, and every packed
module either as a runtime module that executes the packed weights (packed="kernel") or rebuilt as a
dense nn.Linear (packed="dequantize": the reference the kernels are checked against)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from peakllm.errors import PeakError
from peakllm.formats.container import load_model_folder
from peakllm.kernels import lut
import peakllm.formats.sub1  # noqa: F401 - registers the "sub1" kind with the container
from peakllm.models.anatomy import check_architecture, is_expert
from peakllm.runtime import pages
from peakllm.runtime.embedding import PackedEmbedding
from peakllm.runtime.experts import PackedExperts
from peakllm.runtime.linear import packed_linear
from peakllm.runtime.sub1 import Sub1Linear
from peakllm.runtime.ternary import TernaryLinear

# packed kinds the runtime executes directly (and "sub1", "ternary" below); others are dequantized on load
RUNTIME_KINDS = ("intk", "nm", "bitmask")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def runtime_module(name: str, packed, linear: nn.Linear | None) -> nn.Module | None:
    """The module that runs `packed` in place of `linear`, or None when the kind has no runtime module."""
    bias = None if linear is None or linear.bias is None else linear.bias.detach()
    if packed.kind in RUNTIME_KINDS:
        return packed_linear(packed.kind, packed.to_tensors(""), packed.metadata(), bias=bias)
    if packed.kind == "sub1":
        return Sub1Linear(packed, bias=bias)
    if packed.kind == "ternary" and lut.enabled() and lut.applies(packed.in_features, packed.group_size):
        return TernaryLinear(packed, bias=bias)  # the LUT kernel (2-bit bytes); $PEAKLLM_LUT=off: dense
    return None


def load_peakllm_folder(path: Path, *, dtype=torch.float32, packed: str = "kernel"):
    from transformers import AutoConfig, AutoModelForCausalLM

    from peakllm.formats.gguf.vocab import folder_tokenizer

    if packed not in ("kernel", "dequantize"):
        raise PeakError(f"packed must be 'kernel' or 'dequantize', got {packed!r}")

    manifest, dense, modules = load_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(str(path))
        tokenizer = folder_tokenizer(path)
    except (ValueError, OSError, KeyError) as exc:
        raise PeakError(f"cannot read config/tokenizer of {path}: {str(exc).splitlines()[0][:300]}") from None
    check_architecture(config)
    # The skeleton is built on the meta device and the stored dense tensors are assigned into it, so the
    # dense weights of the packed layers are never allocated (nor randomly initialised): peak memory is
    # what the packed model needs, not the dense model's size on top.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    dense = {k: v.to(dtype) if v.is_floating_point() else v for k, v in dense.items()}
    missing, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    experts = {name: pm for name, pm in modules.items() if is_expert(name)}
    modules = {name: pm for name, pm in modules.items() if name not in experts}
    allowed = {f"{name}.weight" for name in modules} | {name.rsplit(".", 1)[0] for name in experts}
    if getattr(config, "tie_word_embeddings", False):
        allowed.add("lm_head.weight")
    if unexpected or set(missing) - allowed:
        bad = sorted(unexpected) or sorted(set(missing) - allowed)
        raise PeakError(f"{path}: tensors do not fit the model's config (e.g. {bad[0]!r})")
    names = {id(m): n for n, m in model.named_modules()}
    embed_name = names.get(id(model.get_input_embeddings()))
    embed_linear = None  # the int-k embedding's bytes as a linear layer: a tied lm_head is this layer
    mapped = (pages.file_mappings(), pages.anonymous_kb())  # the folder's maps, read once for every release
    for name, pm in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise PeakError(f"{path}: packed module {name!r} does not exist in the model") from None
        if tuple(linear.weight.shape) != (pm.out_features, pm.in_features):
            raise PeakError(f"{path}: packed module {name!r} has shape {pm.out_features}x{pm.in_features}, "
                            f"the model expects {tuple(linear.weight.shape)}")
        if name == embed_name and packed == "kernel":
            embed_linear = _packed_embedding(model, name, pm, linear, dtype, path)
            if not getattr(config, "tie_word_embeddings", False):
                # Its load check multiplied once through every row (0.2 GB at 7B with 8-bit rows); decoding
                # reads only its tokens' rows, so the pages go back now (they stay in the page cache).
                pages.release(embed_linear)
            continue
        module = runtime_module(name, pm, linear) if packed == "kernel" else None
        if module is None:
            linear.weight = nn.Parameter(pm.dequantize().to(dtype))
        else:
            _set_module(model, name, module)
            # whatever building it touched goes back (it stays in the page cache): the load's peak is the
            # process plus one module, so a --max-memory run is within its budget before the plan is made
            pages.release(module, *mapped)
    _load_experts(model, experts, packed, dtype, path)
    if getattr(config, "tie_word_embeddings", False):
        if embed_linear is not None:
            _set_module(model, names[id(model.get_output_embeddings())], embed_linear)
        else:
            model.tie_weights()
    materialize_buffers(model)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise PeakError(f"{path}: no stored tensor for {left[0]!r}")
    model.peakllm_manifest = manifest
    return model, tokenizer


def _packed_embedding(model, name: str, pm, embedding: nn.Module, dtype, path) -> nn.Module:
    """Put a PackedEmbedding over int-k rows in place of the model's embedding; return its linear layer."""
    if pm.kind != "intk" or pm.g_idx is not None:
        raise PeakError(f"{path}: the embedding {name!r} must be stored as int-k rows without g_idx, got {pm.kind!r}")
    lin = packed_linear("intk", pm.to_tensors(""), pm.metadata())
    scale = getattr(embedding, "scalar_embed_scale", None)  # Gemma multiplies its embeddings by sqrt(hidden)
    scale = None if scale is None else torch.tensor(float(scale))
    _set_module(model, name, PackedEmbedding(lin, dtype, scale, getattr(embedding, "padding_idx", None)))
    return lin


def materialize_buffers(model: nn.Module) -> None:
    """Compute what a meta skeleton leaves empty: buffers derived from the config (e.g. RoPE inverse
    frequencies), by the model's own initialiser; parameters are left as they are (loaded or meta)."""
    for module in model.modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not metas:
            continue
        for n in metas:
            module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
        # The initialiser may also (re)initialise the module's loaded tensors (e.g. Gemma-3's scaled
        # embedding): it sees meta stand-ins for them instead, and the loaded ones are put back.
        loaded = {n: t for n, t in module._parameters.items() if t is not None}
        loaded_buffers = {n: t for n, t in module._buffers.items() if t is not None and n not in metas}
        for n, t in loaded.items():
            module._parameters[n] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
        for n, t in loaded_buffers.items():
            module._buffers[n] = torch.empty_like(t, device="meta")
        model._init_weights(module)
        module._parameters.update(loaded)
        module._buffers.update(loaded_buffers)


def _load_experts(model, experts: dict, packed: str, dtype, path) -> None:
    """Per-expert packed matrices <experts>.<part>.<e> back into their MoE block."""
    blocks: dict[str, dict[str, dict[int, object]]] = {}
    for name, pm in experts.items():
        prefix, part, e = name.rsplit(".", 2)
        blocks.setdefault(prefix, {}).setdefault(part, {})[int(e)] = pm
    for prefix, parts in blocks.items():
        try:
            fused = model.get_submodule(prefix)
        except AttributeError:
            raise PeakError(f"{path}: experts module {prefix!r} does not exist in the model") from None
        E = fused.gate_up_proj.shape[0]
        for part in ("gate_up_proj", "down_proj"):
            got = parts.get(part, {})
            if sorted(got) != list(range(E)):
                raise PeakError(f"{path}: {prefix}.{part} needs packed matrices for experts 0..{E - 1}")
            for e, pm in got.items():
                if tuple(getattr(fused, part).shape[1:]) != (pm.out_features, pm.in_features):
                    raise PeakError(f"{path}: {prefix}.{part}.{e} has the wrong shape")
        if packed == "dequantize":
            for part in ("gate_up_proj", "down_proj"):
                param = getattr(fused, part)
                full = torch.empty(param.shape, dtype=dtype)
                for e, pm in parts[part].items():
                    full[e] = pm.dequantize().to(dtype)
                setattr(fused, part, nn.Parameter(full))
            continue
        mods = {}
        for part in ("gate_up_proj", "down_proj"):
            mods[part] = []
            for e in range(E):
                pm = parts[part][e]
                module = runtime_module(f"{prefix}.{part}.{e}", pm, None)
                if module is None:
                    module = nn.Linear(pm.in_features, pm.out_features, bias=False, dtype=dtype)
                    module.weight.data = pm.dequantize().to(dtype)
                mods[part].append(module)
        _set_module(model, prefix, PackedExperts(mods["gate_up_proj"], mods["down_proj"], fused.act_fn))
