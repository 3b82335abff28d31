"""One engine step: every scheduled token of every sequence through one pass over the weights.

The linears, norms and MLPs are the `RuntimeModel`'s own modules (dense, or packed int-k / sparse /
sub-1-bit, whose kernels take many rows at once); what differs from `RuntimeModel.forward` is the KV
cache. Here it is paged: per layer a pool `[num_blocks * block_size, kv_heads, head_dim]` for K and one
for V, written at each token's slot (`block_table[pos // block_size] * block_size + pos % block_size`)
and read back by gathering a sequence's blocks. Decoding sequences attend together (their blocks
gathered into one padded batch with a length mask); prompt chunks attend one sequence at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peakllm.errors import PeakError
from peakllm.kernels import dense
from peakllm.serve.scheduler import Work

SERVE_SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(model) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SERVE_SUPPORTED:
        raise PeakError(f"peakllm serve runs {', '.join(SERVE_SUPPORTED)} models, not '{model_type}'")
    if any(not layer.fused_act for layer in model.layers):
        raise PeakError("peakllm serve needs a SiLU-gated MLP in every layer (no mixture-of-experts blocks)")


class PagedRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        check_supported(model)
        self.model, self.block_size, self.num_blocks = model, block_size, num_blocks
        shape = (model.n_layers, num_blocks * block_size, model.n_kv_heads, model.head_dim)
        self.k_pool = torch.zeros(shape, dtype=model.dtype)
        self.v_pool = torch.zeros(shape, dtype=model.dtype)
        self.use_fused = True  # False: plain torch norms and MLP (the path without a compiler; tests compare)

    @property
    def kv_bytes(self) -> int:
        return 2 * self.k_pool.numel() * self.k_pool.element_size()

    def _slots(self, work: list[Work]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids [N], cache slots [N]) of the scheduled tokens, in work order."""
        bs = self.block_size
        ids, slots = [], []
        for w in work:
            table = w.seq.block_table
            ids += w.seq.tokens[w.start:w.start + w.n]
            slots += [table[p // bs] * bs + p % bs for p in range(w.start, w.start + w.n)]
        return torch.tensor(ids, dtype=torch.long), torch.tensor(slots, dtype=torch.long)

    def _decode_batch(self, work: list[Work]):
        """For the decoding sequences: their padded block tables, flat [B * nb], and the attention mask
        [B, 1, 1, nb * block_size]."""
        nb = max(len(w.seq.block_table) for w in work)
        table = torch.tensor([i for w in work for i in w.seq.block_table + [0] * (nb - len(w.seq.block_table))])
        lens = torch.tensor([w.start + 1 for w in work])  # keys up to and including this token
        mask = torch.arange(nb * self.block_size)[None, :] < lens[:, None]
        return table, mask[:, None, None, :]

    @torch.inference_mode()
    def forward(self, work: list[Work]) -> torch.Tensor:
        """Run the step; returns the logits [n_sampled, vocab] of the works that sample, in work order."""
        m = self.model
        ids, slots = self._slots(work)
        positions = torch.cat([torch.arange(w.start, w.start + w.n) for w in work])
        offsets = [0]
        for w in work:
            offsets.append(offsets[-1] + w.n)
        n_decode = next((i for i, w in enumerate(work) if not (w.n == 1 and w.start > 0)), len(work))
        plan = {  # the scheduler puts decodes first: rows 0..n_decode-1 are one token of one sequence each
            "slots": slots, "cos": m.cos[positions], "sin": m.sin_signed[positions], "n_decode": n_decode,
            "decode": self._decode_batch(work[:n_decode]) if n_decode else None,
            "prefill": [(offsets[i], w) for i, w in enumerate(work) if i >= n_decode],
        }
        x = F.embedding(ids, m.embed) if m.packed_embed is None else m.packed_embed(ids)  # [N, dim]: the
        # linears see every token of the step as the rows of one matrix
        last = [offsets[i + 1] - 1 for i, w in enumerate(work) if w.sample]
        if self.use_fused and dense.decode_ops_available(x.dtype):
            h = self._layers_fused(x, plan)
        else:
            h = self._layers_torch(x, plan)
        return m.lm_head(h[last])

    def _layers_fused(self, x: torch.Tensor, plan: dict) -> torch.Tensor:
        """The layers with RuntimeModel's decode kernels: residual add + RMSNorm in one call, SiLU·up fused."""
        m = self.model
        h = dense.add_rmsnorm(x, None, m.layers[0].attn_norm, m.layers[0].eps)
        for li, layer in enumerate(m.layers):
            h = dense.add_rmsnorm(x, self._attention(layer.attn, h, li, plan), layer.mlp_norm, layer.eps)
            mlp = layer.mlp.decode(h).contiguous()
            nxt = m.layers[li + 1] if li + 1 < len(m.layers) else None
            w, eps = (nxt.attn_norm, nxt.eps) if nxt is not None else (m.norm_weight, m.norm_eps)
            h = dense.add_rmsnorm(x, mlp, w, eps)
        return h

    def _layers_torch(self, x: torch.Tensor, plan: dict) -> torch.Tensor:
        m = self.model
        for li, layer in enumerate(m.layers):
            h = F.rms_norm(x, (layer.dim,), layer.attn_norm, layer.eps)
            x = x + self._attention(layer.attn, h, li, plan)
            x = x + layer.mlp(F.rms_norm(x, (layer.dim,), layer.mlp_norm, layer.eps))
        return F.rms_norm(x, (x.shape[-1],), m.norm_weight, m.norm_eps)

    def _attention(self, a, h: torch.Tensor, li: int, plan: dict) -> torch.Tensor:
        N = h.shape[0]
        H, KV, D = a.n_heads, a.n_kv_heads, a.head_dim
        q = a.q_proj(h).view(N, H, D)
        k = a.k_proj(h).view(N, KV, D)
        v = a.v_proj(h).view(N, KV, D)
        if a.qk_norm:
            q = F.rms_norm(q, (D,), a.q_norm_weight, a.qk_eps)
            k = F.rms_norm(k, (D,), a.k_norm_weight, a.qk_eps)
        qk = torch.cat((q, k), dim=1)  # RoPE as RuntimeModel applies it: x*cos + roll(x, D/2)*[-sin, sin]
        qk = torch.addcmul(qk * plan["cos"], qk.roll(D // 2, dims=-1), plan["sin"])
        q, k = qk[:, :H], qk[:, H:]
        k_pool, v_pool = self.k_pool[li], self.v_pool[li]
        k_pool.index_copy_(0, plan["slots"], k.to(k_pool.dtype))
        v_pool.index_copy_(0, plan["slots"], v.to(v_pool.dtype))
        out = torch.empty(N, H, D, dtype=q.dtype)
        bs = self.block_size
        k_blocks = k_pool.view(self.num_blocks, bs, KV, D)
        v_blocks = v_pool.view(self.num_blocks, bs, KV, D)
        if plan["decode"] is not None:
            table, mask = plan["decode"]
            B = plan["n_decode"]
            keys = k_blocks.index_select(0, table).view(B, -1, KV, D).transpose(1, 2)  # [B, KV, L, D]
            values = v_blocks.index_select(0, table).view(B, -1, KV, D).transpose(1, 2)
            qd = q[:B].reshape(B, KV, H // KV, D)  # the G heads sharing a KV head act as G queries
            o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=mask, scale=a.scaling)
            out[:B] = o.view(B, H, D)
        for row, w in plan["prefill"]:
            end = w.start + w.n
            table = torch.tensor(w.seq.block_table[:-(-end // bs)], dtype=torch.long)
            keys = k_blocks.index_select(0, table).view(-1, KV, D)[:end].transpose(0, 1)[None]  # [1, KV, end, D]
            values = v_blocks.index_select(0, table).view(-1, KV, D)[:end].transpose(0, 1)[None]
            mask = None
            if w.start > 0:  # a chunk after cached tokens: query i sees keys 0..start+i
                mask = torch.arange(end)[None, :] <= torch.arange(w.start, end)[:, None]
            o = F.scaled_dot_product_attention(q[row:row + w.n].transpose(0, 1)[None], keys, values, attn_mask=mask,
                                               is_causal=mask is None, scale=a.scaling, enable_gqa=True)
            out[row:row + w.n] = o[0].transpose(0, 1)
        return a.o_proj(out.view(N, H * D)).contiguous()
