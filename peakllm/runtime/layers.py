"""The lean decoder's layers: dense linears (the compiled streaming matvec), RMSNorm, RoPE, the causal /
sliding-window mask, grouped-query attention over a static KV cache, gated MLPs, and the decoder block with
its description for the whole-step decode engine. `runtime/model.py` assembles them into RuntimeModel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peakllm.kernels import decode, dense
from peakllm.runtime import families
from peakllm.runtime.describe import any_lin as _any_lin, moe_desc as _moe_desc
from peakllm.runtime.families import act_kind, norm_params
from peakllm.runtime.linear import as_runtime_linear, split_rows


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
            parts = split_rows(hf_attn.qkv_proj, sizes)
            if parts is None:
                self.qkv_proj, self.qkv_sizes = as_runtime_linear(hf_attn.qkv_proj, dtype), sizes
                self.q_proj = self.k_proj = self.v_proj = None
            else:
                self.q_proj, self.k_proj, self.v_proj = (as_runtime_linear(p, dtype) for p in parts)
        else:
            self.q_proj = as_runtime_linear(hf_attn.q_proj, dtype)
            self.k_proj = as_runtime_linear(hf_attn.k_proj, dtype)
            self.v_proj = as_runtime_linear(hf_attn.v_proj, dtype)
        self.o_proj = as_runtime_linear(hf_attn.o_proj, dtype)
        self.scaling = float(getattr(hf_attn, "scaling", head_dim**-0.5))
        self.qk_norm = None  # Qwen3, Gemma-3: RMSNorm over each head of q and k, before RoPE
        self.qk_norm_full = False  # OLMoE: over all of q and all of k instead
        if getattr(hf_attn, "q_norm", None) is not None:
            (qw, self.qk_eps), (kw, _) = norm_params(hf_attn.q_norm, dtype), norm_params(hf_attn.k_norm, dtype)
            self.register_buffer("q_norm_weight", qw, persistent=False)
            self.register_buffer("k_norm_weight", kw, persistent=False)
            self.qk_norm = True
            self.qk_norm_full = families.qk_norm_full(hf_attn.q_norm, head_dim)

    def _qkv(self, x):
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin_signed, k_cache, v_cache, start_pos: int, mask):
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self._qkv(x)
        if self.qk_norm_full:
            q, k = rms_norm(q, self.q_norm_weight, self.qk_eps), rms_norm(k, self.k_norm_weight, self.qk_eps)
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, KV, D), v.reshape(B, T, KV, D)
        if self.qk_norm and not self.qk_norm_full:
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
        if self.qk_norm_full:  # the kernel norms each head: the whole-width norms run first
            q, k = dense.add_rmsnorm(q, None, qn, self.qk_eps), dense.add_rmsnorm(k, None, kn, self.qk_eps)
            qn = kn = None
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
            parts = split_rows(hf_mlp.gate_up_proj, [inter, inter])
            if parts is None:
                self.gate_up_proj = as_runtime_linear(hf_mlp.gate_up_proj, dtype)
                self.gate_proj = self.up_proj = None
            else:
                self.gate_proj, self.up_proj = (as_runtime_linear(p, dtype) for p in parts)
        else:
            self.gate_proj = as_runtime_linear(hf_mlp.gate_proj, dtype)
            self.up_proj = as_runtime_linear(hf_mlp.up_proj, dtype)
        self.down_proj = as_runtime_linear(hf_mlp.down_proj, dtype)
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
                            m.act if moe is None else 0, a.window, int(self.attn_norm.dtype == torch.float32),
                            int(a.qk_norm_full))

    def _post(self, y, weight):
        return y if weight is None else rms_norm(y, weight, self.eps)

    def forward(self, x, cos, sin_signed, k_cache, v_cache, start_pos, mask):
        a = self.attn(rms_norm(x, self.attn_norm, self.eps), cos, sin_signed,
                      k_cache, v_cache, start_pos, mask)
        h = x + self._post(a, self.post_attn_norm)
        return h + self._post(self.mlp(rms_norm(h, self.mlp_norm, self.eps)), self.post_mlp_norm)
