"""The sub1 format's size accounting: how many bits per parameter a ternary matrix of a given shape takes at a
share of zero codes (stream, block offsets, scales and its manifest entry counted), the share that lands it
on a target, and the one dictionary a folder's ternary matrices share. Used by `--target-bits` runs to price
nonzero codes before solving, and by the writers."""

from __future__ import annotations

from peakllm.formats.container import compact_json, module_entry
from peakllm.formats.sub1 import placeholder
from peakllm.formats.sub1_code import PROB_Q, expected_bits_per_param, Sub1Dictionary, zero_share_for_bits


# One 16-bit dictionary is fitted to all of a model's ternary codes when it is written, so each matrix is coded
# a little worse than by a dictionary of its own statistics (which the per-matrix accounting below assumes):
# +0.04% to +0.23% over the target at 0.8 bits/param on the moefied default model, +0.6% on tiny test experts
# (8k-16k parameters). A size target aims this much lower to land at or below it.
SHARED_DICTIONARY_MARGIN = 0.01


def entry_bytes(name: str, out_features: int, in_features: int, group_size: int) -> int:
    """The bytes of the manifest entry a sub1 matrix of this shape takes, sized from a placeholder."""
    return len(compact_json({name: module_entry(placeholder(out_features, in_features, group_size))}).encode())


def zero_share_for_target(target_bits: float, group_size: int, name: str, out_features: int, in_features: int) -> float:
    """The share of zero codes at which the ternary matrix `name` [out, in] is expected to take `target_bits`
    per parameter in the sub1 format, everything counted: stream, offsets, scales (min-max ternary levels
    are symmetric, one side stored) and its manifest entry, sized from a placeholder of its shape."""
    entry = entry_bytes(name, out_features, in_features, group_size)
    return zero_share_for_bits(target_bits, out_features, in_features, group_size=group_size, extra_bytes=entry)


def bits_per_param(group_size: int, name: str, out_features: int, in_features: int, zero_share: float,
                   dictionary_share: float | None = None) -> float:
    """What the ternary matrix `name` [out, in] is expected to store per parameter in the sub1 format at a
    share of zero codes, counted as `zero_share_for_target` counts. `dictionary_share`: its codes are coded by
    the dictionary of that share (one shared by many matrices) rather than by one of their own."""
    entry = entry_bytes(name, out_features, in_features, group_size)
    q = min(max(zero_share * PROB_Q, 1.0), PROB_Q - 1.0)
    if dictionary_share is not None:
        dq = min(max(round(dictionary_share * PROB_Q), 1), PROB_Q - 1)
        return expected_bits_per_param(out_features, in_features, q, group_size=group_size, extra_bytes=entry,
                                       dictionary_zero_q=dq)
    lo = int(q)  # own dictionaries exist at 1/256 steps: linear between them, so it is monotone in the share
    hi = min(lo + 1, PROB_Q - 1)
    b_lo, b_hi = (expected_bits_per_param(out_features, in_features, k, group_size=group_size, extra_bytes=entry)
                  for k in (lo, hi))
    return b_lo + (q - lo) * (b_hi - b_lo)


SYM_BITS = 16  # the width of the one dictionary a model's ternary matrices share in the sub1 format


def shared_dictionary(modules: dict):
    """The dictionary of a sub1 folder: one fitted to all ternary codes among `modules` (ModuleResults), or
    None without any (it is stored as 3 integers)."""
    codes = [r.quant.codes for r in modules.values() if r.quant is not None and r.quant.grid["kind"] == "ternary"]
    return Sub1Dictionary.fit(codes, SYM_BITS) if codes else None
