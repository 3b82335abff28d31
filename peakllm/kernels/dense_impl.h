// Dense fp32 / bf16-weight building blocks of the decode path, shared by dense.cpp (the standalone ops)
// and decode.cpp (the whole-step engine): SIMD dot products of 4 rows / 1 row of W against fp32 x,
// a row-range matvec, and the small fused helpers of a decode step (residual add + RMSNorm, SiLU * up,
// RoPE, attention over the KV cache). Nothing here starts threads except the omp wrappers at the end.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>
#include <omp.h>
#include "common.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef uint16_t bf16_t;

static inline float load1(const float* p) { return *p; }
static inline float load1(const bf16_t* p) { return bf16_to_f32(*p); }
static inline void store1(float* p, float v) { *p = v; }
static inline void store1(bf16_t* p, float v) { *p = f32_to_bf16(v); }

#if defined(__AVX512F__)
static inline __m512 loadw(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 loadw(const bf16_t* p) {
    __m256i h = _mm256_loadu_si256((const __m256i*)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m512 loadw_tail(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 loadw_tail(const bf16_t* p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 4 rows of W against one fp32 vector x: out[r] = dot(W[r], x).
template <typename TW>
static inline void dot4(const TW* w0, size_t ldw, const float* x, int K, float* out) {
    const TW* w1 = w0 + ldw;
    const TW* w2 = w1 + ldw;
    const TW* w3 = w2 + ldw;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv = _mm512_loadu_ps(x + k);
        a0 = _mm512_fmadd_ps(loadw(w0 + k), xv, a0);
        a1 = _mm512_fmadd_ps(loadw(w1 + k), xv, a1);
        a2 = _mm512_fmadd_ps(loadw(w2 + k), xv, a2);
        a3 = _mm512_fmadd_ps(loadw(w3 + k), xv, a3);
    }
    if (k < K) {
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        a0 = _mm512_fmadd_ps(loadw_tail(w0 + k, m), xv, a0);
        a1 = _mm512_fmadd_ps(loadw_tail(w1 + k, m), xv, a1);
        a2 = _mm512_fmadd_ps(loadw_tail(w2 + k, m), xv, a2);
        a3 = _mm512_fmadd_ps(loadw_tail(w3 + k, m), xv, a3);
    }
    out[0] = _mm512_reduce_add_ps(a0);
    out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2);
    out[3] = _mm512_reduce_add_ps(a3);
}

template <typename TW>
static inline float dot1(const TW* w, const float* x, int K) {
    __m512 a = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) a = _mm512_fmadd_ps(loadw(w + k), _mm512_loadu_ps(x + k), a);
    if (k < K) {
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        a = _mm512_fmadd_ps(loadw_tail(w + k, m), _mm512_maskz_loadu_ps(m, x + k), a);
    }
    return _mm512_reduce_add_ps(a);
}

#elif defined(__AVX2__)
static inline __m256 loadw(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 loadw(const bf16_t* p) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

template <typename TW>
static inline void dot4(const TW* w0, size_t ldw, const float* x, int K, float* out) {
    const TW* w[4] = {w0, w0 + ldw, w0 + 2 * ldw, w0 + 3 * ldw};
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(loadw(w[0] + k), xv, a0);
        a1 = _mm256_fmadd_ps(loadw(w[1] + k), xv, a1);
        a2 = _mm256_fmadd_ps(loadw(w[2] + k), xv, a2);
        a3 = _mm256_fmadd_ps(loadw(w[3] + k), xv, a3);
    }
    out[0] = hsum256(a0);
    out[1] = hsum256(a1);
    out[2] = hsum256(a2);
    out[3] = hsum256(a3);
    for (; k < K; ++k)
        for (int r = 0; r < 4; ++r) out[r] += load1(w[r] + k) * x[k];
}

template <typename TW>
static inline float dot1(const TW* w, const float* x, int K) {
    __m256 a = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(loadw(w + k), _mm256_loadu_ps(x + k), a);
    float s = hsum256(a);
    for (; k < K; ++k) s += load1(w + k) * x[k];
    return s;
}

// bf16 weights: a 32-bit word holds two neighbours, and (w << 16) is the even one, (w & 0xffff0000)
// the odd one, both exact fp32: two cheap integer ops per 16 weights instead of two shuffles and
// two shifts. x is split per 16 columns into its even then odd halves to line up (split_pairs).
#define PEAK_BF16_PAIRS 1
static inline void split_pairs(const float* x, float* xp, int K) {
    int k = 0;
    for (; k + 16 <= K; k += 16)
        for (int i = 0; i < 8; ++i) {
            xp[k + i] = x[k + 2 * i];
            xp[k + 8 + i] = x[k + 2 * i + 1];
        }
    for (; k < K; ++k) xp[k] = x[k];
}

static inline void dot4_pairs(const bf16_t* w0, size_t ldw, const float* xp, int K, float* out) {
    const bf16_t* w[4] = {w0, w0 + ldw, w0 + 2 * ldw, w0 + 3 * ldw};
    const __m256i hi_mask = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m256 xe = _mm256_loadu_ps(xp + k), xo = _mm256_loadu_ps(xp + k + 8);
#define PEAK_PAIR_STEP(r, a)                                                                      \
        {                                                                                         \
            const __m256i v = _mm256_loadu_si256((const __m256i*)(w[r] + k));                     \
            a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, a);            \
            a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi_mask)), xo, a);        \
        }
        PEAK_PAIR_STEP(0, a0) PEAK_PAIR_STEP(1, a1) PEAK_PAIR_STEP(2, a2) PEAK_PAIR_STEP(3, a3)
#undef PEAK_PAIR_STEP
    }
    out[0] = hsum256(a0);
    out[1] = hsum256(a1);
    out[2] = hsum256(a2);
    out[3] = hsum256(a3);
    for (; k < K; ++k)
        for (int r = 0; r < 4; ++r) out[r] += load1(w[r] + k) * xp[k];
}

static inline float dot1_pairs(const bf16_t* w, const float* xp, int K) {
    const __m256i hi_mask = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + k));
        a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xp + k), a);
        a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi_mask)), _mm256_loadu_ps(xp + k + 8), a);
    }
    float s = hsum256(a);
    for (; k < K; ++k) s += load1(w + k) * xp[k];
    return s;
}

#else
template <typename TW>
static inline float dot1(const TW* w, const float* x, int K) {
    float s = 0.f;
    for (int k = 0; k < K; ++k) s += load1(w + k) * x[k];
    return s;
}

template <typename TW>
static inline void dot4(const TW* w0, size_t ldw, const float* x, int K, float* out) {
    for (int r = 0; r < 4; ++r) out[r] = dot1(w0 + r * ldw, x, K);
}
#endif

template <bool pairs, typename TW>
static inline void dot4x(const TW* w0, size_t ldw, const float* x, int K, float* out) {
#ifdef PEAK_BF16_PAIRS
    if constexpr (pairs) return dot4_pairs(w0, ldw, x, K, out);
#endif
    dot4(w0, ldw, x, K, out);
}

template <bool pairs, typename TW>
static inline float dot1x(const TW* w, const float* x, int K) {
#ifdef PEAK_BF16_PAIRS
    if constexpr (pairs) return dot1_pairs(w, x, K);
#endif
    return dot1(w, x, K);
}

// x [M, K] (fp32 or bf16) as the fp32 rows the dot products read: for bf16 weights (pairs layout)
// each 16 columns are split into their even then odd halves. Returns xf itself when nothing is needed.
template <typename TW, typename TX>
static const float* prepare_x(const TX* x, int M, int K, std::vector<float>& wide, std::vector<float>& split) {
    const float* xf;
    if constexpr (sizeof(TX) == sizeof(float)) {
        xf = (const float*)x;
    } else {
        wide.resize((size_t)M * K);
        for (size_t i = 0; i < (size_t)M * K; ++i) wide[i] = load1(x + i);
        xf = wide.data();
    }
#ifdef PEAK_BF16_PAIRS
    if constexpr (sizeof(TW) == 2) {
        split.resize((size_t)M * K);
        for (int m = 0; m < M; ++m) split_pairs(xf + (size_t)m * K, split.data() + (size_t)m * K, K);
        xf = split.data();
    }
#endif
    return xf;
}

// Output rows [n0, n1) of y [M, N] = xf @ W.T + bias, xf from prepare_x<TW>. n0 is a multiple of 4.
template <typename TW, typename TY>
static void dense_rows(const float* xf, const TW* W, const float* bias, TY* y, int M, int N, int K, int n0, int n1) {
#ifdef PEAK_BF16_PAIRS
    constexpr bool pairs = sizeof(TW) == 2;
#else
    constexpr bool pairs = false;
#endif
    float acc[4];
    for (int n = n0; n < n1; n += 4) {
        if (n + 4 <= n1) {
            for (int m = 0; m < M; ++m) {
                dot4x<pairs>(W + (size_t)n * K, (size_t)K, xf + (size_t)m * K, K, acc);
                for (int r = 0; r < 4; ++r) store1(y + (size_t)m * N + n + r, acc[r] + (bias ? bias[n + r] : 0.f));
            }
        } else {
            for (int m = 0; m < M; ++m)
                for (int r = n; r < n1; ++r)
                    store1(y + (size_t)m * N + r,
                           dot1x<pairs>(W + (size_t)r * K, xf + (size_t)m * K, K) + (bias ? bias[r] : 0.f));
        }
    }
}

template <typename TW, typename TX>
static void dense(const TX* x, const TW* W, const float* bias, TX* y, int M, int N, int K, int nthreads) {
    // Widen x to fp32 once; M*K is small on the decode path (M = batch).
    static thread_local std::vector<float> wide, split;
    const float* xf = prepare_x<TW, TX>(x, M, K, wide, split);
    const int nblocks = (N + 3) / 4;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > nblocks) nthreads = nblocks;
#pragma omp parallel num_threads(nthreads)
    {
        // Contiguous bands of 4-row blocks: one forward stream through W per thread.
        int n0, n1;
        share(N, 4, omp_get_thread_num(), omp_get_num_threads(), n0, n1);
        dense_rows<TW, TX>(xf, W, bias, y, M, N, K, n0, n1);
    }
}

// ---- Decode-step helpers -------------------------------------------------------------------
// At one token per step the non-matmul work of a layer is tiny, and a dozen torch ops around it
// cost more than the arithmetic; these fuse it into one call each. Rounding follows the HF
// modules: values a bf16 model stores in bf16 are rounded at the same points.

template <typename TX>
static inline float round_like(float v) {
    if constexpr (sizeof(TX) == 2) return bf16_to_f32(f32_to_bf16(v));
    return v;
}

// The normalised value xn = x * r times norm weight d. Weights in TX (Llama and most families): the HF
// module rounds xn to TX before multiplying, y = w * round(xn). fp32 weights (wf32; Gemma, whose norm
// computes in fp32 and multiplies by 1 + w, folded into w): y = xn * w, rounded once when stored.
template <typename TX>
static inline float norm_mul(const void* w, bool wf32, int d, float xn) {
    return wf32 ? xn * ((const float*)w)[d] : load1((const TX*)w + d) * round_like<TX>(xn);
}

// x += delta (when delta is given), then out = rmsnorm(x) * w; M rows of D. w: TX, or fp32 when wf32.
template <typename TX>
static void add_rmsnorm(TX* x, const TX* delta, const void* w, bool wf32, TX* out, int M, int D, float eps) {
    for (int m = 0; m < M; ++m) {
        TX* xr = x + (size_t)m * D;
        float ss = 0.f;
        for (int d = 0; d < D; ++d) {
            float v = load1(xr + d);
            if (delta) {
                v = round_like<TX>(v + load1(delta + (size_t)m * D + d));
                store1(xr + d, v);
            }
            ss += v * v;
        }
        const float r = 1.0f / std::sqrt(ss / D + eps);
        for (int d = 0; d < D; ++d) store1(out + (size_t)m * D + d, norm_mul<TX>(w, wf32, d, load1(xr + d) * r));
    }
}

// out = silu(g) * u, the gated MLP's activation.
template <typename TX>
static void silu_mul(const TX* g, const TX* u, TX* out, long n) {
    for (long i = 0; i < n; ++i) {
        const float a = load1(g + i);
        store1(out + i, round_like<TX>(a / (1.0f + std::exp(-a))) * load1(u + i));
    }
}

// out = gelu_tanh(g) * u (GeGLU, Gemma's MLP): gelu_tanh(a) = a/2 * (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3))).
template <typename TX>
static void gelu_tanh_mul(const TX* g, const TX* u, TX* out, long n) {
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    for (long i = 0; i < n; ++i) {
        const float a = load1(g + i);
        const float gelu = 0.5f * a * (1.0f + std::tanh(c * (a + 0.044715f * a * a * a)));
        store1(out + i, round_like<TX>(gelu) * load1(u + i));
    }
}

enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

// The gated MLP's activation `act` (ACT_*): out = act(g) * u.
template <typename TX>
static void gated_act(int act, const TX* g, const TX* u, TX* out, long n) {
    if (act == ACT_GELU_TANH) gelu_tanh_mul<TX>(g, u, out, n);
    else silu_mul<TX>(g, u, out, n);
}

// In place on one head vector (fp32): optional per-head RMSNorm, then RoPE (rotate-half form).
template <typename TX>
static void norm_rope(float* v, int D, const void* nw, bool wf32, float eps, const TX* cos, const TX* sin_signed,
                      float* tmp) {
    if (nw) {
        float ss = 0.f;
        for (int d = 0; d < D; ++d) ss += v[d] * v[d];
        const float r = 1.0f / std::sqrt(ss / D + eps);
        for (int d = 0; d < D; ++d) v[d] = round_like<TX>(norm_mul<TX>(nw, wf32, d, v[d] * r));
    }
    const int half = D / 2;
    for (int d = 0; d < D; ++d) tmp[d] = v[(d + half) % D];
    for (int d = 0; d < D; ++d)
        v[d] = round_like<TX>(round_like<TX>(v[d] * load1(cos + d)) + round_like<TX>(tmp[d] * load1(sin_signed + d)));
}

// One decode step of attention for B sequences at position pos, in two parts so threads can share
// it: kv_append(b, j) applies RoPE (and the per-head norm) to the new key of KV head j and writes key
// and value into the caches [B, KV, S, D]; attend_head(b, h) then attends query head h to the pos + 1
// cached keys of its KV head h / (H / KV), or to the last `window` of them when window > 0 (a sliding-window
// layer: key j is seen by query pos when pos - j < window). Scratch: 3 * D + pos + 1 floats.
template <typename TX>
static void kv_append(const TX* k, const TX* v, const void* kn_w, bool wf32, float eps, const TX* cos,
                      const TX* sin_signed,
                      TX* kc, TX* vc, int b, int j, int KV, int D, int S, int pos, float* scratch) {
    float *kv = scratch, *tmp = scratch + D;
    const size_t src = ((size_t)b * KV + j) * D, dst = (((size_t)b * KV + j) * S + pos) * D;
    for (int d = 0; d < D; ++d) kv[d] = load1(k + src + d);
    norm_rope<TX>(kv, D, kn_w, wf32, eps, cos, sin_signed, tmp);
    for (int d = 0; d < D; ++d) {
        store1(kc + dst + d, kv[d]);
        store1(vc + dst + d, load1(v + src + d));
    }
}

template <typename TX>
static void attend_head(const TX* q, const void* qn_w, bool wf32, float eps, const TX* cos, const TX* sin_signed,
                        const TX* kc,
                        const TX* vc, TX* out, int b, int h, int H, int KV, int D, int S, int pos, float scale,
                        int window, float* scratch) {
    const int first = window > 0 && pos + 1 > window ? pos + 1 - window : 0;
    const int L = pos + 1 - first, G = H / KV;
    float *qh = scratch, *t = scratch + D, *acc = scratch + 2 * D, *p = scratch + 3 * D;
    const size_t bh = (size_t)b * H + h;
    for (int d = 0; d < D; ++d) qh[d] = load1(q + bh * D + d);
    norm_rope<TX>(qh, D, qn_w, wf32, eps, cos, sin_signed, t);
    const TX* kb = kc + (((size_t)b * KV + h / G) * S + first) * D;
    const TX* vb = vc + (((size_t)b * KV + h / G) * S + first) * D;
    float mx = -INFINITY;
    for (int j = 0; j < L; ++j) {
        p[j] = dot1(kb + (size_t)j * D, qh, D) * scale;
        mx = p[j] > mx ? p[j] : mx;
    }
    float sum = 0.f;
    for (int j = 0; j < L; ++j) sum += (p[j] = std::exp(p[j] - mx));
    const float inv = 1.0f / sum;
    for (int d = 0; d < D; ++d) acc[d] = 0.f;
    for (int j = 0; j < L; ++j) {
        const float pj = p[j] * inv;
        const TX* vr = vb + (size_t)j * D;
        for (int d = 0; d < D; ++d) acc[d] += pj * load1(vr + d);
    }
    for (int d = 0; d < D; ++d) store1(out + bh * D + d, acc[d]);
}

template <typename TX>
static void attn_decode(const TX* q, const TX* k, const TX* v, const void* qn_w, const void* kn_w, bool wf32, float eps,
                        const TX* cos, const TX* sin_signed, TX* kc, TX* vc, TX* out, int B, int H, int KV, int D,
                        int S, int pos, float scale, int window, int nthreads) {
    std::vector<float> scratch(3 * D + pos + 1);
    for (int b = 0; b < B; ++b)
        for (int j = 0; j < KV; ++j) kv_append<TX>(k, v, kn_w, wf32, eps, cos, sin_signed, kc, vc, b, j, KV, D, S, pos,
                                                   scratch.data());
    const long work = (long)B * H * (pos + 1) * D;
#pragma omp parallel num_threads(work > (1 << 16) ? nthreads : 1)
    {
        std::vector<float> mine(3 * D + pos + 1);
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; ++bh)
            attend_head<TX>(q, qn_w, wf32, eps, cos, sin_signed, kc, vc, out, bh / H, bh % H, H, KV, D, S, pos, scale,
                            window, mine.data());
    }
}
