"""A token embedding stored as int-k rows: a lookup dequantizes only the rows it is asked for.

It holds an `IntKLinear` over the same bytes, so a tied lm_head is that linear layer: one stored copy
serves both the lookup and the logits, and the decode engine reads the lm_head through its int-k kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from peakllm.errors import PeakError
from peakllm.kernels import ops
from peakllm.runtime.linear import IntKLinear


class PackedEmbedding(nn.Module):
    """``forward(ids) -> [*ids.shape, dim]``: rows ``scale * (q - zero)`` (times ``embed_scale`` when the
    model scales its embeddings, as Gemma does), in ``dtype``."""

    def __init__(self, linear: IntKLinear, dtype: torch.dtype = torch.float32, embed_scale: torch.Tensor | None = None,
                 padding_idx: int | None = None):
        super().__init__()
        if not isinstance(linear, IntKLinear) or linear.perm is not None:
            raise PeakError("a packed embedding needs int-k rows with contiguous groups (no act-order g_idx)")
        self.linear = linear
        self.num_embeddings, self.embedding_dim = linear.out_features, linear.in_features
        self.dtype, self.padding_idx = dtype, padding_idx
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.detach().clone(),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1).long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise PeakError(f"token ids must lie in [0, {self.num_embeddings})")
        lin = self.linear
        rows = ops.intk_dequantize(lin.qweight.index_select(0, flat), lin.scales.index_select(0, flat),
                                   lin.zeros.index_select(0, flat), lin.bits, lin.group_starts, lin.in_features,
                                   self.dtype)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.to(rows.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.linear.dequantize(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.linear.bits}, group_size={self.linear.group_size}"
