"""peakllm recover: win back what compression lost, by fine-tuning the compressed model against the original.

- `spec.py`: the typed `RecoverSpec` the CLI builds (cli/recover_cmd.py); every argument check.
- `objective.py`: next-token loss on calibration text + T^2-scaled KL to the teacher's logits at temperature T;
  the order of the batches, a pure function of (seed, step).
- `lora.py`: LoRA through PEFT on a frozen base; packed int-k / sparse-packed linears stay packed and are
  dequantized on the fly in the forward and again in the backward (QLoRA's idea); adapters in PEFT's layout.
- `lomo.py`: full-parameter LOMO (the authors' `lomo-optim`: update inside each parameter's gradient hook, no
  stored gradients, no optimizer state) and AdamW as its memory baseline, both masked on sparse models.
- `loop.py`: the training loop: --steps / --minutes, progress bar, checkpoints and --resume (same bytes).
- `run.py`: one run: checks (arguments, vocabulary, memory, disk) -> perplexity before -> train -> after -> write.
"""

from peakllm.recover.spec import RecoverSpec

__all__ = ["RecoverSpec", "recover"]


def recover(spec: RecoverSpec, **kwargs) -> dict:
    """Run `spec` (see run.recover); imported on call: the room's modules load torch and peft."""
    # lazy for start-up time: the CLI's parser imports this package, the run loads torch and peft
    from peakllm.recover.run import recover as run

    return run(spec, **kwargs)
