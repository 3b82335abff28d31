"""The process's memory: sizes parsed and printed, what the machine has available, this process's RSS and
peak, and how malloc returns freed heap. Every room may use it (a run's predicted peak, streamed or in
memory, is the pipeline's: calibrate/budget.py)."""

from __future__ import annotations

import os
import re

from peakllm.errors import PeakError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'4GB', '512MiB', '3.5g', '1000000' -> bytes (binary units: 1 GB = 2^30 bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PeakError(f"cannot read the size {text!r}: give e.g. 4GB, 512MB or a number of bytes")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise PeakError(f"a memory size must be positive, got {text!r}")
    return value


def _status(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes() -> int | None:
    return _status("MemAvailable", "/proc/meminfo")


def rss_bytes() -> int:
    return _status("VmRSS") or 0


def peak_rss_bytes() -> int:
    """VmHWM: the peak resident set of this process so far."""
    return _status("VmHWM") or 0


MMAP_THRESHOLD_ENV = "PEAKLLM_MMAP_THRESHOLD"


BUDGET_MMAP_THRESHOLD = 1 << 20


def mmap_threshold(budget: bool) -> int:
    """The malloc mmap threshold a streamed run fixes (0: leave glibc's moving one): $PEAKLLM_MMAP_THRESHOLD
    (bytes; 0 = leave it) when set, else 1 MiB under an explicit --max-memory, else 0. Why under a budget:
    glibc raises the threshold to 32 MiB after the first large free, and the solver's 1-32 MiB temporaries
    then fragment the heap within a layer. On a 2-layer OLMoE-shape run (random weights, 5GB budget) the
    resident set climbed 3.4 -> 4.4 GB while layer 0's 192 experts were solved, and stayed at 3.2-3.3 GB
    with the threshold fixed; the cost is an mmap and its page faults per large temporary (2048 x 2048
    GPTQ solve 1.8 -> 2.1 s, README)."""
    text = os.environ.get(MMAP_THRESHOLD_ENV, "").strip()
    if text:
        try:
            return max(0, int(text))
        except ValueError:
            raise PeakError(f"${MMAP_THRESHOLD_ENV} must be a number of bytes, got {text!r}") from None
    return BUDGET_MMAP_THRESHOLD if budget else 0


def release_free_heap(setup: bool = False, budget: bool = False) -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim): a streamed run's many 1-32 MiB
    temporaries otherwise stay in the heap and the resident set grows layer after layer. With setup=True,
    also fix malloc's mmap threshold at `mmap_threshold(budget)` when that is not 0."""
    import ctypes
    import ctypes.util

    threshold = mmap_threshold(budget) if setup else 0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if threshold > 0:
            libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def reset_peak_rss() -> bool:
    """Start VmHWM again from the current resident set (Linux: 5 > /proc/self/clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def io_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (/proc/self/io read_bytes; page cache hits not counted)."""
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def gb(n: float) -> str:
    return f"{n / (1 << 30):.2f} GB"


def size_text(n: float) -> str:
    """A size in GiB, or MiB below one GiB."""
    return f"{n / (1 << 30):.2f} GiB" if abs(n) >= 1 << 30 else f"{n / (1 << 20):.2f} MiB"


