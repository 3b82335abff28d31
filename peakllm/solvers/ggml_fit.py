"""Fit a ggml block type's parameters on a weight, the way llama.cpp's quantizer chooses them.

Per group of weights, a weighted least-squares search over candidate scales (llama.cpp's ``make_qx_quants``
for the symmetric types, ``make_qkx2_quants`` for the ones with a min, ``quantize_row_iq4_nl_impl`` for
IQ4_NL); then the type's own rounding of those: fp16 per block for the legacy types, and for the K-quants
the sub-block scales and mins quantized to 4/6/8-bit integers of one fp16 ``d``/``dmin`` per 256 weights.
The weight of each element in the search is llama.cpp's: with an importance vector (the imatrix: each input
column's mean squared activation, diag(H) up to a constant) ``imp[col] * sqrt(sigma2 + x^2)``, sigma2 the
block's mean x^2; without one, ``x^2`` (symmetric types) or ``sqrt(sigma2) + |x|`` (types with a min).
Vectorised over all groups of the matrix; candidates are tried one at a time to bound memory. Every sum over a
group or block is accumulated in float64 and rounded once (``fsum``): its value then does not depend on the order
of the terms, so the compiled kernel (kernels/ggml_fit.cpp, which ``fit_params`` calls when it can be built)
computes the same parameters with its own loops; this torch code is its reference.
"""

from __future__ import annotations

import torch

from peakllm.formats.gguf.blocks import IQ4_NL_VALUES, BlockType
from peakllm.kernels.ggml_fit import KINDS, FitSpec, fit_kernel

EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a group this small is all zeros
# (nmax, rmin, rdelta, nstep) of make_qkx2_quants as llama.cpp calls it per type
ASYM_SEARCH = {"Q4_1": (15, -1.0, 0.1, 20), "Q5_1": (31, -0.5, 0.1, 15), "Q2_K": (3, -0.5, 0.1, 15),
               "Q4_K": (15, -1.0, 0.1, 20), "Q5_K": (31, -0.5, 0.1, 15)}
# levels of the symmetric types' scale search: round(iscale * x) in [-nmax, nmax - 1] (Q8_0: as llama.cpp, no -128)
SYM_NMAX = {"Q8_0": 127, "Q4_0": 8, "Q5_0": 16, "Q3_K": 4, "Q6_K": 32}
FIT_CHUNK_WEIGHTS = 1 << 21  # weights fitted at once by the reference (~90 MB of workspace)
IQ4NL_NTRY = 7  # quantize_row_iq4_nl_impl's candidates on each side
REFINE_ROUNDS = 2
IQ4NL_LEVELS = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)


def fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def fsum(t: torch.Tensor, dim, keepdim: bool = False) -> torch.Tensor:
    """``t.sum(dim)`` accumulated in float64 and rounded to t's dtype once: the same fp32 value whatever order the
    terms are added in (bar a double's last bit landing on a rounding tie), as the kernel's loops need."""
    return t.sum(dim=dim, keepdim=keepdim, dtype=torch.float64).to(t.dtype)


def sqrt_rounded(t: torch.Tensor) -> torch.Tensor:
    """sqrt rounded to t's dtype as IEEE rounds it: torch's fp32 sqrt (MKL's) is an ulp off at times; through
    float64 and back it is always the correctly rounded fp32 value, as the kernel's sqrtf is."""
    return torch.sqrt(t.double()).to(t.dtype)


def element_weights(x: torch.Tensor, importance: torch.Tensor | None, symmetric: bool) -> torch.Tensor:
    """llama.cpp's per-element weights for ``x [rows, blocks, block]``; ``importance [rows?, blocks, block]``."""
    sigma2 = ((x * x).sum(dim=-1, keepdim=True, dtype=torch.float64) / x.shape[-1]).to(x.dtype)
    if importance is not None:
        return importance * sqrt_rounded(sigma2 + x * x)
    return x * x if symmetric else sqrt_rounded(sigma2) + x.abs()


def signed_max(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along the last dim, with its sign ([..., 1])."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))


def sym_scale(x: torch.Tensor, w: torch.Tensor, nmax: int) -> torch.Tensor:
    """make_qx_quants: the scale s minimising sum w (x - s*L)^2 over L = round(iscale * x) in [-nmax, nmax-1]
    for iscale in -(nmax + 0.1*k) / max, k in -9..9 (max: the signed largest |x|); 0 for empty groups."""
    mx = signed_max(x)
    empty = mx.abs() < EPS
    mx = torch.where(empty, torch.ones_like(mx), mx)
    levels = (torch.round(-(nmax + 0.1 * k) / mx * x).clamp(-nmax, nmax - 1)
              for k in [0] + [k for k in range(-9, 10) if k])
    return torch.where(empty, 0, best_ls_scale(x, w, levels)).squeeze(-1)


def best_ls_scale(x: torch.Tensor, w: torch.Tensor, candidates) -> torch.Tensor:
    """Of the candidate level assignments L (each shaped like x), the least-squares scale s = sum w x L / sum w L^2
    of the one that lowers sum w (x - s L)^2 most (the largest s * sum w x L), per group ([..., 1]); the first
    candidate stands until a valid one beats it, as in llama.cpp's searches."""
    best_scale = best_score = None
    for L in candidates:
        sumlx, suml2 = fsum(w * x * L, -1, keepdim=True), fsum(w * L * L, -1, keepdim=True)
        ok = suml2 > 0
        scale = torch.where(ok, sumlx / torch.where(ok, suml2, 1), 0)
        score = scale * sumlx
        if best_scale is None:
            best_scale, best_score = scale, score
        else:
            better = ok & (score > best_score)
            best_scale, best_score = torch.where(better, scale, best_scale), torch.where(better, score, best_score)
    return best_scale


def asym_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                   nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qkx2_quants: (scale, the_min >= 0) minimising sum w (x - (scale*L - the_min))^2, L in [0, nmax],
    over candidate iscales (rmin + rdelta*k + nmax) / (max - min) with the scale and min refitted by
    weighted least squares for each candidate's L (min clamped to <= 0, as a ggml min is subtracted)."""
    lo = x.min(dim=-1, keepdim=True).values.clamp(max=0)
    hi = x.max(dim=-1, keepdim=True).values
    span = hi - lo
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)

    def err(scale, mn, L):
        return fsum(w * (scale * L + mn - x) ** 2, -1, keepdim=True)

    L = torch.round(nmax / span * (x - lo)).clamp(0, nmax)
    best_scale, best_min = span / nmax, lo
    best_err = err(best_scale, best_min, L)
    sum_w, sum_x = fsum(w, -1, keepdim=True), fsum(w * x, -1, keepdim=True)
    for k in range(nstep + 1):
        L = torch.round((rmin + rdelta * k + nmax) / span * (x - lo)).clamp(0, nmax)
        sum_l, sum_l2, sum_xl = fsum(w * L, -1, True), fsum(w * L * L, -1, True), fsum(w * L * x, -1, True)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, 1)
        scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        mn = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        positive = mn > 0  # a min above 0 cannot be stored: refit the scale alone
        scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1), scale)
        mn = torch.where(positive, 0, mn)
        e = err(scale, mn, L)
        better = ok & (e < best_err)
        best_scale, best_min, best_err = (torch.where(better, a, b) for a, b in
                                          ((scale, best_scale), (mn, best_min), (e, best_err)))
    best_scale = torch.where(flat, 0, best_scale)
    return best_scale.squeeze(-1), (-torch.where(flat, lo, best_min)).squeeze(-1)


def iq4nl_scale(x: torch.Tensor, w: torch.Tensor, ntry: int = IQ4NL_NTRY) -> torch.Tensor:
    """quantize_row_iq4_nl_impl: the scale d minimising sum w (x - d*v)^2 with v the IQ4_NL value nearest
    x/d, over candidates d = max / (v0 + k), k in -ntry..ntry (v0 = -127), refitted by least squares."""
    values = torch.tensor(IQ4_NL_VALUES, dtype=x.dtype, device=x.device)
    mx = signed_max(x)
    empty = mx.abs() < EPS
    mx = torch.where(empty, torch.ones_like(mx), mx)
    iscales = [-values[0] / mx] + [(k + values[0]) / mx for k in range(-ntry, ntry + 1)]
    levels = (values[nearest_value(iscale * x, values)] for iscale in iscales)
    return torch.where(empty, 0, best_ls_scale(x, w, levels)).squeeze(-1)


def nearest_value(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending ``values`` to each element of ``t``."""
    mids = (values[1:] + values[:-1]) / 2
    return torch.bucketize(t, mids)


def superblock_ints(s: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nonnegative sub-block values ``s [rows, blocks, groups]`` as ints in [0, qmax] times one fp16 per block."""
    top = s.max(dim=-1, keepdim=True).values
    inv = torch.where(top > 0, qmax / torch.where(top > 0, top, 1), 0)
    ints = torch.round(inv * s).clamp(0, qmax)
    return fp16((top / qmax).squeeze(-1)), ints.to(torch.int16)


def superblock_signed(s: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed sub-block scales as ints in [lo, hi] times one fp16 d per block; the largest |s| maps to lo
    (llama.cpp's iscale = lo / max, d = 1 / iscale)."""
    mx = signed_max(s)
    zero = mx == 0
    iscale = torch.where(zero, 0, lo / torch.where(zero, 1, mx))
    ints = torch.round(iscale * s).clamp(lo, hi)
    d = torch.where(zero, 0, 1 / torch.where(zero, 1, iscale))
    return fp16(d.squeeze(-1)), ints.to(torch.int16)


def group_error(xs: torch.Tensor, ws: torch.Tensor, t: BlockType, d: torch.Tensor, dmin: torch.Tensor | None,
                sc: torch.Tensor, mn: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted squared error per group [rows, blocks, groups], levels) of ``xs [rows, blocks, groups, group]``
    rounded onto the grid of fp16 ``d``/``dmin`` per block and integer ``sc``/``mn`` per group."""
    scale = (d.float().unsqueeze(-1) * sc.float()).unsqueeze(-1)
    bias = None if mn is None else (-(dmin.float().unsqueeze(-1) * mn.float())).unsqueeze(-1)
    zero = scale == 0
    target = xs if bias is None else xs - bias
    level = torch.round(torch.where(zero, 0, target / torch.where(zero, 1, scale)))
    level = level.clamp(*t.solve_levels)
    q = scale * level if bias is None else scale * level + bias
    return fsum(ws * (xs - q) ** 2, -1), level


def superblock_error(xs, ws, t, d, dmin, sc, mn) -> tuple[torch.Tensor, torch.Tensor]:
    err, level = group_error(xs, ws, t, d, dmin, sc, mn)
    return fsum(err, -1), level


def nudge_ints(xs, ws, t: BlockType, d, dmin, sc, mn):
    """Each group's integer scale (and min) moved by one step where that lowers the group's own error."""
    lo, hi = t.params["scales"][1]
    best, _ = group_error(xs, ws, t, d, dmin, sc, mn)
    for key in ("scales", "mins") if mn is not None else ("scales",):
        for step in (-1, 1):
            cur = sc if key == "scales" else mn
            cand = (cur + step).clamp(lo, hi)
            err, _ = group_error(xs, ws, t, d, dmin, cand if key == "scales" else sc, cand if key == "mins" else mn)
            better = err < best
            best = torch.where(better, err, best)
            if key == "scales":
                sc = torch.where(better, cand, sc)
            else:
                mn = torch.where(better, cand, mn)
    return sc, mn


def refine_superblock(xs: torch.Tensor, ws: torch.Tensor, t: BlockType, d: torch.Tensor, dmin: torch.Tensor | None,
                      sc: torch.Tensor, mn: torch.Tensor | None, rounds: int = REFINE_ROUNDS, nudge: bool = True):
    """Lower each block's weighted error below llama.cpp's fit, in ``rounds`` of two steps: move each group's
    integer scale (and min) by one where that lowers the group's error; then, those fixed, refit the block's
    fp16 d (and dmin) by weighted least squares on its weights (w = d*sc*level - dmin*mn is linear in them)
    and re-round, kept only where the block's error drops. Never worse than the fit it starts from."""
    best, level = superblock_error(xs, ws, t, d, dmin, sc, mn)
    for _ in range(rounds):
        if nudge:
            sc, mn = nudge_ints(xs, ws, t, d, dmin, sc, mn)
            best, level = superblock_error(xs, ws, t, d, dmin, sc, mn)
        a = sc.float().unsqueeze(-1) * level  # the weight is d * a (- dmin * b)
        waa, wax = fsum(ws * a * a, (-1, -2)), fsum(ws * a * xs, (-1, -2))
        if mn is None:
            ok = waa > 0
            new_d, new_dmin = torch.where(ok, wax / torch.where(ok, waa, 1), d.float()), None
        else:
            b = -mn.float().unsqueeze(-1).expand_as(a)
            wab, wbb, wbx = fsum(ws * a * b, (-1, -2)), fsum(ws * b * b, (-1, -2)), fsum(ws * b * xs, (-1, -2))
            det = waa * wbb - wab * wab
            ok = det > 1e-30 * (waa * wbb).clamp_min(1e-30)
            dets = torch.where(ok, det, 1)
            new_d = torch.where(ok, (wax * wbb - wbx * wab) / dets, d.float())
            new_dmin = torch.where(ok, (wbx * waa - wax * wab) / dets, dmin.float())
        new_d = fp16(new_d)
        new_dmin = None if new_dmin is None else fp16(new_dmin)
        finite = torch.isfinite(new_d.float()) & (True if new_dmin is None else torch.isfinite(new_dmin.float()))
        err, new_level = superblock_error(xs, ws, t, new_d, new_dmin, sc, mn)
        better = finite & (err < best)
        d = torch.where(better, new_d, d)
        dmin = None if dmin is None else torch.where(better, new_dmin, dmin)
        level = torch.where(better[..., None, None], new_level, level)
        best = torch.where(better, err, best)
    return d, dmin, sc, mn


def fit_spec(t: BlockType) -> FitSpec:
    """Type ``t`` described to the kernel: which search, its constants, the level and integer ranges."""
    if t.values is not None:
        kind, (nmax, rmin, rdelta, nstep) = "iq4nl", (1, 0.0, 0.0, IQ4NL_NTRY)
    elif t.name in SYM_NMAX:
        kind, (nmax, rmin, rdelta, nstep) = "symmetric", (SYM_NMAX[t.name], 0.0, 0.0, 0)
    else:
        kind, (nmax, rmin, rdelta, nstep) = "min", ASYM_SEARCH[t.name]
    int_lo, int_hi = t.params["scales"][1] if "scales" in t.params else (0, 0)
    return FitSpec(KINDS[kind], t.block, t.group, nmax, rmin, rdelta, nstep, *t.solve_levels, int_lo, int_hi,
                   REFINE_ROUNDS, None)


def fit_params(W: torch.Tensor, t: BlockType, importance: torch.Tensor | None = None, *,
               reference: bool = False) -> dict[str, torch.Tensor]:
    """The parameters of type ``t`` for ``W [rows, cols]`` (cols a multiple of ``t.block``), as
    ``GGMLWeight.params`` names them. ``importance [cols]``: each input column's weight (diag(H)).
    An fp32 CPU ``W`` goes to the compiled kernel (the same parameters, one block at a time in a few KB)
    unless ``reference`` or no kernel can be built; otherwise ``fit_params_reference``."""
    if not reference and W.dtype == torch.float32 and W.device.type == "cpu":
        imp = None if importance is None else importance.to(torch.float32).clamp_min(0)
        values = IQ4NL_LEVELS if t.values is not None else None
        out = fit_kernel(W, fit_spec(t), values, imp)
        if out is not None:
            names = {"d": "d", "dmin": "dmin" if t.block != t.group else "m", "scales": "scales", "mins": "mins"}
            return {names[k]: v for k, v in out.items() if v is not None}
    return fit_params_reference(W, t, importance)


def fit_params_reference(W: torch.Tensor, t: BlockType,
                         importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """fit_params in torch, vectorised over every group (the kernel's reference). Rows are fitted
    independently; a big matrix in chunks of rows, as the search's workspace is ~45 bytes a weight (a 7B
    model's embedding would take 6 GB at once)."""
    rows, cols = W.shape
    step = max(1, FIT_CHUNK_WEIGHTS // max(cols, 1))
    if rows > step:
        parts = [fit_params_reference(W[i:i + step], t, importance) for i in range(0, rows, step)]
        return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
    nb = cols // t.block
    x = W.reshape(rows, nb, t.block)
    imp = None if importance is None else importance.to(x).reshape(1, nb, t.block).clamp_min(0)
    w = element_weights(x, imp, symmetric=t.name in SYM_NMAX or t.values is not None)
    if t.block == t.group:  # legacy types: one scale (and min) per block of 32
        if t.values is not None:
            return {"d": fp16(iq4nl_scale(x, w))}
        if t.name in SYM_NMAX:
            return {"d": fp16(sym_scale(x, w, SYM_NMAX[t.name]))}
        scale, the_min = asym_scale_min(x, w, *ASYM_SEARCH[t.name])
        return {"d": fp16(scale), "m": fp16(-the_min)}
    G = t.block // t.group
    xs, ws = x.reshape(rows, nb, G, t.group), w.reshape(rows, nb, G, t.group)
    if t.name in SYM_NMAX:
        s = sym_scale(xs, ws, SYM_NMAX[t.name])
        d, ints = superblock_signed(s, *t.params["scales"][1])
        d, _, ints, _ = refine_superblock(xs, ws, t, d, None, ints, None)
        return {"d": d, "scales": ints.reshape(rows, nb * G)}
    scale, the_min = asym_scale_min(xs, ws, *ASYM_SEARCH[t.name])
    qmax = t.params["scales"][1][1]
    d, sc = superblock_ints(scale.clamp_min(0), qmax)
    dmin, mn = superblock_ints(the_min, qmax)
    d, dmin, sc, mn = refine_superblock(xs, ws, t, d, dmin, sc, mn)
    return {"d": d, "dmin": dmin, "scales": sc.reshape(rows, nb * G), "mins": mn.reshape(rows, nb * G)}
