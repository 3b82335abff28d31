"""Checkpoints of a streamed run, so that `--resume` continues it after a crash.

After every layer, `.resume/` inside the output's partial folder gets the layer's output activations
(calibration and evaluation, one file per batch), then `state.json` is replaced atomically: the run's
arguments and input fingerprint, the report's counters and the shard writer's state. Whatever instant a
run is killed at, state.json names a complete layer whose shard and activations are on disk; resuming
reads them and runs the next layer exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from peakllm.errors import PeakError

STATE_VERSION = 1


class Checkpoint:
    def __init__(self, folder: Path):
        self.dir = folder / ".resume"

    def load(self) -> dict | None:
        try:
            return json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def load_for(self, run_state: dict, model: str) -> dict:
        """The committed state, refused if the input files or the run's arguments changed since."""
        state = self.load()
        if state is None or state.get("version") != STATE_VERSION:
            raise PeakError(f"the checkpoint in {self.dir.parent} is unreadable or from another peakllm version")
        if state["input"] != run_state["input"]:
            raise PeakError(f"the input model {model} changed since the interrupted run; start again with --overwrite")
        if state["args"] != run_state["args"]:
            diff = sorted(k for k in set(state["args"]) | set(run_state["args"])
                          if state["args"].get(k) != run_state["args"].get(k))
            raise PeakError(f"--resume needs the interrupted run's arguments; these differ: {', '.join(diff)}")
        return state

    def save(self, li: int, tensors: dict, state: dict) -> None:
        self.dir.mkdir(exist_ok=True)
        final = self.dir / f"layer-{li}"
        tmp = self.dir / f".layer-{li}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for kind, items in tensors.items():
            for b, t in enumerate(items):
                torch.save(t, tmp / f"{kind}-{b}.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        state = {**state, "layers_done": li + 1, "acts_dir": final.name}
        (self.dir / "state.json.tmp").write_text(json.dumps(state))
        os.replace(self.dir / "state.json.tmp", self.dir / "state.json")
        for old in self.dir.glob("layer-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def tensors(self, state: dict, kind: str) -> list[torch.Tensor]:
        folder = self.dir / state["acts_dir"]
        n = len(list(folder.glob(f"{kind}-*.pt")))
        return [torch.load(folder / f"{kind}-{b}.pt", weights_only=True) for b in range(n)]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def report_state(report) -> dict:
    return {k: getattr(report, k) for k in ("damping_escalations", "fallbacks", "experts_fallback", "expert_tokens",
                                             "seconds", "notes")}


def restore_report(report, saved: dict) -> None:
    for k, v in saved.items():
        if k == "seconds":
            for name, s in v.items():
                report.seconds[name] = report.seconds.get(name, 0.0) + s
        elif k in ("expert_tokens", "notes"):
            getattr(report, k)[:0] = v
        else:
            setattr(report, k, getattr(report, k) + v)


