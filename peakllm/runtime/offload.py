"""Running a model whose weights exceed a memory budget (`--max-memory`): decoder layers streamed from
disk with read-ahead, and a MoE's experts held in an LRU cache, both over the memory maps the loader made.

A peakllm folder's tensors are views of private memory maps of its files (formats/tensor_file.py `_map`), so a
weight is read from disk when first touched and nothing is ever copied. This module decides which of those
pages may stay in memory:

- the budget covers the model's weights in memory (mapped pages, and the page cache behind them) and its KV
  cache; with `whole_process` (what `--max-memory` means on the command line) it covers the whole process:
  what the process holds besides the model's mapped pages when the plan is made (interpreter, torch,
  tokenizer, derived tensors: ~0.3-0.5 GB, measured) and the forward's transient buffers (`workspace`, the
  caller's bound) come off the budget first;
- what is not a decoder layer's (embeddings, lm_head, final norm) and every tensor that is not a view of a
  file (small derived copies) stays resident; a layer's own weights are a *unit*, and so is each expert;
- dense layers: the first layers that fit stay pinned; the others stream through `ahead + 1` slots: while
  layer i computes, a background thread faults layer i+1 in (`madvise(MADV_POPULATE_READ)`, which reads
  from disk without holding the GIL); after layer i its pages are dropped from the process
  (`MADV_DONTNEED`) and from the page cache (`POSIX_FADV_DONTNEED`), so the next token reads it from disk
  again, which is what a machine without the memory would have to do;
- MoE layers: attention and routers stay resident; experts are faulted in on demand when the router
  picks them (the kernels simply touch the mapped bytes; $PEAKLLM_EXPERT_READAHEAD=off turns the kernel's
  readahead off for experts, `MADV_RANDOM`, so a miss reads its expert only), and after each layer the least recently used experts
  beyond the cache's capacity are dropped the same way.

Offloading changes where bytes live, never what is computed: the kernels read the same addresses, so an
offloaded run's tokens equal the in-memory run's bit for bit (tests/test_offload.py).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from torch import nn

from peakllm.errors import PeakError
from peakllm.kernels.decode import Step
from peakllm.memory import rss_bytes
from peakllm.memory import size_text as t
from peakllm.runtime.pages import (MADV_DONTNEED, MADV_POPULATE_READ, MADV_RANDOM, MADV_WILLNEED, PAGE, anonymous_kb,
                                   expert_modules, file_mappings, libc, resident_bytes, storages, Unit, written)

EXPERT_READAHEAD_ENV = "PEAKLLM_EXPERT_READAHEAD"  # on (default) | off


class Offload:
    """The budget's plan for one RuntimeModel and the hooks its forward calls around each layer."""

    def __init__(self, model: nn.Module, budget: int, kv_bytes: int, ahead: int = 1, whole_process: bool = False,
                 workspace: int = 0):
        if ahead < 1:
            raise PeakError("offload read-ahead must be at least one layer")
        maps = file_mappings()
        self.budget, self.kv_bytes, self.ahead = int(budget), int(kv_bytes), ahead
        self.whole_process, self.workspace = whole_process, int(workspace) if whole_process else 0
        self.layers: list[Unit] = []
        self.experts: list[list[Unit]] = []  # per layer; empty for dense layers
        unit_ptrs: set[int] = set()
        for i, layer in enumerate(model.layers):
            per_expert = expert_modules(layer.mlp)
            skip = {id(m) for ms in per_expert or [] for m in ms}
            own = storages(layer, skip)
            self.layers.append(Unit(f"layer {i}", own, maps))
            unit_ptrs.update(own)
            self.experts.append([])
            for e, ms in enumerate(per_expert or []):
                found = storages(nn.ModuleList(ms))
                self.experts[i].append(Unit(f"layer {i} expert {e}", found, maps))
                unit_ptrs.update(found)
        everything = storages(model)
        self.process = 0  # what the process holds besides the model's mapped weights (whole_process only)
        if whole_process:  # tensors that are not views of a file are in the process's measured memory
            self.process = rss_bytes() - resident_bytes(Unit("model", everything, maps))
            everything = {p: n for p, n in everything.items() if any(lo <= p < hi for lo, hi, _, _ in maps)}
        self.fixed = sum(n for p, n in everything.items() if p not in unit_ptrs) + self.kv_bytes
        self._check_unwritten(maps)
        self.moe = any(self.experts)
        self._plan()
        units = [self.layers[i] for i in self.streamed] + [u for us in self.experts for u in us]
        if not self.all_resident and any(u.nbytes > 4 * PAGE and not u.spans for u in units):
            raise PeakError("--max-memory needs weights memory-mapped from their files (a peakllm folder, or a "
                            "safetensors folder already in the run's dtype); this model's weights were copied into "
                            "memory (write a folder first, e.g. `peakllm quantize ... --output DIR`, and run that)")
        if self.moe and not self.all_resident and os.environ.get(EXPERT_READAHEAD_ENV, "on") == "off":
            # The kernels fault a routed expert's pages in one by one and the kernel's file readahead reads its
            # neighbours too, dropped unused: ~6x the plan's bytes from disk. Off, a miss reads only its expert,
            # but page by page: 20-25 % slower on the dev machine's disk (README), so readahead stays on.
            for sp in (sp for us in self.experts for u in us for sp in u.spans):
                libc.madvise(sp.addr, sp.length, MADV_RANDOM)
        self._fds: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peakllm-readahead")
        self._pending: dict[int, Future] = {}
        self._resident: set[int] = set(range(len(self.layers)))  # streamed layers are dropped on first use
        self.lru: OrderedDict = OrderedDict()  # (layer, expert) -> None, least recently used first
        self.routes: list[tuple[int, list[int]]] = []  # (layer, experts picked) since the last hook
        self.phase = "prefill"  # set by RuntimeModel.forward: counts go to stats[phase]
        self._observed = []
        for i, layer in enumerate(model.layers):  # the op-by-op path reports its experts' routes
            experts = getattr(layer.mlp, "experts", None)
            if hasattr(experts, "on_route"):
                experts.on_route = functools.partial(self.route, i)
                self._observed.append(experts)
        self.stats = {ph: {"steps": 0, "expert_hits": 0, "expert_misses": 0, "layer_reads": 0, "bytes_read": 0}
                      for ph in ("prefill", "decode")}

    # ---- the plan ----------------------------------------------------------------------------------
    def _plan(self) -> None:
        sizes = [u.nbytes for u in self.layers]
        base = self.process + self.workspace + self.fixed
        avail = self.budget - base
        need = base + sum(sizes) + sum(u.nbytes for us in self.experts for u in us)
        self.all_resident = need <= self.budget
        self.pinned = list(range(len(sizes)))
        self.streamed: list[int] = []
        self.capacity = None
        if self.all_resident:
            return
        if self.moe:
            exp = max(u.nbytes for us in self.experts for u in us)
            top_k = 1  # the layer's misses are dropped right after it: one expert of room is the minimum
            room = avail - sum(sizes)
            if room < top_k * exp:
                raise PeakError(self._too_small(sum(sizes) + top_k * exp, "every layer's attention and router plus one "
                                                                          "expert"))
            self.capacity = int(room // exp) - top_k
            return
        biggest = max(sizes)
        slots = (self.ahead + 1) * biggest
        if avail < slots:
            raise PeakError(self._too_small(slots, f"{self.ahead + 1} layers (one computing, {self.ahead} read ahead)"))
        used, self.pinned = 0, []
        for i, n in enumerate(sizes):
            if used + n + slots > avail:
                break
            self.pinned.append(i)
            used += n
        self.streamed = [i for i in range(len(sizes)) if i not in self.pinned]

    def _too_small(self, need_more: int, what: str) -> str:
        process = (f"the process itself holds {t(self.process)} (Python, torch, tokenizer) and its forward needs "
                   f"up to {t(self.workspace)}, " if self.whole_process else "")
        base = self.process + self.workspace + self.fixed
        return (f"--max-memory {t(self.budget)} is too small: {process}the resident part (embeddings, lm_head, "
                f"norms, KV cache) takes {t(self.fixed)} and {what} need {t(need_more)} more; the smallest budget "
                f"that runs is {t(base + need_more)}")

    def predicted_peak(self) -> int:
        """The plan's peak: what the budget counts (whole process: the process and the forward's workspace too)
        with every pinned layer and the streaming slots (or the expert cache) full."""
        sizes = [u.nbytes for u in self.layers]
        peak = self.process + self.workspace + self.fixed
        if self.all_resident:
            return peak + sum(sizes) + sum(u.nbytes for us in self.experts for u in us)
        if self.moe:
            exp = max(u.nbytes for us in self.experts for u in us)
            return peak + sum(sizes) + (self.capacity + 1) * exp
        return peak + sum(sizes[i] for i in self.pinned) + (self.ahead + 1) * max(sizes)

    def _check_unwritten(self, maps) -> None:
        """Dropping a page of a private map reverts it to the file: refuse if a mapped weight was written."""
        anon = anonymous_kb()
        for u in self.layers + [u for us in self.experts for u in us]:
            for s in u.spans:
                if written(s.addr, maps, anon):
                    raise PeakError(f"{u.name}: its mapped weights were modified in memory ({s.path}); "
                                    "offloading would drop the changes")

    def describe(self) -> dict:
        out = {"budget_bytes": self.budget, "resident_bytes": self.fixed, "all_resident": self.all_resident,
               "layer_bytes": sum(u.nbytes for u in self.layers), "whole_process": self.whole_process,
               "predicted_peak_bytes": self.predicted_peak()}
        if self.whole_process:
            out.update(process_bytes=self.process, workspace_bytes=self.workspace)
        if self.moe:
            out.update(expert_capacity=self.capacity, experts=sum(len(us) for us in self.experts),
                       expert_bytes=max(u.nbytes for us in self.experts for u in us))
        else:
            out.update(pinned_layers=len(self.pinned), streamed_layers=len(self.streamed),
                       streamed_bytes_per_token=sum(self.layers[i].nbytes for i in self.streamed))
        return out

    # ---- page movement -----------------------------------------------------------------------------
    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    @staticmethod
    def _populate(unit: Unit) -> None:
        for s in unit.spans:
            if libc.madvise(s.addr, s.length, MADV_POPULATE_READ) != 0:  # kernels before 5.14: hint, then touch
                if ctypes.get_errno() != errno.EINVAL:  # not an old kernel: e.g. the mapping is gone (ENOMEM)
                    return  # touching it would fault; a span still mapped is faulted in when the kernel reads it
                libc.madvise(s.addr, s.length, MADV_WILLNEED)
                for a in range(s.addr, s.addr + s.length, PAGE):
                    ctypes.c_char.from_address(a).value  # noqa: B018 (the read faults the page in)

    def _drop(self, unit: Unit) -> None:
        for s in unit.spans:
            if libc.madvise(s.addr, s.length, MADV_DONTNEED) != 0:
                raise PeakError(f"cannot release {unit.name}'s pages: {os.strerror(ctypes.get_errno())}")
            os.posix_fadvise(self._fd(s.path), s.offset, s.length, os.POSIX_FADV_DONTNEED)

    def _fetch(self, i: int) -> None:
        if i not in self._pending and i not in self._resident:
            self._pending[i] = self._pool.submit(self._populate, self.layers[i])

    # ---- hooks (RuntimeModel calls them around each layer) ------------------------------------------
    def before(self, i: int) -> None:
        if i == 0:
            self.stats[self.phase]["steps"] += 1
        if self.all_resident:
            return
        if i == 0 and self.streamed:
            self._fetch(self.streamed[0])  # read ahead while the pinned layers compute
        if i in self.streamed:
            self._fetch(i)
            fut = self._pending.pop(i, None)
            if fut is not None:
                fut.result()
                self._resident.add(i)
                self.stats[self.phase]["layer_reads"] += 1
                self.stats[self.phase]["bytes_read"] += self.layers[i].mapped
            k = self.streamed.index(i)
            for j in range(1, self.ahead + 1):  # the next layers to stream, wrapping to the next token's
                self._fetch(self.streamed[(k + j) % len(self.streamed)])

    def after(self, i: int) -> None:
        if self.all_resident:
            return
        if i in self.streamed and len(self.streamed) > self.ahead:
            self._drop(self.layers[i])
            self._resident.discard(i)
        if self.moe and self.experts[i]:
            self._experts_after(i)

    def route(self, layer: int, experts) -> None:
        """The experts a layer's router picked (called by the op-by-op path and the engine's readout)."""
        if self.all_resident:
            return
        self.routes.append((layer, [int(e) for e in experts]))

    def _experts_after(self, i: int) -> None:
        picked = [e for layer, es in self.routes if layer == i for e in es]
        self.routes = [r for r in self.routes if r[0] != i]
        for e in dict.fromkeys(picked):
            key = (i, e)
            st = self.stats[self.phase]
            if key in self.lru:
                st["expert_hits"] += 1
                self.lru.move_to_end(key)
            else:
                st["expert_misses"] += 1
                st["bytes_read"] += self.experts[i][e].mapped
                self.lru[key] = None
        while len(self.lru) > self.capacity:
            (li, e), _ = self.lru.popitem(last=False)
            self._drop(self.experts[li][e])
        for e, unit in enumerate(self.experts[i]):  # touched without a readout (prefill): not kept
            if (i, e) not in self.lru:
                self._drop(unit)

    def summary(self, phase: str = "decode") -> dict:
        """Per step of `phase`: bytes the plan read from disk, and the expert cache's hit rate."""
        st = self.stats[phase]
        steps = max(st["steps"], 1)
        out = {"offload_bytes_read_per_step": st["bytes_read"] / steps}
        if self.moe:
            picked = st["expert_hits"] + st["expert_misses"]
            out["expert_hit_rate"] = st["expert_hits"] / picked if picked else None
        return out

    def reset_stats(self) -> None:
        for st in self.stats.values():
            for k in st:
                st[k] = 0

    def start(self) -> None:
        """Drop every streamed layer and uncached expert now (the loader's checksum may have read them)."""
        if self.all_resident:
            return
        for i in self.streamed:
            self._drop(self.layers[i])
            self._resident.discard(i)
        for us in self.experts:
            for unit in us:
                self._drop(unit)

    def close(self) -> None:
        for experts in self._observed:  # unless a later Offload over the same modules has hooked them since
            hook = experts.on_route
            if isinstance(hook, functools.partial) and getattr(hook.func, "__self__", None) is self:
                experts.on_route = None
        self._observed = []
        self._pool.shutdown(wait=True, cancel_futures=True)  # a read-ahead not started is not needed any more
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class OffloadStep:
    """The decode engine in groups of layers with the offload hooks between them: the pinned layers in one
    C call, every streamed (or MoE) layer in its own; the same `run` as kernels/decode.py `Step`."""

    def __init__(self, layers: list, head, dtype, batch: int, keep: list, offload: Offload, chosen: list):
        self.offload, self.chosen = offload, chosen  # chosen[i]: layer i's engine top-k readout, or None
        cut = 0 if offload.moe else len(offload.pinned)
        bounds = ([(0, cut)] if cut else []) + [(i, i + 1) for i in range(cut, len(layers))]
        self.groups = [(a, b, Step(layers[a:b], head if b == len(layers) else None, dtype, batch, keep))
                       for a, b in bounds]

    def run(self, x, h, pos, cos, sin_signed, threads):
        off, logits = self.offload, None
        for a, b, step in self.groups:
            for i in range(a, b):
                off.before(i)
            logits = step.run(x, h, pos, cos, sin_signed, threads)
            for i in range(a, b):
                if self.chosen[i] is not None:
                    off.route(i, self.chosen[i].tolist())
                off.after(i)
        return logits
