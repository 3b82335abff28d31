"""Full-parameter fine-tuning: LOMO (Lv et al. 2023) through the authors' `lomo-optim` package, and AdamW as
its memory baseline; on a sparse model both keep every pruned weight exactly zero.

LOMO updates each parameter inside its gradient hook during the backward and frees the gradient at once, so
there are no stored gradients and no optimizer state: `lomo_optim.Lomo` registers a hook on every trainable
parameter that applies, in place, the gradients accumulated so far (`p -= lr * grad; p.grad = None`), and its
`fused_backward` runs the backward and applies the last one. It works on the CPU in fp32 (its loss scaler is for
fp16 only; gradient-norm clipping, which costs a second backward, is left off).

Sparsity: a weight that is exactly zero in a decoder linear is a pruned one. Its gradient is multiplied by the
mask in a hook registered *before* LOMO's (tensor hooks run in registration order and each passes its result
on), so every update of a pruned weight is exactly 0: `0 - lr * 0`. AdamW sees the same masked gradients: its
moments of a pruned weight stay 0 and so does its update.
"""

from __future__ import annotations

import torch
from torch import nn

from peakllm.errors import PeakError
from peakllm.models.anatomy import decoder_layers
from peakllm.runtime.linear import BitmaskLinear, IntKLinear, NMLinear

PACKED_TYPES = (IntKLinear, NMLinear, BitmaskLinear)


def sparse_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: bool mask (True = kept)} of every decoder nn.Linear holding exact zeros."""
    layers, prefix = decoder_layers(model)
    masks = {}
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                mask = module.weight.detach() != 0
                if not bool(mask.all()):
                    masks[f"{prefix}.{i}.{name}"] = mask
    return masks


def mask_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Multiply each masked weight's gradient by its mask (hooks; register before the optimizer's)."""
    handles = []
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        handles.append(weight.register_hook(lambda g, m=mask: g * m))
    return handles


def full_optimizer(model: nn.Module, method: str, lr: float):
    """Every parameter trainable; LOMO (lomo-optim) or torch's AdamW (no weight decay)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    try:
        from lomo_optim import Lomo  # lazy: it imports transformers' deepspeed glue
    except ImportError:
        raise PeakError("--method lomo needs the authors' package: pip install lomo-optim") from None
    return Lomo(model, lr=lr, clip_grad_norm=None, clip_grad_value=None, weight_decay=0.0)


def check_dense_linears(model: nn.Module) -> None:
    """Full fine-tuning needs float weights to update: refuse a model whose linears are packed."""
    if any(isinstance(m, PACKED_TYPES) for m in model.modules()):
        raise PeakError("--method lomo/adamw updates float weights, and this model's linears are packed (int-k or "
                        "sparse-packed); use --method lora, or fine-tune the dense/sparse HF folder before packing")
