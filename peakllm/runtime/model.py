"""A lean decoder for Llama-family models (Llama, Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma-3), built from a
loaded HF model; what differs between the families (Gemma's norms, GeGLU, sliding windows, per-layer RoPE,
Phi-3's fused projections) is read off the model by `runtime/families.py`.

gpt-fast style: a static KV cache preallocated as [layers, batch, kv_heads, max_seq, head_dim], RoPE
from a precomputed table, RMSNorm, grouped-query attention, and one `forward(tokens, start_pos)` for
both prefill and decode. The linear layers are the HF model's own modules, so packed modules
(`peakllm.runtime.linear`) drop in unchanged; a plain dense `nn.Linear` becomes a `DenseLinear`,
which on the decode path runs the compiled streaming matvec of `peakllm.kernels.dense`.

Decoding one token runs, when every layer can be described to it (dense, int-k, sparse or sub-1-bit
linears; SiLU- or GELU-gated MLP, or a peakllm_moe block at batch 1 in fp32), the whole-step engine of
`peakllm.kernels.decode`: one C call for all layers and the lm_head. Otherwise each module runs on its
own, op by op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peakllm.errors import PeakError
from peakllm.kernels import decode, dense
from peakllm.kernels.dense import dense_linear
from peakllm.runtime import families
from peakllm.runtime.describe import any_lin as _any_lin, moe_desc as _moe_desc
from peakllm.runtime.families import SUPPORTED, act_kind, norm_params  # noqa: F401 (SUPPORTED: callers)

DEFAULT_MAX_SEQ = 2048


class DenseLinear(nn.Module):
    """A dense linear layer whose weight may be shared (tied lm_head); decode uses the compiled kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias)

    def decode_lin(self, keep: list):
        return decode.dense_lin(self.weight, self.bias, keep)


def _linear(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    if type(module) is nn.Linear:
        bias = None if module.bias is None else module.bias
        return DenseLinear(module.weight.detach().to(dtype), bias)
    return module  # a packed module: it owns its bytes and its kernel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight over the last dim; an fp32 weight under lower-precision x (Gemma's norms) is
    applied in fp32 and the result rounded once, as Gemma computes it."""
    if weight.dtype == x.dtype:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def rope(qk: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's rotate-half convention on the last dim: x*cos + roll(x, D/2)*[-sin, sin]."""
    return torch.addcmul(qk * cos, qk.roll(qk.shape[-1] // 2, dims=-1), sin_signed)


def causal_mask(q_pos: torch.Tensor, end: int, window: int = 0) -> torch.Tensor:
    """[len(q_pos), end]: the query at position p sees keys j <= p, and with a window only p - j < window."""
    k = torch.arange(end)[None, :]
    mask = k <= q_pos[:, None]
    return mask & (q_pos[:, None] - k < window) if window else mask


class Attention(nn.Module):
    def __init__(self, hf_attn: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 window: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window = window  # > 0: a sliding-window layer (key j seen from position p when p - j < window)
        self.qkv_proj = None
        if hasattr(hf_attn, "qkv_proj"):  # Phi-3: q, k, v fused; split into views when the layout allows
            sizes = [n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim]
            parts = families.split_rows(hf_attn.qkv_proj, sizes)
            if parts is None:
                self.qkv_proj, self.qkv_sizes = _linear(hf_attn.qkv_proj, dtype), sizes
                self.q_proj = self.k_proj = self.v_proj = None
            else:
                self.q_proj, self.k_proj, self.v_proj = (_linear(p, dtype) for p in parts)
        else:
            self.q_proj = _linear(hf_attn.q_proj, dtype)
            self.k_proj = _linear(hf_attn.k_proj, dtype)
            self.v_proj = _linear(hf_attn.v_proj, dtype)
        self.o_proj = _linear(hf_attn.o_proj, dtype)
        self.scaling = float(getattr(hf_attn, "scaling", head_dim**-0.5))
        self.qk_norm = None  # Qwen3, Gemma-3: RMSNorm over each head of q and k, before RoPE
        if getattr(hf_attn, "q_norm", None) is not None:
            (qw, self.qk_eps), (kw, _) = norm_params(hf_attn.q_norm, dtype), norm_params(hf_attn.k_norm, dtype)
            self.register_buffer("q_norm_weight", qw, persistent=False)
            self.register_buffer("k_norm_weight", kw, persistent=False)
            self.qk_norm = True

    def _qkv(self, x):
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin_signed, k_cache, v_cache, start_pos: int, mask):
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self._qkv(x)
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, KV, D), v.reshape(B, T, KV, D)
        if self.qk_norm:
            q = rms_norm(q, self.q_norm_weight, self.qk_eps)
            k = rms_norm(k, self.k_norm_weight, self.qk_eps)
        qk = rope(torch.cat((q, k), dim=2), cos, sin_signed)  # q and k together
        q, k = qk[:, :, :H], qk[:, :, H:]
        end = start_pos + T
        k_cache[:, :, start_pos:end].copy_(k.transpose(1, 2))
        v_cache[:, :, start_pos:end].copy_(v.transpose(1, 2))
        first = max(0, end - self.window) if self.window and T == 1 else 0  # T > 1: the mask has the window
        keys, values = k_cache[:, :, first:end], v_cache[:, :, first:end]
        if T == 1:
            # One query per head: the G query heads sharing a KV head act as G queries against it.
            out = F.scaled_dot_product_attention(q.view(B, KV, H // KV, D), keys, values, scale=self.scaling)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=mask is None,
                scale=self.scaling, enable_gqa=True,
            ).transpose(1, 2)
        return self.o_proj(out.reshape(B, T, H * D))

    def decode(self, x, cos, sin_signed, k_cache, v_cache, pos: int):
        """forward for one token per sequence through the fused kernel; x [B, 1, dim]."""
        q, k, v = (t.contiguous() for t in self._qkv(x))
        qn, kn = (self.q_norm_weight, self.k_norm_weight) if self.qk_norm else (None, None)
        out = dense.attn_decode(q, k, v, qn, kn, getattr(self, "qk_eps", 0.0), cos, sin_signed,
                                k_cache, v_cache, pos, self.scaling, self.n_heads, self.window)
        return self.o_proj(out)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)); Phi-3's fused gate_up_proj (gate rows first) is split into views."""

    def __init__(self, hf_mlp: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = None
        if hasattr(hf_mlp, "gate_up_proj"):
            inter = hf_mlp.gate_up_proj.out_features // 2
            parts = families.split_rows(hf_mlp.gate_up_proj, [inter, inter])
            if parts is None:
                self.gate_up_proj = _linear(hf_mlp.gate_up_proj, dtype)
                self.gate_proj = self.up_proj = None
            else:
                self.gate_proj, self.up_proj = (_linear(p, dtype) for p in parts)
        else:
            self.gate_proj = _linear(hf_mlp.gate_proj, dtype)
            self.up_proj = _linear(hf_mlp.up_proj, dtype)
        self.down_proj = _linear(hf_mlp.down_proj, dtype)
        self.act_fn = getattr(hf_mlp, "act_fn", None) or hf_mlp.activation_fn
        self.act = act_kind(self.act_fn)  # the kernels' code, or None: only the torch path runs

    def _gate_up(self, x):
        if self.gate_up_proj is not None:
            return self.gate_up_proj(x).chunk(2, dim=-1)
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        gate, up = self._gate_up(x)
        return self.down_proj(self.act_fn(gate) * up)

    def decode(self, x):
        gate, up = self._gate_up(x)
        return self.down_proj(dense.gated_act(gate.contiguous(), up.contiguous(), self.act))


class Block(nn.Module):
    """x + attn(attn_norm(x)), then + mlp(mlp_norm(.)); Gemma-3 also norms each output before it joins the
    residual (post_attn_norm, post_mlp_norm; None elsewhere)."""

    def __init__(self, hf_layer: nn.Module, cfg: dict, dtype: torch.dtype, window: int = 0,
                 rope_key: str | None = None):
        super().__init__()
        self.attn = Attention(hf_layer.self_attn, cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"], dtype,
                              window)
        self.rope_key = rope_key
        if hasattr(hf_layer.mlp, "gate_proj") or hasattr(hf_layer.mlp, "gate_up_proj"):
            self.mlp = MLP(hf_layer.mlp, dtype)
            self.fused_act = self.mlp.act is not None
        else:  # e.g. a mixture-of-experts block (dense or with packed experts): run the model's own module
            self.mlp = hf_layer.mlp.to(dtype)
            self.fused_act = False
        gemma = hasattr(hf_layer, "pre_feedforward_layernorm")
        w1, self.eps = norm_params(hf_layer.input_layernorm, dtype)
        w2, _ = norm_params(hf_layer.pre_feedforward_layernorm if gemma else hf_layer.post_attention_layernorm, dtype)
        self.register_buffer("attn_norm", w1, persistent=False)
        self.register_buffer("mlp_norm", w2, persistent=False)
        post = (norm_params(hf_layer.post_attention_layernorm, dtype)[0],
                norm_params(hf_layer.post_feedforward_layernorm, dtype)[0]) if gemma else (None, None)
        self.register_buffer("post_attn_norm", post[0], persistent=False)
        self.register_buffer("post_mlp_norm", post[1], persistent=False)
        self.dim = w1.shape[0]

    def decode_layer(self, k_cache, v_cache, next_norm, next_eps, keep: list, batch: int = 1, rope=None):
        """This layer as the decode engine's C description, or None when one of its parts is something
        the engine cannot run (then the op-by-op path runs the whole model). rope: this layer's own
        (cos, sin_signed) tables [S, D] when layers differ, else None."""
        a, m = self.attn, self.mlp
        if a.qkv_proj is not None or getattr(m, "gate_up_proj", None) is not None:
            return None  # a fused projection that could not be split: the op-by-op path runs
        moe = None
        if self.fused_act:
            mlp_linears = (m.gate_proj, m.up_proj, m.down_proj)
        else:
            moe = _moe_desc(m, self.dim, batch, keep) if self.attn_norm.dtype == torch.float32 else None
            if moe is None:
                return None
            mlp_linears = ()
        lins = [_any_lin(lin, keep) for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, *mlp_linears)]
        if any(lin is None for lin in lins):
            return None
        lins += [decode.Lin()] * (7 - len(lins))  # a MoE layer's MLP is described by `moe`
        qn, kn = getattr(a, "q_norm_weight", None), getattr(a, "k_norm_weight", None)
        pa, pm = self.post_attn_norm, self.post_mlp_norm
        cos, sin = rope if rope is not None else (None, None)
        keep.extend(t for t in (self.mlp_norm, next_norm, qn, kn, k_cache, v_cache, pa, pm, cos, sin)
                    if t is not None)
        p = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        return decode.Layer(*lins, p(self.mlp_norm), p(next_norm), p(qn), p(kn), p(k_cache), p(v_cache),
                            self.dim, a.n_heads, a.n_kv_heads, a.head_dim,
                            0 if moe is not None else m.down_proj.in_features, k_cache.shape[2], self.eps, next_eps,
                            getattr(a, "qk_eps", 0.0), a.scaling, moe, p(pa), p(pm), p(cos), p(sin),
                            m.act if moe is None else 0, a.window, int(self.attn_norm.dtype == torch.float32))

    def _post(self, y, weight):
        return y if weight is None else rms_norm(y, weight, self.eps)

    def forward(self, x, cos, sin_signed, k_cache, v_cache, start_pos, mask):
        a = self.attn(rms_norm(x, self.attn_norm, self.eps), cos, sin_signed,
                      k_cache, v_cache, start_pos, mask)
        h = x + self._post(a, self.post_attn_norm)
        return h + self._post(self.mlp(rms_norm(h, self.mlp_norm, self.eps)), self.post_mlp_norm)


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
        from peakllm.runtime.embedding import PackedEmbedding

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
            self.lm_head = _linear(lm_head, dtype)

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
        self.max_memory = None  # bytes: weights + KV cache are held to it by runtime/offload.py
        self.offload = None

    def set_max_memory(self, budget: int | None) -> None:
        """Hold the weights and the KV cache to `budget` bytes (None: everything stays in memory); the plan is
        made when the cache is set up, since the cache is part of the budget."""
        self.max_memory = budget
        self.k_cache = None  # the next setup_cache plans

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
            from peakllm.runtime.offload import Offload

            kv = 2 * self.k_cache.numel() * self.k_cache.element_size()
            self.offload = Offload(self, self.max_memory, kv)
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
            from peakllm.runtime.offload import OffloadStep

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
            logits = self._step.run(x, h, pos, cos, sin_signed, torch.get_num_threads())
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
