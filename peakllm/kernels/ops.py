"""Python entry points of the packed-weight kernels: validate, then call intk.cpp / sparse.cpp or,
when no compiler is available (or PEAKLLM_NO_KERNELS is set), the pure-torch reference. The int-k entry
points and what every kernel entry shares (libraries, checks) are here; N:M and bitmask ones in sparse_ops.py.

All matmuls take x as a 2-D [B, in] fp32 or bf16 tensor and return fp32 [B, out] (`y = x @ W.T`);
`runtime/linear.py` handles leading dims, output dtype, bias and the prefill path.

int-k groups are passed as `group_starts` (int32 [n_groups + 1], column ranges in the stored order)
built by `intk_groups`: for act-order layers it also returns `perm`, the column order that makes every
group contiguous, and the codes must be permuted once with `permute_columns`.
"""

from __future__ import annotations

import ctypes
import math

import torch

from peakllm.errors import PeakError
from peakllm.formats.rotation import Rotation, rotate_rows
from peakllm.kernels import reference as ref
from peakllm.kernels.build import load_library, ptr

INTK_BITS = (2, 3, 4, 8)
VALUE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CODES = 3
_I, _L, _P = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "intk": {
        "intk_gemm": [_P, _I, _P, _I, _L, _P, _P, _P, _P, _I, _L, _I, _P, _I],
        "intk_gemm_a8": [_P, _I, _P, _I, _L, _P, _P, _P, _P, _I, _L, _I, _P, _I],
        "intk_dequant": [_P, _P, _P, _P, _I, _L, _L, _I, _P, _I, _I],
        "intk_a8_path": [],
        "intk_rotate": [_P, _I, _I, _L, _P, _I, _P],
    },
    "sparse": {
        "nm_gemm": [_P, _I, _I, _L, _L, _I, _I, _P, _I, _P, _I, _P, _P, _I, _P, _P, _I],
        "bitmask_gemm": [_P, _I, _I, _L, _L, _P, _P, _P, _I, _P, _P, _I, _P, _P, _I, _P, _L, _I],
        "nm_dequant": [_L, _L, _I, _I, _P, _I, _P, _I, _P, _P, _I, _P, _P, _I, _I],
        "bitmask_dequant": [_L, _L, _P, _P, _P, _I, _P, _P, _I, _P, _P, _I, _L, _P, _I, _I],
    },
}
_fns: dict[str, dict | None] = {}


def bind(lib: ctypes.CDLL, lib_name: str) -> dict:
    """The functions of a loaded `lib_name` library (intk, sparse) with their ctypes signatures, by name
    (also for builds compiled elsewhere: the scalar-path tests, benchmarks/bench_intk_builds.py)."""
    fns = {}
    for name, argtypes in _SIGNATURES[lib_name].items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        fns[name] = fn
    return fns


def library_fns(lib_name: str) -> dict | None:
    """ctypes functions of one library, or None when it cannot be built."""
    if lib_name not in _fns:
        lib = load_library(lib_name)
        _fns[lib_name] = None if lib is None else bind(lib, lib_name)
    return _fns[lib_name]


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise PeakError(msg)


def check_tensor(t, name, dtype, shape) -> None:
    check(isinstance(t, torch.Tensor), f"{name} must be a tensor")
    check(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")
    check(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    check(t.is_contiguous() and t.device.type == "cpu", f"{name} must be a contiguous CPU tensor")


def check_x(x: torch.Tensor, in_features: int) -> None:
    check(isinstance(x, torch.Tensor) and x.dim() == 2, "x must be a 2-D tensor [batch, in_features]")
    check(x.dtype in (torch.float32, torch.bfloat16), f"x must be float32 or bfloat16, got {x.dtype}")
    check(x.shape[1] == in_features, f"x has {x.shape[1]} features, the weight expects {in_features}")
    check(x.is_contiguous() and x.device.type == "cpu", "x must be a contiguous CPU tensor")


def threads() -> int:
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- int-k

def intk_groups(in_features: int, group_size: int, g_idx: torch.Tensor | None = None):
    """(group_starts int32 [n_groups + 1], perm int32 [in] or None) for the kernels' contiguous groups."""
    check(group_size == -1 or group_size > 0, f"group_size must be positive or -1, got {group_size}")
    if g_idx is None:
        size = in_features if group_size == -1 else group_size
        starts = list(range(0, in_features, size)) + [in_features]
        return torch.tensor(starts, dtype=torch.int32), None
    check(g_idx.dim() == 1 and g_idx.numel() == in_features, f"g_idx must have {in_features} entries")
    check(not g_idx.dtype.is_floating_point, "g_idx must be an integer tensor")
    n_groups = math.ceil(in_features / (in_features if group_size == -1 else group_size))
    check(bool(((g_idx >= 0) & (g_idx < n_groups)).all()), f"g_idx values must lie in [0, {n_groups})")
    counts = torch.bincount(g_idx.to(torch.int64), minlength=n_groups)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    perm = torch.argsort(g_idx.to(torch.int64), stable=True).to(torch.int32)
    return starts, perm


def permute_columns(qweight: torch.Tensor, bits: int, in_features: int, perm: torch.Tensor) -> torch.Tensor:
    """The same int-k bitstreams with column j holding original column perm[j] (once, at load time)."""
    codes = ref.unpack_bitstream(qweight, bits, in_features)
    return ref.pack_bitstream(codes[:, perm.to(torch.int64)], bits)


def _check_intk(qweight, scales, zeros, bits, group_starts, in_features):
    check(bits in INTK_BITS, f"int-k kernels support bits {INTK_BITS}, got {bits}")
    check(isinstance(group_starts, torch.Tensor) and group_starts.dtype == torch.int32
           and group_starts.dim() == 1 and group_starts.numel() >= 2, "group_starts must be int32 [n_groups + 1]")
    out, n_groups = scales.shape[0], group_starts.numel() - 1
    check_tensor(qweight, "qweight", torch.uint8, (out, math.ceil(in_features * bits / 8)))
    check_tensor(scales, "scales", torch.float16, (out, n_groups))
    check_tensor(zeros, "zeros", torch.uint8, (out, n_groups))
    check(group_starts.is_contiguous(), "group_starts must be contiguous")


def _stored_g_idx(group_starts: torch.Tensor) -> torch.Tensor:
    """Group of each stored column when groups are the contiguous ranges of group_starts."""
    sizes = (group_starts[1:] - group_starts[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(sizes.numel()), sizes)


def int8_act_applies(bits: int, group_starts: torch.Tensor) -> bool:
    """Whether the int8-activation path runs for this layer: bits 2, 4 or 8 and groups of one or more
    whole 32-column blocks (other layers take the fp32-activation path, also when it is asked for)."""
    return (bits in (2, 4, 8) and bool((group_starts % 32 == 0).all())
            and bool((group_starts[1:] > group_starts[:-1]).all()))


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq int8 [B, in], sx fp32 [B, in/32]) as the int8-activation path quantizes x (in % 32 == 0):
    sx = max|block| / 127, xq = round-half-even(x * (127 / max|block|)); x ~ sx * xq, off by <= sx / 2."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1)
    # a true fp32 division as in C (`127.0 / tensor` would be 127 * reciprocal, rounded twice)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    return torch.round(xb * inv.unsqueeze(-1)).to(torch.int8).reshape(x.shape), amax / 127.0


def intk_matmul(x, qweight, scales, zeros, bits: int, group_starts, perm=None, int8_act: bool = False) -> torch.Tensor:
    """fp32 [B, out] = x[:, perm] @ W.T for int-k W (columns in stored order, groups by group_starts).

    int8_act: quantize x to int8 per 32-column block and use integer dot products where
    `int8_act_applies` (intk_a8_impl.h states the error bound); the reference path without a compiler
    computes the same product on the quantized x."""
    check(isinstance(group_starts, torch.Tensor) and group_starts.numel() >= 2,
           "group_starts must be int32 [n_groups + 1]")
    in_features = int(group_starts[-1])
    check_x(x, in_features)
    _check_intk(qweight, scales, zeros, bits, group_starts, in_features)
    if perm is not None:
        check_tensor(perm, "perm", torch.int32, (in_features,))
    int8_act = int8_act and int8_act_applies(bits, group_starts)
    fns = library_fns("intk")
    if fns is None:
        W = ref.dequantize_intk(qweight, scales, zeros, bits, in_features, -1, _stored_g_idx(group_starts))
        xs = x if perm is None else x[:, perm.to(torch.int64)]
        if int8_act and xs.shape[0]:
            xq, sx = quantize_act_int8(xs)
            xs = (xq.float().reshape(xs.shape[0], -1, 32) * sx.unsqueeze(-1)).reshape(xs.shape)
        return ref.matmul_ref(xs, W)
    B, out = x.shape[0], qweight.shape[0]
    y = torch.empty(B, out, dtype=torch.float32)
    if B == 0 or out == 0:
        return y.zero_()
    rc = fns["intk_gemm_a8" if int8_act else "intk_gemm"](ptr(x), int(x.dtype == torch.bfloat16), ptr(perm) if perm is not None else None, B,
                          in_features, ptr(qweight), ptr(scales), ptr(zeros), ptr(group_starts),
                          group_starts.numel() - 1, out, bits, ptr(y), threads())
    check(rc == 0, f"intk_gemm rejected its input (code {rc}): group_starts must rise from 0 to in_features, "
                    "perm must hold column indices")
    return y


def intk_rotate(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """fp32 [B, in]: every row of x (fp32 or bf16 [B, in]) times a rotated int-k layer's R (its input in the
    basis the codes were solved in); formats/rotation.rotate_rows is the reference."""
    check_x(x, rot.in_features)
    fns = library_fns("intk")
    if fns is None:
        return rotate_rows(x, rot)
    return bind_rotate(rot, fns)(x)


def bind_rotate(rot: Rotation, fns: dict | None = None):
    """x -> intk_rotate(x, rot) for x already checked (a contiguous fp32 / bf16 [B, in])."""
    fns = fns or library_fns("intk")
    if fns is None:
        return lambda x: rotate_rows(x, rot)
    signs = rot.signs.contiguous()
    in_features, block = rot.in_features, rot.block

    def call(x, _keep=signs):
        y = torch.empty(x.shape[0], in_features, dtype=torch.float32)
        raise_on(fns["intk_rotate"](x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], in_features,
                                    signs.data_ptr(), block, y.data_ptr()), "intk_rotate")
        return y

    return call


def intk_dequantize(qweight, scales, zeros, bits: int, group_starts, in_features: int,
                    dtype=torch.float32) -> torch.Tensor:
    """Dense W [out, in] in the stored column order, for prefill GEMMs; dtype float32 or bfloat16."""
    _check_intk(qweight, scales, zeros, bits, group_starts, in_features)
    check(dtype in (torch.float32, torch.bfloat16), f"dequantize to float32 or bfloat16, not {dtype}")
    fns = library_fns("intk")
    if fns is None:
        return ref.dequantize_intk(qweight, scales, zeros, bits, in_features, -1, _stored_g_idx(group_starts)).to(dtype)
    W = torch.empty(qweight.shape[0], in_features, dtype=dtype)
    if W.numel():
        rc = fns["intk_dequant"](ptr(qweight), ptr(scales), ptr(zeros), ptr(group_starts), group_starts.numel() - 1,
                                 in_features, qweight.shape[0], bits, ptr(W), int(dtype == torch.bfloat16), threads())
        check(rc == 0, f"intk_dequant rejected its input (code {rc}): group_starts must rise from 0 to in_features")
    return W


# ------------------------------------------------------------------------------ prebound calls (decode)
# Checking every tensor on every call costs tens of microseconds, as much as a small matvec. A module
# validates its packed tensors once (by calling the checked function above) and then uses one of these
# closures, which take only x: a contiguous 2-D float32 / bfloat16 CPU tensor of the right width,
# checked by the caller. They hold references to the tensors whose addresses they keep.

def addr(t) -> int | None:
    return None if t is None else t.data_ptr()


def raise_on(rc: int, kernel: str) -> None:
    if rc:
        raise PeakError(f"{kernel} rejected its input (code {rc})")


def bind_intk(qweight, scales, zeros, bits: int, group_starts, perm=None, int8_act: bool = False):
    """x -> fp32 x[:, perm] @ W.T, for tensors already accepted by intk_matmul."""
    fns = library_fns("intk")
    if fns is None:
        return lambda x: intk_matmul(x, qweight, scales, zeros, bits, group_starts, perm, int8_act)
    fn = fns["intk_gemm_a8" if int8_act and int8_act_applies(bits, group_starts) else "intk_gemm"]
    out, in_features, n_groups = qweight.shape[0], int(group_starts[-1]), group_starts.numel() - 1
    tensors = (qweight, scales, zeros, group_starts, perm)
    p_perm, p_q, p_s, p_z, p_g = addr(perm), addr(qweight), addr(scales), addr(zeros), addr(group_starts)

    def call(x, _keep=tensors):
        y = torch.empty(x.shape[0], out, dtype=torch.float32)
        raise_on(fn(x.data_ptr(), int(x.dtype == torch.bfloat16), p_perm, x.shape[0], in_features, p_q, p_s, p_z,
                     p_g, n_groups, out, bits, y.data_ptr(), torch.get_num_threads()), "intk_gemm")
        return y

    return call


