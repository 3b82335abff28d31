"""The recovery objective and the order of its data.

loss = (1 - alpha) * CE(student, next token) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)),
averaged over the predicted positions of a batch (Hinton et al.'s distillation; the T^2 keeps the KL term's
gradient on the CE term's scale as T changes). Computed in fp32 whatever the models' dtype.

The data: `train_samples` calibration segments drawn once with the run's seed; step k takes batch k of an
endless sequence of permutations of them (epoch e's permutation seeded with (seed, e)), a pure function of
(seed, k): a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, ids: torch.Tensor, *,
                 alpha: float, temperature: float) -> tuple[torch.Tensor, dict]:
    """(loss, its parts as floats) for logits [B, T, V] of the same ids [B, T]; position t predicts t + 1."""
    s = student_logits[:, :-1, :].float().reshape(-1, student_logits.shape[-1])
    ce = F.cross_entropy(s, ids[:, 1:].reshape(-1))
    parts = {"ce": float(ce.detach())}
    if alpha == 0.0 or teacher_logits is None:
        return ce, parts
    t = teacher_logits[:, :-1, :].float().reshape(-1, teacher_logits.shape[-1])
    log_p_student = F.log_softmax(s / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature ** 2
    parts["kl"] = float(kl.detach())
    return (1.0 - alpha) * ce + alpha * kl, parts


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The segments of step `step` (0-based): positions [step*B, (step+1)*B) of epoch permutations of range(n)."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[i]))
    return out
