"""Speculative decoding for one sequence: a drafter proposes k tokens, the target verifies them all in one
pass of the whole-step engine over k + 1 positions (`RuntimeModel.decode_tokens`), and the rule of
`sampling.accept_drafts` commits between 1 and k + 1 tokens.

Two drafters: `PromptLookup` (no model: the tokens that followed the latest earlier occurrence of the
sequence's last n-gram, as in prompt-lookup decoding) and `DraftModel` (a smaller or more compressed form of
the same model, with its own KV cache). Each verified row's logits equal, bit for bit, those of decoding its
token alone (decode.cpp), so greedy output is the plain loop's, token for token. Rejected tokens need no
rollback: their KV entries lie past the committed length and are overwritten by the next step.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from peakllm.errors import PeakError
from peakllm.runtime.sampling import accept_drafts, distribution, sample

DEFAULT_K = 4  # tokens proposed per step (`--speculate`)


class PromptLookup:
    """Drafts from the sequence itself: for n from `max_ngram` down to `min_ngram`, the tokens after the
    latest earlier occurrence of the last n tokens. An index of every n-gram's latest end is kept up to date
    as the sequence grows, so a proposal costs O(new tokens)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise PeakError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.latest: dict[tuple, int] = {}  # n-gram -> position of the token that followed it last
        self.indexed = 0  # positions whose preceding n-grams are in the index

    def propose(self, seq: list[int], k: int, **_) -> tuple[list[int], None]:
        L = len(seq)
        for i in range(max(self.indexed, 1), L):  # the n-grams ending just before position i (i < L: a follower exists)
            for n in range(self.min_ngram, min(self.max_ngram, i) + 1):
                self.latest[tuple(seq[i - n:i])] = i
        self.indexed = max(self.indexed, L)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            at = self.latest.get(tuple(seq[L - n:]))
            if at is not None:
                return seq[at:at + k], None
        return [], None


class DraftModel:
    """Drafts with a second RuntimeModel of the same vocabulary: it decodes k tokens one at a time (greedy, or
    sampled from its own distribution q, which it returns for the acceptance rule). Its cache keeps every
    position whose token the committed sequence confirms; the rest is decoded again."""

    def __init__(self, model, threads: int | None = None):
        self.model = model
        model.engine_threads = threads  # the draft's engine threads (None: torch's; the target keeps its own)
        self.cached: list[int] = []  # tokens whose keys and values the draft's cache holds, from position 0
        self.confirmed = 0  # leading cached tokens known to be the sequence's

    def setup(self, max_seq: int) -> None:
        self.model.setup_cache(1, max_seq)
        self.cached, self.confirmed = [], 0

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Logits [vocab] after decoding `tokens` at the cached length."""
        pos, ids = len(self.cached), torch.tensor([tokens])
        if len(tokens) > 1 and pos > 0 and self.model.can_decode_tokens():
            logits = self.model.decode_tokens(ids, pos)[0, -1]
        elif len(tokens) > 1 and pos > 0:
            for j, t in enumerate(tokens):
                logits = self.model(ids[:, j:j + 1], pos + j, last_only=True)[0, -1]
        else:
            logits = self.model(ids, pos, last_only=True)[0, -1]
        self.cached.extend(tokens)
        return logits

    def propose(self, seq: list[int], k: int, *, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[list[int], torch.Tensor | None]:
        # drafts the sequence kept are cached already; the last token is fed again for its logits
        keep, limit = self.confirmed, min(len(self.cached), len(seq) - 1)
        while keep < limit and self.cached[keep] == seq[keep]:
            keep += 1
        del self.cached[keep:]
        logits = self._feed(seq[keep:])
        self.confirmed = len(seq)
        drafts, qs = [], []
        for i in range(k):
            if temperature > 0:
                q = distribution(logits, temperature, top_p)
                drafts.append(int(torch.multinomial(q, 1, generator=generator)))
                qs.append(q)
            else:
                drafts.append(int(logits.argmax()))
            if i + 1 < k:
                logits = self._feed(drafts[-1:])
        return drafts, (torch.stack(qs) if qs else None)


def speculative_generate(model, drafter, prompt: torch.Tensor, max_new_tokens: int, k: int, *,
                         temperature: float, top_p: float, generator: torch.Generator | None, eos: set[int],
                         push: Callable[[int], None] | None = None, timings: dict | None = None) -> torch.Tensor:
    """New ids [1, n] after prompt [1, T]: the first from the prompt's forward as in plain decoding, then steps
    that each verify up to k drafted tokens in one engine pass. `timings` also gets `drafted` and `accepted`
    (tokens proposed and kept) and `steps` (verification passes)."""
    T = prompt.shape[1]
    model.setup_cache(1, T + max_new_tokens)  # drafts never reach past the last position a token may take
    if isinstance(drafter, DraftModel):
        drafter.setup(T + max_new_tokens)
    seq = prompt[0].tolist()
    out: list[int] = []
    drafted = accepted = steps = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(prompt, 0, last_only=True)
        new = [int(sample(logits[:, -1], temperature, top_p, generator)[0])]
        t1 = time.perf_counter()
        while True:
            for tok in new:
                out.append(tok)
                seq.append(tok)
                if push is not None and tok not in eos:
                    push(tok)
                if tok in eos or len(out) == max_new_tokens:
                    break
            if out[-1] in eos or len(out) == max_new_tokens:
                break
            room = max_new_tokens - len(out)
            drafts, q = drafter.propose(seq, min(k, room - 1), temperature=temperature, top_p=top_p,
                                        generator=generator) if room > 1 else ([], None)
            pos = len(seq) - 1
            ids = torch.tensor([seq[-1:] + drafts])
            logits = (model.decode_tokens(ids, pos) if drafts else model(ids, pos, last_only=True))[0]
            new = accept_drafts(logits, drafts, q, temperature, top_p, generator)
            drafted, accepted, steps = drafted + len(drafts), accepted + len(new) - 1, steps + 1
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, steps=steps, drafted=drafted,
                       accepted=accepted)
    return torch.tensor([out], dtype=torch.long)
