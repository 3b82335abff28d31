"""The compiled fit of llama.cpp's block-type parameters (kernels/ggml_fit.cpp) against its torch reference
(solvers/ggml_fit.fit_params_reference): the same d, m/dmin, scales and mins, bit for bit, for every type, with
and without importance, on random and adversarial weights; without a kernel fit_params is the reference."""

import pytest
import torch

from peakllm.formats.gguf.blocks import BLOCK_TYPES
from peakllm.kernels.ggml_fit import fit_function
from peakllm.solvers import ggml_fit
from peakllm.solvers.ggml import rtn_ggml
from peakllm.solvers.ggml_fit import element_weights, fit_params, fit_params_reference

TYPES = list(BLOCK_TYPES)
needs_kernel = pytest.mark.skipif(fit_function() is None, reason="no C++ compiler: fit_params is the reference")


def hard_weights(cols: int, seed: int) -> torch.Tensor:
    """Eleven rows (an odd count), each a case the searches treat specially."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(11, cols, generator=g) * 0.02
    W[0] = 0  # empty groups
    W[1] = 0.37  # constant: exact for the types with a min
    W[2] = -torch.rand(cols, generator=g) * 0.1 - 0.01  # all negative
    W[3, 5] = 1e4  # one huge outlier
    W[4] = torch.randn(cols // 16, 1, generator=g).expand(-1, 16).reshape(-1)  # constant groups of 16
    W[5] = 1e-16 * torch.randn(cols, generator=g)  # below GROUP_MAX_EPS
    W[6] = -0.25
    W[7] = torch.randint(-8, 8, (cols,), generator=g) * 0.125  # on a grid: rounding ties everywhere
    W[8] *= 1e3
    W[9, : cols // 2] = 0  # half the blocks empty
    W[10, ::3] *= 50  # outliers in every group
    return W


def importances(cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    some_zero = torch.rand(cols, generator=g)
    some_zero[::3] = 0
    block_zero = torch.rand(cols, generator=g)
    block_zero[:256] = 0
    return [None, torch.rand(cols, generator=g) * 10, some_zero, block_zero]


def bits(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp16 parameters as their bit patterns, so that -0 and 0 (different bytes in a file) differ too."""
    return {k: v.view(torch.int16) if v.dtype == torch.float16 else v for k, v in params.items()}


def assert_same(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), what
    for k, v in a.items():
        assert v.shape == b[k].shape and v.dtype == b[k].dtype, (what, k)
        differ = (bits(a)[k] != bits(b)[k]).nonzero().tolist()
        assert not differ, f"{what}: {k} differs at {differ[:5]} ({len(differ)} of {v.numel()})"


@needs_kernel
@pytest.mark.parametrize("name", TYPES)
def test_kernel_equals_reference_on_hard_weights(name):
    t = BLOCK_TYPES[name]
    W = hard_weights(512, seed=1)
    for i, imp in enumerate(importances(512, seed=2)):
        assert_same(fit_params(W, t, imp), fit_params_reference(W, t, imp), f"{name} importance #{i}")


def block_errors(W: torch.Tensor, name: str, params: dict, imp) -> torch.Tensor:
    """Each block's weighted squared error (llama.cpp's element weights) on the grid of ``params``."""
    t = BLOCK_TYPES[name]
    q = rtn_ggml(W, name, params=params).dequantize()
    x = W.reshape(W.shape[0], -1, t.block)
    w = element_weights(x, None if imp is None else imp.reshape(1, -1, t.block),
                        symmetric=name in ggml_fit.SYM_NMAX or t.values is not None)
    return (w * (x - q.reshape(x.shape)) ** 2).double().sum(-1)


@needs_kernel
@pytest.mark.parametrize("name", TYPES)
def test_kernel_equals_reference_on_a_big_random_matrix(name):
    """Random weights with outliers and an imatrix, 300k weights a type: every parameter equal. Should a
    summation tie ever make a group differ on some machine, at most 1e-3 of the blocks may, each no worse
    than the reference's error by 1e-6 relative."""
    t = BLOCK_TYPES[name]
    g = torch.Generator().manual_seed(3)
    W = torch.randn(147, 2048, generator=g) * 0.02
    W[:, ::7] *= 4
    imp = torch.rand(2048, generator=g) ** 4
    a, b = fit_params(W, t, imp), fit_params_reference(W, t, imp)
    per_block = {k: v.reshape(W.shape[0], W.shape[1] // t.block, -1) for k, v in bits(a).items()}
    ref_block = {k: v.reshape(per_block[k].shape) for k, v in bits(b).items()}
    differ = torch.zeros(W.shape[0], W.shape[1] // t.block, dtype=torch.bool)
    for k, v in per_block.items():
        differ |= (v != ref_block[k]).any(-1)
    assert float(differ.float().mean()) < 1e-3, f"{name}: {int(differ.sum())} blocks differ"
    if differ.any():
        ea, eb = block_errors(W, name, a, imp)[differ], block_errors(W, name, b, imp)[differ]
        assert bool((ea <= eb * (1 + 1e-6)).all()), name


def test_without_a_kernel_fit_params_is_the_reference(monkeypatch):
    W = hard_weights(256, seed=4)
    monkeypatch.setattr(ggml_fit, "fit_kernel", lambda *a: None)  # what no compiler gives
    for name in ("Q4_K", "Q5_1", "IQ4_NL"):
        t = BLOCK_TYPES[name]
        assert_same(fit_params(W, t), fit_params_reference(W, t), name)


@needs_kernel
def test_the_kernel_is_what_fit_params_runs(monkeypatch):
    """fp32 goes to the kernel (the reference's refinement patched away does not change its result), fp64 and
    reference=True to torch."""
    t = BLOCK_TYPES["Q4_K"]
    W = hard_weights(256, seed=5)
    plain = fit_params_reference(W, t)
    monkeypatch.setattr(ggml_fit, "refine_superblock", lambda xs, ws, t, d, dmin, sc, mn: (d, dmin, sc, mn))
    unrefined = fit_params(W, t, reference=True)
    assert any(not torch.equal(unrefined[k], plain[k]) for k in plain)
    assert_same(fit_params(W, t), plain, "kernel")
    assert_same(fit_params(W.double(), t), fit_params_reference(W.double(), t), "fp64")
