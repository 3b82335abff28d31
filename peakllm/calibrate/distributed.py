"""Spreading independent solves over torch.distributed workers, when launched with torchrun.

The matrices of one group of a layer (q/k/v; a MoE layer's experts) are solved independently once their
statistics are known, and the solves dominate big runs (a 7B layer: ~100 s of GPTQ against ~12 s of
forward passes on 2 CPU cores). Every worker runs the same forward passes (deterministic, so every
worker holds the same statistics), solves the matrices dealt to it round-robin, and receives the others'
results by broadcast; worker 0 alone writes the output. With one process nothing changes: each matrix is
solved right before it is used, as without this module. The result equals the one-process run's, since
each matrix is solved by exactly one worker on the same inputs (tested with two gloo processes).

Launch: `torchrun --nproc-per-node N -m peakllm quantize ...` (gloo on CPU; NCCL where CUDA is present),
or across machines with torchrun's --nnodes/--rdzv-endpoint options.
"""

from __future__ import annotations

import os


class Workers:
    def __init__(self):
        self.rank, self.world, self._dealt = 0, 1, 0
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def solve(self, keys, fn):
        """Yield (key, fn(key)) for every key, in order; fn runs for each key on exactly one worker."""
        if self.world == 1:
            for key in keys:
                yield key, fn(key)
            return
        import torch.distributed as dist

        owners = {}
        for key in keys:
            owners[key] = self._dealt % self.world
            self._dealt += 1
        mine = {key: fn(key) for key in keys if owners[key] == self.rank}
        for key in keys:
            box = [mine.pop(key, None)]
            dist.broadcast_object_list(box, src=owners[key])
            yield key, box[0]


_WORKERS: Workers | None = None


def workers() -> Workers:
    global _WORKERS
    if _WORKERS is None:
        _WORKERS = Workers()
    return _WORKERS
