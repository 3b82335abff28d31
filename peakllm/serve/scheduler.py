"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step has a budget of `max_step_tokens` tokens that all go through one pass over the weights.
Running sequences that decode (one pending token) come first, so a long prompt never stalls them;
prompts (new, or partly prefilled, or recomputed after a preemption) take what is left of the budget,
in chunks. When the KV pool has no block for a running sequence, the newest running sequence that is
not yet in this step is preempted: its blocks are freed and it goes back to the front of the queue,
to be prefilled again from its tokens (recompute), so nothing is dropped and its output stays the same.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from peakllm.serve.block_manager import BlockManager
from peakllm.serve.sequence import Sequence


@dataclass
class Work:
    """`n` tokens of `seq` from position `start` run this step; `sample`: its next token comes out of it."""

    seq: Sequence
    start: int
    n: int

    @property
    def sample(self) -> bool:
        return self.start + self.n == len(self.seq.tokens)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, max_step_tokens: int):
        self.blocks, self.max_batch = blocks, max_batch
        self.max_step_tokens = max(max_step_tokens, max_batch)  # every running decode fits in a step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out (finished or cancelled) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def schedule(self) -> list[Work]:
        budget = self.max_step_tokens
        work: list[Work] = []
        in_step: set[int] = set()
        # decodes first, then running prefills; each group oldest first (the order they were admitted)
        order = sorted(self.running, key=lambda s: s.num_pending > 1)
        for seq in order:
            if seq not in self.running or budget == 0:
                continue  # preempted earlier in this loop
            n = min(seq.num_pending, budget)
            while not self.blocks.can_grow(seq, seq.num_computed + n):
                victims = [s for s in self.running if s.seq_id not in in_step]
                victim = victims[-1]  # seq itself is among them: at worst it yields to the older ones
                self._preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.blocks.grow(seq, seq.num_computed + n)
            work.append(Work(seq, seq.num_computed, n))
            in_step.add(seq.seq_id)
            budget -= n
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            seq = self.waiting[0]
            self.blocks.share_prefix(seq)
            n = min(seq.num_pending, budget)
            # keep one block per running sequence free so admitting does not force an immediate preemption
            if not self.blocks.can_grow(seq, seq.num_computed + n, reserve=len(self.running)):
                self.blocks.release(seq)
                break
            self.waiting.popleft()
            self.running.append(seq)
            self.blocks.reused_tokens += seq.num_computed
            self.blocks.grow(seq, seq.num_computed + n)
            work.append(Work(seq, seq.num_computed, n))
            budget -= n
        return work
