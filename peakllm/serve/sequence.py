"""A request inside the engine: its tokens, how many of them have their K/V in the cache, its blocks."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

_ids = itertools.count()


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    top_k: int = 0  # 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k


@dataclass(eq=False)  # identity: two requests with the same prompt are two sequences
class Sequence:
    """`tokens` = prompt + generated ids. The K/V of `tokens[:num_computed]` is in the cache; the next step
    computes some of the rest, and samples a new token once all of them are computed. After a preemption
    the blocks are gone and `num_computed` is 0: the whole of `tokens` is prefilled again (recompute)."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[str, object], None]  # ("token", id) | ("done", finish_reason) | ("error", message)
    seq_id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(init=False)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks registered or shared so far
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished: bool = False
    generator: torch.Generator | None = None

    def __post_init__(self):
        self.tokens = list(self.prompt)
        if self.params.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.params.seed if self.params.seed is not None else self.seq_id)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V the next steps must compute before a new token can be sampled."""
        return len(self.tokens) - self.num_computed
