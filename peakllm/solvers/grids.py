"""Quantization grids: fit per-row parameters on a block of columns, map weights to codes and back.

The contract is docs/DESIGN.md "Quantization grids". Every function here works row-wise on a block of
columns ``[rows, cols]`` with parameters of shape ``[rows, 1]``; the solvers decide which columns form a
group and when its parameters are fitted. Parameters are rounded to fp16-representable values as they
are fitted, so a format storing them as fp16 (and zeros as uint8) reproduces ``dequantize`` bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from peakllm.errors import PeakError
from peakllm.formats.rotation import Rotation, unrotate_rows

AFFINE_BITS = (2, 3, 4, 8)
_FP16 = torch.finfo(torch.float16)
# GPTQ's `mse` search: shrink the clip range in steps of 1/100 down to 20% of min-max.
MSE_STEPS = 100
MSE_MAXSHRINK = 0.8


@dataclass(frozen=True)
class Grid:
    """Which grid to quantize onto.

    kind "affine": ``w = scale * (q - zero)``, ``q`` in ``[0, 2^bits - 1]``; ``sym`` fixes ``zero = 2^(bits-1)``.
    kind "ternary": codes {0, 1, 2} mean {-scale_neg, 0, +scale_pos}; ``sym`` forces equal scales.
    ``bits`` is ignored for ternary and recorded as 2 (the width of its dense code layout).
    ``mse`` searches shrunken clip ranges for the affine fit; for ternary it selects the least-squares fit
    instead of QMoE's min-max grid.
    ``zero_share`` (ternary only): the share of zero codes a size target asks of this matrix; the level is
    then fitted to the weights that stay nonzero at that share (see ``fit``), always symmetric.
    """

    kind: str = "affine"
    bits: int = 4
    group_size: int = -1
    sym: bool = False
    mse: bool = False
    zero_share: float | None = None

    def __post_init__(self):
        if self.kind not in ("affine", "ternary"):
            raise PeakError(f"grid kind must be 'affine' or 'ternary', got {self.kind!r}")
        if self.kind == "ternary":
            object.__setattr__(self, "bits", 2)
        elif self.bits not in AFFINE_BITS:
            raise PeakError(f"affine grid bits must be one of {AFFINE_BITS}, got {self.bits!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or (
            self.group_size != -1 and self.group_size < 1
        ):
            raise PeakError(f"group_size must be -1 (one group per row) or >= 1, got {self.group_size!r}")
        if not isinstance(self.sym, bool) or not isinstance(self.mse, bool):
            raise PeakError("grid sym and mse must be True or False")
        if self.zero_share is not None:
            if self.kind != "ternary" or self.mse:
                raise PeakError("a grid's zero_share applies to ternary grids without mse")
            if not 0.0 <= self.zero_share < 1.0:
                raise PeakError(f"grid zero_share must be in [0, 1), got {self.zero_share}")

    @property
    def maxq(self) -> int:
        """Largest code."""
        return 2 if self.kind == "ternary" else 2**self.bits - 1

    def spec(self) -> dict:
        """The grid as formats store it (DESIGN.md): kind, bits, group_size, sym."""
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size, "sym": self.sym}

    @classmethod
    def from_spec(cls, spec: dict) -> "Grid":
        try:
            return cls(kind=spec["kind"], bits=int(spec["bits"]), group_size=int(spec["group_size"]),
                       sym=bool(spec["sym"]))
        except (KeyError, TypeError, ValueError) as e:
            raise PeakError(f"bad grid spec {spec!r}: {e}") from None

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (kept positive and finite for scales), returned as fp32."""
    return t.clamp(0, _FP16.max).to(torch.float16).to(torch.float32)


def _affine_params(xmin: torch.Tensor, xmax: torch.Tensor, grid: Grid) -> dict[str, torch.Tensor]:
    """Scale/zero for ranges [xmin, xmax] (xmin <= 0 <= xmax, so 0 is always exactly representable)."""
    maxq = grid.maxq
    if grid.sym:
        amax = torch.maximum(-xmin, xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = _fp16(2 * amax / maxq).clamp_min(_FP16.tiny)
        zero = torch.full_like(scale, 2 ** (grid.bits - 1))
    else:
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale = _fp16((xmax - xmin) / maxq).clamp_min(_FP16.tiny)
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return {"scale": scale.float(), "zero": zero.float()}


def _ternary_side(x: torch.Tensor) -> torch.Tensor:
    """Least-squares level b for nonnegative x mapped onto {0, b}: the kept set is a top-k of x, b its mean,
    and the error is sum(x^2) - k*b^2, so pick k maximising cumsum_k^2 / k."""
    s = torch.sort(x, dim=1, descending=True).values.double()
    cs = torch.cumsum(s, dim=1)
    k = torch.arange(1, x.shape[1] + 1, dtype=cs.dtype, device=x.device)
    best = torch.argmax(cs * cs / k, dim=1, keepdim=True)
    return (cs.gather(1, best) / (best + 1)).to(torch.float32)


def fit(W_cols: torch.Tensor, grid: Grid, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Fit one group's parameters per row on ``W_cols [rows, cols]``; values ``[rows, 1]`` fp32, fp16-exact.

    affine: min-max over each row with 0 inside the range (as GPTQ); with ``grid.mse`` the range is shrunk
    by factors 1, 0.99, ..., 0.21 and the one with the least squared error per row is kept.
    ternary (default, as QMoE): the 3-level min-max grid, levels {-s, 0, +s} with s = (max - min) / 2, so
    weights within s/2 of zero (most of them) become 0 -- the sparsity the sub-1-bit code feeds on.
    ternary with ``grid.mse``: the exact least-squares fit per row (lower error, far fewer zeros).
    ternary with ``grid.zero_share`` z: one level, the mean magnitude of the row's round((1 - z) * cols)
    largest |w| -- the least-squares level of the weights that stay nonzero when a size target asks for a
    share z of zeros (the min-max level (max - min) / 2 fits few of them well; rate-controlled GPTQ then chooses
    which codes are zero).
    ``weights`` (``[cols]``, e.g. diag(H): each input's mean squared activation) weight the affine ``mse``
    search's error per column, so the range is chosen for the layer's output rather than the weights alone
    (llama.cpp's importance-matrix search does the same).
    Asymmetric: the positive and negative sides are independent, each side's level is the mean of its
    top-k magnitudes for the best k. Symmetric: the same on |w| with one shared level.
    """
    x = W_cols.detach()
    if x.dim() != 2 or x.shape[1] == 0:
        raise PeakError(f"fit needs a [rows, cols] block with cols >= 1, got shape {tuple(x.shape)}")
    if grid.kind == "ternary":
        if grid.zero_share is not None:
            keep = max(1, round((1.0 - grid.zero_share) * x.shape[1]))
            s = _fp16(x.abs().topk(keep, dim=1).values.mean(dim=1, keepdim=True)).clamp_min(_FP16.tiny)
            return {"scale_neg": s, "scale_pos": s.clone()}
        if not grid.mse:  # QMoE's fit: the 3-level min-max grid, whose middle level is 0
            xmin = x.min(dim=1, keepdim=True).values.clamp(max=0)
            xmax = x.max(dim=1, keepdim=True).values.clamp(min=0)
            span = torch.where(xmax - xmin == 0, torch.ones_like(xmax), xmax - xmin)
            s = _fp16(span / 2).clamp_min(_FP16.tiny)
            return {"scale_neg": s, "scale_pos": s.clone()}
        if grid.sym:
            s = _fp16(_ternary_side(x.abs()))
            return {"scale_neg": s, "scale_pos": s.clone()}
        return {"scale_neg": _fp16(_ternary_side((-x).clamp_min(0))), "scale_pos": _fp16(_ternary_side(x.clamp_min(0)))}

    xmin = x.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = x.max(dim=1, keepdim=True).values.clamp(min=0)
    params = _affine_params(xmin, xmax, grid)
    if not grid.mse:
        return params
    w = torch.ones(1, x.shape[1], dtype=x.dtype, device=x.device) if weights is None else \
        weights.detach().to(x.dtype).reshape(1, -1)
    best = (w * (dequantize(quantize(x, params, grid), params, grid) - x) ** 2).sum(1, keepdim=True)
    for i in range(1, int(MSE_MAXSHRINK * MSE_STEPS)):
        p = 1 - i / MSE_STEPS
        cand = _affine_params(p * xmin, p * xmax, grid)
        err = (w * (dequantize(quantize(x, cand, grid), cand, grid) - x) ** 2).sum(1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        params = {k: torch.where(better, cand[k], params[k]) for k in params}
    return params


def quantize(w: torch.Tensor, params: dict[str, torch.Tensor], grid: Grid) -> torch.Tensor:
    """Codes (uint8, shape of ``w``) of the nearest grid point; ``params`` broadcast against ``w``."""
    if grid.kind == "ternary":
        pos, neg = params["scale_pos"], params["scale_neg"]
        codes = torch.ones(w.shape, dtype=torch.uint8, device=w.device)
        codes = torch.where(w > pos / 2, 2, codes)
        return torch.where(w < -neg / 2, 0, codes).to(torch.uint8)
    q = torch.round(w / params["scale"]) + params["zero"]
    return q.clamp(0, grid.maxq).to(torch.uint8)


def dequantize(codes: torch.Tensor, params: dict[str, torch.Tensor], grid: Grid) -> torch.Tensor:
    """fp32 values of ``codes``: exact, since fp16 scale times a small integer fits in fp32."""
    if grid.kind == "ternary":
        c = codes.to(torch.int64)
        zero = torch.zeros((), dtype=torch.float32, device=codes.device)
        return torch.where(c == 2, params["scale_pos"], torch.where(c == 0, -params["scale_neg"], zero))
    return params["scale"] * (codes.to(torch.float32) - params["zero"])


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight as DESIGN.md fixes it.

    weight: dequantized fp32, original column order. codes: uint8 ``[out, in]``, original column order.
    params: fp32 ``[out, n_groups]`` (scale, zero / scale_neg, scale_pos). g_idx: int32 ``[in]`` group of
    each column, or None when groups are contiguous (column // group_size). grid: ``Grid.spec()``.
    rotation: the codes and params quantize W R^T (formats/rotation.py, solvers/rotated.py); ``weight`` is
    then their dequantization turned back to the original basis, Q R.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    params: dict[str, torch.Tensor]
    g_idx: torch.Tensor | None
    grid: dict
    rotation: Rotation | None = None

    def groups(self) -> torch.Tensor:
        """Group of every input column (int64 ``[in]``), whether or not g_idx is stored."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return contiguous_groups(self.codes.shape[1], self.grid["group_size"], self.codes.device)

    def dequantize(self) -> torch.Tensor:
        """The weight rebuilt from codes and params alone (equals ``weight`` exactly)."""
        g = self.groups()
        cols = {k: v[:, g] for k, v in self.params.items()}
        Q = dequantize(self.codes, cols, Grid.from_spec(self.grid))
        return Q if self.rotation is None else unrotate_rows(Q, self.rotation)


def contiguous_groups(in_features: int, group_size: int, device=None) -> torch.Tensor:
    idx = torch.arange(in_features, device=device)
    return torch.zeros_like(idx) if group_size == -1 else idx // group_size


def assemble(weight: torch.Tensor, codes: torch.Tensor, group_params: list[dict[str, torch.Tensor]],
             grid: Grid, perm: torch.Tensor | None = None, *, static: bool = False) -> QuantizedWeight:
    """Build a QuantizedWeight from sweep-order results: ``group_params[k]`` (values ``[out, 1]``) belongs to
    sweep columns ``[k*gs, (k+1)*gs)``; ``perm[j]`` is the original column at sweep position j.
    ``static``: groups are the original columns ``[k*gs, (k+1)*gs)`` whatever the sweep order (no g_idx)."""
    cols = codes.shape[1]
    params = {k: torch.cat([p[k] for p in group_params], dim=1).float() for k in group_params[0]}
    g_sweep = contiguous_groups(cols, grid.group_size, codes.device)
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        weight, codes = weight[:, inv], codes[:, inv]
        g = g_sweep[inv]
        if not static and not torch.equal(g, g_sweep):
            g_idx = g.to(torch.int32)
    return QuantizedWeight(weight.float().contiguous(), codes.contiguous(), params, g_idx, grid.spec())
