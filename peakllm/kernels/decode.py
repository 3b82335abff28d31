"""The whole-step decode engine (decode.cpp): one C call per token for every layer and the lm_head.

The runtime describes each linear layer as a `Lin` (dense fp32/bf16 weights, group-wise int-k codes,
N:M / bitmask sparse weights with float or int-k kept values, a sub-1-bit stream, or 2-bit / ternary codes in
the lookup-table layout (kernels/lut.py); any of them with an
unmerged LoRA adapter's low-rank term beside it) and each decoder layer as a `Layer`; `Step` holds the C arrays, keeps every tensor they point to alive,
and runs a step. Layers the engine cannot describe (other module types, MoE blocks at batch > 1 or
in bf16, other activations) make the runtime use its op-by-op path instead, which computes the same numbers.
"""

from __future__ import annotations

import ctypes

import torch

from peakllm.errors import PeakError
from peakllm.kernels.build import load_library

LIN_F32, LIN_BF16, LIN_INTK, LIN_NM, LIN_BITMASK, LIN_SUB1, LIN_LUT = 0, 1, 2, 3, 4, 5, 6
MOE_SUM, MOE_SOFTMAX, MOE_SOFTMAX_TOPK = 0, 1, 2  # how a MoE weights its chosen experts (decode.cpp)
_VALUE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # sparse_impl.h; 3 = int-k codes
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


class Lin(ctypes.Structure):
    """One linear layer (mirrors the C struct)."""

    _fields_ = ([(n, ctypes.c_int) for n in ("kind", "in_features", "out_features", "bits", "n_groups", "n", "m",
                                              "value_kind", "group_size")]
                + [(n, ctypes.c_void_p) for n in ("w", "bias", "scales", "zeros", "gstart", "perm", "index",
                                                  "row_offsets", "qrow_offsets")]
                + [("total", ctypes.c_int64), ("act_bits", ctypes.c_int), ("rot_signs", ctypes.c_void_p),
                   ("rot_block", ctypes.c_int), ("lora_a", ctypes.c_void_p), ("lora_b", ctypes.c_void_p),
                   ("lora_r", ctypes.c_int), ("lora_bf16", ctypes.c_int)])


class LutMatrix(ctypes.Structure):
    """A matrix in the lookup-table layout (mirrors decode_lut.h's struct; fields of lut_reference.LutWeights)."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("qlut", "s1", "p2")]
                + [(n, ctypes.c_int) for n in ("kind", "group", "n_groups", "kblock", "exact")]
                + [(n, ctypes.c_int64) for n in ("in_pad", "out_pad")])


class Moe(ctypes.Structure):
    """A mixture-of-experts MLP: linear router, top-k experts weighted and summed (mirrors the C struct)."""

    _fields_ = [("router", Lin), ("gate_up", ctypes.POINTER(Lin)), ("down", ctypes.POINTER(Lin)),
                ("n_experts", ctypes.c_int), ("top_k", ctypes.c_int), ("inter", ctypes.c_int),
                ("work", ctypes.c_void_p), ("weighting", ctypes.c_int)]


class Layer(ctypes.Structure):
    """One decoder layer (mirrors the C struct); `moe` points to a Moe or is null."""

    _fields_ = ([(n, Lin) for n in ("q", "k", "v", "o", "g", "u", "d")]
                + [(n, ctypes.c_void_p) for n in ("mlp_norm", "next_norm", "qn", "kn", "kc", "vc")]
                + [(n, ctypes.c_int) for n in ("dim", "n_heads", "n_kv", "head_dim", "inter", "max_seq")]
                + [(n, ctypes.c_float) for n in ("eps", "next_eps", "qk_eps", "scale")]
                + [("moe", ctypes.c_void_p)]
                + [(n, ctypes.c_void_p) for n in ("post_attn_norm", "post_mlp_norm", "rope_cos", "rope_sin")]
                + [(n, ctypes.c_int) for n in ("act", "window", "norm_f32w", "qk_norm_full")])


def moe(router: Lin, gate_up: list[Lin], down: list[Lin], top_k: int, inter: int, dim: int, keep: list,
        readout: list | None = None, weighting: int = MOE_SUM):
    """The C description of a MoE MLP (batch 1, fp32); returns its address for Layer.moe. `readout`, if
    given, receives an int32 view [top_k] of the experts the last step picked."""
    E = len(gate_up)
    gu, dn = (Lin * E)(*gate_up), (Lin * E)(*down)
    work = torch.zeros(E + 3 * top_k * inter + top_k * dim + 2 * top_k)  # the last top_k floats hold ints
    m = Moe(router, ctypes.cast(gu, ctypes.POINTER(Lin)), ctypes.cast(dn, ctypes.POINTER(Lin)), E, top_k, inter,
            work.data_ptr(), weighting)
    keep.extend((gu, dn, work, m))
    if readout is not None:
        readout.append(work[work.numel() - top_k:].view(torch.int32))
    return ctypes.addressof(m)


_fns: dict | None = None


def _kernels() -> dict:
    global _fns
    if _fns is None:
        _fns = {}
        lib = load_library("decode")
        if lib is not None:
            for dtype, s in _SUFFIX.items():
                fn = getattr(lib, f"decode_step_{s}")
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p] + [ctypes.c_void_p] * 3 + [
                    ctypes.c_int, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int]
                fn.restype = ctypes.c_int
                _fns[dtype] = fn
            size = lib.decode_scratch_size
            size.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
            size.restype = ctypes.c_ulong
            _fns["scratch_size"] = size
            apply = lib.lin_apply_f32
            apply.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_int]
            apply.restype = ctypes.c_int
            _fns["lin_apply_f32"] = apply
            claims = lib.lin_apply_f32_claims
            claims.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
            claims.restype = ctypes.c_int
            _fns["lin_apply_f32_claims"] = claims
            sweep = lib.lin_sweep_f32
            sweep.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2
            sweep.restype = ctypes.c_int
            _fns["lin_sweep_f32"] = sweep
    return _fns


def available(dtype: torch.dtype) -> bool:
    return dtype in _kernels()


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int) -> None:
    if rc:
        raise PeakError("the decode engine found sparse positions / offsets that disagree with the layout")


def _bias(bias: torch.Tensor | None, keep: list) -> int | None:
    if bias is None:
        return None
    b = bias.detach().float().contiguous()
    keep.append(b)
    return b.data_ptr()


def dense_lin(weight: torch.Tensor, bias: torch.Tensor | None, keep: list) -> Lin | None:
    """A dense layer (fp32 or bf16 weight [out, in], contiguous), or None for other weights."""
    kind = {torch.float32: LIN_F32, torch.bfloat16: LIN_BF16}.get(weight.dtype)
    if kind is None or weight.dim() != 2 or not weight.is_contiguous():
        return None
    keep.append(weight)
    return Lin(kind, weight.shape[1], weight.shape[0], w=weight.data_ptr(), bias=_bias(bias, keep))


def intk_lin(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_starts: torch.Tensor,
             perm: torch.Tensor | None, bias: torch.Tensor | None, in_features: int, out_features: int,
             keep: list, int8_act: bool = False, rotation=None) -> Lin | None:
    """A group-wise int-k layer whose tensors were already checked (IntKLinear), or None if unusual;
    int8_act: x quantized to int8 per 32 columns where the layer allows it (intk_a8_impl.h); rotation: a
    formats.rotation.Rotation applied to x first (a rotated layer, never with perm)."""
    if rotation is not None and perm is not None:
        return None
    signs = None if rotation is None else rotation.signs.contiguous()
    tensors = (codes, scales, zeros, group_starts) + (() if perm is None else (perm,)) + (() if signs is None else (signs,))
    if not all(t.is_contiguous() for t in tensors) or scales.dtype != torch.float16 or zeros.dtype != torch.uint8:
        return None
    if group_starts.dtype != torch.int32 or (perm is not None and perm.dtype != torch.int32):
        return None
    keep.extend(tensors)
    return Lin(LIN_INTK, in_features, out_features, bits, group_starts.numel() - 1, w=codes.data_ptr(),
               bias=_bias(bias, keep), scales=scales.data_ptr(), zeros=zeros.data_ptr(), gstart=group_starts.data_ptr(),
               perm=_p(perm), act_bits=8 if int8_act else 0, rot_signs=_p(signs),
               rot_block=0 if rotation is None else rotation.block)


def _sparse_values(values, qweight, scales, zeros, bits, group_size, keep: list) -> dict | None:
    if values is not None:
        if values.dtype not in _VALUE_KIND or not values.is_contiguous():
            return None
        keep.append(values)
        return dict(value_kind=_VALUE_KIND[values.dtype], w=values.data_ptr(), group_size=-1)
    if not all(t.is_contiguous() for t in (qweight, scales, zeros)):
        return None
    keep.extend((qweight, scales, zeros))
    return dict(value_kind=3, w=qweight.data_ptr(), bits=bits, group_size=group_size, scales=scales.data_ptr(),
                zeros=zeros.data_ptr())


def nm_lin(indices, n: int, m: int, in_features: int, out_features: int, values=None, qweight=None, scales=None,
           zeros=None, bits=None, group_size=None, bias=None, *, keep: list) -> Lin | None:
    """An N:M sparse layer whose tensors were already checked (NMLinear), or None if unusual."""
    vals = _sparse_values(values, qweight, scales, zeros, bits, group_size, keep)
    if vals is None or not indices.is_contiguous():
        return None
    keep.append(indices)
    return Lin(LIN_NM, in_features, out_features, n=n, m=m, index=indices.data_ptr(), bias=_bias(bias, keep), **vals)


def bitmask_lin(mask, row_offsets, in_features: int, out_features: int, values=None, qweight=None, scales=None,
                zeros=None, bits=None, group_size=None, qrow_offsets=None, bias=None, *, keep: list) -> Lin | None:
    """A bitmask sparse layer whose tensors were already checked (BitmaskLinear), or None if unusual."""
    vals = _sparse_values(values, qweight, scales, zeros, bits, group_size, keep)
    if vals is None or not (mask.is_contiguous() and row_offsets.is_contiguous()):
        return None
    keep.extend(t for t in (mask, row_offsets, qrow_offsets) if t is not None)
    total = (values if values is not None else qweight).numel()
    return Lin(LIN_BITMASK, in_features, out_features, index=mask.data_ptr(), row_offsets=row_offsets.data_ptr(),
               qrow_offsets=_p(qrow_offsets), total=total, bias=_bias(bias, keep), **vals)


def sub1_lin(operands, bias: torch.Tensor | None, in_features: int, out_features: int, keep: list) -> Lin:
    """A sub-1-bit layer from its prepared kernel operands (kernels/sub1.py `operands`)."""
    keep.append(operands)  # the struct and every tensor it points to
    return Lin(LIN_SUB1, in_features, out_features, w=ctypes.addressof(operands.matrix), bias=_bias(bias, keep))


def lut_lin(weights, exact: bool, bias: torch.Tensor | None, keep: list, rotation=None) -> Lin:
    """A layer in the lookup-table layout (kernels/lut.py LutWeights, already checked: lut.check_weights): its rows
    are lut_gemm's, int8 tables or (exact) fp32 ones; rotation: a rotated 2-bit layer's R, applied to x first."""
    m = LutMatrix(weights.qlut.data_ptr(), weights.s1.data_ptr(), _p(weights.p2), weights.kind, weights.group,
                  weights.n_groups, weights.kblock, int(exact), weights.in_pad, weights.out_pad)
    signs = None if rotation is None else rotation.signs.contiguous()
    keep.extend((weights, m, signs))
    lin = Lin(LIN_LUT, weights.in_features, weights.out_features, w=ctypes.addressof(m), bias=_bias(bias, keep),
              rot_signs=_p(signs), rot_block=0 if rotation is None else rotation.block)
    lin.matrix = m  # while this Lin object lives (a copy in a Layer or an array relies on `keep`)
    return lin


def with_lora(lin: Lin, lora_a: torch.Tensor, lora_b: torch.Tensor, keep: list) -> Lin | None:
    """`lin` with an unmerged LoRA term y += lora_b @ (lora_a @ x) (lora_impl.h): lora_a [r, in], lora_b [out, r]
    (already times the adapter's scale), both fp32 or both bf16 and contiguous; None if unusual."""
    r = lora_a.shape[0]
    if (lora_a.dtype not in (torch.float32, torch.bfloat16) or lora_b.dtype != lora_a.dtype
            or tuple(lora_a.shape) != (r, lin.in_features) or tuple(lora_b.shape) != (lin.out_features, r)
            or not (lora_a.is_contiguous() and lora_b.is_contiguous())):
        return None
    keep.extend((lora_a, lora_b))
    lin.lora_a, lin.lora_b, lin.lora_r = lora_a.data_ptr(), lora_b.data_ptr(), r
    lin.lora_bf16 = int(lora_a.dtype == torch.bfloat16)
    return lin


def lin_apply(lin: Lin, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for fp32 x [B, in] through the engine's per-thread row split (tests)."""
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], lin.out_features)
    _check(_kernels()["lin_apply_f32"](ctypes.byref(lin), x.data_ptr(), y.data_ptr(), x.shape[0],
                                       threads or torch.get_num_threads()))
    return y


def lin_apply_claims(lin: Lin, x: torch.Tensor, threads: int, idle: int = -1) -> torch.Tensor:
    """lin_apply through the decode step's row claims (threads that finish early take over others' rows);
    thread `idle` (>= 0) starts only when the others have finished, so they take its whole band (tests)."""
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], lin.out_features)
    _check(_kernels()["lin_apply_f32_claims"](ctypes.byref(lin), x.data_ptr(), y.data_ptr(), x.shape[0], threads,
                                              idle))
    return y


def lin_sweep(lins: list[Lin], x: torch.Tensor, reps: int, threads: int) -> torch.Tensor:
    """`reps` passes over layers of one shape at batch 1 in one parallel region, as a decode step runs its
    linears (benchmarks); returns the last layer's y."""
    arr = (Lin * len(lins))(*lins)
    x = x.float().contiguous().reshape(1, -1)
    y = torch.empty(1, max(lin.out_features for lin in lins))
    _check(_kernels()["lin_sweep_f32"](arr, len(lins), x.data_ptr(), y.data_ptr(), reps, threads))
    return y


class Step:
    """The C description of a whole model for one batch size; `run` decodes one token of each sequence, or
    T consecutive tokens of each (speculative verification: each token's logits are those of decoding it
    alone, see decode.cpp)."""

    def __init__(self, layers: list[Layer], head: Lin | None, dtype: torch.dtype, batch: int, keep: list):
        self.layers = (Layer * len(layers))(*layers)
        self.head = head
        self.dtype, self.batch = dtype, batch
        self._keep = keep  # every tensor a pointer above refers to
        self.scratch = torch.empty(0, dtype=dtype)
        self._scratch_rows = 0
        self._grow_scratch(batch)
        self.fn = _kernels()[dtype]
        self.vocab = None if head is None else head.out_features
        self.multi_token = not any(layer.moe for layer in layers)  # a MoE block decodes one token at a time

    def _grow_scratch(self, rows: int) -> None:
        if rows > self._scratch_rows:
            n = _kernels()["scratch_size"](self.layers, len(self.layers), rows)
            self.scratch = torch.empty(int(n), dtype=self.dtype)
            self._scratch_rows = rows

    def run(self, x: torch.Tensor, h: torch.Tensor, pos: int, cos: torch.Tensor, sin_signed: torch.Tensor,
            threads: int, tokens: int = 1) -> torch.Tensor | None:
        """x [B, T, dim] residual (in place), h = attn_norm(x) of layer 0 (becomes the final norm's
        output), T = `tokens` at positions pos .. pos+T-1; cos / sin_signed: position pos's row of a contiguous
        [positions, 1, head_dim] table. Returns logits [B, T, vocab] when the engine has the lm_head, else None."""
        B = x.shape[0]
        if tokens > 1 and not self.multi_token:
            raise PeakError("the decode engine verifies several tokens only without MoE blocks")
        if tokens > 1 and not (x.is_contiguous() and h.is_contiguous() and x.shape[1] == tokens):
            raise PeakError("decode engine: x and h must be contiguous [batch, tokens, dim]")
        self._grow_scratch(B * tokens)
        logits = None if self.head is None else torch.empty(B, tokens, self.vocab, dtype=self.dtype)
        _check(self.fn(self.layers, len(self.layers), None if self.head is None else ctypes.byref(self.head),
                       x.data_ptr(), h.data_ptr(), _p(logits), B, tokens, pos, cos.data_ptr(), sin_signed.data_ptr(),
                       self.scratch.data_ptr(), threads))
        return logits
