"""The lookup-table kernel's weight layout (`LutWeights`) and its pure-torch reference (kernels/lut.cpp),
written to be obviously right.

`lut_dequantize` rebuilds the dense matrix from the LUT layout alone (so a packing error shows against the
original codes); `lut_matmul_ref` computes what the kernel computes: the per-token sign tables, int8-quantized
per k-block unless `exact`, looked up by every row's bit-plane indices, and combined per group with
(alpha, beta, gamma) of docs/LUT_KERNEL.md. `error_bound` bounds |int8-table result - exact result| per output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT2, TERN_SYM, TERN_ASYM = 0, 1, 2  # LutWeights.kind (lut_impl.h: LUT_*)


@dataclass
class LutWeights:
    """One matrix in the kernel's layout: qlut uint8 [out_pad/8, in_pad/16, 32] bit-plane indices; s1 fp16
    [out_pad/8, n_groups, 8] (int2: scale; ternary: scale_neg, the scale when symmetric); p2 int2: uint8 zeros,
    asymmetric ternary: fp16 scale_pos, same tiling; symmetric ternary: None."""

    qlut: torch.Tensor
    s1: torch.Tensor
    p2: torch.Tensor | None
    kind: int
    in_features: int
    out_features: int
    in_pad: int
    out_pad: int
    group: int  # columns per group in the padded order (in_pad for one group a row)
    kblock: int

    @property
    def n_groups(self) -> int:
        return -(-self.in_pad // self.group)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qlut, self.s1, self.p2) if t is not None)


# SIGNS[idx, i] = +1 when bit i of idx is set, else -1
SIGNS = torch.tensor([[1.0 if idx >> i & 1 else -1.0 for i in range(4)] for idx in range(16)])


def plane_indices(w: LutWeights) -> torch.Tensor:
    """int64 [2, out, in_pad/4]: the 4-bit index of each plane, row and 4-column group."""
    tiles, jt = w.qlut.shape[:2]
    b = w.qlut.reshape(tiles, jt, 2, 8, 2).to(torch.int64)  # tile, j, L, r, p
    nib = torch.stack([b & 15, b >> 4], dim=3)  # tile, j, L, h, r, p: group 4j + 2h + L
    idx = nib.permute(5, 0, 4, 1, 3, 2).reshape(2, w.out_pad, w.in_pad // 4)
    return idx[:, : w.out_features]


def _params(w: LutWeights):
    """Per (row, group) fp32 s1 and p2 in [out, n_groups] order."""
    def untile(t):
        return t.transpose(1, 2).reshape(w.out_pad, -1)[: w.out_features].float()
    return untile(w.s1), None if w.p2 is None else untile(w.p2)


def lut_dequantize(w: LutWeights) -> torch.Tensor:
    """Dense fp32 W [out, in] from the LUT layout."""
    idx = plane_indices(w)
    bits = ((idx.unsqueeze(-1) >> torch.arange(4)) & 1).reshape(2, w.out_features, w.in_pad)[..., : w.in_features]
    s1, p2 = _params(w)
    gi = torch.arange(w.in_features) // w.group
    if w.kind == INT2:
        return s1[:, gi] * ((bits[0] + 2 * bits[1]).float() - p2[:, gi])
    pos, neg = bits[0].bool(), ~bits[1].bool()
    sp = s1 if p2 is None else p2
    return torch.where(pos, sp[:, gi], torch.where(neg, -s1[:, gi], torch.zeros(())))


def sign_tables(x: torch.Tensor, in_pad: int) -> torch.Tensor:
    """fp32 [B, in_pad/4, 16]: T[idx] = sum_i SIGNS[idx, i] * x_i over each 4 columns, summed x0 first."""
    xp = torch.zeros(x.shape[0], in_pad)
    xp[:, : x.shape[1]] = x.float()
    x4 = xp.reshape(x.shape[0], -1, 1, 4)
    t = x4[..., 0] * SIGNS[:, 0]
    for i in range(1, 4):
        t = t + x4[..., i] * SIGNS[:, i]
    return t


def quantize_tables(t: torch.Tensor, kblock: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8-valued fp32 tables, scale [B, in_pad/kblock]) with one scale amax / 127 per k-block."""
    B = t.shape[0]
    tb = t.reshape(B, -1, kblock // 4 * 16)
    amax = tb.abs().amax(-1)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    q = torch.round(tb * inv.unsqueeze(-1))
    return q.reshape(t.shape), amax / 127.0


def _plane_sums(w: LutWeights, t: torch.Tensor) -> torch.Tensor:
    """float64 [2, B, out, in_pad/4]: each row's table entries, per plane and 4-column group."""
    idx = plane_indices(w)  # [2, out, G4]
    tt = t.double().unsqueeze(1).expand(-1, w.out_features, -1, -1)  # B, out, G4, 16
    return torch.stack([torch.gather(tt, 3, idx[p].unsqueeze(0).expand(t.shape[0], -1, -1).unsqueeze(-1))[..., 0]
                        for p in range(2)])


def lut_matmul_ref(x: torch.Tensor, w: LutWeights, exact: bool = False) -> torch.Tensor:
    """fp32 [B, out]: the kernel's product computed with torch (float64 sums, so only the tables' own
    quantization separates it from the exact product)."""
    B = x.shape[0]
    t = sign_tables(x, w.in_pad)
    if exact:
        scale = torch.ones(B, w.in_pad // w.kblock)
    else:
        t, scale = quantize_tables(t, w.kblock)
    e = _plane_sums(w, t)  # [2, B, out, G4]
    per_k = e.reshape(2, B, w.out_features, -1, w.kblock // 4).sum(-1) * scale.double()[None, :, None, :]
    k_per_group = w.group // w.kblock
    nk = per_k.shape[-1]
    gk = torch.arange(nk) // k_per_group
    a = torch.zeros(2, B, w.out_features, w.n_groups, dtype=torch.float64).index_add_(3, gk, per_k)
    xp = torch.zeros(B, w.in_pad, dtype=torch.float64)
    xp[:, : x.shape[1]] = x.double()
    xs = torch.zeros(B, w.n_groups, dtype=torch.float64).index_add_(1, torch.arange(w.in_pad) // w.group, xp)
    alpha, beta, gamma, c = coefficients(w)
    y = (alpha * (a[0] + c * a[1]) + beta * a[0] + gamma * xs[:, None, :]).sum(-1)
    return y.float()


def coefficients(w: LutWeights):
    """(alpha, beta, gamma) float64 [out, n_groups] and the plane-1 weight c (docs/LUT_KERNEL.md)."""
    s1, p2 = _params(w)
    s1 = s1.double()
    zero = torch.zeros_like(s1)
    if w.kind == INT2:
        return s1 / 2, zero, s1 * (1.5 - p2.double()), 2
    if w.kind == TERN_ASYM:
        d = (p2.double() - s1) / 2
        return s1 / 2, d, d, 1
    return s1 / 2, zero, zero, 1


def error_bound(x: torch.Tensor, w: LutWeights) -> torch.Tensor:
    """fp32 [B, out]: a bound on |int8-table result - exact result| from rounding each table entry to
    the nearest multiple of its k-block's scale (half a step per entry looked up), plus fp32 slack."""
    _, scale = quantize_tables(sign_tables(x, w.in_pad), w.kblock)
    alpha, beta, _, c = coefficients(w)
    per_entry = (alpha.abs() * (1 + c) + beta.abs()) * (w.kblock // 4) / 2  # [out, n_groups], per unit of scale
    k_group = torch.arange(w.in_pad // w.kblock) * w.kblock // w.group
    bound = (scale.double()[:, None, :] * per_entry[None, :, k_group]).sum(-1)
    ref = lut_matmul_ref(x, w, exact=True).abs().double()
    return (bound + 1e-5 * (ref + 1)).float()
