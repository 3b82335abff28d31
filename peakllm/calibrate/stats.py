"""What the pipeline measures while a layer runs: each matrix's input statistics (the Hessian H = 2/n sum x x^T,
or sum_t x_j^2), the calibration activations entering the current layer (spilled to disk past a budget), and
the inputs and keyword arguments of every decoder layer, captured in one cheap pass before layer 0."""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.nn as nn

from peakllm.errors import PeakError
from peakllm.models.anatomy import base_model, compressible_linears, decoder_layers, is_moe
from peakllm.progress import tqdm


class StopLayer(Exception):
    """Raised from a hook once the group being calibrated has seen its inputs: skip the rest of the layer."""


# ---------------------------------------------------------------- statistics
class Stats:
    """Running statistics of one matrix's inputs: H = 2/n sum x x^T (fp32) and/or sum_t x_j^2."""

    def __init__(self, in_features: int, kinds: set[str], device, sink_weight: float = 1.0):
        self.n = 0
        self.sink_scale = sink_weight ** 0.5  # on x at each segment's first position: its x x^T counts sink_weight
        self.xtx = torch.zeros(in_features, in_features, device=device) if "hessian" in kinds else None
        self.sqnorm = torch.zeros(in_features, device=device) if "sqnorm" in kinds else None
        # fp32 sums of x x^T over ~1e5 tokens lose little precision next to the damping added later

    def add(self, x: torch.Tensor) -> None:
        if self.sink_scale != 1.0 and x.dim() == 3:  # [batch, positions, features]: position 0 is the sink
            x = x.float().clone()
            x[:, 0] *= self.sink_scale
        x = x.reshape(-1, x.shape[-1]).float()
        self.n += x.shape[0]
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)
        if self.sqnorm is not None:
            self.sqnorm.add_((x * x).sum(0))

    def finish(self) -> dict:
        if self.n == 0:
            raise PeakError("a module received no calibration tokens")
        out = {"tokens": self.n}
        if self.xtx is not None:
            out["hessian"] = self.xtx.mul_(2.0 / self.n)
        if self.sqnorm is not None:
            out["sqnorm"] = self.sqnorm
        return out


# ---------------------------------------------------------------- activations
class Activations:
    """The calibration hidden states entering the current layer, one tensor per batch; spill to disk past a budget."""

    def __init__(self, offload_bytes: int | None):
        self.offload_bytes = offload_bytes
        self.items: list = []
        self.bytes = 0
        self._dir: tempfile.TemporaryDirectory | None = None

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        size = t.numel() * t.element_size()
        if self.offload_bytes is not None and self.bytes + size > self.offload_bytes:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="peakllm-acts-")
            path = os.path.join(self._dir.name, f"{len(self.items)}-{time.monotonic_ns()}.pt")
            torch.save(t.cpu(), path)
            self.items.append(path)
        else:
            self.items.append(t)
            self.bytes += size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i) -> torch.Tensor:
        item = self.items[i]
        return torch.load(item, weights_only=True) if isinstance(item, str) else item

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()


@torch.inference_mode()
def capture_inputs(model, segments: torch.Tensor, batch_size: int, offload_bytes: int | None):
    """Hidden states entering layer 0 and, per batch, the keyword arguments every layer is called with.

    Every decoder layer's forward is swapped for a recorder that returns its input unchanged, so one
    pass through the model costs only the embedding; each layer's own kwargs (attention masks, rotary
    tables, which differ per layer type in e.g. Gemma-3) are recorded as the model builds them.
    """
    layers, _ = decoder_layers(model)
    device = next(model.parameters()).device
    acts = Activations(offload_bytes)
    layer_kwargs: list[list[dict]] = []  # [batch][layer]
    originals = [layer.forward for layer in layers]
    current: list[dict] = []

    def recorder(index):
        def forward(hidden_states, *args, **kwargs):
            if args:
                raise PeakError(f"unsupported decoder layer call with positional arguments in {type(layers[index]).__name__}")
            if index == 0:
                acts.append(hidden_states)
            kwargs.pop("past_key_values", None)
            kwargs.pop("past_key_value", None)
            kwargs.pop("cache", None)  # transformers 5.x's name for the KV cache
            kwargs["use_cache"] = False
            current.append(kwargs)
            return hidden_states
        return forward

    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for batch in torch.split(segments, batch_size):
            current = []
            base_model(model)(input_ids=batch.to(device), use_cache=False)
            if len(current) != len(layers):
                raise PeakError(f"model ran {len(current)} of its {len(layers)} decoder layers; unsupported structure")
            layer_kwargs.append(current)
    finally:
        for layer, fwd in zip(layers, originals):
            layer.forward = fwd
    return acts, layer_kwargs


def collect_group(layer, group: dict[str, nn.Linear], acts: Activations, layer_kwargs, li: int, kinds: set[str],
                  seconds: dict, stop_early: bool, sink_weight: float = 1.0) -> dict[str, dict]:
    """Run the layer over all calibration batches with hooks on `group`; return each module's finished stats
    (`sink_weight`: what each segment's first position counts in them)."""
    stats = {n: Stats(m.in_features, kinds, m.weight.device, sink_weight) for n, m in group.items()}
    pending = set()
    stat_seconds = [0.0]

    def hook(name):
        def fn(mod, args):
            t0 = time.perf_counter()
            stats[name].add(args[0])
            stat_seconds[0] += time.perf_counter() - t0
            pending.discard(name)
            if stop_early and not pending:
                raise StopLayer
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in group.items()]
    t0 = time.perf_counter()
    try:
        for b in range(len(acts)):
            pending.update(group)
            try:
                layer(acts[b], **layer_kwargs[b][li])
            except StopLayer:
                pass
    finally:
        for h in handles:
            h.remove()
    seconds["statistics"] += stat_seconds[0]
    seconds["forward"] += time.perf_counter() - t0 - stat_seconds[0]
    return {n: s.finish() for n, s in stats.items()}


@torch.inference_mode()
def input_sqnorms(model, segments: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    """sum_t x_j^2 of every compressible matrix's inputs in the dense model (one full pass; for OWL)."""
    layers, prefix = decoder_layers(model)
    moe = is_moe(model)
    stats: dict[str, Stats] = {}
    handles = []
    for li, layer in enumerate(layers):
        for name, mod in compressible_linears(layer, moe).items():
            full = f"{prefix}.{li}.{name}"
            stats[full] = Stats(mod.in_features, {"sqnorm"}, mod.weight.device)
            handles.append(mod.register_forward_pre_hook(lambda m, a, s=stats[full]: s.add(a[0])))
    device = next(model.parameters()).device
    try:
        for batch in tqdm(torch.split(segments, batch_size), desc="outlier statistics", disable=not progress,
                          leave=False):
            base_model(model)(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: s.finish()["sqnorm"] for n, s in stats.items()}
