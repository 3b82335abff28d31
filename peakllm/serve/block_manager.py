"""The KV pool's bookkeeping: fixed-size blocks, a free list, one block table per sequence.

The pool itself (the tensors) lives in the runner; here a block is an index. A sequence holding `n`
computed-or-scheduled tokens owns ceil(n / block_size) blocks, in order: token at position p lives in
block `block_table[p // block_size]`, slot `p % block_size`.
"""

from __future__ import annotations

from collections import deque

from peakllm.serve.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        return self.extra_blocks(seq, num_tokens) + reserve <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` the blocks for `num_tokens` tokens (the caller checked can_grow)."""
        for _ in range(self.extra_blocks(seq, num_tokens)):
            seq.block_table.append(self.free.popleft())

    def release(self, seq: Sequence) -> None:
        """Return every block of `seq` to the free list; its cached K/V is gone."""
        self.free.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
