"""What peakllm knows of a causal LM's structure: its decoder layers, which of their matrices are compressible,
fused MoE experts and their naming, and which architectures it can walk. Read by the loaders, the calibration
pipeline, streaming and evaluation alike, so it sits below all of them."""

from __future__ import annotations

import torch
import torch.nn as nn

from peakllm.errors import PeakError

# Architectures whose decoder layers the calibration pipeline and runtime know how to walk.
SUPPORTED_ARCHITECTURES = {
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gemma3", "opt",
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "peakllm_moe",
}


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # MoE routers: kept dense by the pipeline


def decoder_layers(model) -> tuple[nn.ModuleList, str]:
    """The decoder layers of a causal LM and their name prefix."""
    for prefix in ("model.layers", "model.decoder.layers", "model.language_model.layers", "transformer.h"):
        obj = model
        try:
            for part in prefix.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj, prefix
    raise PeakError(f"unsupported model structure {type(model).__name__}: no decoder layers found")


def base_model(model) -> nn.Module:
    """The transformer without its LM head: running it skips the [batch, seq, vocab] logits."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model) or model


def is_moe(model) -> bool:
    cfg = model.config
    return any(getattr(cfg, k, 0) for k in ("num_local_experts", "num_experts"))


def compressible_linears(layer: nn.Module, moe: bool) -> dict[str, nn.Linear]:
    found = {}
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            if moe and name.split(".")[-1] in ROUTER_NAMES:
                continue
            found[name] = mod
    return found


def layer_output(out):
    """A decoder layer returns its hidden states, or a tuple starting with them."""
    return out[0] if isinstance(out, tuple) else out


PARTS = ("gate_up_proj", "down_proj")


def fused_experts(layer: nn.Module) -> dict[str, nn.Module]:
    """Experts modules with fused 3-D weights inside a decoder layer."""
    found = {}
    for name, mod in layer.named_modules():
        gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3:
            if not hasattr(mod, "act_fn"):
                raise PeakError(f"experts module {name} ({type(mod).__name__}) has no act_fn; unsupported MoE")
            found[name] = mod
    return found


def is_expert(name: str) -> bool:
    """Matrices of fused MoE experts are named <...>.experts.<gate_up_proj|down_proj>.<e>."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-3] == "experts" and parts[-1].isdigit()


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise PeakError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )


def outer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the token embedding and, when it is not tied to the embedding, the lm_head."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    out = {names[id(embed)]: embed}
    head_w, embed_w = getattr(head, "weight", None), getattr(embed, "weight", None)
    same = head is not None and ((head_w is not None and head_w is embed_w) or head is getattr(embed, "linear", None))
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) or same
    if head is not None and not tied:
        out[names[id(head)]] = head
    return out
