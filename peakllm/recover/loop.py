"""The training loop: steps or minutes, a progress bar (loss, tokens/s, ETA), a checkpoint every N steps, and
--resume from it giving the same bytes as an uninterrupted run.

A checkpoint holds the step, the trainable tensors, the optimizer's state (AdamW's moments; LOMO has none), the
RNG state and the run's resume key; it is written beside the output (`<output>.recover-ckpt/state.pt`) to a
temp file and renamed, so a kill never leaves half of one. The batches are a function of (seed, step)
(objective.batch_indices), so a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from peakllm.errors import PeakError
from peakllm.models.anatomy import base_model
from peakllm.progress import tqdm
from peakllm.recover.objective import batch_indices, chunked_distill_loss, distill_loss

STATE_FILE = "state.pt"


def learning_rate(base: float, step: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then constant (a --minutes run has no known end to decay towards)."""
    return base * min(1.0, (step + 1) / (warmup + 1))


def data_parallel() -> tuple[int, int]:
    """(rank, world size): under torchrun the process group is started (gloo on the CPU) and each process takes
    its share of every batch; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def update(optimizer, loss: torch.Tensor, lr: float, world: int = 1) -> None:
    """One update at `lr`: LOMO's fused backward (update inside the backward), or backward + optimizer step; with
    several processes the gradients are averaged first (each process's loss is the mean over its equal share
    of the batch, so the average is the one-process gradient of the whole batch)."""
    if hasattr(optimizer, "fused_backward"):
        optimizer.fused_backward(loss, lr)
        return
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss.backward()
    if world > 1:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def plain_head(model) -> bool:
    """Whether the logits are lm_head(last hidden state) and nothing more (no soft-capping, no scaling)."""
    cfg = model.config
    return getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None


def step_loss(student, teacher, ids, spec) -> tuple[torch.Tensor, dict]:
    """The objective of one batch: from hidden states in chunks where both heads are plain, else from logits."""
    use_teacher = teacher is not None and spec.alpha > 0
    student = student.get_base_model() if hasattr(student, "get_base_model") else student  # PEFT: its wrapped model
    if plain_head(student) and (not use_teacher or plain_head(teacher)):
        s_hidden = base_model(student)(input_ids=ids, use_cache=False).last_hidden_state
        t_hidden = None
        if use_teacher:
            with torch.no_grad():
                t_hidden = base_model(teacher)(input_ids=ids, use_cache=False).last_hidden_state
        return chunked_distill_loss(s_hidden, t_hidden, student.get_output_embeddings(),
                                    teacher.get_output_embeddings() if use_teacher else None, ids, alpha=spec.alpha,
                                    temperature=spec.temperature)
    t_logits = None
    if use_teacher:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
    s_logits = student(input_ids=ids, use_cache=False).logits
    return distill_loss(s_logits, t_logits, ids, alpha=spec.alpha, temperature=spec.temperature)


def save_checkpoint(path: Path, step: int, trainable: dict, optimizer, key: dict, seconds: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "key": key, "seconds": seconds, "rng": torch.get_rng_state(),
             "trainable": {n: p.detach().clone() for n, p in trainable.items()},
             "optimizer": None if hasattr(optimizer, "fused_backward") else optimizer.state_dict()}
    tmp = path / f".{STATE_FILE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path / STATE_FILE)


def load_checkpoint(path: Path, trainable: dict, optimizer, key: dict) -> tuple[int, float]:
    """Restore a checkpoint into the trainable tensors and the optimizer; return (step, seconds so far)."""
    file = path / STATE_FILE
    if not file.is_file():
        raise PeakError(f"--resume: no checkpoint at {file}")
    state = torch.load(file, weights_only=False)
    if state.get("key") != key:
        diff = sorted(k for k in set(key) | set(state.get("key", {})) if key.get(k) != state.get("key", {}).get(k))
        raise PeakError(f"--resume: the checkpoint in {path} is of another run (differs in {', '.join(diff)})")
    if set(state["trainable"]) != set(trainable):
        raise PeakError(f"--resume: the checkpoint in {path} holds other tensors than this run trains")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["trainable"][name])
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), float(state["seconds"])


def train(student, teacher, segments: torch.Tensor, spec, optimizer, trainable: dict, *, on_step=None) -> dict:
    """Run the steps of `spec` (steps and/or minutes) from step 0 or the checkpoint; return what was done.
    `on_step(step)` is called after each completed step (and its checkpoint)."""
    ckpt = spec.checkpoint_dir
    key = spec.resume_key()
    rank, world = data_parallel()
    share = spec.batch_size // world
    start, seconds_before = (load_checkpoint(ckpt, trainable, optimizer, key) if spec.resume else (0, 0.0))
    budget = None if spec.minutes is None else spec.minutes * 60.0
    n, tokens_per_step = segments.shape[0], spec.batch_size * spec.seqlen
    student.train()
    bar = tqdm(total=spec.steps, initial=start, desc=f"recover ({spec.method})", unit="step",
               disable=not spec.progress or rank != 0)
    losses, t0 = [], time.perf_counter()
    step = start
    while (spec.steps is None or step < spec.steps) and (budget is None or seconds_before + time.perf_counter() - t0 < budget):
        ids = segments[batch_indices(n, spec.batch_size, step, spec.seed)][rank * share:(rank + 1) * share]
        loss, parts = step_loss(student, teacher, ids, spec)
        update(optimizer, loss, learning_rate(spec.learning_rate, step, spec.warmup_steps), world)
        step += 1
        value = loss.detach().clone()
        if world > 1:  # the whole batch's loss, as one process reports it
            dist.all_reduce(value)
            value /= world
        losses.append({"step": step, "loss": float(value), **parts})
        elapsed = time.perf_counter() - t0
        done = step - start
        postfix = {"loss": f"{losses[-1]['loss']:.3f}", "tok/s": f"{done * tokens_per_step / elapsed:.0f}"}
        if budget is not None:
            postfix["left"] = f"{max(0.0, budget - seconds_before - elapsed) / 60:.1f}min"
        bar.set_postfix(postfix)
        bar.update(1)
        if step % spec.checkpoint_every == 0 and rank == 0:
            save_checkpoint(ckpt, step, trainable, optimizer, key, seconds_before + elapsed)
        if on_step is not None:
            on_step(step)
    bar.close()
    student.eval()
    seconds = time.perf_counter() - t0
    return {"steps": step, "steps_this_run": step - start, "train_seconds": seconds_before + seconds,
            "train_tokens": step * tokens_per_step,
            "tokens_per_second": (step - start) * tokens_per_step / seconds if seconds > 0 else None,
            "losses": losses}
