"""Just-in-time build of the C++ kernels into a cached shared library, loaded with ctypes.

Why ctypes and not torch.utils.cpp_extension: a plain `g++ -O3 -march=native -fopenmp` build of one
file takes about a second (no torch headers), and `-march=native` is how the AVX2 / AVX-512 paths are
selected for the machine that runs the code. The library is cached under
$PEAKLLM_CACHE/kernels/<hash of source + flags + cpu>/ and written atomically (temp file, rename).
If no compiler is found, or the build fails, `load_library` returns None after one warning and
callers use their pure-torch reference instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from peakllm.paths import cache_dir

HERE = Path(__file__).resolve().parent
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=fast"]
# flags one source adds after CXX_FLAGS: ggml_fit reproduces torch's fp32 arithmetic step by step, no fused a*b+c
SOURCE_FLAGS = {"ggml_fit": ["-ffp-contract=off"]}

_loaded: dict[str, ctypes.CDLL | None] = {}
_warned: set[str] = set()


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return hashlib.sha256(line.encode()).hexdigest()[:12]
    except OSError:
        pass
    return platform.machine()


def _warn_once(name: str, msg: str) -> None:
    # One line per process, not one per library: without a compiler every library fails the same way.
    if not _warned:
        _warned.add(name)
        warnings.warn(f"peakllm: {msg}; using the slower pure-torch path", RuntimeWarning, stacklevel=3)


def load_library(name: str) -> ctypes.CDLL | None:
    """Build (once) and load kernels/<name>.cpp; None with a one-line warning when that is impossible."""
    if name in _loaded:
        return _loaded[name]
    lib = None
    if os.environ.get("PEAKLLM_NO_KERNELS"):
        _warn_once(name, "PEAKLLM_NO_KERNELS is set")
    else:
        try:
            lib = ctypes.CDLL(str(_build(name)))
        except Exception as exc:  # noqa: BLE001 - any build/load failure means: fall back
            _warn_once(name, f"could not build the C++ kernel '{name}' ({str(exc).splitlines()[0][:200]})")
    _loaded[name] = lib
    return lib


def _build(name: str) -> Path:
    src = HERE / f"{name}.cpp"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++)")
    headers = b"".join(h.read_bytes() for h in sorted(HERE.glob("*.h")))  # a header change must rebuild too
    flags = CXX_FLAGS + SOURCE_FLAGS.get(name, [])
    key = hashlib.sha256(src.read_bytes() + headers + " ".join([cxx, *flags, _cpu_tag()]).encode()).hexdigest()[:16]
    out_dir = cache_dir() / "kernels" / key
    lib_path = out_dir / f"lib{name}.so"
    if lib_path.exists():
        return lib_path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, f"-I{HERE}", str(src), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[:2000]}")
        os.replace(tmp, lib_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib_path


def ptr(t) -> ctypes.c_void_p:
    """Raw data pointer of a contiguous torch tensor, for passing to a kernel."""
    assert t.is_contiguous(), "kernels take contiguous tensors"
    return ctypes.c_void_p(t.data_ptr())
