"""Progress bars on stderr, and keeping other libraries' bars off it.

`tqdm` draws the usual bar on a terminal; when stderr is a file or a pipe (`--json --progress 2>run.log`)
each update becomes one plain line, so a log reads layer by layer instead of as one line of carriage returns.
"""

from __future__ import annotations

import contextlib
import sys

from tqdm.auto import tqdm as _tqdm


class _Lines:
    """A stream for tqdm that turns each redraw ('\\r' + status) into a line of its own."""

    def __init__(self, stream):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        count = text.split(" [")[0]  # without the timings: tqdm redraws the last state when it closes
        if text and count != self.last:  # clearing writes (blanks, a bare newline at close) carry nothing
            self.stream.write(text + "\n")
            self.last = count

    def flush(self) -> None:
        self.stream.flush()


def tqdm(iterable=None, **kwargs):
    """tqdm.auto.tqdm on stderr; one line per update when stderr is not a terminal (for a bar counting layers
    or shards, every update: there are few and each takes long)."""
    if "file" not in kwargs and not kwargs.get("disable") and not sys.stderr.isatty():
        kwargs.update(file=_Lines(sys.stderr), ascii=True)
        if kwargs.get("unit") in ("layer", "shard"):
            kwargs.setdefault("mininterval", 0)
    return _tqdm(iterable, **kwargs)


@contextlib.contextmanager
def no_library_bars():
    """No tqdm bar at all while a library works for us: compressed-tensors, for one, draws "Compressing
    model" while transformers *loads* a folder, and has no switch to turn that off."""
    from tqdm import std

    init = std.tqdm.__init__

    def quiet(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    std.tqdm.__init__ = quiet
    try:
        yield
    finally:
        std.tqdm.__init__ = init
