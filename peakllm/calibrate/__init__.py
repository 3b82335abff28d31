"""The calibration pipeline: how a model is run layer by layer over calibration text and compressed as it goes.

It owns hooks, layer iteration, statistics, activations, progress and timing, never the math (that is
`solvers/`) nor the bytes (that is `formats/`). The CLI hands it a typed `RunSpec` (spec.py) and a recipe
(recipes.py: what is done to each matrix); `run.run_compression` is the one entry point.

- loop.py: `calibrate()`, the layer loop ("true sequential" groups in data-flow order)
- stats.py: input statistics (Hessians, squared norms), the calibration activations, capturing layer 0's inputs
- experts.py: fused MoE experts (routed statistics per expert, pooled fallback, one budget over a block)
- recipes.py: what is done to a matrix (prune / quantize), calling a solver
- embeddings.py: the outer matrices (token embedding, untied lm_head) onto an int-k grid
- preflight.py: every check the shapes allow, before any work
- budget.py: the peak memory of a streamed run predicted from shapes
- stream.py, run_streamed.py, checkpoint.py: models bigger than memory, layer by layer from disk, resumable
- target.py: a `--target-bits` size held exactly
- distributed.py: a group's independent solves dealt to torchrun workers
- spec.py, run.py: the run description and the run itself
"""

__all__ = ["CalibrationReport", "calibrate"]


def __getattr__(name: str):
    # `from peakllm.calibrate import calibrate` keeps working; resolved on first use so that importing a light
    # submodule (spec.py, for the CLI's parser) does not load torch and transformers
    if name in __all__:
        from peakllm.calibrate import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'peakllm.calibrate' has no attribute {name!r}")
