"""Choosing the next token and turning tokens into text: greedy or temperature + top-p sampling from a
seeded generator, the end-of-sequence ids a model and its tokenizer name, and a streamer that holds back a
piece of text while it ends in a partial character. Shared by `generate`, the transformers fallback loop
and the server."""

from __future__ import annotations

from typing import Callable

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token for each row of logits [B, vocab]: argmax when temperature == 0, else top-p sampling."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one).
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def distribution(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The distribution `sample` draws from (temperature > 0): softmax(logits / temperature), cut to the
    top-p set and renormalised; rows of logits [..., vocab] -> fp32 probabilities."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(mass_before >= top_p, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def accept_drafts(logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None, temperature: float,
                  top_p: float = 1.0, generator: torch.Generator | None = None) -> list[int]:
    """Speculative decoding's rule: the tokens a verification step commits, from the target's logits
    [k+1, vocab] (row i: after the context and drafts[:i]) and the k drafted tokens. Greedy: drafts are kept
    while each equals the target's argmax, then the argmax follows. Sampling (Leviathan et al. 2023, Chen et
    al. 2023): draft i is kept with probability min(1, p(d)/q(d)); the first one refused is replaced by a draw
    from max(0, p - q) renormalised, and when all are kept one more token is drawn from p of the last row.
    `draft_probs` [k, vocab] is q (None: each draft is a point mass, as prompt lookup proposes it). Every
    committed token is then distributed as sampling from the target alone would give it."""
    if temperature <= 0.0:
        best = logits.argmax(dim=-1).tolist()
        out = []
        for i, d in enumerate(drafts):
            if best[i] != d:
                break
            out.append(d)
        return out + [best[len(out)]]
    p = distribution(logits, temperature, top_p)
    out = []
    for i, d in enumerate(drafts):
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        u = float(torch.rand((), generator=generator))
        if u * q_d < float(p[i, d]):  # u < p/q without dividing by a q of 0
            out.append(d)
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - draft_probs[i]).clamp_(min=0.0)
        if not float(residual.sum()) > 0.0:  # p == q up to rounding: nothing to correct
            residual = p[i]
        return out + [int(torch.multinomial(residual, 1, generator=generator))]
    return out + [int(torch.multinomial(p[len(drafts)], 1, generator=generator))]


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


class TextStream:
    """Turns token ids into text pieces, holding back a piece while it ends in a partial character."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        self.tokenizer, self.callback = tokenizer, callback
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > self.sent:
            self.callback(text[self.sent:])
            self.sent = len(text)
