"""One results line: what a benchmark appends to docs/results/*.jsonl, stamped with where it came from.

Every benchmark that appends a JSON line calls `append(path, row)`: the row gets the command line that ran it,
the commit of the tree (and whether it had uncommitted changes), the machine (CPU model, the instruction-set
flags the kernels choose between, threads, load average) and the date, so `peakllm report --docs` can say
under each table where its numbers come from. Fields the row already has are left alone.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

# the flags the kernels dispatch on (kernels/*.h): AVX2 paths, AVX-512 paths, VNNI int8 dot products, bf16 GEMM
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
REPO = Path(__file__).resolve().parent.parent


def cpu() -> dict:
    """CPU model and the relevant flags from /proc/cpuinfo (empty where it cannot be read)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model or "unknown", "flags": [f for f in FLAGS if f in flags]}


def commit() -> dict:
    """HEAD of the repository the benchmark runs from, and whether the tree had uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    if head.returncode != 0:
        return {"commit": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def machine(threads: int | None = None) -> dict:
    """The machine as a results line records it: CPU, flags, cores, the threads the run used, load average."""
    return {**cpu(), "cores": os.cpu_count(), "threads": threads,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def stamp(row: dict, threads: int | None = None) -> dict:
    """The row with command line, commit, machine and date added (existing fields win)."""
    extra = {"command_line": shlex.join([Path(sys.executable).name, *sys.argv]), **commit(),
             "machine": machine(threads), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return {**row, **{k: v for k, v in extra.items() if k not in row}}


def append(path: str | os.PathLike, row: dict, threads: int | None = None) -> dict:
    """Append the stamped row to `path` as one JSON line; return the stamped row."""
    line = stamp(row, threads)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")
    return line
