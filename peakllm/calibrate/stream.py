"""The layer I/O of a streamed compression (run_streamed.py): `StreamIO` is what `calibrate()` calls around
each layer to read it from the input's shards just before it is needed (models/stream.py), write it to the
output's shard as soon as it is compressed (formats/shards.py), checkpoint what a restart needs
(checkpoint.py), and drop it. Also OWL's statistics pass over a model read layer by layer.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from peakllm import memory
from peakllm.calibrate.checkpoint import Checkpoint, report_state
from peakllm.calibrate.distributed import workers
from peakllm.calibrate.stats import Activations, capture_inputs, Stats
from peakllm.errors import PeakError
from peakllm.formats.sub1_code import code_counts
from peakllm.formats.writer import layer_tensors, packed_module
from peakllm.models.anatomy import compressible_linears, is_moe, layer_output
from peakllm.progress import tqdm

KILL_ENV = "PEAKLLM_KILL_AFTER_LAYER"  # fault injection for tests: SIGKILL self once this layer is committed


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


class StreamIO:
    """What calibrate() calls around each layer in streaming mode."""

    def __init__(self, streamed, writer, ckpt: Checkpoint, fmt: str, state: dict | None, run_state: dict,
                 eval_kwargs, eval_dense: list, eval_comp: list, offload_bytes):
        self.sm, self.writer, self.ckpt, self.fmt = streamed, writer, ckpt, fmt
        self.state, self.run_state = state, run_state
        self.start_layer = state["layers_done"] if state else 0
        self.eval_kwargs, self.eval_dense, self.eval_comp = eval_kwargs, eval_dense, eval_comp
        self.offload_bytes = offload_bytes
        self.seconds = {"read": 0.0, "write": 0.0, "evaluation": 0.0}
        self._outer_loaded = True
        self.mask_zeros, self.mask_total = (state or {}).get("mask", (0, 0))
        self.ternary_counts = (state or {}).get("ternary_counts", [0, 0, 0])
        self.rss_after_layer = (state or {}).get("rss_after_layer", [])
        self.is_writer = workers().is_writer  # with torchrun, worker 0 alone writes shards and checkpoints

    def resume_acts(self, acts):
        acts.close()
        out = Activations(self.offload_bytes)
        for t in self.ckpt.tensors(self.state, "calib"):
            out.append(t)
        return out

    def _eval_through(self, layer, li: int, acts: list) -> list:
        t0 = time.perf_counter()
        out = [layer_output(layer(x, **self.eval_kwargs[w][li])) for w, x in enumerate(acts)]
        self.seconds["evaluation"] += time.perf_counter() - t0
        return out

    def load(self, li: int):
        if self._outer_loaded:  # the embedding was needed only to capture the inputs of layer 0
            self.sm.release_outer()
            self._outer_loaded = False
        t0 = time.perf_counter()
        layer = self.sm.load_layer(li)
        self.seconds["read"] += time.perf_counter() - t0
        if self.eval_dense:
            self.eval_dense = self._eval_through(layer, li, self.eval_dense)
        return layer

    def keep(self, name: str, result):
        """The packed form of a compressed matrix (its dense weight is already in the layer)."""
        if getattr(result, "mask", None) is not None:
            self.mask_zeros += int((~result.mask).sum())
            self.mask_total += result.mask.numel()
        quant = getattr(result, "quant", None)
        if self.fmt == "gguf":  # its codes in the block type, written at their offsets in the .gguf file
            if getattr(result, "ggml", None) is None:
                raise PeakError(f"--format gguf stores matrices solved onto a GGUF block type; {name} is not")
            return _Kept(result.ggml)
        if self.fmt == "sub1" and quant is not None and quant.grid["kind"] == "ternary":
            # stored as 2-bit ternary for now; re-encoded once the model-wide dictionary is known
            self.ternary_counts = [a + b for a, b in zip(self.ternary_counts, code_counts(quant.codes))]
        return _Kept(None if self.fmt == "hf" else packed_module(result, "peakllm" if self.fmt == "sub1" else self.fmt))

    def done(self, li: int, layer, acts, report) -> None:
        if self.eval_comp:
            self.eval_comp = self._eval_through(layer, li, self.eval_comp)
        t0 = time.perf_counter()
        prefix = f"{self.sm.prefix}.{li}."
        results = {n: report.modules.pop(n) for n in [n for n in report.modules if n.startswith(prefix)]}
        kept = {n: r for n, r in results.items() if isinstance(r, _Kept)}
        for n, r in results.items():  # fused experts' results come straight from experts.py
            if n not in kept:
                kept[n] = self.keep(n, r)
        dense, packed = layer_tensors(layer, prefix, {n: r.packed for n, r in kept.items()}, self.fmt)
        if self.is_writer:
            self.writer.write(li, dense, packed)
        self.sm.release_layer(li)
        del dense, packed, results, kept
        memory.release_free_heap()
        self.seconds["write"] += time.perf_counter() - t0
        # a generator: activations spilled to disk are read back one batch at a time, not all at once
        tensors = {"calib": (acts[b] for b in range(len(acts))) if acts is not None else [],
                   "evald": self.eval_dense, "evalc": self.eval_comp}
        self.rss_after_layer.append(memory.rss_bytes())
        state = {**self.run_state, "writer": self.writer.state(), "report": report_state(report),
                 "rss_after_layer": self.rss_after_layer,
                 "io_seconds": self.seconds, "mask": (self.mask_zeros, self.mask_total),
                 "ternary_counts": self.ternary_counts}
        if self.is_writer:
            self.ckpt.save(li, tensors, state)
        if os.environ.get(KILL_ENV) == str(li):
            os.kill(os.getpid(), signal.SIGKILL)


class GGUFLayers:
    """A streamed run's .gguf output behind the shard writer's calls (formats/shards.py): each layer's tensors
    go to their offsets in the one file (formats/gguf's GGUFStreamWriter, its temporary file in the partial
    folder); the names written are all a resume needs, the file itself holding the tensors."""

    def __init__(self, out):
        self.out = out

    def write(self, k: int, dense: dict, packed: dict, outer: bool = False) -> None:
        for name, t in dense.items():
            self.out.write(name, t)
        for name, q in packed.items():  # module name -> GGMLWeight
            self.out.write(f"{name}.weight", q)

    def state(self) -> dict:
        return {"written": sorted(self.out.done)}


class _Kept:
    """What report.modules holds of a streamed matrix until its layer is written."""
    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


@torch.inference_mode()
def streamed_layer_sqnorms(sm, segments: torch.Tensor, batch_size: int, offload_bytes, on_layer,
                           progress: bool = True) -> None:
    """One pass of the calibration data through the dense model, layer by layer from disk:
    `on_layer(li, layer, {name: sum_t x^2 of its inputs})` while each layer is loaded (OWL's statistics;
    the same batches and calls as `calibrate.input_sqnorms` on the whole model)."""
    sm.load_outer("input")
    acts, kwargs = capture_inputs(sm.model, segments, batch_size, offload_bytes)
    sm.release_outer()
    moe = is_moe(sm.model)
    try:
        for li in tqdm(range(len(sm.layers)), desc="outlier statistics (streamed)", unit="layer",
                       disable=not progress, leave=False):
            layer = sm.load_layer(li)
            stats = {n: Stats(m.in_features, {"sqnorm"}, "cpu") for n, m in compressible_linears(layer, moe).items()}
            hooks = [m.register_forward_pre_hook(lambda mod, a, s=stats[n]: s.add(a[0]))
                     for n, m in compressible_linears(layer, moe).items()]
            nxt = Activations(offload_bytes)
            try:
                for b in range(len(acts)):
                    nxt.append(layer_output(layer(acts[b], **kwargs[b][li])))
            finally:
                for h in hooks:
                    h.remove()
            acts.close()
            acts = nxt
            on_layer(li, layer, {f"{sm.prefix}.{li}.{n}": s.finish()["sqnorm"] for n, s in stats.items()})
            sm.release_layer(li)
    finally:
        acts.close()


