"""Bitmask and N:M sparse weights, values kept as floats or as int-k codes (docs/DESIGN.md "Packed layouts").

bitmask: mask uint8 [out, ceil(in/8)] (bit c%8 of byte c//8 = column c kept), row_offsets int64 [out+1],
         and either values [nnz] (float) or qweight uint8 [sum_r ceil(nnz_r*k/8)]: the rows' bitstreams over
         their kept values, each row padded to a byte and the rows concatenated.
N:M:     N zeros in every M consecutive columns, K = M - N kept; values [out, in*K/M] or qweight
         [out, ceil(in*K/M*k/8)]; indices [out, ceil(in*K/M*ceil(log2 M)/8)] = positions in the group,
         ascending.
Quantized kept values use scales fp16 / zeros uint8 [out, n_groups], group = original column // group_size.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from peakllm.errors import PeakError
from peakllm.formats.bitpack import pack_bits, packed_row_bytes, padding_is_zero, unpack_bits
from peakllm.formats.intk import (
    FORMAT_VERSION, INTK_BITS, MAX_DIM, canonical_g_idx, check_tensor, check_version, fp16_params, meta_bool,
    meta_int, n_groups_of, take, PackedSize,
)

VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_weight_mask(weight: torch.Tensor, mask: torch.Tensor):
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise PeakError(f"mask must be a bool [out, in] tensor, got {mask.dtype} {tuple(mask.shape)}")
    if weight.shape != mask.shape:
        raise PeakError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} differ in shape")
    if weight.dtype not in VALUE_DTYPES:
        raise PeakError(f"sparse values must be fp32, fp16 or bf16, got {weight.dtype}")
    out_features, in_features = mask.shape
    if not (1 <= out_features <= MAX_DIM and 1 <= in_features <= MAX_DIM):
        raise PeakError(f"weight shape {tuple(mask.shape)} is out of range")
    return out_features, in_features


def _quant_fields(qw, shape):
    """bits, group_size, sym, codes, scales, zeros of an affine QuantizedWeight usable on sparse layouts."""
    grid = getattr(qw, "grid", None)
    if not isinstance(grid, dict) or grid.get("kind") != "affine" or grid.get("bits") not in INTK_BITS:
        raise PeakError(f"sparse layouts store int-k codes of an affine grid with bits in {INTK_BITS}, got {grid!r}")
    codes = qw.codes
    if codes.dtype != torch.uint8 or tuple(codes.shape) != tuple(shape):
        raise PeakError(f"QuantizedWeight.codes must be uint8 {tuple(shape)}, got {codes.dtype} {tuple(codes.shape)}")
    bits, group_size = grid["bits"], grid.get("group_size")
    if type(group_size) is not int or not (group_size == -1 or 1 <= group_size <= MAX_DIM):
        raise PeakError(f"group_size must be -1 or a positive integer, got {group_size!r}")
    n_groups = n_groups_of(shape[1], group_size)
    if canonical_g_idx(qw.g_idx, shape[1], group_size, n_groups) is not None:
        raise PeakError("sparse layouts index groups by original column: act-order g_idx cannot be stored")
    zero = torch.as_tensor(qw.params["zero"])
    if zero.shape != (shape[0], n_groups) or not torch.equal(zero, zero.round()) or (
            zero.numel() and (float(zero.min()) < 0 or float(zero.max()) > (1 << bits) - 1)):
        raise PeakError(f"zero points must be integers in [0, {(1 << bits) - 1}] of shape [{shape[0]}, {n_groups}]")
    scales = fp16_params(torch.as_tensor(qw.params["scale"]), "scale")
    if scales.shape != (shape[0], n_groups):
        raise PeakError(f"scales must have shape [{shape[0]}, {n_groups}], got {tuple(scales.shape)}")
    return bits, group_size, bool(grid.get("sym", False)), codes, scales, zero.to(torch.uint8).contiguous()


def _dequant_kept(codes, rows, cols, scales, zeros, group_size):
    """fp32 values of kept codes (1-D) at (rows, cols), group = original column // group_size."""
    g = torch.zeros_like(cols) if group_size == -1 else cols // group_size
    return scales.float()[rows, g] * (codes.float() - zeros.float()[rows, g])


def _validate_quant(mod, rows: int) -> None:
    g = n_groups_of(mod.in_features, mod.group_size)
    check_tensor(mod.scales, "scales", torch.float16, (rows, g))
    check_tensor(mod.zeros, "zeros", torch.uint8, (rows, g))
    if not torch.isfinite(mod.scales).all():
        raise PeakError("scales hold non-finite values")
    if mod.zeros.numel() and int(mod.zeros.max()) >= 1 << mod.bits:
        raise PeakError(f"zero points exceed {mod.bits} bits")
    if mod.sym and not bool((mod.zeros == 1 << (mod.bits - 1)).all()):
        raise PeakError(f"symmetric grid needs every zero point = {1 << (mod.bits - 1)}")


def _read_quant_meta(metadata: dict):
    bits = meta_int(metadata, "bits", 0, 8)
    if bits == 0:
        return 0, -1, False
    if bits not in INTK_BITS:
        raise PeakError(f"bits must be 0 (float values) or one of {INTK_BITS}, got {bits}")
    group_size = meta_int(metadata, "group_size", -1, MAX_DIM)
    if group_size == 0:
        raise PeakError("group_size must be -1 or positive, got 0")
    return bits, group_size, meta_bool(metadata, "sym")


def _check_values(t, name: str, shape: tuple) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in VALUE_DTYPES:
        raise PeakError(f"tensor {name!r} must exist as fp32, fp16 or bf16")
    return check_tensor(t, name, t.dtype, shape)


# ---- ragged rows of k-bit codes (bitmask + int-k) ---------------------------------------------

def _ragged_layout(counts: torch.Tensor, bits: int):
    """Byte start of every row's bitstream (int64 [rows+1]) when rows of counts[r] codes are padded to bytes."""
    row_bytes = (counts * bits + 7) // 8
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(row_bytes, 0)])


def _ragged_masks(counts: torch.Tensor, bits: int):
    """Which slots of a [rows, max count] code array and of its packed [rows, max bytes] form are real."""
    width = int(counts.max()) if counts.numel() else 0
    code_mask = torch.arange(width) < counts.unsqueeze(1)
    byte_mask = torch.arange(packed_row_bytes(width, bits)) < ((counts * bits + 7) // 8).unsqueeze(1)
    return width, code_mask, byte_mask


def pack_ragged(codes: torch.Tensor, counts: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows of counts[r] codes (given concatenated) -> their byte-padded bitstreams, concatenated."""
    width, code_mask, byte_mask = _ragged_masks(counts, bits)
    # left-align each row's codes in a zero-padded rectangle: zero codes pack to zero padding bits
    rect = torch.zeros(counts.numel(), width, dtype=torch.uint8)
    rect[code_mask] = codes
    return pack_bits(rect, bits)[byte_mask]


def unpack_ragged(stream: torch.Tensor, counts: torch.Tensor, bits: int) -> torch.Tensor:
    width, code_mask, byte_mask = _ragged_masks(counts, bits)
    rect = torch.zeros(byte_mask.shape, dtype=torch.uint8)
    rect[byte_mask] = stream
    return unpack_bits(rect, bits, width)[code_mask]


# ---- bitmask ----------------------------------------------------------------------------------

@dataclass
class PackedBitmask(PackedSize):
    kind: ClassVar[str] = "bitmask"
    mask: torch.Tensor
    row_offsets: torch.Tensor
    in_features: int
    out_features: int
    values: torch.Tensor | None = None
    qweight: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    bits: int = 0  # 0: float values
    group_size: int = -1
    sym: bool = False

    @classmethod
    def pack(cls, weight: torch.Tensor, mask: torch.Tensor, qw=None) -> "PackedBitmask":
        """Keep weight[mask] as floats, or, with an affine QuantizedWeight, its codes at the kept positions."""
        out_features, in_features = _check_weight_mask(weight, mask)
        counts = mask.sum(1)
        fields = dict(mask=pack_bits(mask.to(torch.uint8), 1),
                      row_offsets=torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]),
                      in_features=in_features, out_features=out_features)
        if qw is None:
            packed = cls(values=weight[mask].contiguous(), **fields)
        else:
            bits, group_size, sym, codes, scales, zeros = _quant_fields(qw, mask.shape)
            packed = cls(qweight=pack_ragged(codes[mask], counts, bits), scales=scales, zeros=zeros, bits=bits,
                         group_size=group_size, sym=sym, **fields)
        packed.validate()
        return packed

    def dense_mask(self) -> torch.Tensor:
        return unpack_bits(self.mask, 1, self.in_features).bool()

    def dequantize(self) -> torch.Tensor:
        mask = self.dense_mask()
        out = torch.zeros(self.out_features, self.in_features, dtype=torch.float32)
        if self.bits == 0:
            out[mask] = self.values.float()
        else:
            rows, cols = mask.nonzero(as_tuple=True)
            codes = unpack_ragged(self.qweight, self.row_offsets.diff(), self.bits)
            out[mask] = _dequant_kept(codes, rows, cols, self.scales, self.zeros, self.group_size)
        return out

    def metadata(self) -> dict:
        meta = {"version": FORMAT_VERSION, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits}
        if self.bits:
            meta.update(group_size=self.group_size, sym=self.sym)
        return meta

    def to_tensors(self, prefix: str = "") -> dict:
        out = {prefix + "mask": self.mask, prefix + "row_offsets": self.row_offsets}
        if self.bits == 0:
            out[prefix + "values"] = self.values
        else:
            out.update({prefix + "qweight": self.qweight, prefix + "scales": self.scales, prefix + "zeros": self.zeros})
        return out

    def validate(self) -> None:
        rows, cols = self.out_features, self.in_features
        check_tensor(self.mask, "mask", torch.uint8, (rows, packed_row_bytes(cols, 1)))
        check_tensor(self.row_offsets, "row_offsets", torch.int64, (rows + 1,))
        if not padding_is_zero(self.mask, 1, cols):
            raise PeakError("bitmask has bits set past the last column")
        counts = self.dense_mask().sum(1)
        expected = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
        if not torch.equal(self.row_offsets, expected):
            raise PeakError("bitmask row_offsets disagree with the mask's kept counts")
        nnz = int(expected[-1])
        if self.bits == 0:
            _check_values(self.values, "values", (nnz,))
            return
        nbytes = int(_ragged_layout(counts, self.bits)[-1])
        check_tensor(self.qweight, "qweight", torch.uint8, (nbytes,))
        _validate_quant(self, rows)

    @classmethod
    def from_tensors(cls, tensors: dict, metadata: dict, prefix: str = "") -> "PackedBitmask":
        check_version(metadata, cls.kind)
        in_features = meta_int(metadata, "in_features", 1, MAX_DIM)
        out_features = meta_int(metadata, "out_features", 1, MAX_DIM)
        bits, group_size, sym = _read_quant_meta(metadata)
        fields = dict(mask=take(tensors, prefix + "mask", torch.uint8,
                                (out_features, packed_row_bytes(in_features, 1))),
                      row_offsets=take(tensors, prefix + "row_offsets", torch.int64, (out_features + 1,)),
                      in_features=in_features, out_features=out_features, bits=bits, group_size=group_size, sym=sym)
        names = ("values",) if bits == 0 else ("qweight", "scales", "zeros")
        for name in names:
            if prefix + name not in tensors:
                raise PeakError(f"missing tensor {prefix + name!r}")
        packed = cls(**fields, **{name: tensors[prefix + name] for name in names})
        packed.validate()
        return packed


# ---- N:M --------------------------------------------------------------------------------------

def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


@dataclass
class PackedNM(PackedSize):
    kind: ClassVar[str] = "nm"
    indices: torch.Tensor
    n: int
    m: int
    in_features: int
    out_features: int
    values: torch.Tensor | None = None
    qweight: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    bits: int = 0
    group_size: int = -1
    sym: bool = False

    @property
    def kept(self) -> int:
        """Kept values per row."""
        return self.in_features // self.m * (self.m - self.n)

    @classmethod
    def pack(cls, weight: torch.Tensor, mask: torch.Tensor, n: int, m: int, qw=None) -> "PackedNM":
        """N zeros in every M columns (mask True = kept): store the M-N kept values and their positions."""
        out_features, in_features = _check_weight_mask(weight, mask)
        if not (2 <= m <= 256 and 1 <= n < m):
            raise PeakError(f"N:M needs 2 <= M <= 256 and 1 <= N < M, got {n}:{m}")
        if in_features % m:
            raise PeakError(f"N:M sparsity needs in_features ({in_features}) divisible by M ({m})")
        k = m - n
        groups = mask.reshape(out_features, in_features // m, m)
        if not bool((groups.sum(-1) == k).all()):
            raise PeakError(f"mask is not {n}:{m}: some group of {m} columns does not keep exactly {k}")
        pos = torch.arange(m).expand_as(groups)
        # kept positions first, in ascending order; pruned ones sort to the end and are cut
        kept_pos = torch.sort(torch.where(groups, pos, m), dim=-1).values[..., :k]
        cols = (kept_pos + torch.arange(0, in_features, m).unsqueeze(-1)).reshape(out_features, -1)
        fields = dict(indices=pack_bits(kept_pos.reshape(out_features, -1).to(torch.uint8), index_bits(m)),
                      n=n, m=m, in_features=in_features, out_features=out_features)
        if qw is None:
            packed = cls(values=weight.gather(1, cols).contiguous(), **fields)
        else:
            bits, group_size, sym, codes, scales, zeros = _quant_fields(qw, mask.shape)
            packed = cls(qweight=pack_bits(codes.gather(1, cols).contiguous(), bits), scales=scales, zeros=zeros,
                         bits=bits, group_size=group_size, sym=sym, **fields)
        packed.validate()
        return packed

    def columns(self) -> torch.Tensor:
        """Original column of every kept value, int64 [out, kept]."""
        pos = unpack_bits(self.indices, index_bits(self.m), self.kept).long()
        k = self.m - self.n
        base = torch.arange(0, self.in_features, self.m).repeat_interleave(k)
        return pos + base

    def dequantize(self) -> torch.Tensor:
        cols = self.columns()
        if self.bits == 0:
            vals = self.values.float()
        else:
            rows = torch.arange(self.out_features).unsqueeze(1).expand_as(cols)
            codes = unpack_bits(self.qweight, self.bits, self.kept)
            vals = _dequant_kept(codes, rows, cols, self.scales, self.zeros, self.group_size)
        return torch.zeros(self.out_features, self.in_features).scatter_(1, cols, vals)

    def metadata(self) -> dict:
        meta = {"version": FORMAT_VERSION, "in_features": self.in_features, "out_features": self.out_features,
                "n": self.n, "m": self.m, "bits": self.bits}
        if self.bits:
            meta.update(group_size=self.group_size, sym=self.sym)
        return meta

    def to_tensors(self, prefix: str = "") -> dict:
        out = {prefix + "indices": self.indices}
        if self.bits == 0:
            out[prefix + "values"] = self.values
        else:
            out.update({prefix + "qweight": self.qweight, prefix + "scales": self.scales, prefix + "zeros": self.zeros})
        return out

    def validate(self) -> None:
        rows, kept, ib = self.out_features, self.kept, index_bits(self.m)
        if not (2 <= self.m <= 256 and 1 <= self.n < self.m) or self.in_features % self.m:
            raise PeakError(f"bad N:M shape: {self.n}:{self.m} over {self.in_features} columns")
        check_tensor(self.indices, "indices", torch.uint8, (rows, packed_row_bytes(kept, ib)))
        if not padding_is_zero(self.indices, ib, kept):
            raise PeakError("N:M indices have non-zero padding bits")
        pos = unpack_bits(self.indices, ib, kept).reshape(rows, -1, self.m - self.n).long()
        if pos.numel() and (int(pos.max()) >= self.m or not bool((pos.diff(dim=-1) > 0).all())):
            raise PeakError(f"N:M indices must be ascending positions below {self.m} within each group")
        if self.bits == 0:
            _check_values(self.values, "values", (rows, kept))
            return
        check_tensor(self.qweight, "qweight", torch.uint8, (rows, packed_row_bytes(kept, self.bits)))
        if not padding_is_zero(self.qweight, self.bits, kept):
            raise PeakError("N:M qweight has non-zero padding bits")
        _validate_quant(self, rows)

    @classmethod
    def from_tensors(cls, tensors: dict, metadata: dict, prefix: str = "") -> "PackedNM":
        check_version(metadata, cls.kind)
        in_features = meta_int(metadata, "in_features", 1, MAX_DIM)
        out_features = meta_int(metadata, "out_features", 1, MAX_DIM)
        m = meta_int(metadata, "m", 2, 256)
        n = meta_int(metadata, "n", 1, m - 1)
        if in_features % m:
            raise PeakError(f"N:M in_features ({in_features}) must be divisible by M ({m})")
        bits, group_size, sym = _read_quant_meta(metadata)
        fields = dict(n=n, m=m, in_features=in_features, out_features=out_features, bits=bits,
                      group_size=group_size, sym=sym, indices=tensors.get(prefix + "indices"))
        names = ("indices", "values") if bits == 0 else ("indices", "qweight", "scales", "zeros")
        fields.update({k: tensors.get(prefix + k) for k in names})
        for name in names:
            if fields[name] is None:
                raise PeakError(f"missing tensor {prefix + name!r}")
        packed = cls(**fields)
        packed.validate()
        return packed
