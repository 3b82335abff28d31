"""LoRA through PEFT on a frozen compressed base.

A packed linear (int-k, N:M or bitmask sparse: runtime/linear.py) stays packed: `PackedBase` holds it and, when
a gradient is wanted, multiplies by its dequantized weight inside `DequantMatmul`, which dequantizes again in
the backward instead of keeping the dense matrix alive between the two (QLoRA's idea, without its NF4: our grids).
PEFT does not know these modules, so `PackedBase` is registered as a custom module (`LoraConfig.
_register_custom_module`, PEFT's documented way for layers it lacks) with `PackedLoraLinear`, PEFT's own
`lora.Linear` whose merge refuses (a merged int-k matrix needs a re-solve). Adapter names are those of the base
linears, so the saved adapter (adapter_config.json, adapter_model.safetensors) loads with plain PEFT on the
dequantized model (`load_model(folder, packed="dequantize")`). A sparse HF folder's linears are plain
nn.Linear: PEFT's own layers; `merge_masked` folds the adapter in and re-applies each matrix's zeros.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from peakllm.errors import PeakError
from peakllm.recover.lomo import PACKED_TYPES
from peakllm.runtime.embedding import PackedEmbedding


class DequantMatmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized from `packed` in the forward and again in the backward (never stored)."""

    @staticmethod
    def forward(ctx, x, packed):
        ctx.packed = packed
        return F.linear(x.float(), packed.dequantize(torch.float32)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        W = ctx.packed.dequantize(torch.float32)
        return (grad.float() @ W).to(grad.dtype), None


class PackedBase(nn.Module):
    """A frozen packed linear as a base layer for LoRA: the kernels without a gradient, DequantMatmul with one."""

    def __init__(self, packed: nn.Module):
        super().__init__()
        self.packed = packed
        self.in_features, self.out_features = packed.in_features, packed.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (read by PEFT for its device and dtype; never a parameter)."""
        return self.packed.dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.packed(x)
        y = DequantMatmul.apply(x, self.packed)
        bias = self.packed.bias
        return y if bias is None else y + bias.to(y.dtype)


class PackedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA linear over a PackedBase; a merge is refused (it would need the grid re-solved)."""

    def merge(self, *args, **kwargs):
        raise PeakError("an adapter cannot be merged into packed int-k / sparse-packed weights without re-solving "
                        "them; keep it unmerged, or merge into the dequantized model and compress that again")


def wrap_packed(model: nn.Module) -> int:
    """Put a PackedBase around every packed linear of `model` (not the int-k embedding's own rows); count them."""
    found = []
    for name, module in model.named_modules(remove_duplicate=False):
        for child_name, child in module.named_children():
            if isinstance(child, PACKED_TYPES) and not isinstance(module, (PackedEmbedding, PackedBase)):
                found.append((module, child_name, child))
    for parent, child_name, child in found:
        setattr(parent, child_name, PackedBase(child))
    return len(found)


def has_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PACKED_TYPES) for m in model.modules())


def lora_model(model: nn.Module, *, rank: int, lora_alpha: float, target_modules, seed: int) -> PeftModel:
    """`model` frozen with LoRA adapters on `target_modules` (leaf names); the adapters' init drawn with `seed`."""
    packed = wrap_packed(model)
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    if packed:
        config._register_custom_module({PackedBase: PackedLoraLinear})
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():  # PEFT warns of any layer type it lacks; PackedBase is registered above
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            peft_model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. no module matches target_modules
        raise PeakError(f"cannot put LoRA adapters on the model: {str(exc).splitlines()[0][:300]}") from None
    return peft_model


def adapter_tensors(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors by name (what a checkpoint keeps)."""
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def merge_masked(peft_model: PeftModel, masks: dict[str, torch.Tensor]) -> tuple[nn.Module, float]:
    """Fold the adapter into a dense/sparse-HF base and re-apply each matrix's zeros; return the model and the
    share of the adapter's update (squared Frobenius norm) that the masks removed."""
    lost = total = 0.0
    for name, module in peft_model.named_modules():
        if isinstance(module, PeftLoraLinear) and not isinstance(module, PackedLoraLinear):
            delta = module.get_delta_weight(module.active_adapters[0]).detach()
            total += float(delta.pow(2).sum())
            mask = masks.get(_base_name(name))
            if mask is not None:
                lost += float(delta[~mask].pow(2).sum())
    model = peft_model.merge_and_unload()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in masks:
                module.weight.mul_(masks[name])
    return model, (lost / total if total > 0 else 0.0)


def _base_name(peft_name: str) -> str:
    """'base_model.model.model.layers.0.mlp.up_proj' -> 'model.layers.0.mlp.up_proj'."""
    return peft_name.removeprefix("base_model.model.")
