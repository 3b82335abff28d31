"""nn.Modules that run weights through the compiled kernels: packed ones (kernels/ops.py, sparse_ops.py) and dense.

Each module holds the packed tensors of docs/DESIGN.md "Packed layouts" as buffers, under their
on-disk names, and computes `F.linear(x, W, bias)` for any leading dims of x without a dense W:
up to `PREFILL_ROWS` rows of x (decoding, small batches) the kernels read the packed weights
directly; beyond that (prefill) the work is compute-bound, so W is dequantized per call into an fp32
temporary and handed to torch's fp32 GEMM, also for bf16 x: on the AVX2 dev machine torch's bf16 GEMM
ran ~8x slower than fp32 (3.5 vs 28 GFLOP/s, 512x576 @ 576x1536, one core), see
benchmarks/bench_kernels.py. x may be float32 or bfloat16 (other float dtypes run in float32); the
result has x's dtype, rounded once from fp32.

IntKLinear can instead quantize x to int8 per 32-column block and use integer dot products for the
kernel rows (`int8_act`, default from $PEAKLLM_INTK_ACT = int8 | f32, int8 when unset; error bound in
kernels/intk_a8_impl.h); prefill is unchanged. int8 is the default because it measures best: 1.55-1.8x the
decode speed of fp32 activations (default model, 7B shape) for +0.6% perplexity when the decode step's
logits are scored over 2 x 1024 wiki tokens (README, "int8 activations").
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F
from torch import nn

from peakllm.errors import PeakError
from peakllm.formats.intk import stored_zeros
from peakllm.formats.rotation import Rotation, unpack_signs, unrotate_rows
from peakllm.kernels import decode, lut, ops, sparse_ops
from peakllm.kernels.dense import dense_linear

PREFILL_ROWS = 32  # rows of x above which dequantize + torch GEMM is used instead of the kernels
INTK_ACT_ENV = "PEAKLLM_INTK_ACT"


def int8_act_default() -> bool:
    """Whether new IntKLinear layers use int8 activations: $PEAKLLM_INTK_ACT = int8 | f32 (default int8)."""
    value = os.environ.get(INTK_ACT_ENV, "int8").strip().lower()
    if value not in ("int8", "f32"):
        raise PeakError(f"{INTK_ACT_ENV} must be 'int8' or 'f32', got {value!r}")
    return value == "int8"


def _as_compute(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x as a contiguous 2-D float32 / bfloat16 tensor (a view when it already is one)."""
    if x.shape[-1] != in_features:
        raise PeakError(f"input has {x.shape[-1]} features, the layer expects {in_features}")
    x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    return x2 if x2.is_contiguous() else x2.contiguous()


def _after_load(module, _incompatible_keys) -> None:
    module._prepare()  # a function at module level, so layers stay picklable


class _PackedLinear(nn.Module):
    """Common forward: the kernel for few rows, dequantize + GEMM for many."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise PeakError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = bias.detach().clone()
        self.register_buffer("bias", bias)
        self._kernel = None
        self.register_load_state_dict_post_hook(_after_load)

    def _derive(self) -> None:
        """Recompute the non-persistent buffers that follow from the packed tensors."""

    def _prepare(self) -> None:
        """After construction or load_state_dict: derive, check every tensor once, rebind the kernel."""
        self._derive()
        self._kernel = None
        self._matmul(torch.ones(1, self.in_features))

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:  # fp32 [rows, out], every tensor checked
        raise NotImplementedError

    def _bind(self):
        """The same as _matmul as a closure over the already checked tensors (ops.bind_*)."""
        raise NotImplementedError

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """Dense W [out, in] in the original column order (for checks and exports)."""
        raise NotImplementedError

    def _dense_for_prefill(self, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W in the column order the kernel uses, column permutation of x or None)."""
        return self.dequantize(dtype), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _as_compute(x, self.in_features)
        if x2.shape[0] > PREFILL_ROWS:
            W, perm = self._dense_for_prefill(torch.float32)
            y = F.linear((x2 if perm is None else x2[:, perm]).float(), W)
        else:
            if self._kernel is None:
                self._kernel = self._bind()
            y = self._kernel(x2)
        bias = self._buffers["bias"]
        if bias is not None:
            y += bias.float()
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def __getstate__(self):
        # the bound kernel holds raw addresses of this instance's tensors: copies and pickles rebind
        state = self.__dict__.copy()
        state["_kernel"] = None
        return state

    def _apply(self, fn, recurse=True):
        """`.to()`, `.bfloat16()`, ... move the packed tensors but never change their dtypes: fp16 scales
        or float values cast to a model's dtype would no longer be the layout the kernels read."""
        self._kernel = None  # buffers may move: rebind the kernel on the next call
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            keep_dtype = name != "bias" and moved.dtype != buf.dtype
            self._buffers[name] = buf.to(moved.device) if keep_dtype else moved
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class IntKLinear(_PackedLinear):
    """Group-wise affine int-k weights (k in 2, 3, 4, 8): w = scale * (q - zero), optional act-order g_idx.

    With g_idx the codes are also kept with their columns sorted by group (`qweight_sorted`, the same
    size as qweight), so every group is a contiguous range for the kernel; x is gathered per call.
    `int8_act` (set with `set_int8_act`): the kernel rows quantize x to int8 per 32 columns where
    `ops.int8_act_applies` (bits 2, 4, 8; groups of whole 32-column blocks), fp32 activations elsewhere.
    A rotated layer (`rot_signs`, `rot_block`: formats/rotation.py) multiplies its codes by R x instead of x.
    """

    int8_act = False  # instances set it from $PEAKLLM_INTK_ACT; the class value serves older pickles

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, qweight: torch.Tensor,
                 scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, rot_signs: torch.Tensor | None = None, rot_block: int = 0):
        super().__init__(in_features, out_features, bias)
        self.bits, self.group_size, self.rot_block = int(bits), int(group_size), int(rot_block)
        if self.rot_block and (rot_signs is None or g_idx is not None):
            raise PeakError("a rotated int-k layer needs its rot_signs and cannot have a g_idx")
        self.register_buffer("rot_signs", rot_signs if self.rot_block else None)
        self.int8_act = int8_act_default()
        if scales.shape[0] != self.out_features:
            raise PeakError(f"scales have {scales.shape[0]} rows, the layer has {self.out_features} outputs")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("g_idx", None if g_idx is None else g_idx.to(torch.int32).contiguous())
        for name in ("group_starts", "perm", "qweight_sorted"):
            self.register_buffer(name, None, persistent=False)
        self._prepare()

    def _derive(self):
        self.rotation = None if not self.rot_block else Rotation(self.rot_block,
                                                                 unpack_signs(self.rot_signs, self.in_features))
        self.group_starts, self.perm = ops.intk_groups(self.in_features, self.group_size, self.g_idx)
        self.qweight_sorted = None if self.perm is None else ops.permute_columns(
            self.qweight, self.bits, self.in_features, self.perm)
        self.lut_weights = None  # the LUT kernel's copy of the codes, made when first used (lut_layout)

    def _codes(self) -> torch.Tensor:
        return self.qweight if self.qweight_sorted is None else self.qweight_sorted

    def set_int8_act(self, on: bool) -> None:
        """Use int8 activations in the kernel rows (on) or fp32 ones; a built decode step is not updated."""
        self.int8_act = bool(on)
        self._kernel = None

    def _matmul(self, x2):
        return ops.intk_matmul(x2, self._codes(), self.scales, self.zeros, self.bits, self.group_starts, self.perm,
                               self.int8_act)

    def lut_layout(self):
        """The LUT kernel's copy of the codes (kernels/lut.py) if the layer runs it (2 bits, int8 x, no act-order)."""
        on = self.bits == 2 and self.int8_act and self.perm is None and lut.applies(self.in_features, self.group_size)
        if on and lut.enabled() and getattr(self, "lut_weights", None) is None:  # (older pickles lack the attribute)
            self.lut_weights = lut.intk2_weights(self.qweight, self.scales, self.zeros, self.in_features, self.group_size)
        return self.lut_weights if on and lut.enabled() else None

    def _bind(self):
        layout = self.lut_layout()
        return lut.bind_lut(layout) if layout is not None else ops.bind_intk(
            self._codes(), self.scales, self.zeros, self.bits, self.group_starts, self.perm, self.int8_act)

    def decode_lin(self, keep: list):
        """This layer as a descriptor of the whole-step decode engine (kernels/decode.py)."""
        if (layout := self.lut_layout()) is not None:
            return decode.lut_lin(layout, False, self.bias, keep, self.rotation)
        return decode.intk_lin(self._codes(), self.scales, self.zeros, self.bits, self.group_starts, self.perm,
                               self.bias, self.in_features, self.out_features, keep, self.int8_act, self.rotation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is None:
            return super().forward(x)
        xr = ops.intk_rotate(_as_compute(x, self.in_features), self.rotation)  # the codes' basis, fp32
        y = super().forward(xr)
        return (y if x.dtype in (torch.float32, y.dtype) else y.to(x.dtype)).reshape(*x.shape[:-1], self.out_features)

    def _dense_for_prefill(self, dtype):
        W = ops.intk_dequantize(self._codes(), self.scales, self.zeros, self.bits, self.group_starts,
                                self.in_features, dtype)
        return W, None if self.perm is None else self.perm.to(torch.int64)

    def dequantize(self, dtype=torch.float32):
        W, perm = self._dense_for_prefill(dtype)
        if self.rotation is not None:  # back to the original basis (W R), where x lives
            return unrotate_rows(W, self.rotation).to(dtype)
        if perm is None:
            return W
        out = torch.empty_like(W)
        out[:, perm] = W
        return out

    def extra_repr(self) -> str:
        act_order = self.perm is not None
        return (f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}, act_order={act_order}, "
                f"int8_act={self.int8_act}" + (f", rotate_block={self.rot_block}" if self.rot_block else ""))


class _SparseValues(_PackedLinear):
    """Kept values as floats (`values`) or as int-k codes (`qweight`, `scales`, `zeros`)."""

    def _set_values(self, values, qweight, scales, zeros, bits, group_size):
        if (values is None) == (qweight is None):
            raise PeakError("give exactly one of values (floats) or qweight (int-k codes)")
        for name, t in (("values", values), ("qweight", qweight), ("scales", scales), ("zeros", zeros)):
            self.register_buffer(name, t)
        self.bits = None if bits is None else int(bits)
        self.group_size = None if group_size is None else int(group_size)

    def _value_kwargs(self) -> dict:
        return dict(values=self.values, qweight=self.qweight, scales=self.scales, zeros=self.zeros,
                    bits=self.bits, group_size=self.group_size)


class NMLinear(_SparseValues):
    """N:M sparse weights (N zeros in every M consecutive columns; 2:4 has the fast path)."""

    def __init__(self, in_features: int, out_features: int, n: int, m: int, indices: torch.Tensor,
                 values: torch.Tensor | None = None, qweight: torch.Tensor | None = None,
                 scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None, bits: int | None = None,
                 group_size: int | None = None, bias: torch.Tensor | None = None):
        super().__init__(in_features, out_features, bias)
        self.n, self.m = int(n), int(m)
        self.register_buffer("indices", indices)
        self._set_values(values, qweight, scales, zeros, bits, group_size)
        if indices.shape[0] != self.out_features:
            raise PeakError(f"indices have {indices.shape[0]} rows, the layer has {self.out_features} outputs")
        self._prepare()

    def _matmul(self, x2):
        return sparse_ops.nm_matmul(x2, self.indices, self.n, self.m, **self._value_kwargs())

    def _bind(self):
        return sparse_ops.bind_nm(self.indices, self.n, self.m, self.in_features, **self._value_kwargs())

    def decode_lin(self, keep: list):
        return decode.nm_lin(self.indices, self.n, self.m, self.in_features, self.out_features, bias=self.bias,
                             keep=keep, **self._value_kwargs())

    def dequantize(self, dtype=torch.float32):
        return sparse_ops.nm_dequantize(self.indices, self.n, self.m, self.in_features, dtype=dtype, **self._value_kwargs())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={self.n}:{self.m}, bits={self.bits}"


class BitmaskLinear(_SparseValues):
    """Unstructured sparse weights: a bitmask per row and the kept values (floats or int-k codes)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, row_offsets: torch.Tensor,
                 values: torch.Tensor | None = None, qweight: torch.Tensor | None = None,
                 scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None, bits: int | None = None,
                 group_size: int | None = None, bias: torch.Tensor | None = None):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("mask", mask)
        self.register_buffer("row_offsets", row_offsets)
        if values is not None:
            values = values.reshape(-1)
        if qweight is not None:
            qweight = qweight.reshape(-1)
        self._set_values(values, qweight, scales, zeros, bits, group_size)
        if mask.shape[0] != self.out_features:
            raise PeakError(f"mask has {mask.shape[0]} rows, the layer has {self.out_features} outputs")
        self.register_buffer("qrow_offsets", None, persistent=False)
        self._prepare()

    def _derive(self):
        self.qrow_offsets = None if self.qweight is None else sparse_ops.bitmask_code_offsets(self.row_offsets, self.bits)

    def _kwargs(self) -> dict:
        return dict(qrow_offsets=self.qrow_offsets, **self._value_kwargs())

    def _matmul(self, x2):
        return sparse_ops.bitmask_matmul(x2, self.mask, self.row_offsets, **self._kwargs())

    def _bind(self):
        return sparse_ops.bind_bitmask(self.mask, self.row_offsets, self.in_features, **self._kwargs())

    def decode_lin(self, keep: list):
        return decode.bitmask_lin(self.mask, self.row_offsets, self.in_features, self.out_features, bias=self.bias,
                                  keep=keep, **self._kwargs())

    def dequantize(self, dtype=torch.float32):
        return sparse_ops.bitmask_dequantize(self.mask, self.row_offsets, self.in_features, dtype=dtype, **self._kwargs())


_KINDS = {"intk": IntKLinear, "nm": NMLinear, "bitmask": BitmaskLinear}


def packed_linear(kind: str, tensors: dict, meta: dict, bias=None) -> nn.Module:
    """A packed linear layer from its tensors (named as in docs/DESIGN.md) and meta.

    kind "intk": tensors qweight, scales, zeros[, g_idx]; meta in_features, out_features, bits, group_size.
    kind "nm": tensors indices and values, or qweight, scales, zeros; meta in_features, out_features, n, m
    (N zeros per M), and bits, group_size with codes. kind "bitmask": tensors mask, row_offsets and values,
    or qweight, scales, zeros; meta in_features, out_features, and bits, group_size with codes.
    """
    if kind not in _KINDS:
        raise PeakError(f"unknown packed layer kind {kind!r}; expected one of {sorted(_KINDS)}")
    try:
        sizes = dict(in_features=int(meta["in_features"]), out_features=int(meta["out_features"]))
        if kind == "intk":
            bits = int(meta["bits"])
            zeros = (stored_zeros(tensors, "zeros", True, bits, tuple(tensors["scales"].shape)) if meta.get("sym")
                     else tensors["zeros"])
            return IntKLinear(**sizes, bits=bits, group_size=int(meta["group_size"]), qweight=tensors["qweight"],
                              scales=tensors["scales"], zeros=zeros,
                              g_idx=tensors.get("g_idx"), bias=bias, rot_signs=tensors.get("rot_signs"),
                              rot_block=int(meta.get("rotate_block", 0)))
        values = {k: tensors.get(k) for k in ("values", "qweight", "scales", "zeros")}
        codes = dict(bits=meta.get("bits"), group_size=meta.get("group_size")) if values["qweight"] is not None else {}
        if kind == "nm":
            return NMLinear(**sizes, n=int(meta["n"]), m=int(meta["m"]), indices=tensors["indices"], bias=bias,
                            **values, **codes)
        return BitmaskLinear(**sizes, mask=tensors["mask"], row_offsets=tensors["row_offsets"], bias=bias,
                             **values, **codes)
    except KeyError as exc:
        raise PeakError(f"packed {kind} layer is missing {exc.args[0]!r}") from None


class DenseLinear(nn.Module):
    """A dense linear layer whose weight may be shared (tied lm_head); decode uses the compiled kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias)

    def decode_lin(self, keep: list):
        return decode.dense_lin(self.weight, self.bias, keep)


def as_runtime_linear(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An nn.Linear as a DenseLinear in `dtype`; a packed module is already a runtime linear; a wrapper (an
    adapter's LoraLinear, runtime/adapter.py) makes its own."""
    if hasattr(module, "runtime_linear"):
        return module.runtime_linear(dtype)
    if type(module) is nn.Linear:
        return DenseLinear(module.weight.detach().to(dtype), module.bias)
    return module  # a packed module: it owns its bytes and its kernel


def split_rows(module: nn.Module, sizes: list[int]) -> list[nn.Module] | None:
    """A fused linear (Phi-3's qkv_proj, gate_up_proj) as one module per band of output rows, each a view
    of the fused module's bytes; None when the module's layout cannot be split that way."""
    if sum(sizes) != module.out_features:
        return None
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    bias = getattr(module, "bias", None)
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        b = None if bias is None else bias[lo:hi]
        if type(module) is nn.Linear or isinstance(module, DenseLinear):
            parts.append(DenseLinear(module.weight.detach()[lo:hi], b))
        elif type(module) is IntKLinear:
            m = module
            parts.append(IntKLinear(m.in_features, hi - lo, m.bits, m.group_size, m.qweight[lo:hi],
                                    m.scales[lo:hi], m.zeros[lo:hi], m.g_idx, b))
        else:
            return None
    return parts
