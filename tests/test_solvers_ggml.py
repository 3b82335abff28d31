"""Solving onto llama.cpp's grids: RTN's and GPTQ's weights are what gguf's dequantizer reads back from the
packed bytes; GPTQ equals a slow one-column-at-a-time OBQ reference whose grid points come from gguf itself;
GPTQ's layer-wise error is below RTN's on the same grid; the fitted parameters respect each type."""

import gguf
import numpy as np
import pytest
import torch

from peakllm.errors import PeakError
from peakllm.formats.gguf.blocks import BLOCK_TYPES, GGMLWeight
from peakllm.solvers.ggml import gptq_ggml, rtn_ggml
from peakllm.solvers.ggml_fit import fit_params

TYPES = list(BLOCK_TYPES)


def problem(rows: int, cols: int, seed: int = 0, dtype=torch.float32):
    """A weight and a correlated Hessian with unequal column scales (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.02
    W[:, ::7] *= 4  # some outliers
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) * 0.2 + torch.eye(cols, dtype=torch.float64)
    X = mix @ torch.randn(cols, 4 * cols, generator=g, dtype=torch.float64)
    X *= torch.exp(torch.randn(cols, 1, generator=g, dtype=torch.float64))
    return W.to(dtype), (X @ X.T / X.shape[1]).to(dtype)


def gguf_weight(q: GGMLWeight) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(q.pack(), BLOCK_TYPES[q.type].ggml).copy())


def layer_error(W, Q, H) -> float:
    E = (W - Q).double()
    return float(torch.trace(E @ H.double() @ E.T))


@pytest.mark.parametrize("name", TYPES)
def test_rtn_weight_is_what_gguf_reads(name):
    t = BLOCK_TYPES[name]
    W, H = problem(5, 2 * t.block)
    for importance in (None, torch.diagonal(H)):
        q = rtn_ggml(W, name, importance)
        assert torch.equal(gguf_weight(q).view(torch.int32), q.dequantize().view(torch.int32))
        assert float(((q.dequantize() - W) ** 2).mean()) < float((W**2).mean()) / 5  # Q2_K: 0.11


def gguf_grid_points(q: GGMLWeight) -> torch.Tensor:
    """Every code's value at every weight position, read by gguf's dequantizer: [codes, rows, cols]."""
    t = BLOCK_TYPES[q.type]
    return torch.stack([gguf_weight(GGMLWeight(q.type, torch.full_like(q.codes, c), q.params))
                        for c in range(2**t.code_bits)])


def obq_reference(W, H, points, damp=0.01):
    """Textbook GPTQ/OBQ: columns in decreasing diag(H), one at a time, each rounded to the nearest grid point
    (brute force over gguf's values), its error spread over all remaining columns through the full inverse
    Hessian, which then drops the column (Gaussian elimination)."""
    W = W.double().clone()
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    Hinv = torch.linalg.inv(Hd)
    codes = torch.zeros(W.shape, dtype=torch.uint8)
    Q = torch.zeros_like(W)
    left = torch.ones(W.shape[1], dtype=torch.bool)
    for j in torch.argsort(torch.diagonal(H), descending=True, stable=True).tolist():
        c = (W[:, j].unsqueeze(0) - points[:, :, j].double()).abs().argmin(dim=0)
        codes[:, j], Q[:, j] = c.to(torch.uint8), points[c, torch.arange(W.shape[0]), j].double()
        left[j] = False
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, left] -= err.unsqueeze(1) * Hinv[j, left].unsqueeze(0)
        Hinv -= Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return codes, Q


@pytest.mark.parametrize("name", TYPES)
def test_gptq_equals_slow_obq_reference(name):
    t = BLOCK_TYPES[name]
    W, H = problem(3, t.block if t.block == 256 else 64, seed=1, dtype=torch.float64)
    q, info = gptq_ggml(W, H, name, blocksize=24)  # lazy blocks that straddle groups and blocks
    assert not info.fallback_rtn
    codes, Q = obq_reference(W, H, gguf_grid_points(q)[t.solve_min:])  # solvers skip Q8_0's -128, as llama.cpp
    assert torch.equal(q.codes, codes + t.solve_min)
    assert torch.equal(gguf_weight(q).double(), Q)


@pytest.mark.parametrize("name", TYPES)
def test_gptq_beats_rtn_on_the_same_grid(name):
    t = BLOCK_TYPES[name]
    W, H = problem(16, 2 * t.block, seed=2)
    q, _ = gptq_ggml(W, H, name)
    r = rtn_ggml(W, name, importance=torch.diagonal(H))
    assert all(torch.equal(q.params[k], r.params[k]) for k in q.params)  # the same fixed grid
    assert torch.equal(gguf_weight(q).view(torch.int32), q.dequantize().view(torch.int32))
    assert layer_error(W, q.dequantize(), H) < 0.8 * layer_error(W, r.dequantize(), H)


@pytest.mark.parametrize("name", TYPES)
def test_grids_fitted_as_swept_are_exact_and_follow_the_updated_weights(name):
    """fit_as_swept: each block's grid is fitted on the weights the sweep has left it. The result is still what
    gguf reads; with a diagonal H no error moves between columns, so it is RTN on the importance-weighted grid;
    with a correlated H the blocks after the first see updated weights and get other grids."""
    t = BLOCK_TYPES[name]
    W, H = problem(8, 2 * t.block, seed=4, dtype=torch.float64)
    q, info = gptq_ggml(W, H, name, act_order=False, fit_as_swept=True, blocksize=48)
    assert not info.fallback_rtn
    assert torch.equal(gguf_weight(q).double(), q.dequantize().double())
    diagonal = torch.diag(torch.diagonal(H))
    d, _ = gptq_ggml(W, diagonal, name, act_order=False, fit_as_swept=True)
    r = rtn_ggml(W, name, importance=torch.diagonal(diagonal))
    assert torch.equal(d.codes, r.codes) and all(torch.equal(d.params[k], r.params[k]) for k in r.params)
    upfront, _ = gptq_ggml(W, H, name, act_order=False)
    first = {k: v.shape[1] // 2 for k, v in q.params.items()}  # the first of the two blocks
    assert all(torch.equal(q.params[k][:, :n], upfront.params[k][:, :n]) for k, n in first.items())
    assert any(not torch.equal(q.params[k][:, n:], upfront.params[k][:, n:]) for k, n in first.items())
    assert layer_error(W, q.dequantize(), H) < layer_error(W, r.dequantize(), H)
    with pytest.raises(PeakError, match="act_order=False"):
        gptq_ggml(W, H, name, fit_as_swept=True)


def test_importance_weighted_fit_lowers_the_layer_error():
    """Weighting the scale search by diag(H), as llama.cpp's imatrix does, lowers RTN's layer-wise error."""
    W, H = problem(32, 512, seed=3)
    for name in ("Q4_0", "Q4_K", "Q3_K", "IQ4_NL"):
        plain = layer_error(W, rtn_ggml(W, name).dequantize(), H)
        weighted = layer_error(W, rtn_ggml(W, name, torch.diagonal(H)).dequantize(), H)
        assert weighted < plain


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_kquant_refinement_never_raises_the_weighted_error(name, monkeypatch):
    """The refinement after llama.cpp's K-quant fit (integer nudges, d/dmin least squares) keeps a block's
    values only where its weighted error drops: block by block, never worse, and lower overall."""
    import peakllm.solvers.ggml_fit as fit

    t = BLOCK_TYPES[name]
    W, H = problem(24, 512, seed=5)
    imp = torch.diagonal(H)

    def block_errors(params):
        q = rtn_ggml(W, name, params=params).dequantize()
        x = W.reshape(24, 2, 256)
        w = fit.element_weights(x, imp.reshape(1, 2, 256), symmetric=name in fit.SYM_NMAX)
        return (w * (x - q.reshape(24, 2, 256)) ** 2).sum(-1)

    refined = block_errors(fit_params(W, t, imp, reference=True))  # the torch fit, whose steps can be patched
    monkeypatch.setattr(fit, "refine_superblock", lambda xs, ws, t, d, dmin, sc, mn: (d, dmin, sc, mn))
    plain = block_errors(fit_params(W, t, imp, reference=True))
    assert bool((refined <= plain * (1 + 1e-6)).all()) and float(refined.sum()) < float(plain.sum())


def test_fit_handles_zero_and_constant_groups():
    for name, t in BLOCK_TYPES.items():
        W = torch.zeros(3, t.block)
        W[1] = 0.5  # constant row: representable exactly by the types with a min
        W[2, :t.group] = -0.25
        p = fit_params(W, t)
        q = rtn_ggml(W, name)
        assert all(torch.isfinite(v.float()).all() for v in p.values())
        assert torch.equal(q.dequantize()[0], torch.zeros(t.block))
        assert np.isfinite(gguf_weight(q).numpy()).all()


@pytest.mark.parametrize("name", TYPES)
def test_a_given_grid_is_used_and_recovers_its_own_codes(name):
    """Solving onto the grid a file already stores (the origin grid of a model distributed as a GGUF) finds
    its codes again from the dequantized weight, with RTN and with GPTQ."""
    t = BLOCK_TYPES[name]
    W, H = problem(6, 2 * t.block, seed=4)
    origin = rtn_ggml(W, name)
    again = rtn_ggml(origin.dequantize(), name, params=origin.params)
    assert torch.equal(again.codes, origin.codes)
    solved, _ = gptq_ggml(origin.dequantize(), H, name, params=origin.params)
    assert torch.equal(solved.codes, origin.codes)
    other = rtn_ggml(W * 1.5, name)
    moved = rtn_ggml(W, name, params=other.params)
    assert all(torch.equal(moved.params[k], other.params[k]) for k in other.params)
    with pytest.raises(PeakError, match="needs parameters|must be"):
        rtn_ggml(W, name, params={"d": origin.params["d"][:, :1]})


def test_q8_0_solvers_never_write_minus_128():
    """ggml's Q8_0 can store -128, but llama.cpp's quantizer stays within +-127; we do not bet on every kernel
    taking -128."""
    W, H = problem(8, 64, seed=6)
    tight = rtn_ggml(W, "Q8_0")
    tight.params["d"] = (tight.params["d"].float() / 2).half()  # every big weight now wants beyond the grid
    for q in (rtn_ggml(W, "Q8_0", params=tight.params), gptq_ggml(W, H, "Q8_0", params=tight.params)[0]):
        assert int(q.codes.min()) == 1 and int(q.codes.max()) == 255


def test_bad_input_is_one_error():
    W, H = problem(4, 64)
    with pytest.raises(PeakError, match="blocks of 256"):
        gptq_ggml(W, H, "Q4_K")
    with pytest.raises(PeakError, match="unknown GGUF block type"):
        rtn_ggml(W, "Q4_X")
    with pytest.raises(PeakError, match="importance"):
        rtn_ggml(W, "Q4_0", importance=torch.ones(63))
    with pytest.raises(PeakError, match="H must be"):
        gptq_ggml(W, H[:32, :32], "Q4_0")


def test_pruned_weights_stay_zero_exactly_on_the_symmetric_types_only():
    """GPTQ with SparseGPT's mask kept: the symmetric types (a zero level) read back 0 at every pruned weight,
    as `keeps_zeros` and prune --help claim; the types with a min and IQ4_NL keep few of them 0."""
    from peakllm.calibrate.recipes import keeps_zeros

    W, H = problem(2, 256, seed=3)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    for name in TYPES:
        q, _ = gptq_ggml(W * mask, H, name, mask=mask)
        zero = gguf_weight(q)[~mask] == 0
        assert bool(zero.all()) is keeps_zeros(name), name
        if not keeps_zeros(name):
            assert zero.float().mean() < 0.5, name
    assert {n for n in TYPES if keeps_zeros(n)} == {"Q8_0", "Q4_0", "Q5_0", "Q3_K", "Q6_K"}


def test_big_matrices_in_row_chunks_are_bit_identical(monkeypatch):
    """The fit, RTN's rounding, dequantizing and packing go through big matrices in row chunks (bounded memory):
    the same codes, parameters, weights and bytes as all rows at once."""
    from peakllm.formats.gguf import blocks
    from peakllm.solvers import ggml, ggml_fit

    W, _ = problem(7, 256, seed=4)
    W[3] = 0
    imp = torch.rand(256, generator=torch.Generator().manual_seed(2))
    types = ("Q4_0", "Q5_1", "IQ4_NL", "Q3_K", "Q4_K")  # each fit: symmetric, with a min, IQ4_NL, K-quants' two
    whole = {n: rtn_ggml(W, n, imp) for n in types}
    for mod in (blocks, ggml, ggml_fit):
        monkeypatch.setattr(mod, "ROW_CHUNK_WEIGHTS" if mod is not ggml_fit else "FIT_CHUNK_WEIGHTS", 256 * 3)
    for n in types:
        a, b = whole[n], rtn_ggml(W, n, imp)
        assert torch.equal(a.codes, b.codes) and all(torch.equal(a.params[k], b.params[k]) for k in a.params), n
        assert len(b.row_chunks()) == 3 and torch.equal(a.dequantize(), b.dequantize()), n
        assert np.array_equal(a.pack(), b.pack()), n
