"""The calibration pipeline: run a model one decoder layer at a time and compress it as it goes.

For every decoder layer (in order):
  1. the layer's inputs for all calibration segments are already at hand (captured before layer 0,
     or produced by the previous, already compressed, layer);
  2. its weight matrices are compressed group by group in the order the data flows ("true sequential":
     q/k/v, then o, then gate/up, then down): for each group, hooks accumulate statistics over all
     calibration tokens while the layer runs on its inputs -- with the earlier groups already
     compressed -- and stop the layer as soon as the group has been seen; then the method is called on
     every matrix of the group and the new weight is written into the model;
  3. the compressed layer is run once more to produce the next layer's inputs.
Memory stays at one layer's statistics plus the calibration activations (~T x hidden floats), which
spill to disk past `offload_bytes`. The pipeline owns hooks, iteration, progress and timing; what is
done to a matrix is the `method` (see recipes.py), which calls a solver.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from peakllm.calibrate_moe import PARTS, collect_expert_stats, compress_experts, fused_experts
from peakllm.distributed import workers
from peakllm.errors import PeakError

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # MoE routers: kept dense by the pipeline


class _StopLayer(Exception):
    """Raised from a hook once the group being calibrated has seen its inputs: skip the rest of the layer."""


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


# ---------------------------------------------------------------- statistics
class Stats:
    """Running statistics of one matrix's inputs: H = 2/n sum x x^T (fp32) and/or sum_t x_j^2."""

    def __init__(self, in_features: int, kinds: set[str], device):
        self.n = 0
        self.xtx = torch.zeros(in_features, in_features, device=device) if "hessian" in kinds else None
        self.sqnorm = torch.zeros(in_features, device=device) if "sqnorm" in kinds else None
        # fp32 sums of x x^T over ~1e5 tokens lose little precision next to the damping added later

    def add(self, x: torch.Tensor) -> None:
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


# ---------------------------------------------------------------- results
@dataclass
class CalibrationReport:
    modules: dict = field(default_factory=dict)  # name -> what the method returned (mask / quant / info)
    layers: int = 0
    calib_tokens: int = 0
    seconds: dict = field(default_factory=lambda: {"capture": 0.0, "forward": 0.0, "statistics": 0.0,
                                                   "solver": 0.0, "total": 0.0})
    damping_escalations: int = 0
    fallbacks: int = 0
    experts_fallback: int = 0                           # experts calibrated on pooled statistics
    expert_tokens: list = field(default_factory=list)   # tokens each expert matrix saw
    notes: list = field(default_factory=list)


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


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out


def _flow_groups(layer, linears: dict[str, nn.Linear], experts: dict[str, nn.Module], x: torch.Tensor,
                 kwargs: dict) -> list[list[str]]:
    """Order the layer's matrices as data flows through them; matrices fed the same tensor form one group.
    A fused experts module appears as one group ["@experts:<name>"]."""
    calls: list[tuple[str, torch.Tensor]] = []  # tensors kept alive for the pass, so identity is meaningful
    hooks = [mod.register_forward_pre_hook(lambda m, a, n=name: calls.append((n, a[0])))
             for name, mod in linears.items()]
    hooks += [mod.register_forward_pre_hook(lambda m, a, n=name: calls.append((f"@experts:{n}", None)))
              for name, mod in experts.items()]
    try:
        layer(x, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    seen = set()
    for name, inp in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and inp is last_input and inp is not None:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = inp
    missing = [n for n in list(linears) + [f"@experts:{e}" for e in experts] if n not in seen]
    if missing:
        groups.append(missing)  # never called on these inputs (e.g. unused experts): compressed last
    return groups


def check_method(model, method) -> None:
    """`method.check(name, shape)` on every matrix the pipeline would compress (meta tensors suffice)."""
    if not hasattr(method, "check"):
        return
    layers, prefix = decoder_layers(model)
    moe = is_moe(model)
    for li, layer in enumerate(layers):
        for name, mod in compressible_linears(layer, moe).items():
            method.check(f"{prefix}.{li}.{name}", tuple(mod.weight.shape))
        for name, mod in fused_experts(layer).items():
            for part in PARTS:
                method.check(f"{prefix}.{li}.{name}.{part}.0", tuple(getattr(mod, part).shape[1:]))


@torch.inference_mode()
def calibrate(model, segments: torch.Tensor, method, *, batch_size: int = 8, sequential: bool = True,
              offload_bytes: int | None = 2 << 30, progress: bool = True, io=None) -> CalibrationReport:
    """Compress every linear matrix in the decoder layers of `model` in place with `method`.

    `segments` [n, seqlen] are calibration token ids. `method.stats` names the statistics it needs
    ({"hessian"}, {"sqnorm"} or both); `method.compress(name, layer_index, W, stats)` returns an object with
    a `.weight` (the new dense weight) and whatever it wants kept (masks, codes, solve info).

    `io` (streaming, see calibrate_stream.py) brings layers in and out: `io.start_layer` and, when it is
    above 0, `io.resume_acts(acts)` (the checkpointed inputs of that layer); `io.load(li)` before layer li is
    touched, `io.keep(name, result)` for what report.modules keeps of a matrix (its packed form, not dense
    copies), `io.done(li, layer, acts, report)` once it is compressed and `acts` hold the next layer's inputs.
    """
    from peakllm.progress import tqdm

    if segments.ndim != 2 or segments.shape[0] == 0:
        raise PeakError("the calibration set is empty: need at least one segment of token ids")
    if batch_size < 1:
        raise PeakError(f"calibration batch size must be >= 1, got {batch_size}")
    layers, prefix = decoder_layers(model)
    moe = is_moe(model)
    if not any(compressible_linears(layer, moe) or fused_experts(layer) for layer in layers):
        raise PeakError(f"{type(model).__name__} has no linear layers peakllm can compress")
    check_method(model, method)  # refuse impossible settings before any work is done
    report = CalibrationReport(layers=len(layers), calib_tokens=int(segments.numel()))
    t_start = time.perf_counter()
    start = io.start_layer if io is not None else 0
    if not set(method.stats) - {"tokens"}:  # e.g. magnitude, RTN: the data changes nothing, skip the passes
        report.calib_tokens = 0
        _compress_without_data(layers, prefix, moe, method, report, progress, io)
        report.seconds["total"] = time.perf_counter() - t_start
        return report
    acts, layer_kwargs = capture_inputs(model, segments, batch_size, offload_bytes)
    if start:
        acts = io.resume_acts(acts)
    report.seconds["capture"] = time.perf_counter() - t_start
    kinds = set(method.stats)
    bar = tqdm(total=len(layers), initial=start, desc=f"calibrating ({method.name})", unit="layer",
               disable=not progress)
    try:
        for li, layer in enumerate(layers):
            if li < start:
                continue
            if io is not None:
                layer = io.load(li)
            linears = compressible_linears(layer, moe)
            experts = fused_experts(layer)
            if linears or experts:
                if sequential:
                    groups = _flow_groups(layer, linears, experts, acts[0], layer_kwargs[0][li])
                else:
                    groups = [list(linears)] + [[f"@experts:{e}"] for e in experts]
                for group in groups:
                    if group[0].startswith("@experts:"):
                        ename = group[0].split(":", 1)[1]
                        for part in PARTS:
                            stats = collect_expert_stats(layer, experts[ename], part, acts, layer_kwargs, li, kinds,
                                                         Stats, _StopLayer, report)
                            compress_experts(f"{prefix}.{li}.{ename}", experts[ename], part, stats, method, li, report,
                                             None if io is None else io.keep)
                            # freed before the next part's are collected: an OLMoE layer's 65 gate/up Hessians
                            # are 1.1 GB, which sat beside the down statistics until they were complete
                            del stats
                        continue
                    group = [n for n in group if n in linears]
                    stats = _collect(layer, {n: linears[n] for n in group}, acts, layer_kwargs, li, kinds, report,
                                     stop_early=sequential)
                    t0 = time.perf_counter()
                    solves = workers().solve(group, lambda n: method.compress(f"{prefix}.{li}.{n}", li,
                                                                              linears[n].weight.data, stats.pop(n)))
                    for name, result in solves:
                        mod = linears[name]
                        full = f"{prefix}.{li}.{name}"
                        if result is None:  # the method keeps this matrix as it is
                            report.seconds["solver"] += time.perf_counter() - t0
                            t0 = time.perf_counter()
                            continue
                        mod.weight.data.copy_(result.weight.to(mod.weight.dtype))
                        report.modules[full] = result if io is None else io.keep(full, result)
                        info = getattr(result, "info", None)
                        if info is not None:
                            report.damping_escalations += int(info.retries > 0)
                            report.fallbacks += int(info.fallback_rtn)
                        report.seconds["solver"] += time.perf_counter() - t0
                        t0 = time.perf_counter()
            t0 = time.perf_counter()
            nxt = Activations(acts.offload_bytes)
            for b in range(len(acts)):
                nxt.append(_layer_out(layer(acts[b], **layer_kwargs[b][li])))
            acts.close()
            acts = nxt
            report.seconds["forward"] += time.perf_counter() - t0
            if io is not None:
                io.done(li, layer, acts, report)
            bar.update(1)
    finally:
        bar.close()
        acts.close()
    report.seconds["total"] = time.perf_counter() - t_start
    return report


def _collect(layer, group: dict[str, nn.Linear], acts: Activations, layer_kwargs, li: int, kinds: set[str],
             report: CalibrationReport, stop_early: bool) -> dict[str, dict]:
    """Run the layer over all calibration batches with hooks on `group`; return each module's finished stats."""
    stats = {n: Stats(m.in_features, kinds, m.weight.device) for n, m in group.items()}
    pending = set()
    stat_seconds = [0.0]

    def hook(name):
        def fn(mod, args):
            t0 = time.perf_counter()
            stats[name].add(args[0])
            stat_seconds[0] += time.perf_counter() - t0
            pending.discard(name)
            if stop_early and not pending:
                raise _StopLayer
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in group.items()]
    t0 = time.perf_counter()
    try:
        for b in range(len(acts)):
            pending.update(group)
            try:
                layer(acts[b], **layer_kwargs[b][li])
            except _StopLayer:
                pass
    finally:
        for h in handles:
            h.remove()
    report.seconds["statistics"] += stat_seconds[0]
    report.seconds["forward"] += time.perf_counter() - t0 - stat_seconds[0]
    return {n: s.finish() for n, s in stats.items()}


@torch.inference_mode()
def input_sqnorms(model, segments: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    """sum_t x_j^2 of every compressible matrix's inputs in the dense model (one full pass; for OWL)."""
    from peakllm.progress import tqdm

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


def _compress_without_data(layers, prefix: str, moe: bool, method, report: CalibrationReport, progress: bool,
                           io=None) -> None:
    from peakllm.progress import tqdm

    start = io.start_layer if io is not None else 0
    bar = tqdm(total=len(layers), initial=start, desc=f"compressing ({method.name})", unit="layer",
               disable=not progress)
    for li, layer in enumerate(layers):
        if li < start:
            continue
        if io is not None:
            layer = io.load(li)
        t0 = time.perf_counter()
        for name, mod in compressible_linears(layer, moe).items():
            full = f"{prefix}.{li}.{name}"
            result = method.compress(full, li, mod.weight.data, {"tokens": 0})
            if result is not None:
                mod.weight.data.copy_(result.weight.to(mod.weight.dtype))
                report.modules[full] = result if io is None else io.keep(full, result)
        report.seconds["solver"] += time.perf_counter() - t0
        for name, experts in fused_experts(layer).items():
            for part in PARTS:
                E = getattr(experts, part).shape[0]
                compress_experts(f"{prefix}.{li}.{name}", experts, part, [{"tokens": 0}] * E, method, li, report,
                                 None if io is None else io.keep)
        if io is not None:
            io.done(li, layer, None, report)
        bar.update(1)
    bar.close()
