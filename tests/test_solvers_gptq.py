"""GPTQ against a per-column OBS reference with explicit inverses, lazy batching, grids, fallbacks."""

import pytest
import torch

from peakllm.errors import PeakError
from peakllm.solvers import Grid, fit, gptq, quantize, dequantize, rtn

GRIDS = [
    Grid(bits=4),
    Grid(bits=3, group_size=4, sym=True),
    Grid(bits=2, group_size=5),  # 18 columns: a partial last group
    Grid(bits=4, group_size=8, mse=True),
    Grid(kind="ternary", group_size=6),
    Grid(kind="ternary", sym=True),
]


def correlated(rows, cols, n=256, seed=0, dtype=torch.float64):
    """Weights and inputs X = random @ random (so H is far from diagonal), with H = 2/n X^T X."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    X = torch.randn(n, cols, generator=g, dtype=dtype) @ torch.randn(cols, cols, generator=g, dtype=dtype)
    return W, X, 2 / n * X.T @ X


def gptq_reference(W, H, grid, damp=0.01, act_order="none", rate=0.0, price=None):
    """Column by column: Hinv_j = inverse(H[j:, j:]), quantize w_j, W[:, j:] -= (w - q)/Hinv_j[0,0] * Hinv_j[0, :].

    act_order "static": every group's parameters fitted on the original W before the sweep, column j of the
    sweep uses the group of its original column; "group": groups are runs of the sweep order."""
    W, H = W.double().clone(), H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    rows, cols = W.shape
    gs = cols if grid.group_size == -1 else grid.group_size
    original_group = torch.arange(cols) // gs
    diag = H.diagonal().clone()  # grid.mse weighs each column's error by diag(H)
    static = [fit(W[:, g0:g0 + gs], grid, diag[g0:g0 + gs]) for g0 in range(0, cols, gs)]
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order != "none" else torch.arange(cols)
    W, H, diag = W[:, perm], H[perm][:, perm], diag[perm]
    H = H + damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    Q, codes, groups = torch.zeros_like(W), torch.zeros(rows, cols, dtype=torch.uint8), []
    lam = price or 0.0
    if rate:  # a nonzero code is kept only if it lowers the OBS loss (w^2 - (w-q)^2) / [H_F^-1]_00 by > lam
        levels = torch.stack([p[k] for p in static for k in ("scale_pos", "scale_neg")]) \
            if act_order == "static" else fit(W, grid)["scale_pos"]
        sens = [1 / torch.linalg.inv(H[j:, j:])[0, 0] for j in range(cols)]
        lam = rate * float((levels.double() ** 2).mean()) * float(torch.stack(sens).mean())
    for j in range(cols):
        Hinv_j = torch.linalg.inv(H[j:, j:])
        if act_order == "static":
            params = static[int(original_group[perm[j]])]
        else:
            if j % gs == 0:
                groups.append(fit(W[:, j:j + gs], grid, diag[j:j + gs]))
            params = groups[-1]
        w = W[:, j].clone()
        c = quantize(w[:, None], params, grid)
        q = dequantize(c, params, grid)[:, 0].double()
        if lam:
            keep = (w * w - (w - q) ** 2) / Hinv_j[0, 0] > lam
            c, q = torch.where(keep[:, None], c, torch.ones_like(c)), torch.where(keep, q, torch.zeros_like(q))
        codes[:, j], Q[:, j] = c[:, 0], q
        W[:, j:] -= torch.outer((w - q) / Hinv_j[0, 0], Hinv_j[0, :])
    inv = torch.argsort(perm)
    if act_order == "static":
        groups = static
    params = {k: torch.cat([p[k] for p in groups], 1) for k in groups[0]}
    return Q[:, inv], codes[:, inv], params, original_group if act_order == "static" else original_group[inv]


@pytest.mark.parametrize("act_order", ["none", "group", "static"])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_matches_per_column_reference(grid, act_order):
    W, _, H = correlated(12, 18, seed=1)
    Q, codes, params, groups = gptq_reference(W, H, grid, act_order=act_order)
    for blocksize in (1, 4, 7, 128):
        qw, info = gptq(W, H, grid, blocksize=blocksize, act_order=act_order)
        assert not info.fallback_rtn and info.retries == 0 and info.damp_used == 0.01
        assert torch.equal(qw.codes, codes), blocksize
        assert torch.allclose(qw.weight.double(), Q, rtol=0, atol=1e-6)
        assert qw.params.keys() == params.keys()
        for k in params:
            assert torch.equal(qw.params[k], params[k])
        assert torch.equal(qw.groups(), groups)
        assert torch.equal(qw.dequantize(), qw.weight)


def test_lazy_batching_does_not_change_result_fp32():
    W, X, H = correlated(48, 96, n=512, seed=2, dtype=torch.float32)
    grid = Grid(bits=3, group_size=16)
    base, _ = gptq(W, H, grid, blocksize=1, act_order="group")
    for blocksize in (4, 8, 40, 128):
        qw, _ = gptq(W, H, grid, blocksize=blocksize, act_order="group")
        # fp32 summation order may flip a rounding at a tie; allow a handful of codes, no more
        assert (qw.codes != base.codes).float().mean() < 0.005
        assert torch.allclose(qw.params["scale"], base.params["scale"], rtol=2e-3)


@pytest.mark.parametrize("grid", [Grid(bits=4, group_size=16), Grid(bits=3, group_size=16, sym=True),
                                  Grid(kind="ternary", group_size=16), Grid(bits=2)], ids=str)
@pytest.mark.parametrize("act_order", ["none", "group", "static"])
def test_on_grid_and_better_than_rtn(grid, act_order):
    W, X, H = correlated(64, 96, n=512, seed=3, dtype=torch.float32)
    W0, H0 = W.clone(), H.clone()
    qw, info = gptq(W, H, grid, act_order=act_order)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert qw.weight.dtype == torch.float32 and qw.codes.dtype == torch.uint8
    assert torch.equal(qw.dequantize(), qw.weight)
    for v in qw.params.values():
        assert torch.equal(v, v.half().float())
    if act_order == "group" and grid.group_size > 0:
        assert qw.g_idx is not None and qw.g_idx.dtype == torch.int32
        assert torch.bincount(qw.g_idx.long()).tolist() == [16] * 6
    else:
        assert qw.g_idx is None
    err_gptq = ((W - qw.weight) @ X.T).pow(2).sum()
    err_rtn = ((W - rtn(W, grid).weight) @ X.T).pow(2).sum()
    assert err_gptq < err_rtn
    assert info.loss > 0


def test_dead_inputs():
    W, X, _ = correlated(16, 24, seed=4)
    X[:, [3, 10]] = 0
    H = 2 / X.shape[0] * X.T @ X
    for order in ("none", "static"):
        qw, info = gptq(W, H, Grid(bits=4, group_size=8), act_order=order)
        assert not info.fallback_rtn and torch.isfinite(qw.weight).all()
        assert (qw.weight[:, [3, 10]] == 0).all()
        Q, codes, _, _ = gptq_reference(W, H, Grid(bits=4, group_size=8), act_order=order)
        assert torch.equal(qw.codes, codes)


def test_damping_escalation_and_rtn_fallback():
    W, X, H = correlated(8, 16, seed=5)
    # an indefinite H: its smallest eigenvalue is -0.05 of its mean diagonal, so damp 0.01 fails, 0.1 works
    evals, evecs = torch.linalg.eigh(H)
    evals[0] = 0
    H_psd = evecs @ torch.diag(evals) @ evecs.T
    m = H_psd.diagonal().mean()
    t = 0.05 * m / (1 + 0.05 / 16)  # the shift lowers the mean diagonal by t/16; t = 0.05 of the new mean
    H_bad = H_psd - t * torch.outer(evecs[:, 0], evecs[:, 0])
    qw, info = gptq(W, H_bad, Grid(bits=4), act_order="none")
    assert info.retries == 1 and info.damp_used == pytest.approx(0.1) and not info.fallback_rtn
    Q, codes, _, _ = gptq_reference(W, H_bad, Grid(bits=4), damp=0.1)
    assert torch.equal(qw.codes, codes)

    for order in ("none", "static", "group"):
        qw, info = gptq(W, -torch.eye(16, dtype=torch.float64), Grid(bits=4, group_size=8), act_order=order)
        assert info.fallback_rtn and info.retries > 0
        assert torch.equal(qw.codes, rtn(W, Grid(bits=4, group_size=8)).codes)


def test_validation():
    W, _, H = correlated(4, 8, seed=6)
    with pytest.raises(PeakError):
        gptq(W, H[:7, :7], Grid())
    with pytest.raises(PeakError):
        gptq(W, H, {"kind": "affine"})
    with pytest.raises(PeakError):
        gptq(W, H, Grid(), blocksize=0)
    with pytest.raises(PeakError):
        gptq(W, H, Grid(), damp=-1.0)
    with pytest.raises(PeakError):
        gptq(W[0], H, Grid())
    with pytest.raises(PeakError, match="act_order"):
        gptq(W, H, Grid(), act_order=True)
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(PeakError):
        gptq(bad, H, Grid())


@pytest.mark.parametrize("act_order", ["none", "group", "static"])
@pytest.mark.parametrize("grid", [Grid(kind="ternary", group_size=6), Grid(kind="ternary", sym=True),
                                  Grid(kind="ternary", group_size=6, zero_share=0.8)], ids=str)
@pytest.mark.parametrize("rate", [0.3, 2.0])
def test_rate_controlled_ternary_matches_reference(grid, act_order, rate):
    """A nonzero code must lower the column's OBS loss by more than the rate: the same codes as the
    per-column reference, error feedback included."""
    W, _, H = correlated(10, 18, seed=5)
    qw, _ = gptq(W, H, grid, act_order=act_order, blocksize=7, rate=rate)
    Q, codes, _, _ = gptq_reference(W, H, grid, act_order=act_order, rate=rate)
    assert torch.equal(qw.codes, codes)
    torch.testing.assert_close(qw.weight.double(), Q, rtol=1e-9, atol=1e-9)


def test_zero_share_control():
    from peakllm.solvers.rate import gptq_at_zero_share, zero_share

    W, _, H = correlated(24, 64, seed=6)
    grid = Grid(kind="ternary", group_size=32)
    plain, _ = gptq(W, H, grid)
    qw, _, rate = gptq_at_zero_share(W, H, grid, 0.0)  # reached already: plain GPTQ, rate 0
    assert rate == 0.0 and torch.equal(qw.codes, plain.codes)
    base = zero_share(plain)
    for share in (base + 0.05, base + 0.15, 0.95):
        qw, _, rate = gptq_at_zero_share(W, H, grid, share)
        assert rate > 0 and share <= zero_share(qw) <= share + 0.01
    for hint in (1e-3, 0.5, 50.0):  # a hint starts the search elsewhere; the result meets the share all the same
        qw, _, rate = gptq_at_zero_share(W, H, grid, base + 0.1, rate_hint=hint)
        assert rate > 0 and base + 0.1 <= zero_share(qw) <= base + 0.11
    qw, _, rate = gptq_at_zero_share(W, H, grid, base, rate_hint=50.0)  # plain GPTQ's share, from far above
    assert base <= zero_share(qw) <= base + 0.002 and rate < 50.0 / 4 ** 3
    bad = -torch.eye(64, dtype=torch.float64)  # no factorisation: RTN, which no rate changes; not an error
    for hint in (None, 1.0):
        qw, info, rate = gptq_at_zero_share(W, bad, grid, 0.99, rate_hint=hint)
        assert info.fallback_rtn and rate == 0.0 and torch.equal(qw.codes, rtn(W, grid).codes)
    with pytest.raises(PeakError, match="ternary"):
        gptq_at_zero_share(W, H, Grid(bits=4), 0.5)
    with pytest.raises(PeakError):
        gptq(W, H, Grid(bits=4), rate=1.0)


@pytest.mark.parametrize("act_order", ["none", "static"])
def test_priced_ternary_matches_reference(act_order):
    """price: the same dead zone as rate, in the loss's own units (no per-matrix normalisation)."""
    W, _, H = correlated(10, 18, seed=8)
    grid = Grid(kind="ternary", group_size=6)
    for price in (0.05, 0.5):
        qw, _ = gptq(W, H, grid, act_order=act_order, blocksize=7, price=price)
        Q, codes, _, _ = gptq_reference(W, H, grid, act_order=act_order, price=price)
        assert torch.equal(qw.codes, codes)
    with pytest.raises(PeakError, match="price"):
        gptq(W, H, grid, price=0.1, rate=0.1)
    with pytest.raises(PeakError, match="price"):
        gptq(W, H, Grid(bits=4), price=0.1)


def test_allocation_at_one_price_stays_within_the_budget():
    """Experts share a budget: one price per nonzero code (each loss weighted), the mean bits never above the
    budget and close below it; the heavily weighted matrix (many tokens) keeps more nonzeros."""
    from peakllm.solvers.rate import allocate_at_price, zero_share

    grid = Grid(kind="ternary", sym=True)
    problems = []
    for i, weight in enumerate((1.0, 1.0, 1.0, 100.0)):
        W, _, H = correlated(12, 40, seed=20 + i)
        problems.append((W, H, weight, grid))

    def bits_of(i, share):  # any decreasing accounting will do; this one has a floor, as the format's has
        return 0.1 + 1.6 * (1 - share)

    def mean_bits(solves):
        return sum(bits_of(i, zero_share(q)) for i, (q, _) in enumerate(solves)) / len(solves)

    plain = [gptq(W, H, grid)[0] for W, H, _, _ in problems]
    loose = sum(bits_of(i, zero_share(q)) for i, q in enumerate(plain)) / 4 + 0.01
    solves, price = allocate_at_price(problems, bits_of, loose)
    assert price == 0.0 and all(torch.equal(q.codes, p.codes) for (q, _), p in zip(solves, plain))
    for budget in (0.4, 0.25):
        solves, price = allocate_at_price(problems, bits_of, budget, tolerance=0.01)
        assert price > 0 and budget * 0.99 - 1e-6 <= mean_bits(solves) <= budget
        for (W, H, weight, g), (q, _) in zip(problems, solves):  # every matrix solved at the one price
            assert torch.equal(q.codes, gptq(W, H, g, price=price / weight)[0].codes)
        shares = [zero_share(q) for q, _ in solves]
        assert shares[3] < min(shares[:3])
        again, _ = allocate_at_price(problems, bits_of, budget, tolerance=0.01, price_hint=price * 37)
        assert mean_bits(again) <= budget  # a hint moves the search, never the budget
    with pytest.raises(PeakError, match="every code zero"):
        allocate_at_price(problems, bits_of, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gptq_grids_is_one_gptq_per_grid(dtype):
    """The shared sweep gives each grid exactly what gptq gives it alone ("static" order, partial last group,
    a dead input), and falls back to RTN for all as gptq does."""
    from peakllm.solvers.gptq import gptq_grids

    W, X, H = correlated(12, 20, dtype=dtype)
    H[3, :] = H[:, 3] = 0
    grids = [Grid(bits=b, group_size=8) for b in (8, 4, 3, 2)] + [Grid(bits=3, group_size=8, sym=True, mse=True)]
    for grid, got in zip(grids, gptq_grids(W, H, grids)):
        want = gptq(W, H, grid, act_order="static")[0].weight
        assert got.shape == W.shape and torch.allclose(got.double(), want.double(), rtol=0, atol=1e-6)
    bad = -torch.eye(20, dtype=dtype)  # no damping makes it factorable
    for grid, got in zip(grids[:2], gptq_grids(W, bad, grids[:2])):
        assert torch.equal(got, rtn(W, grid).weight)
    with pytest.raises(PeakError):
        gptq_grids(W, H, [Grid(bits=4, group_size=8), Grid(bits=4, group_size=4)])
    with pytest.raises(PeakError):
        gptq_grids(W, H, [Grid(kind="ternary")])
