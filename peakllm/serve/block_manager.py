"""The KV pool's bookkeeping: fixed-size blocks, a free list, one block table per sequence, and
prefix sharing of full blocks.

The pool itself (the tensors) lives in the runner; here a block is an index. A sequence holding `n`
computed-or-scheduled tokens owns ceil(n / block_size) blocks, in order: token at position p lives in
block `block_table[p // block_size]`, slot `p % block_size`.

Prefix sharing: once a block is full of computed tokens it is registered under a hash of its tokens and
of everything before them (the hash of the previous block). A new sequence whose leading full blocks
hash (and compare) equal takes those blocks as they are, with a reference count, and starts computing
after them. A full block is never written again, so sharing needs no copy. A block whose count drops to
0 goes back to the free list but keeps its contents and hash until the free list hands it out again
(least recently freed first), so a preempted or repeated prompt often finds its blocks still there.
"""

from __future__ import annotations

from collections import OrderedDict

from peakllm.serve.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_sharing: bool = True):
        self.num_blocks, self.block_size, self.prefix_sharing = num_blocks, block_size, prefix_sharing
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.refs = [0] * num_blocks
        self.key: list[tuple | None] = [None] * num_blocks  # (hash, tokens) of a registered full block
        self.cached: dict[int, int] = {}  # hash -> block
        self.reused_tokens = 0  # counted by the scheduler when a sequence with a shared prefix is admitted

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
            block, _ = self.free.popitem(last=False)
            if self.key[block] is not None:  # its old contents are about to be overwritten
                del self.cached[self.key[block][0]]
                self.key[block] = None
            self.refs[block] = 1
            seq.block_table.append(block)

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks; its cached K/V is gone for it (shared blocks stay for others)."""
        for block in seq.block_table:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0

    def _hash(self, seq: Sequence, i: int) -> tuple[int, tuple]:
        tokens = tuple(seq.tokens[i * self.block_size:(i + 1) * self.block_size])
        return hash((seq.block_hashes[i - 1] if i else None, tokens)), tokens

    def share_prefix(self, seq: Sequence) -> None:
        """For a sequence without blocks: take the registered blocks equal to its leading full blocks (at
        least its last token stays to compute, whose logits give the next token)."""
        if not self.prefix_sharing or seq.block_table:
            return
        for i in range((len(seq.tokens) - 1) // self.block_size):
            h, tokens = self._hash(seq, i)
            block = self.cached.get(h)
            if block is None or self.key[block][1] != tokens:
                break
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        seq.num_computed = len(seq.block_table) * self.block_size

    def register(self, seq: Sequence) -> None:
        """After a step: register `seq`'s blocks that became full of computed tokens."""
        if not self.prefix_sharing:
            return
        for i in range(len(seq.block_hashes), seq.num_computed // self.block_size):
            h, tokens = self._hash(seq, i)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and self.key[block] is None:
                self.cached[h] = block
                self.key[block] = (h, tokens)
