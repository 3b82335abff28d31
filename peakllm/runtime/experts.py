"""The experts of one MoE block run from per-expert packed matrices (sub-1-bit, int-k, ...).

It replaces transformers' fused experts module and is called the same way,
`experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`, so the model's own router and
block code run unchanged: routing is identical to the uncompressed model given the same dense weights.
Each expert's matrices stay compressed; only the tokens routed to an expert are multiplied by it.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedExperts(nn.Module):
    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module], act_fn):
        super().__init__()
        if len(gate_up) != len(down) or not gate_up:
            raise ValueError("need one gate_up and one down module per expert")
        self.gate_up = nn.ModuleList(gate_up)  # [2I, H] each: gate rows first, then up rows
        self.down = nn.ModuleList(down)        # [H, I] each
        self.act_fn = act_fn
        self.num_experts = len(gate_up)
        self.on_route = None  # called with the experts a forward uses (runtime/offload.py's LRU cache)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        used = torch.unique(top_k_index).tolist()
        if self.on_route is not None:
            self.on_route([e for e in used if 0 <= e < self.num_experts])
        for e in used:
            if not 0 <= e < self.num_experts:
                continue  # transformers marks dropped routes with index num_experts
            token, slot = torch.where(top_k_index == e)
            gate, up = self.gate_up[e](hidden_states[token]).chunk(2, dim=-1)
            y = self.down[e](self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out
