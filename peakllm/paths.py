"""Where peakllm keeps its caches: $PEAKLLM_CACHE, default ~/.cache/peakllm."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("PEAKLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peakllm")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
