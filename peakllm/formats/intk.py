"""Dense int-k (affine) and ternary packed weights (docs/DESIGN.md "Packed layouts").

int-k:   qweight uint8 [out, ceil(in*k/8)] bitstream, scales fp16 [out, n_groups], zeros uint8
         [out, n_groups] (not stored for symmetric grids: every zero is 2^(k-1)), optional g_idx int32 [in];
         w = scale * (q - zero). Optionally rotated (formats/rotation.py): rot_signs uint8 [ceil(in/8)] and
         metadata rotate_block b; the codes then quantize W R^T and the layer computes (W R^T)(R x).
ternary: qweight 2-bit bitstream of codes {0,1,2} = {-scale_neg, 0, +scale_pos}, scale_neg/scale_pos fp16.

Every packed module speaks the same small protocol the container relies on: a class attribute `kind`,
`to_tensors(prefix)`, `metadata()`, `from_tensors(tensors, metadata, prefix)`, `nbytes`, `num_params`,
`dequantize()`. `from_tensors` trusts nothing it reads.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from peakllm.errors import PeakError
from peakllm.formats.bitpack import pack_bits, packed_row_bytes, padding_is_zero, unpack_bits
from peakllm.formats.rotation import Rotation, pack_signs, unpack_signs, unrotate_rows

FORMAT_VERSION = 1
INTK_BITS = (2, 3, 4, 8)
# Large enough for any real layer, small enough that a corrupted header cannot ask for petabytes.
MAX_DIM = 1 << 24


# ---- validation helpers shared by the formats -------------------------------------------------

def meta_int(meta: dict, key: str, lo: int, hi: int) -> int:
    value = meta.get(key) if isinstance(meta, dict) else None
    if type(value) is not int or not lo <= value <= hi:
        raise PeakError(f"metadata field {key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def meta_bool(meta: dict, key: str) -> bool:
    value = meta.get(key) if isinstance(meta, dict) else None
    if type(value) is not bool:
        raise PeakError(f"metadata field {key!r} must be true or false, got {value!r}")
    return value


def check_version(meta: dict, kind: str) -> None:
    version = meta_int(meta, "version", 0, 1 << 30)
    if version != FORMAT_VERSION:
        raise PeakError(f"{kind} module has format version {version}; this peakllm reads version {FORMAT_VERSION}")


def check_tensor(t, name: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """t, which must be a tensor of exactly this dtype and shape."""
    if not isinstance(t, torch.Tensor):
        raise PeakError(f"missing tensor {name!r}")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise PeakError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
    return t


def take(tensors: dict, name: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """The tensor called name, which must exist with exactly this dtype and shape."""
    return check_tensor(tensors.get(name), name, dtype, shape)


def n_groups_of(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Group of every input column, int64 [in]."""
    if g_idx is not None:
        return g_idx.long()
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // group_size


def fp16_params(x: torch.Tensor, name: str) -> torch.Tensor:
    """Grid parameters as fp16; the grids contract makes them fp16-representable already."""
    if not torch.isfinite(x).all():
        raise PeakError(f"grid parameter {name} has non-finite values")
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise PeakError(f"grid parameter {name} overflows fp16 (|value| > 65504)")
    return h.contiguous()


def canonical_g_idx(g_idx, in_features: int, group_size: int, n_groups: int):
    """g_idx as int32, or None when it only restates contiguous groups (then it costs nothing to drop)."""
    if g_idx is None:
        return None
    g_idx = torch.as_tensor(g_idx)
    if g_idx.shape != (in_features,) or g_idx.dtype.is_floating_point:
        raise PeakError(f"g_idx must be an integer tensor [{in_features}], got {g_idx.dtype} {tuple(g_idx.shape)}")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise PeakError(f"g_idx values must lie in [0, {n_groups})")
    if torch.equal(g_idx.long(), group_index(in_features, group_size, None)):
        return None
    return g_idx.to(torch.int32).contiguous()


def _grid_shape(qw, kind: str):
    grid = getattr(qw, "grid", None)
    if not isinstance(grid, dict) or grid.get("kind") != kind:
        raise PeakError(f"expected a QuantizedWeight with a {kind} grid, got grid {grid!r}")
    codes = qw.codes
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise PeakError(f"QuantizedWeight.codes must be uint8 [out, in], got {codes.dtype} {tuple(codes.shape)}")
    out_features, in_features = codes.shape
    group_size = grid.get("group_size")
    if type(group_size) is not int or not (group_size == -1 or group_size >= 1):
        raise PeakError(f"group_size must be -1 or a positive integer, got {group_size!r}")
    return grid, out_features, in_features, group_size


def _check_dims(out_features: int, in_features: int, group_size: int) -> None:
    if not (1 <= out_features <= MAX_DIM and 1 <= in_features <= MAX_DIM):
        raise PeakError(f"weight shape [{out_features}, {in_features}] is out of range")
    if not (group_size == -1 or 1 <= group_size <= MAX_DIM):
        raise PeakError(f"group_size {group_size} is out of range")


def stored_zeros(tensors: dict, name: str, sym: bool, bits: int, shape: tuple) -> torch.Tensor:
    """An int-k matrix's zero points as a file holds them: the uint8 tensor ``name``, or, for a symmetric grid
    written without it (since zeros stopped being stored for those), 2^(bits-1) everywhere."""
    if sym and name not in tensors:
        return torch.full(shape, 1 << (bits - 1), dtype=torch.uint8)
    return take(tensors, name, torch.uint8, shape)


# ---- int-k ------------------------------------------------------------------------------------

class PackedSize:
    """Sizes every packed matrix kind reports the same way (mixed into the dataclasses below and in
    sparse.py / sub1.py): parameters of the original matrix, and bytes of everything stored for it."""

    @property
    def num_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())


@dataclass
class PackedIntK(PackedSize):
    kind: ClassVar[str] = "intk"
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int
    sym: bool
    rot_signs: torch.Tensor | None = None  # packed signs of the input rotation (formats/rotation.py)
    rot_block: int = 0                     # its Hadamard block; 0: not rotated

    @classmethod
    def from_codes(cls, codes, scale, zero, *, bits, group_size, g_idx=None, sym=False,
                   rotation: Rotation | None = None) -> "PackedIntK":
        """Pack uint8 codes [out, in] with per-group scale/zero [out, n_groups] (any float dtype); ``rotation``:
        the codes quantize W R^T."""
        if bits not in INTK_BITS:
            raise PeakError(f"int-k packing supports {INTK_BITS} bits, got {bits}")
        out_features, in_features = codes.shape
        _check_dims(out_features, in_features, group_size)
        n_groups = n_groups_of(in_features, group_size)
        zero = torch.as_tensor(zero)
        if zero.shape != (out_features, n_groups) or not torch.equal(zero, zero.round()):
            raise PeakError(f"zero points must be integers of shape [{out_features}, {n_groups}]")
        if zero.numel() and (float(zero.min()) < 0 or float(zero.max()) > (1 << bits) - 1):
            raise PeakError(f"zero points must lie in [0, {(1 << bits) - 1}] for {bits}-bit codes")
        if codes.numel() and int(codes.max()) >= 1 << bits:
            raise PeakError(f"a code does not fit in {bits} bits")
        packed = cls(
            qweight=pack_bits(codes.contiguous(), bits),
            scales=fp16_params(torch.as_tensor(scale), "scale"),
            zeros=zero.to(torch.uint8).contiguous(),
            g_idx=canonical_g_idx(g_idx, in_features, group_size, n_groups),
            bits=bits, group_size=group_size, in_features=in_features, out_features=out_features, sym=sym,
            rot_signs=None if rotation is None else pack_signs(rotation.signs),
            rot_block=0 if rotation is None else rotation.block,
        )
        packed.validate()
        return packed

    @classmethod
    def from_quantized(cls, qw) -> "PackedIntK":
        """Pack a solver's QuantizedWeight on an affine grid (docs/DESIGN.md "Quantization grids")."""
        grid, _, _, group_size = _grid_shape(qw, "affine")
        return cls.from_codes(qw.codes, qw.params["scale"], qw.params["zero"], bits=grid.get("bits"),
                              group_size=group_size, g_idx=qw.g_idx, sym=bool(grid.get("sym", False)),
                              rotation=getattr(qw, "rotation", None))

    @property
    def n_groups(self) -> int:
        return n_groups_of(self.in_features, self.group_size)

    @property
    def rotation(self) -> Rotation | None:
        if not self.rot_block:
            return None
        return Rotation(self.rot_block, unpack_signs(self.rot_signs, self.in_features))

    def codes(self) -> torch.Tensor:
        return unpack_bits(self.qweight, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        gi = group_index(self.in_features, self.group_size, self.g_idx)
        scale = self.scales.float()[:, gi]
        zero = self.zeros.float()[:, gi]
        W = scale * (self.codes().float() - zero)
        return W if not self.rot_block else unrotate_rows(W, self.rotation)

    def metadata(self) -> dict:
        meta = {"version": FORMAT_VERSION, "bits": self.bits, "group_size": self.group_size,
                "in_features": self.in_features, "out_features": self.out_features, "sym": self.sym}
        if self.rot_block:
            meta["rotate_block"] = self.rot_block
        return meta

    def to_tensors(self, prefix: str = "") -> dict:
        out = {prefix + "qweight": self.qweight, prefix + "scales": self.scales}
        if not self.sym:  # a symmetric grid's zeros are all 2^(bits-1): nothing to store
            out[prefix + "zeros"] = self.zeros
        if self.g_idx is not None:
            out[prefix + "g_idx"] = self.g_idx
        if self.rot_block:
            out[prefix + "rot_signs"] = self.rot_signs
        return out

    def validate(self) -> None:
        rows, cols, g = self.out_features, self.in_features, self.n_groups
        check_tensor(self.qweight, "qweight", torch.uint8, (rows, packed_row_bytes(cols, self.bits)))
        check_tensor(self.scales, "scales", torch.float16, (rows, g))
        check_tensor(self.zeros, "zeros", torch.uint8, (rows, g))
        if not torch.isfinite(self.scales).all():
            raise PeakError("int-k scales hold non-finite values")
        if self.zeros.numel() and int(self.zeros.max()) >= 1 << self.bits:
            raise PeakError(f"int-k zero points exceed {self.bits} bits")
        if self.sym and not bool((self.zeros == 1 << (self.bits - 1)).all()):
            raise PeakError(f"symmetric int-k needs every zero point = {1 << (self.bits - 1)}")
        if not padding_is_zero(self.qweight, self.bits, cols):
            raise PeakError("int-k qweight has non-zero padding bits")
        if self.g_idx is not None:
            check_tensor(self.g_idx, "g_idx", torch.int32, (cols,))
            if int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= g:
                raise PeakError(f"int-k g_idx values must lie in [0, {g})")
        if self.rot_block:
            if self.g_idx is not None:
                raise PeakError("a rotated int-k matrix cannot also have act-order groups (g_idx)")
            self.rotation  # checks the block and the signs

    @classmethod
    def from_tensors(cls, tensors: dict, metadata: dict, prefix: str = "") -> "PackedIntK":
        check_version(metadata, cls.kind)
        bits = meta_int(metadata, "bits", 2, 8)
        if bits not in INTK_BITS:
            raise PeakError(f"int-k bits must be one of {INTK_BITS}, got {bits}")
        group_size = meta_int(metadata, "group_size", -1, MAX_DIM)
        if group_size == 0:
            raise PeakError("int-k group_size must be -1 or positive, got 0")
        in_features = meta_int(metadata, "in_features", 1, MAX_DIM)
        out_features = meta_int(metadata, "out_features", 1, MAX_DIM)
        g_name = prefix + "g_idx"
        g_idx = take(tensors, g_name, torch.int32, (in_features,)) if g_name in tensors else None
        rows, g = out_features, n_groups_of(in_features, group_size)
        sym = meta_bool(metadata, "sym")
        zeros = stored_zeros(tensors, prefix + "zeros", sym, bits, (rows, g))
        rot_block = meta_int(metadata, "rotate_block", 2, MAX_DIM) if "rotate_block" in metadata else 0
        rot_signs = take(tensors, prefix + "rot_signs", torch.uint8, ((in_features + 7) // 8,)) if rot_block else None
        packed = cls(
            qweight=take(tensors, prefix + "qweight", torch.uint8, (rows, packed_row_bytes(in_features, bits))),
            scales=take(tensors, prefix + "scales", torch.float16, (rows, g)),
            zeros=zeros, g_idx=g_idx, bits=bits, group_size=group_size, in_features=in_features,
            out_features=out_features, sym=sym, rot_signs=rot_signs, rot_block=rot_block,
        )
        packed.validate()
        return packed


# ---- ternary (dense layout) -------------------------------------------------------------------

@dataclass
class PackedTernary(PackedSize):
    kind: ClassVar[str] = "ternary"
    qweight: torch.Tensor
    scale_neg: torch.Tensor
    scale_pos: torch.Tensor
    group_size: int
    in_features: int
    out_features: int
    sym: bool

    @classmethod
    def from_codes(cls, codes, scale_neg, scale_pos, *, group_size, sym=False) -> "PackedTernary":
        out_features, in_features = codes.shape
        _check_dims(out_features, in_features, group_size)
        if codes.numel() and int(codes.max()) > 2:
            raise PeakError("ternary codes must be 0, 1 or 2")
        packed = cls(qweight=pack_bits(codes.contiguous(), 2),
                     scale_neg=fp16_params(torch.as_tensor(scale_neg), "scale_neg"),
                     scale_pos=fp16_params(torch.as_tensor(scale_pos), "scale_pos"),
                     group_size=group_size, in_features=in_features, out_features=out_features, sym=sym)
        packed.validate()
        return packed

    @classmethod
    def from_quantized(cls, qw) -> "PackedTernary":
        grid, _, in_features, group_size = _grid_shape(qw, "ternary")
        n_groups = n_groups_of(in_features, group_size)
        if canonical_g_idx(qw.g_idx, in_features, group_size, n_groups) is not None:
            raise PeakError("the ternary layout has no g_idx: act-order groups cannot be stored")
        return cls.from_codes(qw.codes, qw.params["scale_neg"], qw.params["scale_pos"],
                              group_size=group_size, sym=bool(grid.get("sym", False)))

    @property
    def n_groups(self) -> int:
        return n_groups_of(self.in_features, self.group_size)

    def codes(self) -> torch.Tensor:
        return unpack_bits(self.qweight, 2, self.in_features)

    def dequantize(self) -> torch.Tensor:
        gi = group_index(self.in_features, self.group_size, None)
        codes = self.codes()
        w = torch.zeros(codes.shape, dtype=torch.float32)
        w = torch.where(codes == 0, -self.scale_neg.float()[:, gi], w)
        return torch.where(codes == 2, self.scale_pos.float()[:, gi], w)

    def metadata(self) -> dict:
        return {"version": FORMAT_VERSION, "group_size": self.group_size, "in_features": self.in_features,
                "out_features": self.out_features, "sym": self.sym}

    def to_tensors(self, prefix: str = "") -> dict:
        return {prefix + "qweight": self.qweight, prefix + "scale_neg": self.scale_neg,
                prefix + "scale_pos": self.scale_pos}

    def validate(self) -> None:
        rows, g = self.out_features, self.n_groups
        check_tensor(self.qweight, "qweight", torch.uint8, (rows, packed_row_bytes(self.in_features, 2)))
        for name, t in (("scale_neg", self.scale_neg), ("scale_pos", self.scale_pos)):
            check_tensor(t, name, torch.float16, (rows, g))
            if not torch.isfinite(t).all():
                raise PeakError(f"ternary {name} holds non-finite values")
        if self.sym and not torch.equal(self.scale_neg, self.scale_pos):
            raise PeakError("symmetric ternary needs scale_neg == scale_pos")
        if not padding_is_zero(self.qweight, 2, self.in_features):
            raise PeakError("ternary qweight has non-zero padding bits")
        if self.qweight.numel() and int(self.codes().max()) > 2:
            raise PeakError("ternary qweight holds code 3, which means nothing")

    @classmethod
    def from_tensors(cls, tensors: dict, metadata: dict, prefix: str = "") -> "PackedTernary":
        check_version(metadata, cls.kind)
        group_size = meta_int(metadata, "group_size", -1, MAX_DIM)
        if group_size == 0:
            raise PeakError("ternary group_size must be -1 or positive, got 0")
        in_features = meta_int(metadata, "in_features", 1, MAX_DIM)
        out_features = meta_int(metadata, "out_features", 1, MAX_DIM)
        g = n_groups_of(in_features, group_size)
        packed = cls(
            qweight=take(tensors, prefix + "qweight", torch.uint8,
                         (out_features, packed_row_bytes(in_features, 2))),
            scale_neg=take(tensors, prefix + "scale_neg", torch.float16, (out_features, g)),
            scale_pos=take(tensors, prefix + "scale_pos", torch.float16, (out_features, g)),
            group_size=group_size, in_features=in_features, out_features=out_features,
            sym=meta_bool(metadata, "sym"),
        )
        packed.validate()
        return packed
