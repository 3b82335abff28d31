"""Writing an output folder atomically: the one implementation every writer uses.

A folder is written into a staging directory beside it and renamed into place when complete, so a reader
never sees half a folder and a failure leaves nothing behind. An existing non-empty folder is refused
before any work unless the caller passes overwrite, and is then replaced whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from peakllm.errors import PeakError


def check_output(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, to clobber an existing non-empty folder (or anything that is not a folder)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PeakError(f"output {out} already exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PeakError(f"output {out} already exists and is not empty (use --overwrite to replace it)")
    return out


@contextlib.contextmanager
def staged_dir(out_dir: str | Path, overwrite: bool = False):
    """A temp dir beside out_dir to write into; renamed onto out_dir when the block succeeds, removed if not."""
    out_dir = check_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        rename_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rename_into_place(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder `tmp` onto `out_dir`, replacing what is there; on failure the old one stays."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        os.replace(tmp, out_dir)  # rename(2) may replace an empty directory
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
