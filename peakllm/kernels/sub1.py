"""y = x @ W.T straight from the sub-1-bit stream (kernels/sub1.cpp), with a pure-torch reference.

The compiled kernel decodes every row's dictionary words and adds the x values at its nonzeros, so the
dense matrix never exists; the reference decodes to dense fp32 and calls F.linear. Without a compiler
(or with PEAKLLM_NO_KERNELS set) `sub1_matmul` uses the reference.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

import torch
import torch.nn.functional as F

from peakllm.errors import PeakError
from peakllm.formats.sub1_code import NZ_MAX, ZERO, Sub1Dictionary
from peakllm.kernels.build import load_library

if TYPE_CHECKING:  # the format calls this module to encode and check its streams; its class is only a type here
    from peakllm.formats.sub1 import PackedSub1

_fn = None
_encode_fn = None
_check_fn = None
_tried = False


class Operands(NamedTuple):
    """What the kernel reads, prepared once per matrix: the dictionary tables and fp32 scales."""

    stream: torch.Tensor
    block_offsets: torch.Tensor
    table: torch.Tensor  # int64 view of the uint64 dictionary entries
    lanes: torch.Tensor | None  # int32 [256, 8] widened 8-bit dictionary, None for 16-bit
    scale_pos: torch.Tensor
    scale_neg: torch.Tensor | None  # None: symmetric
    matrix: "_Matrix"  # the C struct pointing at all the above
    fused: torch.Tensor | None = None  # int16 [2^sym_bits, 4 or 8] fused-path entries (sub1_fused.h)


class _Matrix(ctypes.Structure):
    """struct Sub1Matrix in sub1.cpp: one call then passes a single pointer for the whole matrix."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("stream", "block_offsets", "dict", "lanes", "scale_pos", "scale_neg")] + \
               [(name, ctypes.c_int64) for name in ("out", "in_", "group_size", "block_rows", "sym_bits")] + \
               [("fused", ctypes.c_void_p), ("fused_k", ctypes.c_int64)]


@lru_cache(maxsize=16)
def _dictionary_tables(dictionary: Sub1Dictionary) -> tuple[torch.Tensor, torch.Tensor | None]:
    tables = dictionary.tables
    table = torch.from_numpy(tables.entry.view("int64"))
    if dictionary.sym_bits != 8:
        return table, None
    # [col | neg << 31 of each nonzero slot (0 when unused), len, nnz]: the kernel adds the word's start column
    lanes = np.zeros((tables.pos.shape[0], 8), dtype=np.int64)
    lanes[:, :NZ_MAX] = tables.pos + (tables.neg.astype(np.int64) << 31)
    lanes[:, :NZ_MAX] *= np.arange(NZ_MAX)[None, :] < tables.nnz[:, None]
    lanes[:, 6], lanes[:, 7] = tables.length, tables.nnz
    lanes = lanes.astype(np.uint32).view(np.int32)
    return table, torch.from_numpy(np.ascontiguousarray(lanes))


@lru_cache(maxsize=16)
def _fused_table(dictionary: Sub1Dictionary) -> tuple[torch.Tensor, int]:
    """The dictionary as the fused batch-1 path reads it (kernels/sub1_fused.h), and its slot count K.

    Entry of symbol w, uint16: [3 len, 3 pos_k + s_k for k < K, padding], s_k = 0 for +, 1 for -, and 2
    for a slot past the word's nonzeros (it reads a zero); K = the largest nonzero count of any word.
    """
    tables = dictionary.tables
    k = max(1, int(tables.nnz.max()))
    width = 4 if k <= 3 else 8
    entry = np.full((tables.length.shape[0], width), 2, dtype=np.int64)
    entry[:, 0] = 3 * tables.length
    slot = np.arange(NZ_MAX)[None, :] < tables.nnz[:, None]
    offs = np.where(slot, 3 * tables.pos + tables.neg.astype(np.int64), 2)
    entry[:, 1:1 + k] = offs[:, :k]
    return torch.from_numpy(np.ascontiguousarray(entry.astype(np.uint16).view(np.int16))), k


def _kernel():
    global _fn, _encode_fn, _check_fn, _tried
    if not _tried:
        _tried = True
        lib = load_library("sub1")
        if lib is not None:
            _fn = lib.sub1_matmul_f32
            _fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
            _fn.restype = ctypes.c_int
            _encode_fn = lib.sub1_encode_rows
            _encode_fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
            _encode_fn.restype = ctypes.c_int64
            _check_fn = lib.sub1_check_stream
            _check_fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)]
            _check_fn.restype = ctypes.c_int64
    return _fn


def available() -> bool:
    return _kernel() is not None


@lru_cache(maxsize=16)
def _trie(dictionary: Sub1Dictionary) -> tuple[np.ndarray, np.ndarray]:
    tables = dictionary.tables
    return np.asarray(tables.child, dtype=np.int32), np.asarray(tables.word, dtype=np.int32)


_CHECK_ERRORS = {
    -1: "sub1 stream holds a symbol that is not in its dictionary (symbol {})",
    -2: "sub1 row {} runs past the end of its block",
    -3: "sub1 block {} holds symbols after its last row",
    -4: "sub1 stream has a nonzero past the end of a row (row {})",
}


@lru_cache(maxsize=16)
def _check_tables(dictionary: Sub1Dictionary) -> tuple[np.ndarray, np.ndarray]:
    tables = dictionary.tables
    return (np.ascontiguousarray(tables.length, dtype=np.int64), np.ascontiguousarray(tables.span, dtype=np.int64))


def check_stream(stream: torch.Tensor, block_offsets: torch.Tensor, out_features: int, in_features: int,
                 block_rows: int, dictionary: Sub1Dictionary) -> bool:
    """formats/sub1.py `parse`'s checks compiled (sub1.cpp `sub1_check_stream`), keeping nothing: raises the
    PeakError parse would (naming the row or block); False without the kernel library (the caller then
    parses in Python). block_offsets must already run from 0 to the symbol count and increase."""
    if _kernel() is None:
        return False
    stream = stream.contiguous()
    offsets = block_offsets.contiguous()
    length, span = _check_tables(dictionary)
    where = ctypes.c_int64(-1)
    rc = _check_fn(stream.data_ptr(), dictionary.sym_bits, offsets.data_ptr(), out_features, in_features, block_rows,
                   length.ctypes.data, span.ctypes.data, ctypes.byref(where))
    if rc != 0:
        raise PeakError(_CHECK_ERRORS.get(rc, "sub1 stream check failed ({})").format(where.value))
    return True


def encode_rows(codes: np.ndarray, dictionary: Sub1Dictionary) -> tuple[np.ndarray, np.ndarray] | None:
    """formats/sub1.py `_encode_rows` compiled (sub1.cpp `sub1_encode_rows`): the same symbols and symbols per
    row, ~20x faster (the trie walk is a chain of dependent loads); None without the kernel library (the
    caller then runs the Python parse)."""
    if _kernel() is None:
        return None
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    out, inn = codes.shape
    child, word = _trie(dictionary)
    cap = out * inn + out  # a symbol covers at least one value, and each row may end on a part-word
    syms = np.empty(max(cap, 1), dtype=np.int32)
    per_row = np.zeros(out, dtype=np.int64)
    n = _encode_fn(codes.ctypes.data, out, inn, child.ctypes.data, word.ctypes.data, len(word), ZERO, syms.ctypes.data, cap,
           per_row.ctypes.data)
    if n < 0:
        raise PeakError("sub1 encode: a code is not 0, 1 or 2, or the dictionary does not parse the rows")
    return syms[:n], per_row


def operands(packed: PackedSub1, fused: bool | None = None) -> Operands:
    """The kernel's operands; fused=False leaves out the fused batch-1 path (every call gathers, as before
    the fused path existed: benchmarks and tests compare the two). fused=None: the fused path unless
    the environment sets PEAKLLM_SUB1_GATHER (an end-to-end A/B switch for Sub1Linear and the engine)."""
    if fused is None:
        fused = not os.environ.get("PEAKLLM_SUB1_GATHER")
    table, lanes = _dictionary_tables(packed.dictionary)
    fused_table, fused_k = _fused_table(packed.dictionary) if fused else (None, 0)
    stream, offsets = packed.stream.contiguous(), packed.block_offsets.contiguous()
    scale_pos = packed.scale_pos.float().contiguous()
    scale_neg = None if packed.sym else packed.scale_neg.float().contiguous()
    if scale_neg is not None and torch.equal(scale_neg, scale_pos):
        # equal scales (a min-max ternary grid stored asymmetric): the symmetric kernels give the same
        # products, since 0.5 (p + p) s + 0.5 (p - p) a = p s exactly, and need only the signed sum
        scale_neg = None
    ptrs = [None if t is None else t.data_ptr() for t in (stream, offsets, table, lanes, scale_pos, scale_neg)]
    matrix = _Matrix(*ptrs, packed.out_features, packed.in_features, packed.group_size, packed.block_rows,
                     packed.dictionary.sym_bits, None if fused_table is None else fused_table.data_ptr(), fused_k)
    return Operands(stream, offsets, table, lanes, scale_pos, scale_neg, matrix, fused_table)


def sub1_reference(x: torch.Tensor, packed: PackedSub1) -> torch.Tensor:
    """Decode to dense fp32, then F.linear: fp32 output [..., out]."""
    return F.linear(x.float(), packed.dequantize())


def sub1_matmul(x: torch.Tensor, packed: PackedSub1, ops: Operands | None = None,
                n_threads: int | None = None) -> torch.Tensor:
    """x [..., in] (any float dtype, computed in fp32) -> fp32 [..., out], from the packed stream."""
    if x.shape[-1] != packed.in_features:
        raise PeakError(f"sub1 matmul: x has {x.shape[-1]} features, the weight wants {packed.in_features}")
    fn = _kernel()
    if fn is None:
        return sub1_reference(x, packed)
    x2 = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    batch = x2.numel() // packed.in_features
    y = torch.empty(*x.shape[:-1], packed.out_features, dtype=torch.float32)
    if batch == 0:
        return y
    ops = ops or operands(packed)  # held until the call returns: it owns the fp32 scales
    rc = fn(ctypes.addressof(ops.matrix), x2.data_ptr(), batch, y.data_ptr(), n_threads or torch.get_num_threads())
    if rc != 0:
        raise PeakError(f"sub1 kernel refused a [{packed.out_features}, {packed.in_features}] matrix")
    return y
