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
// (add_rmsnorm_<x>, silu_mul_<x>, attn_decode_<x>, decode_layer_<w>w_<x>x); read_sum_f32.

#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef uint16_t bf16_t;

static inline float bf16_to_f32(bf16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

static inline bf16_t f32_to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((bits >> 16) | 0x40);  // keep NaN a NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even, as torch does
    return (bf16_t)(bits >> 16);
}

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

template <typename TW, typename TX>
static void dense(const TX* x, const TW* W, const float* bias, TX* y, int M, int N, int K, int nthreads) {
    // Widen x to fp32 once; M*K is small on the decode path (M = batch).
    static thread_local std::vector<float> xbuf;
    const float* xf;
    if constexpr (sizeof(TX) == sizeof(float)) {
        xf = (const float*)x;
    } else {
        xbuf.resize((size_t)M * K);
        for (size_t i = 0; i < (size_t)M * K; ++i) xbuf[i] = load1(x + i);
        xf = xbuf.data();
    }
#ifdef PEAK_BF16_PAIRS
    constexpr bool pairs = sizeof(TW) == 2;
    static thread_local std::vector<float> xpbuf;
    if constexpr (pairs) {
        xpbuf.resize((size_t)M * K);
        for (int m = 0; m < M; ++m) split_pairs(xf + (size_t)m * K, xpbuf.data() + (size_t)m * K, K);
        xf = xpbuf.data();
    }
#else
    constexpr bool pairs = false;
#endif
    const int nblocks = (N + 3) / 4;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > nblocks) nthreads = nblocks;
#pragma omp parallel num_threads(nthreads)
    {
        // Contiguous bands of 4-row blocks: one forward stream through W per thread.
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int b0 = (int)((long)nblocks * t / nt), b1 = (int)((long)nblocks * (t + 1) / nt);
        float acc[4];
        for (int b = b0; b < b1; ++b) {
            const int n = 4 * b;
            if (n + 4 <= N) {
                for (int m = 0; m < M; ++m) {
                    dot4x<pairs>(W + (size_t)n * K, (size_t)K, xf + (size_t)m * K, K, acc);
                    for (int r = 0; r < 4; ++r)
                        store1(y + (size_t)m * N + n + r, acc[r] + (bias ? bias[n + r] : 0.f));
                }
            } else {
                for (int m = 0; m < M; ++m)
                    for (int r = n; r < N; ++r)
                        store1(y + (size_t)m * N + r,
                               dot1x<pairs>(W + (size_t)r * K, xf + (size_t)m * K, K) + (bias ? bias[r] : 0.f));
            }
        }
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

// x += delta (when delta is given), then out = rmsnorm(x) * w; M rows of D.
template <typename TX>
static void add_rmsnorm(TX* x, const TX* delta, const TX* w, TX* out, int M, int D, float eps) {
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
        for (int d = 0; d < D; ++d) store1(out + (size_t)m * D + d, load1(w + d) * round_like<TX>(load1(xr + d) * r));
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

// In place on one head vector (fp32): optional per-head RMSNorm, then RoPE (rotate-half form).
template <typename TX>
static void norm_rope(float* v, int D, const TX* nw, float eps, const TX* cos, const TX* sin_signed, float* tmp) {
    if (nw) {
        float ss = 0.f;
        for (int d = 0; d < D; ++d) ss += v[d] * v[d];
        const float r = 1.0f / std::sqrt(ss / D + eps);
        for (int d = 0; d < D; ++d) v[d] = round_like<TX>(load1(nw + d) * round_like<TX>(v[d] * r));
    }
    const int half = D / 2;
    for (int d = 0; d < D; ++d) tmp[d] = v[(d + half) % D];
    for (int d = 0; d < D; ++d)
        v[d] = round_like<TX>(round_like<TX>(v[d] * load1(cos + d)) + round_like<TX>(tmp[d] * load1(sin_signed + d)));
}

// One decode step of attention for B sequences at position pos: RoPE on q and the new k, append
// k and v to the cache [B, KV, S, D], attend each of the H query heads to the pos + 1 cached keys
// of its KV head (head h uses KV head h / (H / KV)).
template <typename TX>
static void attn_decode(const TX* q, const TX* k, const TX* v, const TX* qn_w, const TX* kn_w, float eps,
                        const TX* cos, const TX* sin_signed, TX* kc, TX* vc, TX* out, int B, int H, int KV, int D,
                        int S, int pos, float scale, int nthreads) {
    const int L = pos + 1, G = H / KV;
    std::vector<float> tmp(D), kv(D);
    for (int b = 0; b < B; ++b)
        for (int j = 0; j < KV; ++j) {
            const size_t src = ((size_t)b * KV + j) * D, dst = (((size_t)b * KV + j) * S + pos) * D;
            for (int d = 0; d < D; ++d) kv[d] = load1(k + src + d);
            norm_rope<TX>(kv.data(), D, kn_w, eps, cos, sin_signed, tmp.data());
            for (int d = 0; d < D; ++d) {
                store1(kc + dst + d, kv[d]);
                store1(vc + dst + d, load1(v + src + d));
            }
        }
    const long work = (long)B * H * L * D;
#pragma omp parallel num_threads(work > (1 << 16) ? nthreads : 1)
    {
        std::vector<float> qh(D), t(D), acc(D), p(L);
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; ++bh) {
            const int b = bh / H, h = bh % H;
            for (int d = 0; d < D; ++d) qh[d] = load1(q + (size_t)bh * D + d);
            norm_rope<TX>(qh.data(), D, qn_w, eps, cos, sin_signed, t.data());
            const TX* kb = kc + ((size_t)b * KV + h / G) * S * D;
            const TX* vb = vc + ((size_t)b * KV + h / G) * S * D;
            float mx = -INFINITY;
            for (int j = 0; j < L; ++j) {
                p[j] = dot1(kb + (size_t)j * D, qh.data(), D) * scale;
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
            for (int d = 0; d < D; ++d) store1(out + (size_t)bh * D + d, acc[d]);
        }
    }
}

// A whole decoder layer for one token per sequence when all seven linears are dense: one call from
// Python per layer instead of a dozen (at 135M parameters the per-call cost is a visible share of a
// token's time). x [B, dim] is the residual stream (updated in place); h [B, dim] holds
// attn_norm(x) on entry and next_norm(x) on return, the input of the next layer (or the lm_head).
struct LayerDesc {
    const void *wq, *wk, *wv, *wo, *wg, *wu, *wd;
    const float *bq, *bk, *bv, *bo, *bg, *bu, *bd;
    const void *mlp_norm, *next_norm, *qn, *kn;
    void *kc, *vc;
    int dim, n_heads, n_kv, head_dim, inter, max_seq;
    float eps, next_eps, qk_eps, scale;
};

template <typename TW, typename TX>
static void decode_layer(const LayerDesc* L, TX* x, TX* h, int B, int pos, const TX* cos, const TX* sin_signed,
                         int nt) {
    const int dim = L->dim, qd = L->n_heads * L->head_dim, kvd = L->n_kv * L->head_dim, I = L->inter;
    static thread_local std::vector<TX> scratch;
    scratch.resize((size_t)B * (2 * qd + 2 * kvd + 2 * dim + 3 * I));
    TX *q = scratch.data(), *k = q + (size_t)B * qd, *v = k + (size_t)B * kvd, *a = v + (size_t)B * kvd;
    TX *o = a + (size_t)B * qd, *g = o + (size_t)B * dim, *u = g + (size_t)B * I, *act = u + (size_t)B * I;
    TX* d = act + (size_t)B * I;
    dense<TW, TX>(h, (const TW*)L->wq, L->bq, q, B, qd, dim, nt);
    dense<TW, TX>(h, (const TW*)L->wk, L->bk, k, B, kvd, dim, nt);
    dense<TW, TX>(h, (const TW*)L->wv, L->bv, v, B, kvd, dim, nt);
    attn_decode<TX>(q, k, v, (const TX*)L->qn, (const TX*)L->kn, L->qk_eps, cos, sin_signed, (TX*)L->kc,
                    (TX*)L->vc, a, B, L->n_heads, L->n_kv, L->head_dim, L->max_seq, pos, L->scale, nt);
    dense<TW, TX>(a, (const TW*)L->wo, L->bo, o, B, dim, qd, nt);
    add_rmsnorm<TX>(x, o, (const TX*)L->mlp_norm, h, B, dim, L->eps);
    dense<TW, TX>(h, (const TW*)L->wg, L->bg, g, B, I, dim, nt);
    dense<TW, TX>(h, (const TW*)L->wu, L->bu, u, B, I, dim, nt);
    silu_mul<TX>(g, u, act, (long)B * I);
    dense<TW, TX>(act, (const TW*)L->wd, L->bd, d, B, dim, I, nt);
    add_rmsnorm<TX>(x, d, (const TX*)L->next_norm, h, B, dim, L->next_eps);
}

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
// share of the concatenated bytes, in 64-byte lines.
unsigned long long read_buffers(const unsigned char* const* ptrs, const long* sizes, int n, int nthreads) {
    long total = 0;
    for (int i = 0; i < n; ++i) total += sizes[i];
    unsigned long long result = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : result)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const long lo = total / 64 * t / nt * 64, hi = t + 1 == nt ? total : total / 64 * (t + 1) / nt * 64;
        long start = 0;
        unsigned long long acc = 0;
#if defined(__AVX2__)
        __m256i v0 = _mm256_setzero_si256(), v1 = _mm256_setzero_si256();
#endif
        for (int i = 0; i < n; ++i) {
            const long b0 = lo > start ? lo - start : 0, b1 = hi - start < sizes[i] ? hi - start : sizes[i];
            const unsigned char* p = ptrs[i];
            long j = b0;
#if defined(__AVX2__)
            for (; j + 64 <= b1; j += 64) {
                v0 = _mm256_or_si256(v0, _mm256_loadu_si256((const __m256i*)(p + j)));
                v1 = _mm256_or_si256(v1, _mm256_loadu_si256((const __m256i*)(p + j + 32)));
            }
#endif
            for (; j < b1; ++j) acc |= p[j];
            start += sizes[i];
        }
#if defined(__AVX2__)
        alignas(32) unsigned long long lanes[4];
        _mm256_store_si256((__m256i*)lanes, _mm256_or_si256(v0, v1));
        acc |= lanes[0] | lanes[1] | lanes[2] | lanes[3];
#endif
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
    void add_rmsnorm_##S(X* x, const X* delta, const X* w, X* out, int M, int D, float eps) {         \
        add_rmsnorm<X>(x, delta, w, out, M, D, eps);                                                  \
    }                                                                                                 \
    void silu_mul_##S(const X* g, const X* u, X* out, long n) { silu_mul<X>(g, u, out, n); }          \
    void attn_decode_##S(const X* q, const X* k, const X* v, const X* qn_w, const X* kn_w, float eps, \
                         const X* cos, const X* sin_signed, X* kc, X* vc, X* out, int B, int H, int KV, \
                         int D, int S, int pos, float scale, int nthreads) {                          \
        attn_decode<X>(q, k, v, qn_w, kn_w, eps, cos, sin_signed, kc, vc, out, B, H, KV, D, S, pos,   \
                       scale, nthreads);                                                              \
    }
DECODE_EXPORTS(float, f32)
DECODE_EXPORTS(bf16_t, bf16)
#define LAYER_EXPORT(W, X, WS, XS)                                                                    \
    void decode_layer_##WS##w_##XS##x(const LayerDesc* L, X* x, X* h, int B, int pos, const X* cos,  \
                                       const X* sin_signed, int nt) {                                \
        decode_layer<W, X>(L, x, h, B, pos, cos, sin_signed, nt);                                     \
    }
LAYER_EXPORT(float, float, f32, f32)
LAYER_EXPORT(bf16_t, float, bf16, f32)
LAYER_EXPORT(float, bf16_t, f32, bf16)
LAYER_EXPORT(bf16_t, bf16_t, bf16, bf16)
}
