"""What a report's figures show, read from matplotlib before each is saved: the tests check the series,
points and axes a plot draws, not the size of its PNG."""

from __future__ import annotations

from pathlib import Path


def _axes(ax) -> dict:
    from matplotlib.patches import Rectangle

    def floats(values):
        return [float(v) for v in values]

    return {
        "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "yscale": ax.get_yscale(),
        "lines": {line.get_label(): (floats(line.get_xdata()), floats(line.get_ydata())) for line in ax.get_lines()},
        "bars": [float(p.get_height()) for p in ax.patches if isinstance(p, Rectangle)],
        "xticklabels": [t.get_text() for t in ax.get_xticklabels()],
        "texts": [(t.get_text(), tuple(float(v) for v in t.xy)) for t in ax.texts if hasattr(t, "xy")],
    }


def capture_figures(monkeypatch) -> dict[str, list[dict]]:
    """From now on, each figure saved records {file name: [what each of its axes shows]} in the dict returned."""
    from matplotlib.figure import Figure

    drawn: dict[str, list[dict]] = {}
    save = Figure.savefig

    def savefig(fig, fname, *args, **kwargs):
        drawn[Path(fname).name] = [_axes(ax) for ax in fig.axes]
        return save(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return drawn
