// Dense matvec / small-batch matmul for the decode path: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
//
// Decoding one token reads every weight once, so the kernel is a streaming read of W: it is
// memory-bound, and the goal is to keep both cores' load ports busy on W and nothing else.
// Each thread owns a contiguous band of output rows (one stream of W per thread, which the hardware
// prefetcher follows), walks it four rows at a time so one load of x feeds four FMAs, and
// accumulates in fp32. Weights are fp32 or bf16 (bf16 -> fp32 is a 16-bit left shift, exact);
// activations x / y are fp32 or bf16. x is widened to fp32 once per call, before the threads start.
//
// Exported symbols: dense_<w>w_<x>x for w, x in {f32, bf16}; the decode-step helpers below
// (add_rmsnorm_<x>, gated_act_<x>, attn_decode_<x>); read_buffers, read_sum_f32. The kernels themselves
// live in dense_impl.h, shared with the whole-step decode engine (decode.cpp).


#include "dense_impl.h"

extern "C" {
void dense_f32w_f32x(const float* x, const float* W, const float* bias, float* y, int M, int N, int K, int nt) {
    dense<float, float>(x, W, bias, y, M, N, K, nt);
}
void dense_bf16w_f32x(const float* x, const bf16_t* W, const float* bias, float* y, int M, int N, int K, int nt) {
    dense<bf16_t, float>(x, W, bias, y, M, N, K, nt);
}
void dense_f32w_bf16x(const bf16_t* x, const float* W, const float* bias, bf16_t* y, int M, int N, int K, int nt) {
    dense<float, bf16_t>(x, W, bias, y, M, N, K, nt);
}
void dense_bf16w_bf16x(const bf16_t* x, const bf16_t* W, const float* bias, bf16_t* y, int M, int N, int K, int nt) {
    dense<bf16_t, bf16_t>(x, W, bias, y, M, N, K, nt);
}
// Read n buffers once with all threads (the bytes are OR-ed, never interpreted): the read bandwidth
// of exactly the bytes a decode step streams, without its arithmetic. Each thread takes one contiguous
// share of the concatenated bytes and reads it as `streams` interleaved sequential streams (one 64-byte
// line of each in turn), as the kernels' multi-row tiles do: one stream per core is limited by the
// core's outstanding line fills and reads well below what the memory delivers. Returns a value that is
// non-zero exactly when some byte is.
static inline unsigned long long or_line(const unsigned char* p) {
#if defined(__AVX512F__)
    const __m512i v = _mm512_loadu_si512((const void*)p);
    return _mm512_reduce_or_epi64(v);
#else
    unsigned long long a = 0;
    for (int k = 0; k < 8; ++k) {
        unsigned long long w;
        memcpy(&w, p + 8 * k, 8);
        a |= w;
    }
    return a;
#endif
}

unsigned long long read_buffers(const unsigned char* const* ptrs, const long* sizes, int n, int nthreads,
                                int streams) {
    long total = 0;
    for (int i = 0; i < n; ++i) total += sizes[i];
    std::vector<long> starts(n + 1, 0);
    for (int i = 0; i < n; ++i) starts[i + 1] = starts[i] + sizes[i];
    if (streams < 1) streams = 1;
    unsigned long long result = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : result)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const long lo = total / 64 * t / nt * 64, hi = t + 1 == nt ? total : total / 64 * (t + 1) / nt * 64;
        // Stream s covers [lo + s * len, lo + (s + 1) * len) of this thread's share (len in whole lines);
        // the last stream also takes the remainder.
        const long len = (hi - lo) / 64 / streams * 64;
        unsigned long long acc = 0;
        // Byte offset g of the concatenation -> (buffer, offset) is found per line; buffers are large,
        // so a cursor per stream that only moves forward keeps that cheap.
        std::vector<int> buf(streams, 0);
        auto at = [&](int s, long g) -> const unsigned char* {
            while (g >= starts[buf[s] + 1]) ++buf[s];
            return ptrs[buf[s]] + (g - starts[buf[s]]);
        };
        auto whole_line = [&](int s, long g) { return g + 64 <= starts[buf[s] + 1]; };
        for (long j = 0; j < len; j += 64)
            for (int s = 0; s < streams; ++s) {
                const long g = lo + s * len + j;
                const unsigned char* p = at(s, g);
                if (whole_line(s, g)) {
                    acc |= or_line(p);
                } else {  // a line across two buffers: byte by byte
                    for (long b = g; b < g + 64; ++b) acc |= *at(s, b);
                }
            }
        for (long g = lo + (long)streams * len; g < hi; ++g) acc |= *at(streams - 1, g);  // the share's tail
        result |= acc;
    }
    return result;
}
// Sum of a large fp32 buffer with all threads: the machine's read bandwidth, for the roofline.
double read_sum_f32(const float* p, long n, int nthreads) {
    double total = 0.0;
#pragma omp parallel for num_threads(nthreads) reduction(+ : total) schedule(static)
    for (long c = 0; c < (n + 4095) / 4096; ++c) {
        const long lo = c * 4096, hi = lo + 4096 < n ? lo + 4096 : n;
#if defined(__AVX512F__)
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        long i = lo;
        for (; i + 32 <= hi; i += 32) {
            a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
            a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
        }
        float s0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)), s1 = 0.f, s2 = 0.f, s3 = 0.f;
#else
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
        long i = lo;
        for (; i + 4 <= hi; i += 4) { s0 += p[i]; s1 += p[i + 1]; s2 += p[i + 2]; s3 += p[i + 3]; }
#endif
        for (; i < hi; ++i) s0 += p[i];
        total += (double)(s0 + s1 + s2 + s3);
    }
    return total;
}

#define DECODE_EXPORTS(X, S)                                                                          \
    void add_rmsnorm_##S(X* x, const X* delta, const void* w, int wf32, X* out, int M, int D, float eps) { \
        add_rmsnorm<X>(x, delta, w, wf32 != 0, out, M, D, eps);                                       \
    }                                                                                                 \
    void gated_act_##S(int act, const X* g, const X* u, X* out, long n) { gated_act<X>(act, g, u, out, n); } \
    void attn_decode_##S(const X* q, const X* k, const X* v, const void* qn_w, const void* kn_w, int wf32, float eps, \
                         const X* cos, const X* sin_signed, X* kc, X* vc, X* out, int B, int H, int KV, \
                         int D, int S, int pos, float scale, int window, int nthreads) {              \
        attn_decode<X>(q, k, v, qn_w, kn_w, wf32 != 0, eps, cos, sin_signed, kc, vc, out, B, H, KV, D, S, pos, \
                       scale, window, nthreads);                                                      \
    }
DECODE_EXPORTS(float, f32)
DECODE_EXPORTS(bf16_t, bf16)
}
