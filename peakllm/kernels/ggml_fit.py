"""llama.cpp block types' parameters fitted by the compiled kernel (kernels/ggml_fit.cpp).

The reference, and the meaning of every field, is ``solvers/ggml_fit.py``: it describes a type to the kernel
with a ``FitSpec`` and calls ``fit_kernel``; None back means no kernel (no compiler, PEAKLLM_NO_KERNELS), and
the caller runs the torch reference instead.
"""

from __future__ import annotations

import ctypes

import torch

from peakllm.errors import PeakError
from peakllm.kernels.build import load_library, ptr

KINDS = {"symmetric": 0, "min": 1, "iq4nl": 2}
_P, _L, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class FitSpec(ctypes.Structure):
    """struct FitSpec in ggml_fit.cpp: one type's search constants and ranges."""

    _fields_ = [("kind", ctypes.c_int32), ("block", ctypes.c_int32), ("group", ctypes.c_int32),
                ("nmax", ctypes.c_int32), ("rmin", ctypes.c_double), ("rdelta", ctypes.c_double),
                ("nstep", ctypes.c_int32), ("level_lo", ctypes.c_int32), ("level_hi", ctypes.c_int32),
                ("int_lo", ctypes.c_int32), ("int_hi", ctypes.c_int32), ("rounds", ctypes.c_int32),
                ("values", ctypes.c_void_p)]


_fn = None
_tried = False


def fit_function():
    """The ctypes ``ggml_fit``, or None when the kernel cannot be built (one warning, from build.py)."""
    global _fn, _tried
    if not _tried:
        _tried = True
        lib = load_library("ggml_fit")
        if lib is not None:
            _fn = lib.ggml_fit
            _fn.argtypes = [ctypes.POINTER(FitSpec), _P, _L, _L, _P, _P, _P, _P, _P, _I]
            _fn.restype = ctypes.c_int
    return _fn


def fit_kernel(W: torch.Tensor, spec: FitSpec, values: torch.Tensor | None,
               importance: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
    """(d, dmin or None, scales or None, mins or None) of fp32 CPU ``W [rows, cols]`` as the spec's type stores
    them, keyed "d", "dmin", "scales", "mins"; ``importance`` fp32 [cols] already >= 0; None without a kernel."""
    fn = fit_function()
    if fn is None:
        return None
    rows, cols = W.shape
    W = W.contiguous()
    nb, k_quant = cols // spec.block, spec.block != spec.group
    d = torch.empty(rows, nb, dtype=torch.float16)
    dmin = torch.empty(rows, nb, dtype=torch.float16) if spec.kind == KINDS["min"] else None
    scales = torch.empty(rows, cols // spec.group, dtype=torch.int16) if k_quant else None
    mins = torch.empty_like(scales) if k_quant and dmin is not None else None
    if values is not None:
        spec.values = values.data_ptr()
    imp = None if importance is None else importance.contiguous()
    if rows:
        rc = fn(ctypes.byref(spec), ptr(W), rows, cols, None if imp is None else ptr(imp), ptr(d),
                None if dmin is None else ptr(dmin), None if scales is None else ptr(scales),
                None if mins is None else ptr(mins), torch.get_num_threads())
        if rc:
            raise PeakError(f"ggml_fit rejected its input (code {rc}): block {spec.block}, group {spec.group}, "
                            f"width {cols}")
    return {"d": d, "dmin": dmin, "scales": scales, "mins": mins}
