"""The typed description of one compression run: what the CLI (or a caller) decides, handed to the pipeline.

The CLI turns its arguments into a `RunSpec` at the door (cli/compress_common.py: run_spec); nothing in the
pipeline reads argparse's namespace. What is done to each matrix is the recipe (recipes.py), not the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type only: the CLI builds a RunSpec before it loads torch
    from peakllm.solvers import Grid


EVAL_SEQLEN = 512  # the window of the before/after perplexity


@dataclass(frozen=True)
class RunSpec:
    command: str                       # "prune" | "quantize": recorded with the output
    model: str                         # as the user named it: an alias, a folder or a .gguf file
    output: Path
    format: str                        # formats.writer.FORMATS
    overwrite: bool = False
    # calibration
    calib_samples: int = 32
    calib_seqlen: int = 512
    calib_dataset: str = "calib"
    seed: int = 0
    batch_size: int = 8
    sequential: bool = True
    sink_weight: float = 1.0           # weight of each segment's first position in the input statistics
    blocksize: int = 128
    damp: float = 0.01
    bos: bool = True
    # evaluation before and after
    eval_tokens: int = 4096
    eval_dataset: str = "wiki"
    # what the run writes beside the decoder's linears
    embed_grid: Grid | str | None = None  # the token embedding (and an untied lm_head): int-k grid or GGUF type
    target_bits: float | None = None   # a sub1 size held exactly (in-memory runs)
    # big models
    stream: str = "off"                # "auto" | "on" | "off"
    max_memory_bytes: int | None = None
    resume: bool = False
    progress: bool = True

    def resume_key(self, extra: dict, threads: int) -> dict:
        """What must not change between a run and its --resume (the result would differ)."""
        return {"command": self.command, "model": self.model, "format": self.format,
                "calib_samples": self.calib_samples, "calib_seqlen": self.calib_seqlen,
                "calib_dataset": self.calib_dataset, "seed": self.seed, "batch_size": self.batch_size,
                "no_sequential": not self.sequential, "blocksize": self.blocksize, "damp": self.damp,
                "sink_weight": self.sink_weight,
                "eval_tokens": self.eval_tokens, "eval_dataset": self.eval_dataset, "no_bos": not self.bos,
                **extra, "threads": threads}

    def run_info(self, extra: dict, bos: bool, *, streamed: bool = False) -> dict:
        """What the output folder records of how it was made (peakllm_run.json)."""
        info = {"command": self.command, "model": self.model, **extra, "calib_samples": self.calib_samples,
                "calib_seqlen": self.calib_seqlen, "calib_dataset": self.calib_dataset, "seed": self.seed}
        if self.sink_weight != 1.0:
            info["sink_weight"] = self.sink_weight
        if streamed:
            info["streamed"] = True
        info["bos"] = bos
        return info
