"""Pages of memory-mapped weights: which file mapping a tensor lives in, whether this process has written it,
how many of its pages are resident, and giving pages back (`madvise`). Used by the offloader
(runtime/offload.py) and by the loader, which gives back the pages its load check touched in tensors that
decoding reads only a few rows of (the embedding).

A peakllm folder's tensors are views of private memory maps of its files (formats/tensor_file.py `_map`).
Dropping an unwritten page of such a map (`MADV_DONTNEED`) only unmaps it from this process: the next read
faults it back in from the page cache or the file, with the same bytes.
"""

from __future__ import annotations

import ctypes
import os

from torch import nn

PAGE = os.sysconf("SC_PAGE_SIZE")
MADV_RANDOM, MADV_WILLNEED, MADV_DONTNEED, MADV_POPULATE_READ = 1, 3, 4, 22

libc = ctypes.CDLL(None, use_errno=True)  # CDLL calls release the GIL: read-ahead overlaps compute
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.restype = ctypes.c_int


def file_mappings() -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of every file-backed mapping of this process."""
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            out.append((lo, hi, int(parts[2], 16), parts[5].rstrip("\n")))
    return out


def anonymous_kb() -> dict[int, int]:
    """{mapping start: its anonymous (copied-on-write) kilobytes} from /proc/self/smaps."""
    out, start = {}, None
    with open("/proc/self/smaps") as fh:
        for line in fh:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                start = int(first.split("-")[0], 16)
            elif first == "Anonymous:" and start is not None:
                out[start] = int(line.split()[1])
    return out


class Span:
    """Whole pages of one mapped file: [addr, addr + length) in memory, [offset, offset + length) on disk."""

    __slots__ = ("addr", "length", "path", "offset")

    def __init__(self, addr: int, length: int, path: str, offset: int):
        self.addr, self.length, self.path, self.offset = addr, length, path, offset


def storages(module: nn.Module, skip: set[int] = frozenset()) -> dict[int, int]:
    """{storage address: nbytes} of every tensor under `module` (modules in `skip` by id left out)."""
    found: dict[int, int] = {}
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in skip:
            continue
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None and t.device.type == "cpu" and not t.is_meta:
                s = t.untyped_storage()
                if s.nbytes():
                    found[s.data_ptr()] = max(found.get(s.data_ptr(), 0), s.nbytes())
        stack.extend(m._modules.values())
    return found


class Unit:
    """One evictable piece (a decoder layer's own weights, or one expert): its whole file pages."""

    def __init__(self, name: str, storages: dict[int, int], maps: list):
        self.name, self.spans, self.nbytes = name, [], sum(storages.values())
        ranges = []
        for ptr, n in storages.items():
            for lo, hi, off, path in maps:
                if lo <= ptr < hi:
                    a, b = -(-ptr // PAGE) * PAGE, (ptr + n) // PAGE * PAGE  # whole pages inside the tensor
                    if b > a:
                        ranges.append((a, b, off - lo, path))
                    break
        ranges.sort()
        for a, b, delta, path in ranges:  # merge touching ranges of one file
            last = self.spans[-1] if self.spans else None
            if last is not None and last.path == path and last.addr + last.length == a:
                last.length += b - a
            else:
                self.spans.append(Span(a, b - a, path, a + delta))
        self.mapped = sum(s.length for s in self.spans)


def expert_modules(mlp: nn.Module) -> list[list[nn.Module]] | None:
    """Per expert, the modules holding its weights (packed experts), or None for a block without them."""
    experts = getattr(mlp, "experts", None)
    if experts is not None and hasattr(experts, "gate_up") and hasattr(experts, "down"):
        return [[g, d] for g, d in zip(experts.gate_up, experts.down)]
    return None


def resident_bytes(unit: "Unit") -> int:
    """Bytes of the unit's pages mapped into this process now (/proc/self/pagemap's present bit). The page
    cache is not counted: the kernel's readahead may keep a window of neighbouring pages there."""
    import array

    total = 0
    with open("/proc/self/pagemap", "rb") as fh:
        for s in unit.spans:
            fh.seek(s.addr // PAGE * 8)
            entries = array.array("Q", fh.read(s.length // PAGE * 8))
            total += sum(1 for e in entries if e >> 63) * PAGE
    return total


def written(addr: int, maps: list, anon: dict[int, int]) -> bool:
    """Whether this process has written to the private file map holding `addr` (`anonymous_kb` of it): dropping
    a page of such a map would revert it to the file."""
    lo = next(lo for lo, hi, _off, _path in maps if lo <= addr < hi)
    return bool(anon.get(lo))


def release(module: nn.Module, maps: list | None = None, anon: dict[int, int] | None = None) -> int:
    """Unmap from this process the whole file pages of `module`'s tensors (they stay in the page cache, and the
    next read faults them back in); tensors that are not views of a file, and maps this process has written
    to, are left alone. Returns the bytes given back (what was resident is not known without pagemap).
    `maps` / `anon`: `file_mappings()` / `anonymous_kb()` read once by a caller releasing many modules
    (reading /proc/self/smaps costs ~30 ms)."""
    maps = file_mappings() if maps is None else maps
    unit = Unit("release", storages(module), maps)
    anon = anonymous_kb() if anon is None else anon
    given = 0
    for s in unit.spans:
        if not written(s.addr, maps, anon) and libc.madvise(s.addr, s.length, MADV_DONTNEED) == 0:
            given += s.length
    return given
