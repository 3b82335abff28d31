"""Sub-1-bit ternary weights (QMoE): a Tunstall dictionary code over ternary codes, decodable per block.

A weight row is a sequence of ternary codes {0, 1, 2} = {-scale_neg, 0, +scale_pos}. Expert weights after
ternary quantization are mostly zeros, so the row is parsed greedily into dictionary words: each word is
a variable-length ternary sequence (a long run of zeros, or zeros with a few nonzeros), sent as one
fixed-width symbol (8 or 16 bits). The dictionary is a Tunstall tree for an i.i.d. ternary source with
the matrix's measured P(0) and P(+ | nonzero); Tunstall words are nearly equiprobable, which is what
makes a fixed-width code for them close to the entropy. It is rebuilt from three small integers kept in
the metadata, so it costs no stored bytes and matrices with the same statistics share one table.

Layout (docs/SUB1_FORMAT.md): `stream` uint8 [n_symbols * sym_bits / 8] (16-bit symbols little-endian);
each row starts on a fresh symbol and its last word is completed with zeros; `block_offsets` int32
[n_blocks + 1] = index of the first symbol of every block of `block_rows` rows, so blocks decode
independently; `scale_pos` fp16 [out, n_groups] and, unless the scales are symmetric, `scale_neg`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from peakllm.errors import PeakError
from peakllm.formats.container import register_kind
from peakllm.formats.intk import (MAX_DIM, canonical_g_idx, check_version, fp16_params, meta_bool, meta_int,
                                  n_groups_of, PackedSize, take)
from peakllm.formats.sub1_code import DEFAULT_BLOCK_ROWS, NEG, NZ_MAX, POS, PROB_Q, ZERO, Sub1Dictionary, Tables
from peakllm.kernels import sub1 as sub1_kernel

FORMAT_VERSION = 1


def placeholder(out_features: int, in_features: int, group_size: int = -1, sym: bool = True,
                sym_bits: int = 16, block_rows: int = DEFAULT_BLOCK_ROWS) -> "PackedSub1":
    """A PackedSub1 of this shape with zeroed tensors (not a valid stream): what its manifest entry looks
    like, for sizing the metadata before any codes exist."""
    g = n_groups_of(in_features, group_size)
    scale = torch.zeros(out_features, g, dtype=torch.float16)
    return PackedSub1(stream=torch.zeros(out_features * sym_bits // 8, dtype=torch.uint8),
                      block_offsets=torch.zeros(math.ceil(out_features / block_rows) + 1, dtype=torch.int32),
                      scale_pos=scale, scale_neg=scale if sym else scale.clone(),
                      dictionary=Sub1Dictionary(sym_bits), group_size=group_size, block_rows=block_rows,
                      in_features=in_features, out_features=out_features, sym=sym)


# ---- encoding and parsing ----------------------------------------------------------------------

def _encode_rows(codes: np.ndarray, tables: Tables) -> tuple[list, np.ndarray]:
    """Greedy longest-match parse of every row; (symbols, symbols per row). The reference of the compiled
    parse (kernels/sub1.py `encode_rows`), and what runs without a compiler."""
    child, word = tables.child, tables.word
    syms: list = []
    per_row = np.zeros(codes.shape[0], dtype=np.int64)
    for r, row in enumerate(codes.tolist()):
        start, v = len(syms), 0
        for c in row:
            nxt = child[v * 3 + c]
            if nxt < 0:  # v is a word that cannot grow by c: emit it and restart at the root
                syms.append(word[v])
                nxt = child[c]
            v = nxt
        while word[v] < 0:  # the row ended inside the tree: complete the word with zeros
            v = child[v * 3 + ZERO]
        syms.append(word[v])
        per_row[r] = len(syms) - start
    return syms, per_row


def _symbols(stream: torch.Tensor, sym_bits: int) -> np.ndarray:
    raw = stream.numpy()
    if sym_bits == 8:
        return raw.astype(np.int64)
    return raw.view("<u2").astype(np.int64)


def _check_offsets(block_offsets: np.ndarray, n_blocks: int, n_symbols: int) -> None:
    if block_offsets.shape != (n_blocks + 1,) or block_offsets[0] != 0 or block_offsets[-1] != n_symbols:
        raise PeakError(f"sub1 block_offsets must run from 0 to {n_symbols} over {n_blocks} blocks")
    if np.any(np.diff(block_offsets) < 1):
        raise PeakError("sub1 block_offsets must increase (every row holds at least one symbol)")


def parse(symbols: np.ndarray, block_offsets: np.ndarray, out_features: int, in_features: int,
          block_rows: int, tables: Tables) -> tuple[np.ndarray, np.ndarray]:
    """Row and first column of every symbol, checking that the stream parses exactly into the rows.

    Raises PeakError unless every symbol is a word, every block's rows end exactly at the next block's
    offset, and no nonzero of a row's last word lies past the row's end (the kernel reads x there).
    """
    n_blocks = math.ceil(out_features / block_rows)
    _check_offsets(block_offsets, n_blocks, len(symbols))
    lens = tables.length[symbols]
    if np.any(lens == 0):
        raise PeakError("sub1 stream holds a symbol that is not in its dictionary")
    cum = np.cumsum(lens)
    row_first = np.empty(out_features + 1, dtype=np.int64)
    r = 0
    for b in range(n_blocks):
        s, e = int(block_offsets[b]), int(block_offsets[b + 1])
        for _ in range(min(block_rows, out_features - r)):
            base = int(cum[s - 1]) if s else 0
            # the row's last symbol is the first one whose cumulative length reaches the row's end
            j = s + int(np.searchsorted(cum[s:e], base + in_features, side="left"))
            if j >= e:
                raise PeakError(f"sub1 row {r} runs past the end of its block")
            row_first[r] = s
            s, r = j + 1, r + 1
        if s != e:
            raise PeakError(f"sub1 block {b} holds {e - s} symbols after its last row")
    row_first[out_features] = len(symbols)
    counts = np.diff(row_first)
    rows = np.repeat(np.arange(out_features), counts)
    base = np.concatenate(([0], cum))[row_first[:-1]]
    col = cum - lens - base[rows]
    last = row_first[1:] - 1
    if np.any(col[last] + tables.span[symbols[last]] > in_features):
        raise PeakError("sub1 stream has a nonzero past the end of a row")
    return rows, col


# ---- the packed module -------------------------------------------------------------------------

@dataclass
class PackedSub1(PackedSize):
    kind: ClassVar[str] = "sub1"
    stream: torch.Tensor
    block_offsets: torch.Tensor
    scale_pos: torch.Tensor
    scale_neg: torch.Tensor  # the same tensor as scale_pos when sym
    dictionary: Sub1Dictionary
    group_size: int
    block_rows: int
    in_features: int
    out_features: int
    sym: bool

    @classmethod
    def encode(cls, codes: torch.Tensor, scale_neg, scale_pos, group_size: int = -1,
               dictionary: Sub1Dictionary | None = None, *, sym_bits: int = 8,
               block_rows: int = DEFAULT_BLOCK_ROWS) -> "PackedSub1":
        """Pack ternary codes uint8 [out, in] with fp16-representable scales [out, n_groups].

        `dictionary=None` fits an 8-bit one on these codes (0.03 s to build, 10 KiB). Better: fit one on all
        of a model's ternary codes and pass it to every matrix, so all share a table; a shared 16-bit
        dictionary then saves another ~0.03 bits/param (its 512 KiB table takes ~0.5 s to build).
        """
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 2:
            raise PeakError("sub1 encode wants ternary codes as a uint8 tensor [out, in]")
        out_features, in_features = codes.shape
        _check_shape(out_features, in_features, group_size, block_rows)
        if codes.numel() and int(codes.max()) > POS:
            raise PeakError("ternary codes must be 0, 1 or 2")
        g = n_groups_of(in_features, group_size)
        scale_neg, scale_pos = torch.as_tensor(scale_neg), torch.as_tensor(scale_pos)
        for name, t in (("scale_neg", scale_neg), ("scale_pos", scale_pos)):
            if tuple(t.shape) != (out_features, g):
                raise PeakError(f"sub1 {name} must have shape [{out_features}, {g}], got {tuple(t.shape)}")
        scale_neg, scale_pos = fp16_params(scale_neg, "scale_neg"), fp16_params(scale_pos, "scale_pos")
        sym = torch.equal(scale_neg, scale_pos)
        if dictionary is None:
            dictionary = Sub1Dictionary.fit(codes, sym_bits)
        if not isinstance(dictionary, Sub1Dictionary):
            raise PeakError(f"sub1 dictionary must be a Sub1Dictionary, got {type(dictionary).__name__}")
        rows = codes.cpu().numpy()
        fast = sub1_kernel.encode_rows(rows, dictionary)
        syms, per_row = fast if fast is not None else _encode_rows(rows, dictionary.tables)
        row_end = np.cumsum(per_row)
        block_offsets = np.concatenate(([0], row_end[block_rows - 1::block_rows]))
        if block_offsets[-1] != row_end[-1]:
            block_offsets = np.concatenate((block_offsets, row_end[-1:]))
        if row_end[-1] >= 1 << 31:
            raise PeakError("sub1 matrix too large: more than 2^31 symbols")
        dtype = np.uint8 if dictionary.sym_bits == 8 else np.dtype("<u2")
        stream = torch.from_numpy(np.asarray(syms, dtype=dtype).view(np.uint8).copy())
        packed = cls(stream=stream, block_offsets=torch.from_numpy(block_offsets.astype(np.int32)),
                     scale_pos=scale_pos, scale_neg=scale_pos if sym else scale_neg, dictionary=dictionary,
                     group_size=group_size, block_rows=block_rows, in_features=in_features,
                     out_features=out_features, sym=sym)
        packed.validate()
        return packed

    @classmethod
    def from_quantized(cls, qw, dictionary: Sub1Dictionary | None = None, **kw) -> "PackedSub1":
        """Pack a solver's QuantizedWeight on a ternary grid (contiguous groups only)."""
        grid = getattr(qw, "grid", None)
        if not isinstance(grid, dict) or grid.get("kind") != "ternary":
            raise PeakError(f"sub1 packs ternary QuantizedWeights, got grid {grid!r}")
        group_size = grid.get("group_size")
        _check_shape(*qw.codes.shape, group_size, kw.get("block_rows", DEFAULT_BLOCK_ROWS))
        n_groups = n_groups_of(qw.codes.shape[1], group_size)
        if canonical_g_idx(qw.g_idx, qw.codes.shape[1], group_size, n_groups) is not None:
            raise PeakError("sub1 has no g_idx: act-order groups cannot be stored")
        return cls.encode(qw.codes, qw.params["scale_neg"], qw.params["scale_pos"], group_size, dictionary, **kw)

    # -- sizes

    @property
    def n_groups(self) -> int:
        return n_groups_of(self.in_features, self.group_size)

    @property
    def n_symbols(self) -> int:
        return self.stream.numel() * 8 // self.dictionary.sym_bits

    @property
    def bits_per_param(self) -> float:
        """Stored bits (stream, offsets, scales) per original parameter; metadata is a few dozen bytes more
        in the container and the dictionary is rebuilt from the metadata, so it stores nothing."""
        return 8 * self.nbytes / self.num_params

    # -- decoding

    def _rows_cols(self) -> tuple[np.ndarray, np.ndarray]:
        # not kept: 16 bytes per symbol, several times the stream (4.5 GB for an OLMoE-shaped model's experts)
        return parse(_symbols(self.stream, self.dictionary.sym_bits), self.block_offsets.numpy(),
                     self.out_features, self.in_features, self.block_rows, self.dictionary.tables)

    def decode(self) -> torch.Tensor:
        """The ternary codes uint8 [out, in], exactly as encoded."""
        tables = self.dictionary.tables
        rows, col = self._rows_cols()
        symbols = _symbols(self.stream, self.dictionary.sym_bits)
        codes = np.full((self.out_features, self.in_features), ZERO, dtype=np.uint8)
        nnz = tables.nnz[symbols]
        for k in range(NZ_MAX):
            has = nnz > k
            s = symbols[has]
            codes[rows[has], col[has] + tables.pos[s, k]] = np.where(tables.neg[s, k], NEG, POS)
        return torch.from_numpy(codes)

    def dequantize(self) -> torch.Tensor:
        """fp32 weights [out, in]."""
        codes = self.decode()
        gs = self.in_features if self.group_size == -1 else self.group_size
        gi = torch.arange(self.in_features) // gs
        w = torch.zeros(codes.shape, dtype=torch.float32)
        w = torch.where(codes == NEG, -self.scale_neg.float()[:, gi], w)
        return torch.where(codes == POS, self.scale_pos.float()[:, gi], w)

    # -- the container protocol

    def metadata(self) -> dict:
        d = self.dictionary
        return {"version": FORMAT_VERSION, "in_features": self.in_features, "out_features": self.out_features,
                "group_size": self.group_size, "block_rows": self.block_rows, "sym": self.sym,
                "sym_bits": d.sym_bits, "p_zero_q": d.p_zero_q, "p_pos_q": d.p_pos_q}

    def to_tensors(self, prefix: str = "") -> dict:
        out = {prefix + "stream": self.stream, prefix + "block_offsets": self.block_offsets,
               prefix + "scale_pos": self.scale_pos}
        if not self.sym:
            out[prefix + "scale_neg"] = self.scale_neg
        return out

    def validate(self) -> None:
        rows, g = self.out_features, self.n_groups
        _check_shape(rows, self.in_features, self.group_size, self.block_rows)
        n_blocks = math.ceil(rows / self.block_rows)
        take({"b": self.block_offsets}, "b", torch.int32, (n_blocks + 1,))
        if self.stream.dtype != torch.uint8 or self.stream.dim() != 1 or \
                self.stream.numel() % (self.dictionary.sym_bits // 8):
            raise PeakError(f"sub1 stream must be uint8 [n_symbols * {self.dictionary.sym_bits // 8}]")
        for name, t in (("scale_pos", self.scale_pos), ("scale_neg", self.scale_neg)):
            take({name: t}, name, torch.float16, (rows, g))
            if not torch.isfinite(t).all():
                raise PeakError(f"sub1 {name} holds non-finite values")
        if self.sym and not torch.equal(self.scale_neg, self.scale_pos):
            raise PeakError("symmetric sub1 needs scale_neg == scale_pos")
        # the structure the kernels rely on, checked in one compiled pass (the Python parse without a compiler)
        _check_offsets(self.block_offsets.numpy(), n_blocks, self.n_symbols)
        if not sub1_kernel.check_stream(self.stream, self.block_offsets, rows, self.in_features, self.block_rows,
                                        self.dictionary):
            self._rows_cols()

    @classmethod
    def from_tensors(cls, tensors: dict, metadata: dict, prefix: str = "") -> "PackedSub1":
        check_version(metadata, cls.kind)
        in_features = meta_int(metadata, "in_features", 1, MAX_DIM)
        out_features = meta_int(metadata, "out_features", 1, MAX_DIM)
        group_size = meta_int(metadata, "group_size", -1, MAX_DIM)
        block_rows = meta_int(metadata, "block_rows", 1, MAX_DIM)
        _check_shape(out_features, in_features, group_size, block_rows)
        sym = meta_bool(metadata, "sym")
        dictionary = Sub1Dictionary(sym_bits=meta_int(metadata, "sym_bits", 8, 16),
                                    p_zero_q=meta_int(metadata, "p_zero_q", 1, PROB_Q - 1),
                                    p_pos_q=meta_int(metadata, "p_pos_q", 1, PROB_Q - 1))
        g = n_groups_of(in_features, group_size)
        stream = tensors.get(prefix + "stream")
        if not isinstance(stream, torch.Tensor) or stream.dtype != torch.uint8 or stream.dim() != 1:
            raise PeakError(f"missing or malformed tensor {prefix + 'stream'!r} (uint8, one dimension)")
        n_blocks = math.ceil(out_features / block_rows)
        scale_pos = take(tensors, prefix + "scale_pos", torch.float16, (out_features, g))
        if sym and prefix + "scale_neg" in tensors:
            raise PeakError("symmetric sub1 stores no scale_neg")
        scale_neg = scale_pos if sym else take(tensors, prefix + "scale_neg", torch.float16, (out_features, g))
        packed = cls(stream=stream.contiguous(),
                     block_offsets=take(tensors, prefix + "block_offsets", torch.int32, (n_blocks + 1,)).contiguous(),
                     scale_pos=scale_pos.contiguous(), scale_neg=scale_neg.contiguous(), dictionary=dictionary,
                     group_size=group_size, block_rows=block_rows, in_features=in_features,
                     out_features=out_features, sym=sym)
        packed.validate()
        return packed


def _check_shape(out_features: int, in_features: int, group_size: int, block_rows: int) -> None:
    if not (1 <= out_features <= MAX_DIM and 1 <= in_features <= MAX_DIM):
        raise PeakError(f"sub1 weight shape [{out_features}, {in_features}] is out of range")
    if type(group_size) is not int or not (group_size == -1 or 1 <= group_size <= MAX_DIM):
        raise PeakError(f"sub1 group_size must be -1 or in [1, {MAX_DIM}], got {group_size!r}")
    if type(block_rows) is not int or not 1 <= block_rows <= MAX_DIM:
        raise PeakError(f"sub1 block_rows must be in [1, {MAX_DIM}], got {block_rows!r}")


# The container loads "sub1" modules once this module is imported (peakllm.formats imports it).
register_kind(PackedSub1.kind, PackedSub1)
