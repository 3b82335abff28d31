"""Incoherence processing with randomized block-Hadamard rotations (QuIP#, Tseng et al. 2024; QuaRot).

A matrix with a few large input columns (outlier features) wastes a low-bit grid: the group's scale follows
the outlier and every other weight of the group rounds to a handful of levels. Rotating the input space by
an orthogonal R spreads each column's mass over all the columns of its block, so the rotated weights are
close to Gaussian and quantize with much smaller error; the layer computes the same function because

    W x = (W R^T) (R x).

R = blockdiag(H_b, ..., H_b) diag(s) / sqrt(b): H_b the Sylvester-Hadamard matrix of the largest power of two
b dividing the width (capped at MAX_BLOCK), s a random +-1 vector. Applying R to a vector costs O(n log b)
additions (the fast Walsh-Hadamard transform), against O(n * out) for the matmul it precedes, so the run time
pays almost nothing. The solver sees the rotated problem: weights W R^T and Hessian R H R^T (the Hessian of
the rotated inputs R x), whose layer-wise loss equals the original one for any Q:
tr((W - Q R) H (W - Q R)^T) = tr((W R^T - Q) (R H R^T) (W R^T - Q)^T).

The rotation is part of a stored int-k matrix (formats/intk.py: block and packed signs); the solvers quantize
in its basis (solvers/rotated.py) and the kernels apply it to activations (kernels/intk.cpp, with
``rotate_rows`` as their reference).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from peakllm.errors import PeakError

MAX_BLOCK = 1024  # bigger blocks mix more columns but cost more adds per activation; 1024 covers real widths
MIN_BLOCK = 16    # narrower blocks barely mix: a width whose power-of-two part is smaller is left unrotated


@dataclass(frozen=True)
class Rotation:
    """R = blockdiag(H_block, ...) diag(signs) / sqrt(block) on vectors of ``len(signs)`` columns."""

    block: int
    signs: torch.Tensor  # int8 [in], values -1 / +1

    def __post_init__(self):
        n = self.signs.numel()
        if self.block < 2 or self.block & (self.block - 1) or n % self.block:
            raise PeakError(f"a Hadamard rotation needs a power-of-two block dividing the width; got block "
                            f"{self.block} for {n} columns")
        if self.signs.dtype != torch.int8 or self.signs.dim() != 1 or not bool((self.signs.abs() == 1).all()):
            raise PeakError("rotation signs must be an int8 vector of -1 and +1")

    @property
    def in_features(self) -> int:
        return self.signs.numel()


def block_for(in_features: int) -> int:
    """The block of the rotation a width takes: its largest power-of-two divisor, at most MAX_BLOCK; 0 when
    that is below MIN_BLOCK (the width is then not rotated)."""
    b = min(in_features & -in_features, MAX_BLOCK)
    return b if b >= MIN_BLOCK else 0


def rotation_for(name: str, in_features: int, seed: int = 0) -> Rotation | None:
    """The rotation of matrix ``name`` (its signs drawn from the name and the run's seed, so a rerun repeats
    them); None when the width takes no block."""
    block = block_for(in_features)
    if not block:
        return None
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    signs = (torch.randint(0, 2, (in_features,), generator=gen, dtype=torch.int8) * 2 - 1).to(torch.int8)
    return Rotation(block, signs)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of every ``block`` consecutive entries of the last dimension
    (x @ blockdiag(H_block) with H_block symmetric), in log2(block) butterfly passes."""
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(shape)


def rotate_rows(X: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """Each row x of ``X [..., in]`` replaced by R x (activations entering a rotated layer; W R^T row-wise)."""
    return fwht(X.float() * rot.signs.to(torch.float32), rot.block) / math.sqrt(rot.block)


def unrotate_rows(X: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """Each row x replaced by R^T x: undoes ``rotate_rows`` (a rotated layer's weights back in the original
    basis: Q R row-wise)."""
    return fwht(X.float(), rot.block) / math.sqrt(rot.block) * rot.signs.to(torch.float32)


def rotate_problem(W: torch.Tensor, H: torch.Tensor, rot: Rotation) -> tuple[torch.Tensor, torch.Tensor]:
    """(W R^T, R H R^T): the layer-wise problem in the rotated basis (same loss for every Q, see above)."""
    if W.shape[1] != rot.in_features or H.shape != (rot.in_features, rot.in_features):
        raise PeakError(f"a rotation of {rot.in_features} columns cannot rotate W {tuple(W.shape)} / H {tuple(H.shape)}")
    HR = rotate_rows(H, rot)              # rows h_i -> R h_i: H R^T (H symmetric)
    return rotate_rows(W, rot), rotate_rows(HR.T.contiguous(), rot).T.contiguous()


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """+-1 int8 [n] -> uint8 [ceil(n / 8)], bit i of byte j set where signs[8 j + i] is -1."""
    bits = (signs < 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, torch.zeros(pad, dtype=torch.uint8)]).reshape(-1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (bits * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``pack_signs``: int8 [n] of -1 / +1."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise PeakError(f"packed rotation signs must be uint8 [{(n + 7) // 8}], got {packed.dtype} {tuple(packed.shape)}")
    bits = (packed.unsqueeze(1).to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1
    bits = bits.flatten()
    if n < bits.numel() and bool(bits[n:].any()):
        raise PeakError("packed rotation signs have bits set past the width")
    return (1 - 2 * bits[:n]).to(torch.int8)
