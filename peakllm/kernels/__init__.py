"""Compiled CPU kernels for packed weights, each with a pure-torch reference beside it.

`build.py` compiles the C++ sources (`*.cpp`, with the row-range kernels in `*_impl.h`) with g++ for the
machine's instruction set into a cached shared library loaded with ctypes; without a compiler every entry
point falls back to its reference (`reference.py`, `dense.py`). `ops.py` (int-k) and `sparse_ops.py` (N:M,
bitmask), `sub1.py` (sub-1-bit dictionary codes) and `dense.py` validate and call them per op; `decode.py`
describes a whole model to the whole-step decode engine (`decode.cpp`: every layer of one token in one call).
Kernels know nothing of files or models: they take tensors.
"""
