"""Grids: fits against slow per-row references, code/value round trips, fp16-exact params, RTN assembly."""

import numpy as np
import pytest
import torch

from peakllm.errors import PeakError
from peakllm.solvers import Grid, QuantizedWeight, dequantize, fit, quantize, rtn

AFFINE = [Grid(bits=b, sym=s) for b in (2, 3, 4, 8) for s in (False, True)]


def _weights(rows=8, cols=24, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=dtype) * 0.05


def _fp16(x: float) -> float:
    return float(np.float16(x))


def _affine_reference(row, bits, sym):
    """GPTQ-style min-max for one row, written out with Python floats."""
    maxq = 2**bits - 1
    lo, hi = min(min(row), 0.0), max(max(row), 0.0)
    if sym:
        a = max(-lo, hi) or 1.0
        return max(_fp16(2 * a / maxq), 2**-14), float(2 ** (bits - 1))
    if lo == 0 and hi == 0:
        lo, hi = -1.0, 1.0
    scale = max(_fp16((hi - lo) / maxq), 2**-14)
    return scale, float(min(max(round(-lo / scale), 0), maxq))


@pytest.mark.parametrize("grid", AFFINE, ids=str)
def test_affine_fit_matches_per_row_reference(grid):
    W = _weights()
    W[3] = W[3].abs()  # a row with no negative weight: 0 must still be inside the range
    p = fit(W, grid)
    assert p["scale"].shape == (8, 1) and p["zero"].shape == (8, 1)
    for r, row in enumerate(W.tolist()):
        scale, zero = _affine_reference(row, grid.bits, grid.sym)
        assert p["scale"][r, 0].item() == scale
        assert p["zero"][r, 0].item() == zero


@pytest.mark.parametrize("grid", AFFINE + [Grid(kind="ternary"), Grid(kind="ternary", sym=True)], ids=str)
def test_round_trip_and_params_fp16_exact(grid):
    W = _weights(seed=1)
    p = fit(W, grid)
    for v in p.values():
        assert v.dtype == torch.float32 and torch.equal(v, v.half().float())
    codes = quantize(W, p, grid)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= grid.maxq
    deq = dequantize(codes, p, grid)
    assert deq.dtype == torch.float32
    # values on the grid map back to themselves, and 0 is always exactly representable
    assert torch.equal(dequantize(quantize(deq, p, grid), p, grid), deq)
    zero_codes = quantize(torch.zeros_like(W), p, grid)
    assert torch.equal(dequantize(zero_codes, p, grid), torch.zeros_like(deq))
    if grid.kind == "affine":
        assert torch.equal(zero_codes.float(), p["zero"].expand_as(W))
        lo = p["scale"] * (0 - p["zero"])
        hi = p["scale"] * (grid.maxq - p["zero"])
        inside = (W >= lo) & (W <= hi)
        assert ((deq - W).abs() <= p["scale"] / 2 + 1e-12)[inside].all()
        if grid.sym:
            assert (p["zero"] == 2 ** (grid.bits - 1)).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_mse_fit_never_worse_than_min_max(bits, sym):
    torch.manual_seed(2)
    W = torch.distributions.StudentT(2.0).sample((16, 64)).double()  # heavy tails: clipping pays off
    base, mse = Grid(bits=bits, sym=sym), Grid(bits=bits, sym=sym, mse=True)
    err = {}
    for grid in (base, mse):
        p = fit(W, grid)
        err[grid.mse] = ((dequantize(quantize(W, p, grid), p, grid) - W) ** 2).sum(1)
    assert (err[True] <= err[False] + 1e-12).all()
    assert (err[True] < err[False]).any()


def _ternary_brute(row, sym):
    """Least squared error over every candidate level set: top-k of each side, nearest-level assignment."""
    w = np.asarray(row)

    def side_candidates(x):
        s = np.sort(x[x > 0])[::-1]
        return [0.0] + [s[:k].mean() for k in range(1, len(s) + 1)]

    def err(neg, pos):
        levels = np.array([-neg, 0.0, pos])
        return float(((w[:, None] - levels[None, :]) ** 2).min(1).sum())

    if sym:
        return min(err(a, a) for a in side_candidates(np.abs(w)))
    return min(err(n, p) for n in side_candidates(-w) for p in side_candidates(w))


@pytest.mark.parametrize("sym", [False, True])
def test_ternary_fit_is_least_squares(sym):
    grid = Grid(kind="ternary", sym=sym, mse=True)
    W = _weights(rows=6, cols=11, seed=3)
    W[0] = W[0].abs() + 0.01  # all positive: the negative level is unused
    p = fit(W, grid)
    err = ((dequantize(quantize(W, p, grid), p, grid) - W) ** 2).sum(1)
    for r, row in enumerate(W.tolist()):
        best = _ternary_brute(row, sym)
        # fp16 rounding of the level moves the error only to second order
        assert err[r].item() <= best * (1 + 1e-4) + 1e-15
    if sym:
        assert torch.equal(p["scale_neg"], p["scale_pos"])
    else:
        assert p["scale_neg"][0, 0] == 0


def test_grid_validation_and_spec():
    for bad in [dict(kind="nf4"), dict(bits=5), dict(bits=1), dict(group_size=0), dict(group_size=-2),
                dict(sym=1)]:
        with pytest.raises(PeakError):
            Grid(**bad)
    assert Grid(kind="ternary", bits=8).bits == 2
    g = Grid(bits=3, group_size=32, sym=True, mse=True)
    assert g.spec() == {"kind": "affine", "bits": 3, "group_size": 32, "sym": True}
    assert Grid.from_spec(g.spec()) == Grid(bits=3, group_size=32, sym=True)
    with pytest.raises(PeakError):
        Grid.from_spec({"kind": "affine"})


@pytest.mark.parametrize("grid", [Grid(bits=4, group_size=16), Grid(bits=3), Grid(kind="ternary", group_size=16)],
                         ids=str)
def test_rtn_groups_partial_last_group(grid):
    W = _weights(rows=5, cols=40, seed=4, dtype=torch.float32)
    W0 = W.clone()
    qw = rtn(W, grid)
    assert torch.equal(W, W0)
    assert isinstance(qw, QuantizedWeight) and qw.g_idx is None and qw.grid == grid.spec()
    n_groups = 3 if grid.group_size == 16 else 1
    assert all(v.shape == (5, n_groups) for v in qw.params.values())
    assert qw.codes.shape == (5, 40) and qw.codes.dtype == torch.uint8 and qw.weight.dtype == torch.float32
    assert torch.equal(qw.dequantize(), qw.weight)
    gs = 40 if grid.group_size == -1 else grid.group_size
    for k, g1 in enumerate(range(0, 40, gs)):
        cols = slice(g1, min(g1 + gs, 40))
        p = fit(W[:, cols], grid)
        for name in p:
            assert torch.equal(qw.params[name][:, k:k + 1], p[name])
        assert torch.equal(qw.weight[:, cols], dequantize(quantize(W[:, cols], p, grid), p, grid))


def test_ternary_default_fit_is_qmoe_minmax():
    """Default ternary fit: levels {-s, 0, s} with s = (max - min) / 2 per row (fp16), zero code for |w| <= s/2."""
    torch.manual_seed(3)
    W = torch.randn(6, 40)
    grid = Grid(kind="ternary")
    p = fit(W, grid)
    s = ((W.max(1).values - W.min(1).values) / 2).half().float()[:, None]
    assert torch.equal(p["scale_pos"], s) and torch.equal(p["scale_neg"], s)
    codes = quantize(W, p, grid)
    assert torch.equal(codes == 1, W.abs() <= s / 2)
    assert (codes == 1).float().mean() > 0.5  # mostly zeros on Gaussian rows


def test_ternary_levels_matched_to_a_zero_share():
    """zero_share z: one level per row, the mean of its round((1 - z) * cols) largest |w| (fp16): the
    least-squares level of exactly the weights that stay nonzero at that share."""
    torch.manual_seed(4)
    W = torch.randn(7, 37)
    for z in (0.0, 0.5, 0.9, 0.99):
        p = fit(W, Grid(kind="ternary", zero_share=z))
        keep = max(1, round((1 - z) * 37))
        for r in range(7):
            mags = sorted((abs(v) for v in W[r].tolist()), reverse=True)[:keep]
            want = torch.tensor(sum(mags) / keep).half().float()
            assert p["scale_pos"][r, 0] == want and p["scale_neg"][r, 0] == want
    for bad in (dict(kind="affine", zero_share=0.5), dict(kind="ternary", mse=True, zero_share=0.5),
                dict(kind="ternary", zero_share=1.0), dict(kind="ternary", zero_share=-0.1)):
        with pytest.raises(PeakError):
            Grid(**bad)


def test_weighted_mse_fit_minimises_the_weighted_error():
    """With weights (diag(H)), the mse search picks, per row, the candidate range with the least weighted error."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 32, generator=g)
    w = torch.rand(32, generator=g) ** 4 * 100  # a few columns dominate, as activations do
    grid = Grid(bits=3, group_size=32, mse=True)

    def weighted_err(params):
        return (w * (dequantize(quantize(x, params, grid), params, grid) - x) ** 2).sum(1)

    plain, weighted = fit(x, grid), fit(x, grid, w)
    assert (weighted_err(weighted) <= weighted_err(plain)).all()
    assert (weighted_err(weighted) < weighted_err(plain)).any()
    assert all(torch.equal(fit(x, grid, torch.ones(32))[k], plain[k]) for k in plain)  # equal weights: unchanged
