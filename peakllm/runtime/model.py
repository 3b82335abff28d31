"""A lean decoder for Llama-family models (Llama, Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma-3, OLMoE and
peakllm_moe), built from a loaded HF model; what differs between the families (Gemma's norms, GeGLU, sliding
windows, per-layer RoPE, Phi-3's fused projections, OLMoE's whole-width q/k norms) is read off the model by
`runtime/families.py`.

gpt-fast style: a static KV cache preallocated as [layers, batch, kv_heads, max_seq, head_dim], RoPE
from a precomputed table, RMSNorm, grouped-query attention, and one `forward(tokens, start_pos)` for
both prefill and decode. The linear layers are the HF model's own modules, so packed modules
(`peakllm.runtime.linear`) drop in unchanged; a plain dense `nn.Linear` becomes a `DenseLinear`,
which on the decode path runs the compiled streaming matvec of `peakllm.kernels.dense`.

Decoding one token runs, when every layer can be described to it (dense, int-k, sparse or sub-1-bit
linears; SiLU- or GELU-gated MLP, or a peakllm_moe / OLMoE block at batch 1 in fp32), the whole-step engine of
`peakllm.kernels.decode`: one C call for all layers and the lm_head. Otherwise each module runs on its
own, op by op.

The layers (attention, MLP, block, norms, RoPE) are in `runtime/layers.py`. `set_max_memory` holds the
weights and KV cache to a budget through `runtime/offload.py` (layers streamed from their memory-mapped
files, MoE experts in an LRU cache): the decode engine then runs in groups of layers with its hooks between.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peakllm.errors import PeakError
from peakllm.kernels import decode, dense
from peakllm.runtime import families
from peakllm.runtime.describe import any_lin as _any_lin
from peakllm.runtime.embedding import PackedEmbedding
from peakllm.runtime.families import SUPPORTED, norm_params  # noqa: F401 (SUPPORTED: callers)
from peakllm.runtime.layers import Block, causal_mask, rms_norm  # noqa: F401 (callers)
from peakllm.runtime.linear import as_runtime_linear, DenseLinear  # noqa: F401 (callers)
from peakllm.runtime.offload import Offload, OffloadStep

DEFAULT_MAX_SEQ = 2048


class RuntimeModel(nn.Module):
    """forward(tokens [B, T], start_pos) -> logits [B, T, vocab] (or [B, 1, vocab] with last_only)."""

    def __init__(self, hf_model: nn.Module, dtype: torch.dtype, max_seq: int | None):
        super().__init__()
        config = hf_model.config
        families.check_config(config)
        if dtype not in (torch.float32, torch.bfloat16):
            raise PeakError(f"runtime dtype must be float32 or bfloat16, got {dtype}")
        self.config, self.dtype = config, dtype
        inner = hf_model.model
        n_heads, n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        cfg = {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim}
        self.n_layers, self.n_kv_heads, self.head_dim = len(inner.layers), n_kv_heads, head_dim
        windows = families.layer_windows(config, self.n_layers)
        self.rotary_emb = inner.rotary_emb
        rope_keys = families.rope_kinds(config, self.rotary_emb, self.n_layers)
        self.layers = nn.ModuleList(Block(layer, cfg, dtype, windows[i] if windows else 0, rope_keys[i])
                                    for i, layer in enumerate(inner.layers))

        if isinstance(inner.embed_tokens, PackedEmbedding):  # int-k rows; a tied lm_head is its linear layer
            self.embed = None
            self.packed_embed = PackedEmbedding(inner.embed_tokens.linear, dtype, inner.embed_tokens.embed_scale)
        else:
            self.register_buffer("embed", inner.embed_tokens.weight.detach().to(dtype), persistent=False)
            self.packed_embed = None
        scale = getattr(inner.embed_tokens, "embed_scale", None)  # Gemma: embeddings times sqrt(hidden)
        self.embed_scale = None if scale is None else torch.as_tensor(scale).to(dtype)
        norm_weight, self.norm_eps = norm_params(inner.norm, dtype)
        self.register_buffer("norm_weight", norm_weight, persistent=False)
        lm_head = hf_model.get_output_embeddings()
        if type(lm_head) is nn.Linear and lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr():
            self.lm_head = DenseLinear(self.embed)  # tied: one tensor serves both, read once per token
        else:
            self.lm_head = as_runtime_linear(lm_head, dtype)

        limit = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if window and windows is None:
            # One window for every layer that the layers do not implement: beyond it the attention would
            # differ from the model's. (With layer types, each layer masks its own window.)
            limit = min(limit, window)
        self.max_seq_limit = limit
        self.max_seq = min(max_seq or DEFAULT_MAX_SEQ, limit)
        self._rope_tables(self.max_seq)
        self.batch = 0
        self.k_cache = self.v_cache = None
        self.use_fused = True  # False forces the plain torch path (tests compare the two)
        self.use_step_engine = True  # False: the op-by-op decode path (tests compare the two)
        self._step = None
        self.engine_threads = None  # threads of the whole-step engine (None: torch's); a draft model may use fewer
        self.max_memory = None  # bytes: weights + KV cache are held to it by runtime/offload.py
        self.max_memory_whole_process = False  # True: the budget is the whole process's (--max-memory)
        self.offload = None

    def set_max_memory(self, budget: int | None, whole_process: bool = False) -> None:
        """Hold the weights and the KV cache to `budget` bytes (None: everything stays in memory); with
        `whole_process` (the command line's --max-memory) the whole process, its forward's buffers included
        (runtime/offload.py). The plan is made when the cache is set up, since the cache is part of the budget."""
        self.max_memory, self.max_memory_whole_process = budget, whole_process
        self.k_cache = None  # the next setup_cache plans

    def workspace_bytes(self, tokens: int, context: int) -> int:
        """A bound on the transient buffers of one forward over `tokens` tokens attending to up to `context`
        positions: fp32 logits for every token, each layer's activations (residual, norms, q/k/v/o, the MLP's
        gate, up and product) and the attention scores."""
        c = self.config
        hidden = c.hidden_size
        inter = getattr(c, "intermediate_size", None) or 4 * hidden
        return 4 * tokens * (c.vocab_size + 6 * hidden + 3 * inter + c.num_attention_heads * context)

    @classmethod
    @torch.inference_mode()
    def from_hf(cls, hf_model: nn.Module, dtype: torch.dtype = torch.float32, max_seq: int | None = None):
        """Take the HF model's modules and weights (shared, or cast to `dtype`) into a RuntimeModel."""
        return cls(hf_model, dtype, max_seq).eval()

    def _rope_tables(self, max_seq: int) -> None:
        # The HF rotary module knows every rope_type (default, llama3, yarn, ...) and its scaling factor.
        positions = torch.arange(max_seq)[None]
        self.rope = {}  # layer type (None: all layers) -> (cos, sin_signed) [max_seq, 1, head_dim]
        for key in dict.fromkeys(layer.rope_key for layer in self.layers):
            extra = () if key is None else (key,)
            cos, sin = self.rotary_emb(torch.zeros(1, dtype=torch.float32), positions, *extra)
            cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [max_seq, head_dim]; HF rounds them too
            half = self.head_dim // 2
            sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
            # [max_seq, 1, head_dim]: broadcasts over [B, T, heads, D]
            self.rope[key] = (cos[:, None, :].contiguous(), sin_signed[:, None, :].contiguous())
        # the first layer's tables (the only ones unless layers differ)
        self.cos, self.sin_signed = self.rope[self.layers[0].rope_key]

    def setup_cache(self, batch: int, max_seq: int | None = None) -> None:
        """Preallocate the KV cache for `batch` sequences of up to `max_seq` tokens."""
        max_seq = max_seq or self.max_seq
        if max_seq > self.max_seq_limit:
            raise PeakError(f"sequence of {max_seq} tokens exceeds the model's limit of {self.max_seq_limit}")
        if max_seq > self.cos.shape[0]:
            self.max_seq = max_seq
            self._rope_tables(max_seq)
        if self.k_cache is not None and self.batch == batch and self.k_cache.shape[3] >= max_seq:
            return
        shape = (self.n_layers, batch, self.n_kv_heads, max_seq, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, dtype=self.dtype)
        self.batch = batch
        if self.offload is not None:
            self.offload.close()
            self.offload = None
        if self.max_memory is not None:
            kv = 2 * self.k_cache.numel() * self.k_cache.element_size()
            self.offload = Offload(self, self.max_memory, kv, whole_process=self.max_memory_whole_process,
                                   workspace=self.workspace_bytes(batch * max_seq, max_seq))
            self.offload.start()
        self._step = self._build_step(batch)

    def _build_step(self, batch: int):
        """The decode engine's description of the model, or None if a layer needs the op-by-op path."""
        if not decode.available(self.dtype):
            return None
        keep: list = []
        layers = []
        for i, layer in enumerate(self.layers):
            last = i + 1 == len(self.layers)
            nxt_w, nxt_eps = (self.norm_weight, self.norm_eps) if last else (self.layers[i + 1].attn_norm,
                                                                              self.layers[i + 1].eps)
            rope = self.rope[layer.rope_key] if len(self.rope) > 1 else None
            made = layer.decode_layer(self.k_cache[i], self.v_cache[i], nxt_w, nxt_eps, keep, batch, rope)
            if made is None:
                return None
            layers.append(made)
        head = _any_lin(self.lm_head, keep)
        if self.offload is not None and not self.offload.all_resident:  # layer groups with the hooks between

            chosen = [None if b.fused_act else getattr(b.mlp, "engine_chosen", None) for b in self.layers]
            return OffloadStep(layers, head, self.dtype, batch, keep, self.offload, chosen)
        return decode.Step(layers, head, self.dtype, batch, keep)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input embeddings of token ids (int-k rows, or the table; Gemma's scale applied)."""
        if self.packed_embed is not None:
            return self.packed_embed(tokens)
        x = F.embedding(tokens, self.embed)
        return x if self.embed_scale is None else x * self.embed_scale

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        B, T = tokens.shape
        end = start_pos + T
        if self.k_cache is None or B != self.batch or end > self.k_cache.shape[3]:
            raise PeakError(f"KV cache not set up for batch {B} and {end} tokens (call setup_cache)")
        x = self.embed_tokens(tokens)
        off = self.offload  # None, or the memory budget's hooks around each layer
        if off is not None:
            off.phase = "decode" if T == 1 else "prefill"
        if T == 1 and self.use_fused and dense.decode_ops_available(self.dtype):
            return self._decode(x, start_pos)
        masks = {}
        for i, layer in enumerate(self.layers):
            cos, sin_signed = (t[start_pos:end] for t in self.rope[layer.rope_key])
            window = layer.attn.window
            if window not in masks:
                masks[window] = self._mask(T, start_pos, window)
            if off is not None:
                off.before(i)
            x = layer(x, cos, sin_signed, self.k_cache[i], self.v_cache[i], start_pos, masks[window])
            if off is not None:
                off.after(i)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(rms_norm(x, self.norm_weight, self.norm_eps))

    def can_decode_tokens(self) -> bool:
        """Whether `decode_tokens` runs (the whole-step engine holds every layer and the lm_head, in memory)."""
        return (self.use_fused and self.use_step_engine and isinstance(self._step, decode.Step)
                and self._step.multi_token and self._step.head is not None)

    @torch.inference_mode()
    def decode_tokens(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """logits [B, T, vocab] of T tokens at start_pos.. in one engine pass over the weights, each row equal
        bit for bit to decoding its token alone (speculative verification: runtime/speculate.py). Positions
        past the accepted ones need no rollback: the cache is read only up to the position decoded."""
        B, T = tokens.shape
        end = start_pos + T
        if not self.can_decode_tokens():
            raise PeakError("several tokens per step need the whole-step decode engine for every layer")
        if self.k_cache is None or B != self.batch or end > self.k_cache.shape[3]:
            raise PeakError(f"KV cache not set up for batch {B} and {end} tokens (call setup_cache)")
        x = self.embed_tokens(tokens).contiguous()
        first = self.layers[0]
        h = dense.add_rmsnorm(x, None, first.attn_norm, first.eps).contiguous()
        cos, sin_signed = self.cos[start_pos, 0], self.sin_signed[start_pos, 0]
        return self._step.run(x, h, start_pos, cos, sin_signed, self.engine_threads or torch.get_num_threads(),
                              tokens=T)

    @staticmethod
    def _mask(T: int, start_pos: int, window: int):
        """Which of the keys 0..start_pos+T-1 each of T queries sees (None: plain causal from 0, T > 1;
        a single query's window is cut from the keys instead)."""
        if T == 1 or (start_pos == 0 and not (window and T > window)):
            return None
        return causal_mask(torch.arange(start_pos, start_pos + T), start_pos + T, window)

    def _decode(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        # One token: the residual add rides along with the next RMSNorm, attention is one kernel call.
        first = self.layers[0]
        h = dense.add_rmsnorm(x, None, first.attn_norm, first.eps)
        if self._step is not None and self.use_step_engine:  # every layer (and the lm_head) in one C call
            cos, sin_signed = self.cos[pos, 0], self.sin_signed[pos, 0]
            logits = self._step.run(x, h, pos, cos, sin_signed, self.engine_threads or torch.get_num_threads())
            return self.lm_head(h) if logits is None else logits
        off = self.offload
        for i, layer in enumerate(self.layers):
            if off is not None:
                off.before(i)
            cos, sin_signed = (t[pos, 0] for t in self.rope[layer.rope_key])
            attn = layer.attn.decode(h, cos, sin_signed, self.k_cache[i], self.v_cache[i], pos)
            if layer.post_attn_norm is not None:
                attn = dense.add_rmsnorm(attn.contiguous(), None, layer.post_attn_norm, layer.eps)
            h = dense.add_rmsnorm(x, attn.view_as(x), layer.mlp_norm, layer.eps)
            if layer.fused_act:
                mlp = layer.mlp.decode(h)
            else:
                mlp = layer.mlp(h)
            if layer.post_mlp_norm is not None:
                mlp = dense.add_rmsnorm(mlp.contiguous(), None, layer.post_mlp_norm, layer.eps)
            if i + 1 < len(self.layers):
                nxt = self.layers[i + 1]
                h = dense.add_rmsnorm(x, mlp.contiguous().view_as(x), nxt.attn_norm, nxt.eps)
            else:
                h = dense.add_rmsnorm(x, mlp.contiguous().view_as(x), self.norm_weight, self.norm_eps)
            if off is not None:
                off.after(i)
        return self.lm_head(h)
