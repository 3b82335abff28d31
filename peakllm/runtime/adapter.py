"""A PEFT LoRA adapter run by the lean runtime beside the model's linears, unmerged (`--adapter DIR`).

`read_adapter` reads and checks a PEFT adapter folder (adapter_config.json, adapter_model.safetensors, as
`peakllm recover --method lora` writes it) before the model is loaded; `attach_adapter` checks it against the
loaded model (every adapted module present and a linear, every shape matching, every target module found)
and only then puts a `LoraLinear` around each adapted linear, packed or dense. A `LoraLinear` computes
y = base(x) + scale * B (A x), as PEFT's lora.Linear does, with the base untouched (int-k codes stay codes);
in the whole-step decode engine the term rides along with the base linear's rows (kernels/lora_impl.h).
A and B are held rounded to `weights_dtype` (bf16 by default: half the bytes a decode step reads beside the
packed weights), the same numbers on the torch path and in the engine.

Supported: PEFT's LoRA on linear layers (r, lora_alpha, use_rslora, target_modules as a list or a regex;
fan_in_fan_out is PEFT's flag for GPT-2's Conv1D weights and does not change an nn.Linear's forward). Refused
in one line: other PEFT methods, DoRA, modules_to_save, trained biases, rank / alpha patterns, embedding
adapters, layer replication, and any tensor that is not a LoRA A or B matrix.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peakllm.errors import PeakError
from peakllm.formats.tensor_file import read_safetensors
from peakllm.kernels import decode
from peakllm.runtime.describe import any_lin
from peakllm.runtime.linear import as_runtime_linear

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
# config fields whose non-default values change what the adapter computes in ways the runtime does not run
_REFUSED = {"use_dora": "DoRA", "modules_to_save": "modules_to_save (full copies of modules)",
            "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
            "layer_replication": "layer replication", "lora_bias": "LoRA biases (lora_bias)",
            "trainable_token_indices": "trainable token embeddings"}


@dataclass
class LoraAdapter:
    """A read and checked PEFT LoRA adapter: {module name: (A [r, in], B [out, r])} and the scale of B A."""

    path: str
    rank: int
    scale: float
    target_modules: list[str] | str | None
    layers_limited: bool  # layers_to_transform / exclude_modules: not every matched module need have weights
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    weights_dtype: torch.dtype = torch.bfloat16  # A and B as the runtime holds them


def read_adapter(adapter_dir, weights_dtype: torch.dtype = torch.bfloat16) -> LoraAdapter:
    """The adapter folder's config and weights, checked on their own (the model is checked in attach_adapter);
    weights_dtype: how the runtime will hold A and B (bfloat16 or float32)."""
    if weights_dtype not in (torch.float32, torch.bfloat16):
        raise PeakError(f"adapter weights must be float32 or bfloat16, got {weights_dtype}")
    folder = Path(adapter_dir)
    where = f"--adapter {adapter_dir}"
    if not folder.is_dir():
        raise PeakError(f"{where}: no such folder")
    if not (folder / CONFIG_NAME).is_file():
        raise PeakError(f"{where}: no {CONFIG_NAME} (a PEFT adapter folder, as `peakllm recover --method lora` writes)")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PeakError(f"{where}: {CONFIG_NAME} is not JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise PeakError(f"{where}: a {kind or 'non-PEFT'} adapter; the runtime runs LoRA adapters only")
    for field, what in _REFUSED.items():
        if config.get(field):
            raise PeakError(f"{where}: {what} is not supported by the runtime (an adapter of plain LoRA matrices is)")
    if config.get("bias", "none") != "none":
        raise PeakError(f"{where}: trained biases (bias={config['bias']!r}) are not supported; use bias='none'")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(rank, int) and rank > 0 and isinstance(alpha, (int, float))):
        raise PeakError(f"{where}: r must be a positive integer and lora_alpha a number, got r={rank!r}, "
                        f"lora_alpha={alpha!r}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    if not (folder / WEIGHTS_NAME).is_file():
        raise PeakError(f"{where}: no {WEIGHTS_NAME} (the runtime reads safetensors adapters only)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_safetensors(folder / WEIGHTS_NAME)[1].items():
        found = _KEY.match(key)
        if found is None:
            raise PeakError(f"{where}: tensor {key!r} is not a LoRA A or B matrix (DoRA magnitudes, embedding "
                            "adapters, modules_to_save copies and trained biases are not supported)")
        pairs.setdefault(found["module"], {})[found["side"]] = tensor
    if not pairs:
        raise PeakError(f"{where}: {WEIGHTS_NAME} holds no LoRA matrices")
    weights = {}
    for module, sides in pairs.items():
        if set(sides) != {"A", "B"}:
            raise PeakError(f"{where}: {module} has lora_{next(iter(sides))} but not its other matrix")
        a, b = sides["A"].float(), sides["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise PeakError(f"{where}: {module}'s A {tuple(a.shape)} and B {tuple(b.shape)} are not of rank r={rank}")
        weights[module] = (a, b)
    limited = bool(config.get("layers_to_transform") or config.get("exclude_modules"))
    return LoraAdapter(str(adapter_dir), rank, float(scale), config.get("target_modules"), limited, weights,
                       weights_dtype)


def _is_linear(module: nn.Module) -> bool:
    """A linear the runtime runs: nn.Linear, or a packed / dense runtime linear (not an embedding)."""
    return (type(module) is nn.Linear or hasattr(module, "decode_lin")) and hasattr(module, "in_features")


def _targeted(name: str, targets) -> bool:
    """PEFT's rule: a regex matches the whole name; a list entry matches the name or its last parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def attach_adapter(hf_model: nn.Module, adapter: LoraAdapter) -> int:
    """Put a LoraLinear around every linear of `hf_model` that `adapter` has weights for, after checking them
    all (nothing changes when a check fails); returns how many."""
    where = f"--adapter {adapter.path}"
    modules = dict(hf_model.named_modules(remove_duplicate=False))
    for name, (a, b) in adapter.weights.items():
        module = modules.get(name)
        if module is None:
            raise PeakError(f"{where}: the model has no module {name} (an adapter for another model?)")
        if not _is_linear(module):
            raise PeakError(f"{where}: {name} is a {type(module).__name__}, not a linear layer; the runtime runs "
                            "adapters on linear layers only")
        if (a.shape[1], b.shape[0]) != (module.in_features, module.out_features):
            raise PeakError(f"{where}: {name} is {module.in_features} -> {module.out_features} features, the "
                            f"adapter's A and B are {tuple(a.shape)} and {tuple(b.shape)} (an adapter for another model?)")
    targets = adapter.target_modules
    if targets:
        linears = [n for n, m in modules.items() if _is_linear(m)]
        for target in [targets] if isinstance(targets, str) else targets:
            if not any(_targeted(n, [target] if not isinstance(targets, str) else target) for n in linears):
                raise PeakError(f"{where}: target module {target!r} names no linear layer of the model")
        missing = [n for n in linears if _targeted(n, targets) and n not in adapter.weights]
        if missing and not adapter.layers_limited:
            raise PeakError(f"{where}: no weights for {len(missing)} of the layers its target_modules name (e.g. "
                            f"{missing[0]}): an adapter for another model?")
    for name, (a, b) in adapter.weights.items():
        parent_name, _, child = name.rpartition(".")
        parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
        setattr(parent, child, LoraLinear(getattr(parent, child), a, b * adapter.scale, adapter.weights_dtype))
    return len(adapter.weights)


class LoraLinear(nn.Module):
    """y = base(x) + lora_b @ (lora_a @ x), lora_b already times the scale, never merged into the base."""

    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 weights_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if weights_dtype not in (torch.float32, torch.bfloat16):
            raise PeakError(f"adapter weights must be float32 or bfloat16, got {weights_dtype}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weights_dtype = weights_dtype
        # fp32 values rounded to weights_dtype once: the torch path and the engine use the same numbers
        self.register_buffer("lora_a", lora_a.detach().to(weights_dtype).float().contiguous(), persistent=False)
        self.register_buffer("lora_b", lora_b.detach().to(weights_dtype).float().contiguous(), persistent=False)
        self._engine = None  # (A, B) in weights_dtype, made once for the decode engine

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term alone, fp32."""
        return F.linear(F.linear(x.float(), self.lora_a), self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return (y.float() + self.delta(x)).to(y.dtype)

    def runtime_linear(self, dtype: torch.dtype) -> "LoraLinear":
        """This adapter around the runtime's form of the base (runtime/linear.py as_runtime_linear)."""
        return LoraLinear(as_runtime_linear(self.base, dtype), self.lora_a, self.lora_b, self.weights_dtype)

    def decode_lin(self, keep: list):
        """The base's engine descriptor with the low-rank term beside it, or None if the base has none."""
        lin = any_lin(self.base, keep)
        if lin is None:
            return None
        if self._engine is None:
            self._engine = (self.lora_a.to(self.weights_dtype).contiguous(), self.lora_b.to(self.weights_dtype).contiguous())
        return decode.with_lora(lin, *self._engine, keep)

    def packed_nbytes(self) -> int:
        """Bytes of A and B a decode step reads (the base counts its own)."""
        return (self.lora_a.numel() + self.lora_b.numel()) * self.weights_dtype.itemsize

    def extra_repr(self) -> str:
        return f"rank={self.rank}, weights={str(self.weights_dtype).removeprefix('torch.')}"


def has_adapter(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())
