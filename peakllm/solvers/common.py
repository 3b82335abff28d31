"""What every solver shares: argument checks, the damped inverse Hessian, and the solve report."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peakllm.errors import PeakError

# On a failed Cholesky, damping grows x10 this many times before the solver gives up on H.
DAMP_RETRIES = 4
DAMP_GROWTH = 10.0


@dataclass
class SolveInfo:
    """How a Hessian-based solve went.

    damp_used: the relative damping (fraction of mean diag(H)) that made H factorable.
    retries: how many times damping was raised. fallback_rtn: H could not be factored at all and the
    solver returned a result without error feedback. loss: sum over weights of (w - q)^2 / d^2 with d the
    diagonal of the upper Cholesky factor of H^-1 (NaN when fallback_rtn).
    """

    damp_used: float
    retries: int
    fallback_rtn: bool
    loss: float


def compute_dtype(W: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (references and tests); everything else is solved in fp32."""
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def check_weight(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.numel() == 0:
        raise PeakError(f"weight must be a non-empty 2-D tensor [out, in], got {getattr(W, 'shape', type(W))}")
    if not W.is_floating_point():
        raise PeakError(f"weight must be floating point, got {W.dtype}")
    if not torch.isfinite(W).all():
        raise PeakError("weight has non-finite values")


def check_hessian(H: torch.Tensor, in_features: int) -> None:
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (in_features, in_features):
        raise PeakError(f"H must be [{in_features}, {in_features}] for a weight with {in_features} inputs, "
                        f"got {tuple(getattr(H, 'shape', ()))}")


def check_sparsity(sparsity: float, prunen: int, prunem: int, in_features: int) -> None:
    """sparsity in [0, 1); N:M (prunen zeros per prunem columns) needs 0 < prunen < prunem dividing in."""
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise PeakError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if prunen < 0 or (prunem > 0 and prunen >= prunem) or (prunem <= 0 and prunen != 0) or (
            prunem > 0 and prunen == 0):
        raise PeakError(f"N:M sparsity needs 0 < prunen < prunem (or both 0), got {prunen}:{prunem}")
    if prunem > 0 and in_features % prunem != 0:
        raise PeakError(f"{prunen}:{prunem} sparsity needs in_features divisible by {prunem}, got {in_features}")


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if not isinstance(blocksize, int) or blocksize < 1:
        raise PeakError(f"{name} must be an integer >= 1, got {blocksize!r}")


def prepare(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of W and H in the compute dtype with dead inputs (diag(H) == 0) neutralised: such a column
    never saw a nonzero activation, so its weight is irrelevant; set it to 0 and H's diagonal to 1."""
    dtype = compute_dtype(W)
    W = W.detach().to(dtype=dtype, copy=True)
    H = H.detach().to(dtype=dtype, device=W.device, copy=True)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def upper_inverse(H: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float, int]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, so that Hinv = U^T U.

    Row j of U is the row of the inverse Hessian restricted to the columns not yet solved, scaled by
    1/sqrt of its diagonal: everything the OBS update for column j needs (GPTQ paper, Step 3).
    Returns (U, damp used, retries), or (None, last damp, retries) when no damping made it factorable.
    """
    if not isinstance(damp, (int, float)) or not damp >= 0:
        raise PeakError(f"damp must be >= 0, got {damp!r}")
    mean_diag = torch.mean(torch.diagonal(H))
    d = float(damp)
    for retry in range(DAMP_RETRIES + 1):
        if retry:
            d = d * DAMP_GROWTH if d > 0 else 1e-6
        # at most three in x in matrices alive at once besides H (it is 485 MB each for a 7B down_proj)
        damped = H.clone()
        damped.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0 and torch.isfinite(L).all():
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0 and torch.isfinite(U).all():
                return U, d, retry
    return None, d, DAMP_RETRIES


def current_columns(W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor,
                    i1: int, j: int, end: int) -> torch.Tensor:
    """Up-to-date weights of columns [j, end) while the lazy block starting at i1 is being swept.

    Columns inside the block live in W1; columns past it still wait for the block's update
    -Err1 @ Hinv[block, cols] (zero for the columns not yet swept), so apply it here. The IST-DASLab code
    reads stale W at this point; doing it exactly makes the result independent of blocksize.
    """
    i2 = i1 + W1.shape[1]
    inside = W1[:, j - i1:min(end, i2) - i1]
    if end <= i2:
        return inside
    outside = W[:, i2:end] - Err1 @ Hinv[i1:i2, i2:end]
    return torch.cat([inside, outside], dim=1)


def nm_mask(score: torch.Tensor, prunen: int, prunem: int) -> torch.Tensor:
    """Pruned positions (True) of the prunen lowest scores in every group of prunem consecutive columns."""
    rows, cols = score.shape
    g = score.reshape(rows, cols // prunem, prunem)
    idx = torch.argsort(g, dim=2, stable=True)[:, :, :prunen]
    pruned = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True)
    return pruned.reshape(rows, cols)


def lowest_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Pruned positions (True) of the floor(numel * sparsity) lowest scores of the whole tensor."""
    k = int(score.numel() * sparsity)
    pruned = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    pruned[torch.argsort(score.flatten(), stable=True)[:k]] = True
    return pruned.reshape(score.shape)
