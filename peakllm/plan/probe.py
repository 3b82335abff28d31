"""A short probe of this machine, the measured rates the plan's costs are computed from, cached per machine.

- decode: GB/s the runtime's own int-k kernel (`IntKLinear`, batch 1, its default activations) reads packed
  weights at, per code width, on a matrix far larger than the last-level cache: bandwidth with the engine's
  access pattern and its efficiency in one figure, so tok/s = rate / bytes read per token;
- solver: GFLOP/s of an fp32 matmul (the Hessians, forwards and GPTQ's updates are matmuls) and weights/s of
  round-to-nearest (solvers.rtn, which is memory-bound);
- disk: GB/s reading a file just written, its pages dropped from the page cache first (offloaded decoding).

Cached in `$PEAKLLM_CACHE/plan-probe.json` under the CPU model, the kernel-relevant flags and the thread
count; `refresh` measures again.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from peakllm.paths import cache_dir

PROBE_VERSION = 2
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni")
DECODE_BITS = (2, 3, 4, 8)


@dataclass
class Probe:
    machine: str                      # CPU model, flags, threads: the cache key
    intk_gb_s: dict                   # code width (str) -> GB/s of packed weights the int-k kernel reads
    matmul_gflop_s: float
    rtn_weights_per_s: float
    disk_gb_s: float
    seconds: float                    # what the probe took


def machine_key() -> str:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return f"{model} [{' '.join(f for f in FLAGS if f in flags)}] threads={torch.get_num_threads()}"


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm: the kernel's first call builds and binds
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def intk_rate(bits: int, size_bytes: int = 48 << 20, repeats: int = 5) -> float:
    """GB/s of packed codes (and their scales) one batch-1 product through IntKLinear reads."""
    from peakllm.formats.intk import PackedIntK
    from peakllm.runtime.linear import IntKLinear

    cols, group = 4096, 128
    rows = max(256, size_bytes * 8 // (cols * bits))
    codes = torch.randint(0, 1 << bits, (rows, cols), dtype=torch.uint8)
    scales = torch.rand(rows, cols // group) / 64
    packed = PackedIntK.from_codes(codes, scales, torch.full_like(scales, 1 << (bits - 1)), bits=bits,
                                   group_size=group)
    del codes
    lin = IntKLinear(cols, rows, bits, group, packed.qweight, packed.scales, packed.zeros)
    x = torch.randn(1, cols)
    nbytes = sum(t.numel() * t.element_size() for t in (packed.qweight, packed.scales, packed.zeros))
    with torch.inference_mode():
        return nbytes / _best_seconds(lambda: lin(x), repeats) / 1e9


def matmul_rate(n: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / _best_seconds(lambda: a @ b, repeats) / 1e9


def rtn_rate(repeats: int = 2) -> float:
    from peakllm.solvers import Grid, rtn

    W = torch.randn(1024, 4096)
    return W.numel() / _best_seconds(lambda: rtn(W, Grid(bits=4, group_size=128)), repeats)


def disk_rate(size_bytes: int = 128 << 20) -> float:
    """GB/s reading a file after its pages were dropped from the page cache (posix_fadvise DONTNEED)."""
    with tempfile.NamedTemporaryFile(dir=cache_dir(), prefix=".disk-probe-") as fh:
        fh.write(os.urandom(1 << 20) * (size_bytes >> 20))
        fh.flush()
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        with open(fh.name, "rb", buffering=0) as r:
            while r.read(8 << 20):
                pass
        return size_bytes / (time.perf_counter() - t0) / 1e9


def measure() -> Probe:
    t0 = time.perf_counter()
    intk = {str(b): intk_rate(b) for b in DECODE_BITS}
    return Probe(machine_key(), intk, matmul_rate(), rtn_rate(), disk_rate(), time.perf_counter() - t0)


def probe(refresh: bool = False) -> Probe:
    """This machine's rates: from the cache, or measured now (a few seconds) and cached."""
    path = cache_dir() / "plan-probe.json"
    key = machine_key()
    cached = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
    entry = cached.get(key)
    if entry and not refresh and entry.get("version") == PROBE_VERSION:
        return Probe(**{k: v for k, v in entry.items() if k != "version"})
    result = measure()
    cached[key] = {**asdict(result), "version": PROBE_VERSION}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cached, indent=1))
    tmp.replace(path)  # temp path then rename: a concurrent reader sees the old file or the new one
    return result
