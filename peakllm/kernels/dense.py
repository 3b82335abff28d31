"""Dense fp32 / bf16-weight matvec for decoding, with `F.linear` as the pure-torch reference.

Decoding reads every weight once per token, so speed is bytes / bandwidth. torch's CPU matvec reaches
about half the read bandwidth for fp32 and a fifth for bf16 weights; `dense.cpp` streams the weights
at close to the machine's limit. Beyond `MAX_ROWS` rows of x (prefill) the problem is compute-bound
and torch's GEMM is the better tool, so `dense_linear` hands it over.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from peakllm.kernels.build import load_library

# Rows of x up to which the streaming kernel is used: on the 2-core dev machine it is even with torch's
# GEMM at 8 rows for fp32 weights and ~3x faster for bf16; beyond that GEMM blocking wins.
MAX_ROWS = 8

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_fns: dict | None = None


def _kernels() -> dict:
    """{(weight dtype, x dtype): ctypes function}, empty when the library cannot be built."""
    global _fns
    if _fns is None:
        _fns = {}
        lib = load_library("dense")
        if lib is not None:
            for wd, ws in _SUFFIX.items():
                for xd, xs in _SUFFIX.items():
                    fn = getattr(lib, f"dense_{ws}w_{xs}x")
                    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
                    fn.restype = None
                    _fns[(wd, xd)] = fn
            for xd, xs in _SUFFIX.items():
                norm = getattr(lib, f"add_rmsnorm_{xs}")
                norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 2 + [
                    ctypes.c_float]
                act = getattr(lib, f"gated_act_{xs}")
                act.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_long]
                attn = getattr(lib, f"attn_decode_{xs}")
                attn.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_float] + [ctypes.c_void_p] * 5
                                 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int, ctypes.c_int])
                for fn in (norm, act, attn):
                    fn.restype = None
                _fns[("add_rmsnorm", xd)], _fns[("gated_act", xd)], _fns[("attn_decode", xd)] = norm, act, attn
            rb = lib.read_buffers
            rb.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
            rb.restype = ctypes.c_ulonglong
            _fns["read_buffers"] = rb
            read = lib.read_sum_f32
            read.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
            read.restype = ctypes.c_double
            _fns["read_sum_f32"] = read
    return _fns


_bf16_native: bool | None = None


def _native_bf16() -> bool:
    global _bf16_native
    if _bf16_native is None:
        try:
            _bf16_native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _bf16_native = False
    return _bf16_native


def available() -> bool:
    return bool(_kernels())


def dense_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What `dense_linear` computes, in plain torch (fp32 accumulation, output in x's dtype)."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias for x [..., K] and weight [N, K]; fp32 or bf16 each, bias fp32 or None.

    Uses the compiled kernel for up to MAX_ROWS rows of x, torch otherwise. Output dtype = x's dtype.
    """
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    fn = _kernels().get((weight.dtype, x.dtype))
    if fn is None or M > MAX_ROWS or M == 0 or not weight.is_contiguous() or weight.dim() != 2:
        if torch.bfloat16 in (x.dtype, weight.dtype) and not _native_bf16():
            # Without bf16 hardware torch's bf16 GEMM is ~7x slower than widening to fp32 first.
            b = None if bias is None else bias.float()
            return F.linear(x.float(), weight.float(), b).to(x.dtype)
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    if not x.is_contiguous():
        x = x.contiguous()
    N = weight.shape[0]
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    fn(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
       M, N, K, torch.get_num_threads())
    return y


def decode_ops_available(dtype: torch.dtype) -> bool:
    """Whether the fused decode-step kernels below exist for activations of `dtype`."""
    return ("attn_decode", dtype) in _kernels()


def _p(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta (in place, when given); returns rmsnorm(x) * weight. Contiguous tensors of x's dtype; the
    weight may be fp32 under bf16 x (Gemma's norms: computed in fp32, rounded once)."""
    D = x.shape[-1]
    out = torch.empty_like(x)
    wf32 = int(weight.dtype == torch.float32)
    _fns[("add_rmsnorm", x.dtype)](x.data_ptr(), _p(delta), weight.data_ptr(), wf32, out.data_ptr(),
                                   x.numel() // D, D, eps)
    return out


ACT_SILU, ACT_GELU_TANH = 0, 1  # dense_impl.h: the gated MLP activations the kernels know


def gated_act(gate: torch.Tensor, up: torch.Tensor, act: int = ACT_SILU) -> torch.Tensor:
    """act(gate) * up (SiLU: SwiGLU; GELU-tanh: GeGLU), rounded as the HF MLP rounds it."""
    out = torch.empty_like(gate)
    _fns[("gated_act", gate.dtype)](act, gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel())
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, rounded as the HF MLP rounds it."""
    return gated_act(gate, up, ACT_SILU)


def attn_decode(q, k, v, q_norm, k_norm, eps: float, cos, sin_signed, k_cache, v_cache, pos: int,
                scale: float, n_heads: int, window: int = 0) -> torch.Tensor:
    """One decode step of attention: q [B, H*D], k/v [B, KV*D] from the projections; caches
    [B, KV, S, D] get the new (normed, rotated) k and v at `pos`; returns [B, H*D].
    q_norm / k_norm: per-head RMSNorm weights [D] (Qwen3, Gemma-3) or None; cos / sin_signed: [D] rows at
    pos; window > 0: a sliding-window layer, the query sees only the last `window` positions."""
    B, KV, S, D = k_cache.shape
    out = torch.empty_like(q)
    wf32 = int(q_norm is not None and q_norm.dtype == torch.float32)
    _fns[("attn_decode", q.dtype)](
        q.data_ptr(), k.data_ptr(), v.data_ptr(), _p(q_norm), _p(k_norm), wf32, eps, cos.data_ptr(),
        sin_signed.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        B, n_heads, KV, D, S, pos, scale, window, torch.get_num_threads())
    return out


PROBE_STREAMS = (2, 4, 8)  # interleaved sequential streams per thread tried by `read_tensors_gb_s`
PROBE_PASSES = 2  # passes per stream count


def read_buffers_or(tensors: list[torch.Tensor], streams: int = 4) -> int:
    """One pass of the compiled reader over these tensors' bytes; non-zero exactly when some byte is (tests)."""
    tensors = [t for t in tensors if t.numel() and t.is_contiguous()]
    ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_long * len(tensors))(*[t.numel() * t.element_size() for t in tensors])
    return int(_kernels()["read_buffers"](ptrs, sizes, len(tensors), torch.get_num_threads(), streams))


def probe_method() -> str:
    """How `read_tensors_gb_s` measures, in words (bench reports it with its figure)."""
    if _kernels().get("read_buffers") is None:
        return "torch amax over the step's weight bytes, one pass (no compiled reader)"
    counts = "/".join(str(n) for n in PROBE_STREAMS)
    return (f"the step's weight bytes read with {torch.get_num_threads()} threads as {counts} interleaved "
            f"streams each, 64-byte lines, best of {PROBE_PASSES * len(PROBE_STREAMS)} passes")


def read_tensors_gb_s(tensors: list[torch.Tensor], passes: int = PROBE_PASSES) -> float:
    """GB/s reading these (contiguous) tensors with all threads, the best pass: the bytes one decode step
    streams, read without arithmetic, each thread's share as 2, 4 and 8 interleaved streams, `passes`
    passes each (one stream per core cannot keep enough lines in flight to reach the memory's bandwidth;
    the best count differs between machines). Use on a set much larger than the last-level cache."""
    import time

    tensors = [t for t in tensors if t.numel() and t.is_contiguous()]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    fn = _kernels().get("read_buffers")
    best = 0.0
    for streams in PROBE_STREAMS if fn is not None else (1,):
        for _ in range(passes):
            t0 = time.perf_counter()
            if fn is None:
                for t in tensors:
                    t.reshape(-1).view(torch.uint8).amax()
            else:
                read_buffers_or(tensors, streams)
            best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def read_bandwidth_gb_s(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Median read bandwidth (GB/s) summing a large fp32 buffer with all threads: the decode roofline.

    Uses the compiled readers when available (torch.sum otherwise): a sum, and the interleaved-stream
    reader of `read_tensors_gb_s` at each of its stream counts; the largest is what a streaming kernel
    can reach, so all are tried and the best median is returned.
    """
    import statistics
    import time

    buf = torch.rand(size_bytes // 4)
    readers = [lambda: float(buf.sum())]
    read = _kernels().get("read_sum_f32")
    if read is not None:
        readers.append(lambda: read(buf.data_ptr(), buf.numel(), torch.get_num_threads()))
    if _kernels().get("read_buffers") is not None:  # interleaved streams per thread, as the weights' probe
        readers += [lambda n=n: read_buffers_or([buf], n) for n in PROBE_STREAMS]
    best = 0.0
    for reader in readers:
        reader()  # warm-up: page faults and thread start-up are not bandwidth
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            reader()
            times.append(time.perf_counter() - t0)
        best = max(best, buf.numel() * 4 / statistics.median(times) / 1e9)
    del buf
    return best
