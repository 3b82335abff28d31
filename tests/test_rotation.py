"""Rotated int-k matrices (formats/rotation.py): the block-Hadamard rotation against an explicit matrix, the
rotated solves' loss identity, the packed layout's round trip (symmetric grids without zeros included), the
C rotation and the kernels and decode engine on rotated layers against dequantize-then-matmul, and the
int-k size allocation's byte accounting."""

from __future__ import annotations

import math

import pytest
import torch

from peakllm.calibrate.intk_plan import GridPlan, intk_bytes, parse_grids
from peakllm.errors import PeakError
from peakllm.formats.intk import PackedIntK
from peakllm.formats.rotation import (Rotation, block_for, pack_signs, rotate_problem, rotate_rows, rotation_for,
                                      unpack_signs, unrotate_rows)
from peakllm.kernels import decode, ops
from peakllm.runtime.linear import IntKLinear, packed_linear
from peakllm.solvers.allocate import layer_loss
from peakllm.solvers.gptq import gptq
from peakllm.solvers.grids import Grid
from peakllm.solvers.rotated import gptq_rotated, rtn_rotated
from test_kernels_intk import assert_close_to


def sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def explicit_R(rot: Rotation) -> torch.Tensor:
    n, b = rot.in_features, rot.block
    return torch.block_diag(*[sylvester(b)] * (n // b)) @ torch.diag(rot.signs.double()) / math.sqrt(b)


def problem(out, cols, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g)
    X = torch.randn(cols, 4 * cols, generator=g)
    if outliers:  # a few input features tens of times larger than the rest, as in real LLM activations
        X[torch.randperm(cols, generator=g)[:3]] *= 30
    return W, X @ X.T / X.shape[1]


@pytest.mark.parametrize("cols,block", [(96, 32), (576, 64), (1536, 512), (2048, 1024), (40, 0), (24, 0)])
def test_block_and_explicit_matrix(cols, block):
    assert block_for(cols) == block
    rot = rotation_for("model.layers.0.mlp.down_proj", cols, seed=3)
    if not block:
        assert rot is None
        return
    R = explicit_R(rot)
    assert torch.allclose(R @ R.T, torch.eye(cols, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, cols)
    torch.testing.assert_close(rotate_rows(x, rot).double(), x.double() @ R.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unrotate_rows(rotate_rows(x, rot), rot), x, atol=1e-5, rtol=1e-5)
    assert torch.equal(rotation_for("model.layers.0.mlp.down_proj", cols, seed=3).signs, rot.signs)
    assert not torch.equal(rotation_for("model.layers.1.mlp.down_proj", cols, seed=3).signs, rot.signs)


def test_rotated_problem_has_the_same_loss_for_every_q():
    W, H = problem(12, 64)
    rot = rotation_for("m", 64)
    Wr, Hr = rotate_problem(W, H, rot)
    Q = torch.randn(12, 64)  # any candidate in the rotated basis
    a = layer_loss(W, unrotate_rows(Q, rot), H)
    b = layer_loss(Wr, Q, Hr)
    assert a == pytest.approx(b, rel=1e-4)


def test_gptq_rotated_keeps_codes_and_weight_consistent_and_helps_outliers():
    W, H = problem(64, 128, seed=1)
    grid = Grid("affine", 2, 64, sym=True)
    rot = rotation_for("m", 128)
    q, _ = gptq_rotated(W, H, grid, rot)
    assert q.rotation is rot
    assert torch.equal(q.dequantize(), q.weight)  # codes + params + rotation rebuild the stored weight exactly
    plain, _ = gptq(W, H, grid)
    # incoherence: with outlier input features, the rotated solve's layer loss is far below the plain one
    assert layer_loss(W, q.weight, H) < 0.7 * layer_loss(W, plain.weight, H)
    r = rtn_rotated(W, grid, rot)
    assert torch.equal(r.dequantize(), r.weight)


def test_signs_pack_round_trip_and_reject_stray_bits():
    s = rotation_for("x", 77 * 16).signs
    packed = pack_signs(s)
    assert packed.numel() == (s.numel() + 7) // 8
    assert torch.equal(unpack_signs(packed, s.numel()), s)
    bad = pack_signs(torch.ones(20, dtype=torch.int8))
    bad[-1] |= 0x80  # bit 23, past the 20 columns
    with pytest.raises(PeakError, match="past the width"):
        unpack_signs(bad, 20)


@pytest.mark.parametrize("bits,group_size,sym", [(2, 32, True), (3, 64, False), (4, -1, True), (8, 16, False)])
def test_packed_rotated_round_trip_is_exact(bits, group_size, sym):
    W, H = problem(9, 96, seed=bits)
    q, _ = gptq_rotated(W, H, Grid("affine", bits, group_size, sym=sym), rotation_for("m", 96))
    packed = PackedIntK.from_quantized(q)
    tensors, meta = packed.to_tensors(""), packed.metadata()
    assert meta["rotate_block"] == 32 and "rot_signs" in tensors
    assert ("zeros" in tensors) == (not sym)  # symmetric grids store no zeros
    again = PackedIntK.from_tensors(tensors, meta)
    assert torch.equal(again.dequantize(), q.weight)
    assert packed.nbytes == intk_bytes(Grid("affine", bits, group_size, sym=sym), (9, 96), True)


def test_symmetric_files_with_zeros_still_read_and_bad_rotations_are_refused():
    W, H = problem(6, 64)
    q, _ = gptq(W, H, Grid("affine", 4, 32, sym=True))
    packed = PackedIntK.from_quantized(q)
    old = {**packed.to_tensors(""), "zeros": packed.zeros}  # written before zeros were dropped
    assert torch.equal(PackedIntK.from_tensors(old, packed.metadata()).dequantize(), q.weight)
    assert packed.nbytes == 6 * 32 + 6 * 2 * 2
    rq, _ = gptq_rotated(W, H, Grid("affine", 4, 32), rotation_for("m", 64))
    rp = PackedIntK.from_quantized(rq)
    t, m = rp.to_tensors(""), rp.metadata()
    with pytest.raises(PeakError, match="rot_signs"):
        PackedIntK.from_tensors({k: v for k, v in t.items() if k != "rot_signs"}, m)
    with pytest.raises(PeakError, match="power-of-two"):
        PackedIntK.from_tensors(t, {**m, "rotate_block": 24})
    with pytest.raises(PeakError, match="g_idx"):
        PackedIntK.from_tensors({**t, "g_idx": torch.zeros(64, dtype=torch.int32)}, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_rotation_matches_reference(dtype):
    for cols in (32, 576, 1536):
        rot = rotation_for("r", cols)
        x = torch.randn(3, cols).to(dtype)
        torch.testing.assert_close(ops.intk_rotate(x, rot), rotate_rows(x.float(), rot), atol=1e-5, rtol=1e-5)
    with pytest.raises(PeakError):
        ops.intk_rotate(torch.randn(2, 33), rotation_for("r", 32))


def _rotated_layer(out, cols, bits, group_size, seed=0, bias=None):
    W, H = problem(out, cols, seed=seed)
    q, _ = gptq_rotated(W, H, Grid("affine", bits, group_size, sym=bits != 3), rotation_for("l", cols, seed))
    packed = PackedIntK.from_quantized(q)
    return packed, packed_linear("intk", packed.to_tensors(""), packed.metadata(), bias=bias), q.weight


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 128), (8, -1)])
def test_rotated_layer_equals_dequantize_then_matmul(bits, group_size):
    bias = torch.randn(40)
    _, lin, W = _rotated_layer(40, 256, bits, group_size, seed=bits, bias=bias)
    assert isinstance(lin, IntKLinear) and lin.rot_block == 256
    torch.testing.assert_close(lin.dequantize(), W, atol=1e-5, rtol=1e-5)
    for rows in (1, 3, 64):  # kernel rows, and the prefill path (dequantize + GEMM on rotated x)
        x = torch.randn(rows, 256)
        mag = x.abs() @ W.abs().T + 1
        assert_close_to(lin(x), x @ W.T + bias, 100 * mag)  # the rotation's rounding: a few ulps more
    assert lin(torch.randn(2, 5, 256).bfloat16()).dtype == torch.bfloat16


@pytest.mark.skipif(not decode.available(torch.float32), reason="decode engine not built")
def test_engine_applies_the_rotation():
    packed, lin, W = _rotated_layer(33, 576, 4, 64, seed=5)
    bias = torch.randn(33)
    keep: list = []
    d = decode.intk_lin(lin._codes(), lin.scales, lin.zeros, lin.bits, lin.group_starts, lin.perm, bias, 576, 33,
                        keep, False, lin.rotation)
    for batch in (1, 3):
        x = torch.randn(batch, 576)
        for threads in (1, 2, 3):
            y = decode.lin_apply(d, x, threads)
            assert_close_to(y, x @ W.T + bias, 100 * (x.abs() @ W.abs().T + 1))


def test_allocation_plan_checks_before_work(tiny_llama):
    grids = parse_grids("2g32s,4g64")
    assert grids == (Grid("affine", 2, 32, sym=True), Grid("affine", 4, 64))
    assert parse_grids("3g-1sm") == (Grid("affine", 3, -1, sym=True, mse=True),)
    with pytest.raises(PeakError, match="BITSgGROUP"):
        parse_grids("5g32")
    plan = GridPlan(3.0, grids, rotate=True)
    plan.check(tiny_llama)
    params = sum(math.prod(s) for s in plan.shapes.values())
    assert plan.budget_bytes == int(3.0 * params / 8)
    for bits, match in ((1.5, "below"), (5.5, "above")):
        with pytest.raises(PeakError, match=match):
            GridPlan(bits, grids).check(tiny_llama)
