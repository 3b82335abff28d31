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

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from peakllm.calibrate.distributed import workers
from peakllm.calibrate.experts import collect_expert_stats, compress_experts
from peakllm.calibrate.stats import Activations, capture_inputs, collect_group
from peakllm.errors import PeakError
from peakllm.models.anatomy import PARTS, compressible_linears, decoder_layers, fused_experts, is_moe, layer_output
from peakllm.progress import tqdm


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

    def expert_facts(self) -> dict:
        """How a MoE model's experts were calibrated: pooled fallbacks and tokens per expert matrix."""
        if not self.expert_tokens:
            return {}
        tokens = sorted(self.expert_tokens)
        return {"experts_fallback": self.experts_fallback, "expert_tokens_min": tokens[0],
                "expert_tokens_median": tokens[len(tokens) // 2]}


@dataclass(frozen=True)
class Group:
    """Matrices compressed together: linears fed the same tensor, or one fused experts module."""
    linears: tuple[str, ...] = ()
    experts: str | None = None


def flow_groups(layer, linears: dict[str, nn.Linear], experts: dict[str, nn.Module], x: torch.Tensor,
                kwargs: dict) -> list[Group]:
    """Order the layer's matrices as data flows through them; linears fed the same tensor form one group,
    a fused experts module is a group of its own."""
    calls: list[tuple[str, str, torch.Tensor | None]] = []  # tensors kept alive for the pass: identity is meaningful
    hooks = [mod.register_forward_pre_hook(lambda m, a, n=name: calls.append(("linear", n, a[0])))
             for name, mod in linears.items()]
    hooks += [mod.register_forward_pre_hook(lambda m, a, n=name: calls.append(("experts", n, None)))
              for name, mod in experts.items()]
    try:
        layer(x, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[Group] = []
    last_input = None
    seen = set()
    for kind, name, inp in calls:
        if (kind, name) in seen:
            continue
        seen.add((kind, name))
        if kind == "experts":
            groups.append(Group(experts=name))
        elif groups and inp is last_input and inp is not None:
            groups[-1] = Group(linears=groups[-1].linears + (name,))
        else:
            groups.append(Group(linears=(name,)))
        last_input = inp
    # never called on these inputs (e.g. unused experts): compressed last
    missing = tuple(n for n in linears if ("linear", n) not in seen)
    if missing:
        groups.append(Group(linears=missing))
    groups += [Group(experts=e) for e in experts if ("experts", e) not in seen]
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


class InMemory:
    """The layer I/O of a model held whole in memory: the layers are there, results are kept as they come.
    A streamed run passes its own (stream.StreamIO) that reads, writes and checkpoints each layer."""

    start_layer = 0

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers

    def load(self, li: int) -> nn.Module:
        return self.layers[li]

    def keep(self, name: str, result):
        return result

    def done(self, li: int, layer, acts, report) -> None:
        pass


@torch.inference_mode()
def calibrate(model, segments: torch.Tensor, method, *, batch_size: int = 8, sequential: bool = True,
              offload_bytes: int | None = 2 << 30, progress: bool = True, io=None,
              sink_weight: float = 1.0) -> CalibrationReport:
    """Compress every linear matrix in the decoder layers of `model` in place with `method`.

    `segments` [n, seqlen] are calibration token ids. `method.stats` names the statistics it needs
    ({"hessian"}, {"sqnorm"} or both); `method.compress(name, layer_index, W, stats)` returns an object with
    a `.weight` (the new dense weight) and whatever it wants kept (masks, codes, solve info).
    `sink_weight`: what each segment's first position (the attention sink) counts in the dense matrices'
    statistics (routed expert tokens have no positions and count once).

    `io` brings layers in and out (default: `InMemory`; streaming: stream.StreamIO): `io.start_layer` and,
    when it is above 0, `io.resume_acts(acts)` (the checkpointed inputs of that layer); `io.load(li)` before
    layer li is touched, `io.keep(name, result)` for what report.modules keeps of a matrix (a streamed run:
    its packed form, not dense copies), `io.done(li, layer, acts, report)` once it is compressed and `acts`
    hold the next layer's inputs.
    """
    if segments.ndim != 2 or segments.shape[0] == 0:
        raise PeakError("the calibration set is empty: need at least one segment of token ids")
    if batch_size < 1:
        raise PeakError(f"calibration batch size must be >= 1, got {batch_size}")
    layers, prefix = decoder_layers(model)
    moe = is_moe(model)
    if not any(compressible_linears(layer, moe) or fused_experts(layer) for layer in layers):
        raise PeakError(f"{type(model).__name__} has no linear layers peakllm can compress")
    check_method(model, method)  # refuse impossible settings before any work is done
    io = io if io is not None else InMemory(layers)
    report = CalibrationReport(layers=len(layers), calib_tokens=int(segments.numel()))
    t_start = time.perf_counter()
    if not set(method.stats) - {"tokens"}:  # e.g. magnitude, RTN: the data changes nothing, skip the passes
        report.calib_tokens = 0
        _compress_without_data(layers, prefix, moe, method, report, progress, io)
        report.seconds["total"] = time.perf_counter() - t_start
        return report
    acts, layer_kwargs = capture_inputs(model, segments, batch_size, offload_bytes)
    if io.start_layer:
        acts = io.resume_acts(acts)
    report.seconds["capture"] = time.perf_counter() - t_start
    bar = tqdm(total=len(layers), initial=io.start_layer, desc=f"calibrating ({method.name})", unit="layer",
               disable=not progress)
    try:
        for li in range(io.start_layer, len(layers)):
            layer = io.load(li)
            _compress_layer(layer, f"{prefix}.{li}", li, moe, method, acts, layer_kwargs, sequential, report, io,
                            sink_weight)
            t0 = time.perf_counter()
            nxt = Activations(acts.offload_bytes)
            for b in range(len(acts)):
                nxt.append(layer_output(layer(acts[b], **layer_kwargs[b][li])))
            acts.close()
            acts = nxt
            report.seconds["forward"] += time.perf_counter() - t0
            io.done(li, layer, acts, report)
            bar.update(1)
    finally:
        bar.close()
        acts.close()
    report.seconds["total"] = time.perf_counter() - t_start
    return report


def _compress_layer(layer, prefix: str, li: int, moe: bool, method, acts: Activations, layer_kwargs,
                    sequential: bool, report: CalibrationReport, io, sink_weight: float = 1.0) -> None:
    """Every group of one layer, each calibrated on the layer's inputs with the earlier groups compressed."""
    linears = compressible_linears(layer, moe)
    experts = fused_experts(layer)
    if not (linears or experts):
        return
    if sequential:
        groups = flow_groups(layer, linears, experts, acts[0], layer_kwargs[0][li])
    else:
        groups = [Group(linears=tuple(linears))] + [Group(experts=e) for e in experts]
    kinds = set(method.stats)
    for group in groups:
        if group.experts is not None:
            for part in PARTS:
                stats = collect_expert_stats(layer, experts[group.experts], part, acts, layer_kwargs, li, kinds,
                                             report)
                compress_experts(f"{prefix}.{group.experts}", experts[group.experts], part, stats, method, li,
                                 report, io.keep)
                # freed before the next part's are collected: an OLMoE layer's 65 gate/up Hessians are 1.1 GB,
                # which sat beside the down statistics until they were complete
                del stats
            continue
        stats = collect_group(layer, {n: linears[n] for n in group.linears}, acts, layer_kwargs, li, kinds,
                              report.seconds, stop_early=sequential, sink_weight=sink_weight)
        t0 = time.perf_counter()
        solves = workers().solve(list(group.linears), lambda n: method.compress(f"{prefix}.{n}", li,
                                                                                linears[n].weight.data, stats.pop(n)))
        for name, result in solves:
            if result is not None:  # None: the method keeps this matrix as it is
                _store(linears[name], f"{prefix}.{name}", result, report, io)
            report.seconds["solver"] += time.perf_counter() - t0
            t0 = time.perf_counter()


def _store(mod: nn.Linear, full: str, result, report: CalibrationReport, io) -> None:
    mod.weight.data.copy_(result.weight.to(mod.weight.dtype))
    report.modules[full] = io.keep(full, result.held_in(mod.weight.data))
    info = getattr(result, "info", None)
    if info is not None:
        report.damping_escalations += int(info.retries > 0)
        report.fallbacks += int(info.fallback_rtn)


def _compress_without_data(layers, prefix: str, moe: bool, method, report: CalibrationReport, progress: bool,
                           io) -> None:
    bar = tqdm(total=len(layers), initial=io.start_layer, desc=f"compressing ({method.name})", unit="layer",
               disable=not progress)
    for li in range(io.start_layer, len(layers)):
        layer = io.load(li)
        t0 = time.perf_counter()
        for name, mod in compressible_linears(layer, moe).items():
            full = f"{prefix}.{li}.{name}"
            result = method.compress(full, li, mod.weight.data, {"tokens": 0})
            if result is not None:
                mod.weight.data.copy_(result.weight.to(mod.weight.dtype))
                report.modules[full] = io.keep(full, result.held_in(mod.weight.data))
        report.seconds["solver"] += time.perf_counter() - t0
        for name, experts in fused_experts(layer).items():
            for part in PARTS:
                E = getattr(experts, part).shape[0]
                compress_experts(f"{prefix}.{li}.{name}", experts, part, [{"tokens": 0}] * E, method, li, report,
                                 io.keep)
        io.done(li, layer, None, report)
        bar.update(1)
    bar.close()
