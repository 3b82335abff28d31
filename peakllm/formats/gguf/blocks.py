"""llama.cpp's block types as codes + parameters, packed to ggml's exact bytes.

A weight ``[rows, cols]`` in type T is cut along each row into blocks of ``T.block`` weights (32 for the
legacy types and IQ4_NL, 256 for the K-quants); within a block every ``T.group`` weights share one scale
(and, for the types with a min, one offset). Each weight is

    w = scale[group] * level + bias[group]          (in fp32, in exactly the order ggml computes it)

with ``level = code + T.level_min`` (IQ4_NL: ``level = T.values[code]``) and codes uint8 in
``[0, 2^T.code_bits)``. ``scale`` and ``bias`` come from the stored parameters, named as ggml names them:

  Q8_0 Q4_0 Q5_0 IQ4_NL   d fp16 per block                  scale = d
  Q4_1 Q5_1               d, m fp16 per block               scale = d, bias = m
  Q2_K Q4_K Q5_K          d, dmin fp16 per block;           scale = d * scales, bias = -(dmin * mins)
                          scales, mins ints per group (Q2_K 4-bit, Q4_K/Q5_K 6-bit)
  Q3_K                    d fp16; scales in [-32, 31]       scale = d * scales
  Q6_K                    d fp16; scales int8               scale = d * scales

``GGMLWeight.dequantize`` equals ``gguf.quants.dequantize(weight.pack(), T.ggml)`` bit for bit, so
whatever a solver returns is what llama.cpp computes with. Layouts: ggml-common.h's ``block_*`` structs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from peakllm.errors import PeakError

ROW_CHUNK_WEIGHTS = 1 << 21  # a big matrix is dequantized and packed this many weights at a time
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class BlockType:
    """One ggml block type: its shape, its codes and its parameters (name -> (per "block"/"group", range))."""

    name: str
    block: int
    group: int
    code_bits: int
    level_min: int
    params: dict
    values: tuple | None = None
    solve_min: int = 0  # codes solvers leave unused at the bottom: llama.cpp's quantizer never writes Q8_0's -128

    @property
    def solve_levels(self) -> tuple[int, int]:
        """The levels a solver rounds onto: [level_min + solve_min, level_min + 2^code_bits - 1]."""
        return self.level_min + self.solve_min, self.level_min + 2**self.code_bits - 1

    @property
    def ggml(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def type_size(self) -> int:
        """Bytes per block, as ggml stores it."""
        return GGML_QUANT_SIZES[self.ggml][1]

    @property
    def has_bias(self) -> bool:
        return "m" in self.params or "mins" in self.params

    def levels(self) -> torch.Tensor:
        """The value of every code before scaling (fp32 [2^code_bits])."""
        if self.values is not None:
            return torch.tensor(self.values, dtype=torch.float32)
        return torch.arange(2**self.code_bits, dtype=torch.float32) + self.level_min

    def row_bytes(self, cols: int) -> int:
        return cols // self.block * self.type_size


FP16 = ("block", None)
BLOCK_TYPES = {t.name: t for t in (
    BlockType("Q8_0", 32, 32, 8, -128, {"d": FP16}, solve_min=1),
    BlockType("Q4_0", 32, 32, 4, -8, {"d": FP16}),
    BlockType("Q4_1", 32, 32, 4, 0, {"d": FP16, "m": FP16}),
    BlockType("Q5_0", 32, 32, 5, -16, {"d": FP16}),
    BlockType("Q5_1", 32, 32, 5, 0, {"d": FP16, "m": FP16}),
    BlockType("IQ4_NL", 32, 32, 4, 0, {"d": FP16}, IQ4_NL_VALUES),
    BlockType("Q2_K", 256, 16, 2, 0, {"d": FP16, "dmin": FP16, "scales": ("group", (0, 15)),
                                      "mins": ("group", (0, 15))}),
    BlockType("Q3_K", 256, 16, 3, -4, {"d": FP16, "scales": ("group", (-32, 31))}),
    BlockType("Q4_K", 256, 32, 4, 0, {"d": FP16, "dmin": FP16, "scales": ("group", (0, 63)),
                                      "mins": ("group", (0, 63))}),
    BlockType("Q5_K", 256, 32, 5, 0, {"d": FP16, "dmin": FP16, "scales": ("group", (0, 63)),
                                      "mins": ("group", (0, 63))}),
    BlockType("Q6_K", 256, 16, 6, -32, {"d": FP16, "scales": ("group", (-128, 127))}),
)}

# What llama-quantize uses for a tensor whose width the wanted type cannot take (src/llama-quant.cpp, "fallback";
# llama.cpp 0c1e570, the version benchmarks/ build: Q2_K and Q3_K fall back to Q4_0, older releases took
# IQ4_NL), and F16 when the fallback cannot take it either.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def block_type(name) -> BlockType:
    if isinstance(name, BlockType):
        return name
    t = BLOCK_TYPES.get(name)
    if t is None:
        raise PeakError(f"unknown GGUF block type {name!r}; known: {', '.join(BLOCK_TYPES)}")
    return t


def check_width(name, cols: int) -> BlockType:
    """The type, or one error if rows ``cols`` wide cannot be stored in it (ggml blocks never straddle rows)."""
    t = block_type(name)
    if not isinstance(cols, int) or cols <= 0 or cols % t.block:
        raise PeakError(f"{t.name} stores rows in blocks of {t.block} weights; a row of {cols} is not a multiple "
                        f"(fallback as llama.cpp: {fallback_type(t.name, cols) if isinstance(cols, int) else '-'})")
    return t


def fallback_type(name: str, cols: int) -> str:
    """The type llama.cpp stores a ``cols``-wide tensor in when ``name`` cannot take it ("F16" at the end)."""
    while name in BLOCK_TYPES and cols % BLOCK_TYPES[name].block:
        name = FALLBACK.get(name, "F16")
    return name


@dataclass
class GGMLWeight:
    """A ``[rows, cols]`` weight in a ggml block type: uint8 ``codes [rows, cols]`` and ``params`` as
    ``BLOCK_TYPES[type].params`` names them (fp16 ``[rows, cols / block]``, ints int16 ``[rows, cols / group]``)."""

    type: str
    codes: torch.Tensor
    params: dict[str, torch.Tensor]

    def __post_init__(self):
        t = check_width(self.type, self.codes.shape[1] if self.codes.dim() == 2 else -1)
        rows, cols = self.codes.shape
        if self.codes.dtype != torch.uint8 or int(self.codes.max()) >= 2**t.code_bits:
            raise PeakError(f"{t.name} codes must be uint8 below {2**t.code_bits}")
        if set(self.params) != set(t.params):
            raise PeakError(f"{t.name} needs parameters {sorted(t.params)}, got {sorted(self.params)}")
        for key, (per, bounds) in t.params.items():
            p = self.params[key]
            want = (rows, cols // (t.block if per == "block" else t.group))
            if tuple(p.shape) != want:
                raise PeakError(f"{t.name} parameter {key} must be {list(want)}, got {list(p.shape)}")
            if bounds is None and p.dtype != torch.float16:
                raise PeakError(f"{t.name} parameter {key} must be fp16, got {p.dtype}")
            if bounds is not None and (p.is_floating_point() or int(p.min()) < bounds[0] or int(p.max()) > bounds[1]):
                raise PeakError(f"{t.name} parameter {key} must be integers in [{bounds[0]}, {bounds[1]}]")

    @property
    def block_type(self) -> BlockType:
        return BLOCK_TYPES[self.type]

    def scale_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per group fp32 ``scale [rows, cols / group]`` and ``bias`` (None for the types without a min)."""
        return scale_bias(self.block_type, self.params)

    def rows(self, start: int, stop: int) -> "GGMLWeight":
        """Rows ``[start, stop)``: a view of the codes and parameters (rows are independent in every type)."""
        return GGMLWeight(self.type, self.codes[start:stop], {k: v[start:stop] for k, v in self.params.items()})

    def row_chunks(self):
        """(start, stop) row ranges of about ROW_CHUNK_WEIGHTS weights: dequantizing takes ~24 bytes a weight
        of workspace, a 7B model's embedding 5 GB at once."""
        rows, cols = self.codes.shape
        step = max(1, ROW_CHUNK_WEIGHTS // cols)
        return [(i, min(i + step, rows)) for i in range(0, rows, step)]

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[rows, cols]``, bit for bit what ``gguf.quants.dequantize`` gives for ``pack()``."""
        chunks = self.row_chunks()
        if len(chunks) > 1:
            out = torch.empty(self.codes.shape, dtype=torch.float32, device=self.codes.device)
            for i, j in chunks:
                out[i:j] = self.rows(i, j).dequantize()
            return out
        scale, bias = self.scale_bias()
        return dequantize_codes(self.block_type, self.codes, scale, bias)

    def pack(self) -> np.ndarray:
        """ggml's bytes: uint8 ``[rows, row_bytes]``, blocks in row order, each laid out as ggml's struct."""
        chunks = self.row_chunks()
        if len(chunks) > 1:
            out = np.empty((self.codes.shape[0], self.block_type.row_bytes(self.codes.shape[1])), dtype=np.uint8)
            for i, j in chunks:
                out[i:j] = pack(self.rows(i, j))
            return out
        return pack(self)


def scale_bias(t: BlockType, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per group scale and bias of ``params``, each product rounded to fp32 as ggml rounds it."""
    per_block = t.block // t.group
    d = params["d"].float().repeat_interleave(per_block, dim=1)
    if "scales" not in params:
        return d, params["m"].float() if "m" in params else None
    scale = d * params["scales"].float()
    if "mins" not in params:
        return scale, None
    dmin = params["dmin"].float().repeat_interleave(per_block, dim=1)
    return scale, -(dmin * params["mins"].float())


def per_column(t: BlockType, p: torch.Tensor | None) -> torch.Tensor | None:
    """A per group ``[rows, cols / group]`` tensor repeated to every column ``[rows, cols]``."""
    return None if p is None else p.repeat_interleave(t.group, dim=1)


def grid_values(t: BlockType, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``scale * level + bias`` of each code, ``scale``/``bias`` broadcast against ``codes``."""
    w = scale * t.levels().to(codes.device)[codes.long()]
    return w if bias is None else w + bias


def dequantize_codes(t: BlockType, codes: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """The weights of ``codes [rows, cols]`` under per group ``scale`` / ``bias`` ``[rows, cols / group]``."""
    return grid_values(t, codes, per_column(t, scale), per_column(t, bias))


# ---- bytes -------------------------------------------------------------------------------------

def interleave(x: np.ndarray, bits: int, chunk: int) -> np.ndarray:
    """ggml's sub-byte layout: each ``chunk`` of values fills chunk*bits/8 bytes, value ``s*L + l`` of the
    chunk in bits ``[bits*s, bits*(s+1))`` of byte ``l`` (L = chunk*bits/8)."""
    per = 8 // bits
    x = x.reshape(-1, per, chunk // per).astype(np.uint8)
    out = np.zeros((x.shape[0], chunk // per), dtype=np.uint8)
    for s in range(per):
        out |= (x[:, s] & ((1 << bits) - 1)) << np.uint8(bits * s)
    return out.reshape(-1)


def deinterleave(b: np.ndarray, bits: int, chunk: int) -> np.ndarray:
    per = 8 // bits
    b = b.reshape(-1, 1, chunk // per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).reshape(1, per, 1)
    return ((b >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)


def fp16_bytes(p: torch.Tensor) -> np.ndarray:
    return p.detach().cpu().contiguous().numpy().astype(np.float16).reshape(-1, 1).view(np.uint8)


def pack(weight: GGMLWeight) -> np.ndarray:
    t = weight.block_type
    rows, cols = weight.codes.shape
    n = rows * cols // t.block
    c = weight.codes.cpu().numpy().reshape(n, t.block)
    p = {k: v.detach().cpu().numpy() for k, v in weight.params.items()}
    d = fp16_bytes(weight.params["d"])
    fields: list[np.ndarray]
    if t.block == 32:
        if t.code_bits == 8:
            fields = [d, c ^ np.uint8(0x80)]  # code = int8 value + 128
        else:
            fields = [d] + ([fp16_bytes(weight.params["m"])] if "m" in p else [])
            if t.code_bits == 5:
                fields.append(interleave(c >> 4, 1, 8).reshape(n, 4))
            fields.append(interleave(c & 15, 4, 32).reshape(n, 16))
    else:
        g = t.block // t.group
        sc = p["scales"].reshape(n, g).astype(np.int16)
        if t.name == "Q2_K":
            mn = p["mins"].reshape(n, g).astype(np.int16)
            fields = [(sc | (mn << 4)).astype(np.uint8), interleave(c, 2, 128).reshape(n, 64), d,
                      fp16_bytes(weight.params["dmin"])]
        elif t.name == "Q3_K":
            u = (sc + 32).astype(np.uint8)
            fields = [interleave(c >> 2, 1, 256).reshape(n, 32), interleave(c & 3, 2, 128).reshape(n, 64),
                      interleave(u & 15, 4, 16).reshape(n, 8), interleave(u >> 4, 2, 16).reshape(n, 4), d]
        elif t.name == "Q6_K":
            fields = [interleave(c & 15, 4, 128).reshape(n, 128), interleave(c >> 4, 2, 128).reshape(n, 64),
                      sc.astype(np.int8).view(np.uint8), d]
        else:  # Q4_K, Q5_K
            mn = p["mins"].reshape(n, g).astype(np.uint8)
            sc = sc.astype(np.uint8)
            packed_scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                                            (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
            fields = [d, fp16_bytes(weight.params["dmin"]), packed_scales]
            if t.code_bits == 5:
                fields.append(interleave(c >> 4, 1, 256).reshape(n, 32))
            fields.append(interleave(c & 15, 4, 64).reshape(n, 128))
    out = np.concatenate([f.reshape(n, -1) for f in fields], axis=1)
    assert out.shape[1] == t.type_size, (t.name, out.shape)
    return out.reshape(rows, t.row_bytes(cols))


def unpack(name, data: np.ndarray, shape: tuple[int, int]) -> GGMLWeight:
    """The codes and parameters stored in ggml bytes ``data`` of a ``shape = (rows, cols)`` weight."""
    rows, cols = shape
    t = check_width(name, cols)
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if data.size != rows * t.row_bytes(cols):
        raise PeakError(f"{t.name} [{rows}, {cols}] needs {rows * t.row_bytes(cols)} bytes, got {data.size}")
    n = rows * cols // t.block
    b = data.reshape(n, t.type_size)
    offsets = {}

    def take(k: int) -> np.ndarray:
        start = offsets.setdefault("at", 0)
        offsets["at"] = start + k
        return b[:, start:start + k]

    def fp16(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x).view(np.float16).reshape(rows, -1).copy())

    def ints(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.int16).reshape(rows, -1))

    params = {}
    if t.block == 32:
        params["d"] = fp16(take(2))
        if t.code_bits == 8:
            c = take(32) ^ np.uint8(0x80)
        else:
            if "m" in t.params:
                params["m"] = fp16(take(2))
            high = deinterleave(take(4), 1, 8).reshape(n, 32) if t.code_bits == 5 else 0
            c = deinterleave(take(16), 4, 32).reshape(n, 32) | (high << 4)
    elif t.name == "Q2_K":
        s = take(16)
        params["scales"], params["mins"] = ints(s & 15), ints(s >> 4)
        c = deinterleave(take(64), 2, 128)
        params["d"], params["dmin"] = fp16(take(2)), fp16(take(2))
    elif t.name == "Q3_K":
        high = deinterleave(take(32), 1, 256)
        c = deinterleave(take(64), 2, 128) | (high << 2)
        u = deinterleave(take(8), 4, 16) | (deinterleave(take(4), 2, 16) << 4)
        params["scales"] = ints(u.astype(np.int16) - 32)
        params["d"] = fp16(take(2))
    elif t.name == "Q6_K":
        low = deinterleave(take(128), 4, 128)
        c = low | (deinterleave(take(64), 2, 128) << 4)
        params["scales"] = ints(take(16).view(np.int8))
        params["d"] = fp16(take(2))
    else:  # Q4_K, Q5_K
        params["d"], params["dmin"] = fp16(take(2)), fp16(take(2))
        s = take(12)
        lo, mlo, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
        params["scales"] = ints(np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1))
        params["mins"] = ints(np.concatenate([mlo & 63, (hi >> 4) | ((mlo >> 6) << 4)], axis=1))
        high = deinterleave(take(32), 1, 256) if t.code_bits == 5 else 0
        c = deinterleave(take(128), 4, 64) | (np.asarray(high, dtype=np.uint8) << 4)
    codes = torch.from_numpy(np.ascontiguousarray(c, dtype=np.uint8).reshape(rows, cols))
    return GGMLWeight(t.name, codes, params)
