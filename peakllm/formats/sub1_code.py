"""The sub-1-bit format's code (docs/SUB1_FORMAT.md section 2): the Tunstall dictionary over ternary codes, and
what it costs, in theory, to store a matrix with it. formats/sub1.py encodes and parses streams with it.

A dictionary is rebuilt from three integers (`Sub1Dictionary`: symbol width, P(0) and P(+ | nonzero) in
1/256), so it costs no stored bytes. The size accounting (`expected_symbols_per_row`, `expected_bits_per_param`,
`zero_share_for_bits`) is what `quantize --target-bits` plans with before any codes exist.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from peakllm.errors import PeakError
from peakllm.formats.intk import n_groups_of

SYM_BITS = (8, 16)
MAX_LEN = 128  # word length cap: positions fit 7 bits of a byte whose top bit is the sign
NZ_MAX = 6  # nonzeros per word: a kernel table entry is 8 bytes = [len, nnz, 6 x (pos | neg << 7)]
PROB_Q = 256  # probabilities are stored as integers / 256, so similar matrices share a dictionary
DEFAULT_BLOCK_ROWS = 16
NEG, ZERO, POS = 0, 1, 2


# ---- the dictionary ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Tables:
    """A built dictionary. `entry` is what the kernel reads; `child`/`word` drive the encoder."""

    entry: np.ndarray  # uint64 [2^sym_bits]: len | nnz << 8 | (pos_k | neg_k << 7) << (16 + 8k); 0 = unused
    length: np.ndarray  # int64 [2^sym_bits] ternary values a symbol covers (0 = unused symbol)
    nnz: np.ndarray  # int64 [2^sym_bits]
    pos: np.ndarray  # int64 [2^sym_bits, NZ_MAX] position of each nonzero inside the word
    neg: np.ndarray  # bool  [2^sym_bits, NZ_MAX]
    span: np.ndarray  # int64 [2^sym_bits] last nonzero position + 1 (0 if none)
    child: list = field(repr=False)  # flat [node * 3 + code] -> node or -1; node 0 is the root
    word: list = field(repr=False)  # node -> symbol, or -1 for a node that is not a word
    n_words: int = 0
    expected_len: float = 0.0  # E[values per symbol] under the source model


@lru_cache(maxsize=16)
def tunstall(sym_bits: int, p_zero_q: int, p_pos_q: int) -> Tables:
    """Tunstall tree for P(0) = p_zero_q/256, P(+) = (1 - P(0)) * p_pos_q/256, capped at MAX_LEN, NZ_MAX.

    Repeatedly expand the most probable word into its three one-longer extensions. A word holding NZ_MAX
    nonzeros can only grow a zero, so it stays a word itself (greedy longest-match parsing then still
    always succeeds); a word of MAX_LEN values is never expanded.
    """
    p0 = p_zero_q / PROB_Q
    pp = (1 - p0) * p_pos_q / PROB_Q
    prob_of = (1 - p0 - pp, p0, pp)  # indexed by code
    n_max = 1 << sym_bits
    child, length, nzs, prob, is_word = [-1, -1, -1], [0], [()], [1.0], [False]
    heap: list = []

    def grow(parent: int, code: int) -> None:
        node = len(length)
        child[parent * 3 + code] = node
        child.extend((-1, -1, -1))
        length.append(length[parent] + 1)
        nzs.append(nzs[parent] + (((length[parent]) | (code == NEG) << 7),) if code != ZERO else nzs[parent])
        prob.append(prob[parent] * prob_of[code])
        is_word.append(True)
        if length[node] < MAX_LEN:
            heapq.heappush(heap, (-prob[node], node))

    for code in (NEG, ZERO, POS):
        grow(0, code)
    n_words, expected_len = 3, 1.0
    while heap:
        neg_p, node = heap[0]
        full = len(nzs[node]) < NZ_MAX
        if n_words + (2 if full else 1) > n_max:
            break
        heapq.heappop(heap)
        if full:
            is_word[node] = False
            for code in (NEG, ZERO, POS):
                grow(node, code)
            n_words += 2
            expected_len += -neg_p
        else:
            grow(node, ZERO)
            n_words += 1
            expected_len += -neg_p * p0

    word = [-1] * len(length)
    entry = np.zeros(n_max, dtype=np.uint64)
    lens = np.zeros(n_max, dtype=np.int64)
    nnz = np.zeros(n_max, dtype=np.int64)
    pos = np.zeros((n_max, NZ_MAX), dtype=np.int64)
    neg = np.zeros((n_max, NZ_MAX), dtype=bool)
    sym = 0
    for node in range(1, len(length)):
        if not is_word[node]:
            continue
        word[node] = sym
        lens[sym], nnz[sym] = length[node], len(nzs[node])
        e = length[node] | len(nzs[node]) << 8
        for k, b in enumerate(nzs[node]):
            pos[sym, k], neg[sym, k] = b & 127, bool(b >> 7)
            e |= b << (16 + 8 * k)
        entry[sym] = e
        sym += 1
    span = np.where(nnz > 0, np.take_along_axis(pos, np.maximum(nnz - 1, 0)[:, None], 1)[:, 0] + 1, 0)
    return Tables(entry=entry, length=lens, nnz=nnz, pos=pos, neg=neg, span=span, child=child, word=word,
                  n_words=sym, expected_len=expected_len)


@lru_cache(maxsize=16)
def _node_counts(sym_bits: int, p_zero_q: int, p_pos_q: int) -> tuple[np.ndarray, np.ndarray]:
    """(zeros, nonzeros) in the label of every node of the dictionary's parse tree but the root."""
    child = tunstall(sym_bits, p_zero_q, p_pos_q).child
    zeros, nonzeros, stack = [], [], [(0, 0, 0)]
    while stack:
        node, z, nz = stack.pop()
        for code in (NEG, ZERO, POS):
            c = child[node * 3 + code]
            if c >= 0:
                cz, cnz = z + (code == ZERO), nz + (code != ZERO)
                zeros.append(cz)
                nonzeros.append(cnz)
                stack.append((c, cz, cnz))
    return np.array(zeros, dtype=np.float64), np.array(nonzeros, dtype=np.float64)


def expected_len_under(dictionary: "Sub1Dictionary", p_zero: float) -> float:
    """E[values per symbol] when `dictionary` codes an i.i.d. source with P(0) = p_zero (signs even): every
    node of the parse tree but the root is one value of a symbol, reached with the probability of its label.
    (At the dictionary's own statistics this is Tables.expected_len.)"""
    zeros, nonzeros = _node_counts(dictionary.sym_bits, dictionary.p_zero_q, dictionary.p_pos_q)
    p_zero = min(max(p_zero, 0.0), 1.0)
    with np.errstate(divide="ignore"):
        logp = zeros * np.log(p_zero) + nonzeros * np.log((1.0 - p_zero) / 2)
    return float(np.exp(logp).sum())


RENEWAL_EXACT = 2048  # row positions computed exactly; a longer row's rest counts 1 / E[len] symbols a value


@lru_cache(maxsize=4096)
def expected_symbols_per_row(dictionary: "Sub1Dictionary", p_zero: float, in_features: int) -> float:
    """E[symbols] of a row of `in_features` i.i.d. codes (P(0) = p_zero, signs even): the number of words
    started before the row ends, the last one cut short and completed (a renewal sum: u[t], the chance
    that a word starts at position t, from the parsed word length's distribution, whose tail P(len >= L)
    sums the probabilities of the tree's nodes at depth L). Short rows of long words pay more than the
    half symbol a long row's end costs on average."""
    zeros, nonzeros = _node_counts(dictionary.sym_bits, dictionary.p_zero_q, dictionary.p_pos_q)
    p_zero = min(max(p_zero, 0.0), 1.0)
    with np.errstate(divide="ignore"):
        prob = np.exp(zeros * np.log(p_zero) + nonzeros * np.log((1.0 - p_zero) / 2))
    tail = np.bincount((zeros + nonzeros).astype(np.int64), weights=prob, minlength=MAX_LEN + 2)  # P(len >= L)
    pmf = tail[1:MAX_LEN + 1] - tail[2:MAX_LEN + 2]  # P(len = L), L = 1..MAX_LEN
    mean = float(tail[1:].sum())
    m = min(in_features, RENEWAL_EXACT)
    u = np.zeros(m)
    u[0] = 1.0
    rev = pmf[::-1]  # u[t] = sum over L of u[t - L] P(len = L)
    for t in range(1, m):
        k = min(t, MAX_LEN)
        u[t] = float(u[t - k:t] @ rev[MAX_LEN - k:])
    return float(u.sum()) + (in_features - m) / mean


def code_counts(codes: torch.Tensor) -> tuple[int, int, int]:
    """(codes, zero codes, positive codes) of a ternary code matrix."""
    return codes.numel(), int((codes == ZERO).sum()), int((codes == POS).sum())


@dataclass(frozen=True)
class Sub1Dictionary:
    """Which Tunstall dictionary a matrix uses: symbol width and the quantized source probabilities."""

    sym_bits: int = 8
    p_zero_q: int = 230
    p_pos_q: int = 128

    def __post_init__(self):
        if self.sym_bits not in SYM_BITS:
            raise PeakError(f"sub1 symbols are {SYM_BITS} bits wide, got {self.sym_bits!r}")
        for name in ("p_zero_q", "p_pos_q"):
            v = getattr(self, name)
            if type(v) is not int or not 1 <= v <= PROB_Q - 1:
                raise PeakError(f"sub1 dictionary {name} must be an integer in [1, {PROB_Q - 1}], got {v!r}")

    @classmethod
    def fit(cls, codes, sym_bits: int = 8) -> "Sub1Dictionary":
        """The dictionary for the pooled statistics of one code matrix or a list of them (one per model)."""
        mats = [codes] if isinstance(codes, torch.Tensor) else list(codes)
        n = zeros = pos = 0
        for c in mats:
            cn, cz, cp = code_counts(c)
            n, zeros, pos = n + cn, zeros + cz, pos + cp
        return cls.from_counts(n, zeros, pos, sym_bits)

    @classmethod
    def from_counts(cls, n: int, zeros: int, pos: int, sym_bits: int = 8) -> "Sub1Dictionary":
        """The dictionary for pooled code counts (what `fit` computes; streaming adds them up layer by layer)."""
        if n == 0:
            raise PeakError("cannot fit a sub1 dictionary on no codes")
        nonzero = n - zeros
        p_zero_q = min(max(round(PROB_Q * zeros / n), 1), PROB_Q - 1)
        p_pos_q = min(max(round(PROB_Q * pos / nonzero), 1), PROB_Q - 1) if nonzero else PROB_Q // 2
        return cls(sym_bits=sym_bits, p_zero_q=p_zero_q, p_pos_q=p_pos_q)

    @property
    def tables(self) -> Tables:
        return tunstall(self.sym_bits, self.p_zero_q, self.p_pos_q)


def expected_bits_per_param(out_features: int, in_features: int, p_zero_q: int, *, group_size: int = -1,
                            sym: bool = True, sym_bits: int = 16, block_rows: int = DEFAULT_BLOCK_ROWS,
                            extra_bytes: int = 0, dictionary_zero_q: int | None = None) -> float:
    """Bits/param this format is expected to store for a matrix whose codes are zero with probability
    p_zero_q / 256 (signs even), counting what `nbytes` counts: the stream (`expected_symbols_per_row`, the
    row's last word completed), the block offsets and
    the fp16 scales (one side when symmetric); plus `extra_bytes` (e.g. its manifest entry).
    `dictionary_zero_q`: the codes are coded by the dictionary built for that share instead of their own
    (a dictionary shared with other matrices; p_zero_q may then be fractional)."""
    own = dictionary_zero_q is None
    dictionary = Sub1Dictionary(sym_bits, int(p_zero_q) if own else dictionary_zero_q, PROB_Q // 2)
    words = expected_symbols_per_row(dictionary, p_zero_q / PROB_Q, in_features)
    stream = out_features * words * sym_bits
    offsets = 32 * (math.ceil(out_features / block_rows) + 1)
    scales = 16 * out_features * n_groups_of(in_features, group_size) * (1 if sym else 2)
    return (stream + offsets + scales + 8 * extra_bytes) / (out_features * in_features)


@lru_cache(maxsize=4096)
def zero_share_for_bits(target_bits: float, out_features: int, in_features: int, *, group_size: int = -1,
                        sym: bool = True, sym_bits: int = 16, extra_bytes: int = 0) -> float:
    """The smallest share of zero codes (a multiple of 1/256) at which `expected_bits_per_param` of an
    [out, in] matrix is at most `target_bits`; PeakError when even 255/256 zeros cost more (the scales,
    offsets and metadata alone may exceed a small target)."""
    def bits(q: int) -> float:
        return expected_bits_per_param(out_features, in_features, q, group_size=group_size, sym=sym,
                                       sym_bits=sym_bits, extra_bytes=extra_bytes)

    if bits(PROB_Q - 1) > target_bits:
        raise PeakError(f"a [{out_features}, {in_features}] sub1 matrix needs more than {target_bits} bits/param "
                        f"even at 255/256 zero codes ({bits(PROB_Q - 1):.3f}): raise the target or the group size")
    lo, hi = 0, PROB_Q - 1  # bits(hi) <= target; find the smallest such q (bits fall as zeros rise)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid >= 1 and bits(mid) <= target_bits:
            hi = mid
        else:
            lo = mid
    return hi / PROB_Q
