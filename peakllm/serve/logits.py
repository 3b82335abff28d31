"""Per-request logits processing for the server: presence/frequency penalties, top-k, and the log-probabilities a
request asks for. Plain greedy or temperature/top-p requests never come here (the engine's fast path)."""

from __future__ import annotations

import torch

from peakllm.runtime.sampling import sample


def needs_processing(params) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.top_k > 0
                or params.logprobs is not None)


def penalized(logits: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties over the tokens generated so far (not the prompt, as vLLM and OpenAI do):
    logit[j] - frequency * count[j] - presence * (count[j] > 0)."""
    if not generated or not (presence or frequency):
        return logits
    counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[-1])
    counts = counts[:logits.shape[-1]].to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def choose(logits: torch.Tensor, params, generated: list[int], generator) -> tuple[int, tuple | None]:
    """The next token from one row of logits [vocab], and (its logprob, [(id, logprob)] of the top
    `params.logprobs`) when the request asks for logprobs: the model's own log-softmax, before penalties,
    temperature and truncation (as vLLM reports them)."""
    row = logits.float()
    adjusted = penalized(row, generated, params.presence_penalty, params.frequency_penalty)
    if params.top_k > 0 and params.temperature > 0 and params.top_k < adjusted.shape[-1]:
        kth = adjusted.topk(params.top_k).values[-1]
        adjusted = adjusted.masked_fill(adjusted < kth, float("-inf"))
    token = int(sample(adjusted[None], params.temperature, params.top_p, generator)[0])
    if params.logprobs is None:
        return token, None
    logp = torch.log_softmax(row, dim=-1)
    top = []
    if params.logprobs > 0:
        values, ids = logp.topk(params.logprobs)
        top = list(zip(ids.tolist(), values.tolist()))
    return token, (float(logp[token]), top)
