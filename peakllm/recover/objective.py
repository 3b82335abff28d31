"""The recovery objective and the order of its data.

loss = (1 - alpha) * CE(student, next token) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)),
averaged over the predicted positions of a batch (Hinton et al.'s distillation; the T^2 keeps the KL term's
gradient on the CE term's scale as T changes). Computed in fp32 whatever the models' dtype.

`chunked_distill_loss` is the same loss from the two models' last hidden states, the LM heads applied to
`chunk_tokens` positions at a time under activation checkpointing: the [B, T, vocab] logits (and the softmaxes
and gradients of that size) never exist whole, only one chunk's; the heads are recomputed in the backward.
At the default model's 49152-token vocabulary, batch 4 x 256 tokens, one logits tensor is 0.2 GB and the
unchunked loss held about ten of them.

The data: `train_samples` calibration segments drawn once with the run's seed; step k takes batch k of an
endless sequence of permutations of them (epoch e's permutation seeded with (seed, e)), a pure function of
(seed, k): a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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


def _chunk_sums(s_head, t_head, temperature: float, h, targets, t_h):
    """(summed CE, summed T^2 KL) over one chunk of positions [n, hidden]."""
    s = s_head(h).float()
    ce = F.cross_entropy(s, targets, reduction="sum")
    if t_h is None:
        return ce, ce.new_zeros(())
    with torch.no_grad():
        t = t_head(t_h).float()
    log_p_student = F.log_softmax(s / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum") * temperature ** 2
    return ce, kl


def chunked_distill_loss(s_hidden, t_hidden, s_head, t_head, ids, *, alpha: float, temperature: float,
                         chunk_tokens: int = 256) -> tuple[torch.Tensor, dict]:
    """`distill_loss` from hidden states [B, T, H] and the LM heads, `chunk_tokens` positions at a time."""
    hs = s_hidden[:, :-1].reshape(-1, s_hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    use_teacher = alpha > 0.0 and t_hidden is not None
    ht = t_hidden[:, :-1].reshape(-1, t_hidden.shape[-1]) if use_teacher else None
    n = hs.shape[0]
    ce = kl = hs.new_zeros((), dtype=torch.float32)
    for lo in range(0, n, chunk_tokens):
        hi = min(n, lo + chunk_tokens)
        c, k = checkpoint(_chunk_sums, s_head, t_head, temperature, hs[lo:hi], targets[lo:hi],
                          None if ht is None else ht[lo:hi], use_reentrant=False)
        ce, kl = ce + c, kl + k
    ce, kl = ce / n, kl / n
    parts = {"ce": float(ce.detach())}
    if not use_teacher:
        return ce, parts
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
