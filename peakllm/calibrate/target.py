"""A sub1 size target held exactly, after calibration and before the model is written or evaluated.

`quantize --target-bits B` plans every ternary matrix's share of zero codes with the format's accounting,
1% below B (formats/sub1_size.py: SHARED_DICTIONARY_MARGIN), but the one dictionary the model's matrices share and
rows that are not i.i.d. move the stored size a little: the moefied default model's runs landed from
2.1% under to 0.05% over B. This step measures the stored size exactly as `save_compressed` will write it
(the shared 16-bit dictionary fitted to all ternary codes, every matrix encoded, its manifest entry
counted) and, while it exceeds B, zeroes an evenly spaced fraction of every ternary matrix's nonzero codes
(solvers/rate.py `thin_nonzeros`), doubling the fraction until the size fits. The thinned codes go back
into the model's weights, so what is evaluated is what is stored.
"""

from __future__ import annotations

import dataclasses

import torch

from peakllm.errors import PeakError
from peakllm.formats.container import bits_per_param
from peakllm.formats.sub1_size import shared_dictionary
from peakllm.formats.writer import packed_module
from peakllm.models.anatomy import is_expert
from peakllm.solvers.rate import thin_nonzeros

FIRST_FRACTION = 1e-4


def sub1_bits(results: dict) -> float:
    """Bits/param the ternary matrices of `results` (ModuleResults) store in the sub1 format, everything counted:
    packed by formats/writer.py exactly as `save_compressed` packs them, with one dictionary fitted to all of them."""
    dictionary = shared_dictionary(results)
    return bits_per_param({n: packed_module(r, "sub1", dictionary) for n, r in results.items()})


def _thinned(results: dict, fraction: float) -> dict:
    """The results with `fraction` of each one's nonzero codes zeroed (their dense weights not yet rebuilt)."""
    return {n: dataclasses.replace(r, quant=dataclasses.replace(r.quant, codes=thin_nonzeros(r.quant.codes, fraction)))
            for n, r in results.items()}


def hold_sub1_target(model, modules: dict, target_bits: float) -> dict:
    """Thin the ternary matrices of `modules` (ModuleResults, updated in place, and their weights in `model`)
    until they store at most `target_bits` per parameter; returns what it did (for the run's JSON)."""
    base = {n: r for n, r in sorted(modules.items()) if r.quant is not None and r.quant.grid["kind"] == "ternary"}
    if not base:
        return {}
    bits = sub1_bits(base)
    facts = {"target_bits_before_thinning": bits, "thinned_codes": 0}
    if bits <= target_bits:
        return facts
    # a nonzero costs ~3-4 bits at 80-90% zeros while the stream carries ~0.7 bits/param: removing a
    # fraction f of them saves ~0.7 f of the size, so 2x the relative excess is the first guess
    fraction = min(1.0, max(FIRST_FRACTION, 2 * (bits - target_bits) / bits))
    while True:
        thinned = _thinned(base, fraction)
        bits = sub1_bits(thinned)
        if bits <= target_bits:
            break
        if fraction >= 1.0:
            raise PeakError(f"the ternary matrices store {bits:.4f} bits/param with every code zero, over "
                            f"--target-bits {target_bits}")
        fraction = min(1.0, 2 * fraction)
    count = 0
    for n, r in thinned.items():
        qw = dataclasses.replace(r.quant, weight=r.quant.dequantize())
        count += int((qw.codes != base[n].quant.codes).sum())
        modules[n] = dataclasses.replace(r, weight=qw.weight, quant=qw)
        _write_back(model, n, qw.weight)
    facts.update(thinned_codes=count, thinned_fraction=fraction)
    return facts


def _write_back(model, name: str, weight: torch.Tensor) -> None:
    if is_expert(name):  # <experts>.<part>.<e>: a slice of the fused parameter
        prefix, part, e = name.rsplit(".", 2)
        param = getattr(model.get_submodule(prefix), part)
        param.data[int(e)].copy_(weight.to(param.dtype))
    else:
        mod = model.get_submodule(name)
        mod.weight.data.copy_(weight.to(mod.weight.dtype))
