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
from peakllm.runtime.families import SUPPORTED
from peakllm.runtime.layers import causal_mask, rms_norm, rope
from peakllm.runtime.offload import Offload
from peakllm.serve.scheduler import Work

SERVE_SUPPORTED = tuple(t for t in SUPPORTED if t not in ("peakllm_moe", "olmoe"))  # the runtime's dense families


def check_family(config) -> None:
    """One PeakError for a model type serve does not run (before a RuntimeModel is built)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SERVE_SUPPORTED:
        raise PeakError(f"peakllm serve runs {', '.join(SERVE_SUPPORTED)} models, not '{model_type}'")


def check_supported(model) -> None:
    check_family(model.config)
    if any(not hasattr(layer.mlp, "down_proj") for layer in model.layers):
        raise PeakError("peakllm serve needs a gated MLP in every layer (no mixture-of-experts blocks)")


class PagedRunner:
    def __init__(self, model, num_blocks: int, block_size: int, max_memory: int | None = None,
                 whole_process: bool = False, step_tokens: int = 1):
        check_supported(model)
        self.model, self.block_size, self.num_blocks = model, block_size, num_blocks
        shape = (model.n_layers, num_blocks * block_size, model.n_kv_heads, model.head_dim)
        self.k_pool = torch.zeros(shape, dtype=model.dtype)
        self.v_pool = torch.zeros(shape, dtype=model.dtype)
        self.use_fused = True  # False: plain torch norms and MLP (the path without a compiler; tests compare)
        self.offload = None  # --max-memory: runtime/offload.py's hooks around each layer (the pool is counted)
        if max_memory is not None:
            # whole_process: --max-memory covers the process; a step's forward holds up to `step_tokens` tokens
            self.offload = Offload(model, max_memory, self.kv_bytes, whole_process=whole_process,
                                   workspace=model.workspace_bytes(step_tokens, num_blocks * block_size))
            self.offload.start()

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

    def _decode_batch(self, work: list[Work], windows: set[int]):
        """For the decoding sequences: their padded block tables, flat [B * nb], and per window the
        attention mask [B, 1, 1, nb * block_size]."""
        nb = max(len(w.seq.block_table) for w in work)
        table = torch.tensor([i for w in work for i in w.seq.block_table + [0] * (nb - len(w.seq.block_table))])
        pos = torch.tensor([w.start for w in work])  # each new token's position: it sees keys 0..pos
        masks = {win: causal_mask(pos, nb * self.block_size, win)[:, None, None, :] for win in windows}
        return table, masks

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
        windows = {layer.attn.window for layer in m.layers}
        plan = {  # the scheduler puts decodes first: rows 0..n_decode-1 are one token of one sequence each
            "slots": slots, "n_decode": n_decode,
            "rope": {key: (cos[positions], sin[positions]) for key, (cos, sin) in m.rope.items()},
            "decode": self._decode_batch(work[:n_decode], windows) if n_decode else None,
            "prefill": [(offsets[i], w) for i, w in enumerate(work) if i >= n_decode],
        }
        if self.offload is not None:
            self.offload.phase = "prefill" if plan["prefill"] else "decode"
        x = m.embed_tokens(ids)
        # x [N, dim]: the linears see every token of the step as the rows of one matrix
        last = [offsets[i + 1] - 1 for i, w in enumerate(work) if w.sample]
        if self.use_fused and dense.decode_ops_available(x.dtype):
            h = self._layers_fused(x, plan)
        else:
            h = self._layers_torch(x, plan)
        return m.lm_head(h[last])

    def _layers_fused(self, x: torch.Tensor, plan: dict) -> torch.Tensor:
        """The layers with RuntimeModel's decode kernels: residual add + RMSNorm in one call, gated act fused."""
        m = self.model
        h = dense.add_rmsnorm(x, None, m.layers[0].attn_norm, m.layers[0].eps)
        off = self.offload
        for li, layer in enumerate(m.layers):
            if off is not None:
                off.before(li)
            attn = self._attention(layer, h, li, plan)
            if layer.post_attn_norm is not None:
                attn = dense.add_rmsnorm(attn, None, layer.post_attn_norm, layer.eps)
            h = dense.add_rmsnorm(x, attn, layer.mlp_norm, layer.eps)
            mlp = (layer.mlp.decode(h) if layer.fused_act else layer.mlp(h)).contiguous()
            if layer.post_mlp_norm is not None:
                mlp = dense.add_rmsnorm(mlp, None, layer.post_mlp_norm, layer.eps)
            nxt = m.layers[li + 1] if li + 1 < len(m.layers) else None
            w, eps = (nxt.attn_norm, nxt.eps) if nxt is not None else (m.norm_weight, m.norm_eps)
            h = dense.add_rmsnorm(x, mlp, w, eps)
            if off is not None:
                off.after(li)
        return h

    def _layers_torch(self, x: torch.Tensor, plan: dict) -> torch.Tensor:
        m, off = self.model, self.offload
        for li, layer in enumerate(m.layers):
            if off is not None:
                off.before(li)
            attn = self._attention(layer, rms_norm(x, layer.attn_norm, layer.eps), li, plan)
            x = x + (attn if layer.post_attn_norm is None else rms_norm(attn, layer.post_attn_norm, layer.eps))
            mlp = layer.mlp(rms_norm(x, layer.mlp_norm, layer.eps))
            x = x + (mlp if layer.post_mlp_norm is None else rms_norm(mlp, layer.post_mlp_norm, layer.eps))
            if off is not None:
                off.after(li)
        return rms_norm(x, m.norm_weight, m.norm_eps)

    def _attention(self, layer, h: torch.Tensor, li: int, plan: dict) -> torch.Tensor:
        a = layer.attn
        N = h.shape[0]
        H, KV, D = a.n_heads, a.n_kv_heads, a.head_dim
        q, k, v = a._qkv(h)
        q, k, v = q.reshape(N, H, D), k.reshape(N, KV, D), v.reshape(N, KV, D)
        if a.qk_norm:
            q, k = rms_norm(q, a.q_norm_weight, a.qk_eps), rms_norm(k, a.k_norm_weight, a.qk_eps)
        cos, sin = plan["rope"][layer.rope_key]
        qk = rope(torch.cat((q, k), dim=1), cos, sin)  # as RuntimeModel applies it
        q, k = qk[:, :H], qk[:, H:]
        k_pool, v_pool = self.k_pool[li], self.v_pool[li]
        k_pool.index_copy_(0, plan["slots"], k.to(k_pool.dtype))
        v_pool.index_copy_(0, plan["slots"], v.to(v_pool.dtype))
        out = torch.empty(N, H, D, dtype=q.dtype)
        bs = self.block_size
        k_blocks = k_pool.view(self.num_blocks, bs, KV, D)
        v_blocks = v_pool.view(self.num_blocks, bs, KV, D)
        if plan["decode"] is not None:
            table, masks = plan["decode"]
            B = plan["n_decode"]
            keys = k_blocks.index_select(0, table).view(B, -1, KV, D).transpose(1, 2)  # [B, KV, L, D]
            values = v_blocks.index_select(0, table).view(B, -1, KV, D).transpose(1, 2)
            qd = q[:B].reshape(B, KV, H // KV, D)  # the G heads sharing a KV head act as G queries
            o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=masks[a.window], scale=a.scaling)
            out[:B] = o.view(B, H, D)
        for row, w in plan["prefill"]:
            end = w.start + w.n
            table = torch.tensor(w.seq.block_table[:-(-end // bs)], dtype=torch.long)
            keys = k_blocks.index_select(0, table).view(-1, KV, D)[:end].transpose(0, 1)[None]  # [1, KV, end, D]
            values = v_blocks.index_select(0, table).view(-1, KV, D)[:end].transpose(0, 1)[None]
            mask = None  # plain causal from position 0; otherwise after cached tokens and/or within a window
            if w.start > 0 or (a.window and end > a.window):
                mask = causal_mask(torch.arange(w.start, end), end, a.window)
            o = F.scaled_dot_product_attention(q[row:row + w.n].transpose(0, 1)[None], keys, values, attn_mask=mask,
                                               is_causal=mask is None, scale=a.scaling, enable_gqa=True)
            out[row:row + w.n] = o[0].transpose(0, 1)
        return a.o_proj(out.view(N, H * D)).contiguous()
