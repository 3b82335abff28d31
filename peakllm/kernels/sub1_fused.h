// The sub-1-bit kernel's fused batch-1 path (included by sub1_impl.h, namespace sub1k): one table lookup
// and K plain loads per symbol, no per-nonzero buffer, no gather.
//
// The activations are laid out once per call as three floats per column, xb[3c + s] = {x[c], -x[c], 0}
// (asymmetric scales: three float pairs, {(x, x), (-x, x), (0, 0)}, giving the signed and the plain sum
// at once). A dictionary word then becomes a fixed-size entry of uint16: [3 len, 3 pos_k + s_k for k < K]
// where s_k is 0 (+), 1 (-) or 2 (unused slot: reads the zero) and K is the dictionary's largest nonzero
// count (at most NZ_MAX = 6; 1-3 for the QMoE-like 85-97% zeros). Decoding a row is then, per symbol,
//     v = xb[c3 + off_0] + ... + xb[c3 + off_{K-1}];  acc += v;  c3 += len3
// with no branch on the data except the row end, and no write: the word's signs and its empty slots are
// addresses, not arithmetic. Accumulators take turns so the fp add latency is not the bound, and the
// matvec runs one row of each of two blocks in lockstep (two independent chains).
// Sums are taken word by word in column order (the gather path sums 8 interleaved lanes), so the two
// paths differ by fp32 rounding only (tests bound it by a few ulps of sum |w x|).
#pragma once
#include <cstdint>
#include <algorithm>
#include <cstring>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

namespace sub1k {

constexpr int fused_width(int K) { return K <= 3 ? 4 : 8; }  // uint16 per entry: [len3, K offsets, pad]

template <bool SYM>
constexpr int64_t fused_xb_floats(int64_t in) { return (SYM ? 3 : 6) * in + 8; }

template <bool SYM>
inline void fused_prepare(const float* x, int64_t in, float* xb) {
    for (int64_t c = 0; c < in; c++) {
        const float v = x[c];
        if (SYM) {
            xb[3 * c] = v;
            xb[3 * c + 1] = -v;
            xb[3 * c + 2] = 0.f;
        } else {
            float* p = xb + 6 * c;
            p[0] = v, p[1] = v, p[2] = -v, p[3] = v, p[4] = 0.f, p[5] = 0.f;
        }
    }
}

template <typename SymT>
inline uint32_t next_sym(const SymT*& sp) {
    SymT s;
    std::memcpy(&s, sp++, sizeof(SymT));  // 16-bit symbols need not be aligned in the stream
    return s;
}

// 16-bit dictionaries (2^16 entries, 0.5-1 MiB) miss the cache on most symbols, so the entry of the
// symbol PF_AHEAD places on is prefetched; `lim` (the block's last symbol) keeps the peek inside the stream.
constexpr int PF_AHEAD = 12;
template <typename SymT, int W>
inline void prefetch_ahead(const SymT* sp, const SymT* lim, const uint16_t* tab) {
    if constexpr (sizeof(SymT) == 2) {
        const SymT* q = sp + PF_AHEAD < lim ? sp + PF_AHEAD : lim;
        SymT s;
        std::memcpy(&s, q, sizeof(SymT));
        __builtin_prefetch(tab + W * (size_t)s);
    }
}

// Asymmetric scales: xb holds (signed, plain) pairs; one 8-byte load per slot gives both.
#ifdef __SSE2__
template <int K>
inline void pair_add(const float* xc, const uint16_t* e, __m128& S) {
    __m128 v = _mm_castpd_ps(_mm_load_sd((const double*)(xc + 2 * e[1])));
    for (int k = 1; k < K; k++) v = _mm_add_ps(v, _mm_castpd_ps(_mm_load_sd((const double*)(xc + 2 * e[1 + k]))));
    S = _mm_add_ps(S, v);
}
using PairAcc = __m128;
inline PairAcc pair_zero() { return _mm_setzero_ps(); }
inline float pair_lo(PairAcc v) { return _mm_cvtss_f32(v); }
inline float pair_hi(PairAcc v) { return _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)); }
#else
struct PairAcc {
    float s, a;
};
template <int K>
inline void pair_add(const float* xc, const uint16_t* e, PairAcc& S) {
    float v = xc[2 * e[1]], w = xc[2 * e[1] + 1];
    for (int k = 1; k < K; k++) v += xc[2 * e[1 + k]], w += xc[2 * e[1 + k] + 1];
    S.s += v, S.a += w;
}
inline PairAcc pair_zero() { return PairAcc{0.f, 0.f}; }
inline float pair_lo(PairAcc v) { return v.s; }
inline float pair_hi(PairAcc v) { return v.a; }
#endif

// One row from sp (advanced past it): s = signed sum, a = plain sum (asymmetric scales only).
template <typename SymT, int K, bool SYM>
inline void fused_row(const SymT*& sp, const SymT* lim, const uint16_t* tab, const float* xb, int64_t in, float& s,
                      float& a) {
    constexpr int W = fused_width(K);
    const int64_t end = 3 * in;
    int64_t c = 0;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    PairAcc a0 = pair_zero(), a1 = pair_zero(), a2 = pair_zero(), a3 = pair_zero();
#define PEAK_SUB1_STEP(S, A)                                                  \
    {                                                                         \
        prefetch_ahead<SymT, W>(sp, lim, tab);                                \
        const uint16_t* e = tab + W * (size_t)next_sym(sp);                   \
        if constexpr (SYM) {                                                  \
            const float* xc = xb + c;                                         \
            float v = xc[e[1]];                                               \
            for (int k = 1; k < K; k++) v += xc[e[1 + k]];                    \
            S += v;                                                           \
        } else {                                                              \
            pair_add<K>(xb + 2 * c, e, A);                                    \
        }                                                                     \
        c += e[0];                                                            \
        if (c >= end) break;                                                  \
    }
    for (;;) {
        PEAK_SUB1_STEP(s0, a0)
        PEAK_SUB1_STEP(s1, a1)
        PEAK_SUB1_STEP(s2, a2)
        PEAK_SUB1_STEP(s3, a3)
    }
#undef PEAK_SUB1_STEP
    if constexpr (SYM) {
        s = (s0 + s1) + (s2 + s3), a = 0.f;
    } else {
        s = (pair_lo(a0) + pair_lo(a1)) + (pair_lo(a2) + pair_lo(a3));
        a = (pair_hi(a0) + pair_hi(a1)) + (pair_hi(a2) + pair_hi(a3));
    }
}

// Rows [r0, r1) of y, one group per row, batch 1; sp points at row r0's first symbol. xb: fused_prepare'd x.
template <typename SymT, int K, bool SYM>
inline void fused_rows(const SymT* sp, const SymT* lim, const uint16_t* tab, const float* xb, int64_t in,
                       const float* scale_pos, const float* scale_neg, float* y, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        float s, a;
        fused_row<SymT, K, SYM>(sp, lim, tab, xb, in, s, a);
        const float p = scale_pos[r], q = SYM ? p : scale_neg[r];
        y[r] = SYM ? p * s : 0.5f * (p + q) * s + 0.5f * (p - q) * a;
    }
}

// Two rows from different blocks in lockstep (two independent decode chains: on large matrices, whose x
// copy lives in L2, one row alone leaves the core waiting on loads). Same sums as fused_row, per row.
template <typename SymT, int K, bool SYM>
inline void fused_row2(const SymT*& pa, const SymT*& pb, const SymT* palim, const SymT* pblim, const uint16_t* tab,
                       const float* xb, int64_t in, float* s, float* a) {
    constexpr int W = fused_width(K);
    const int64_t end = 3 * in;
    int64_t ca = 0, cb = 0;
    float sa0 = 0.f, sa1 = 0.f, sb0 = 0.f, sb1 = 0.f;
    PairAcc aa0 = pair_zero(), aa1 = pair_zero(), ab0 = pair_zero(), ab1 = pair_zero();
#define PEAK_SUB1_STEP(P, C, S, A)                                            \
    {                                                                         \
        prefetch_ahead<SymT, W>(P, P##lim, tab);                              \
        const uint16_t* e = tab + W * (size_t)next_sym(P);                    \
        if constexpr (SYM) {                                                  \
            const float* xc = xb + C;                                         \
            float v = xc[e[1]];                                               \
            for (int k = 1; k < K; k++) v += xc[e[1 + k]];                    \
            S += v;                                                           \
        } else {                                                              \
            pair_add<K>(xb + 2 * C, e, A);                                    \
        }                                                                     \
        C += e[0];                                                            \
    }
    for (;;) {
        PEAK_SUB1_STEP(pa, ca, sa0, aa0)
        PEAK_SUB1_STEP(pb, cb, sb0, ab0)
        if (ca >= end || cb >= end) break;
        PEAK_SUB1_STEP(pa, ca, sa1, aa1)
        PEAK_SUB1_STEP(pb, cb, sb1, ab1)
        if (ca >= end || cb >= end) break;
    }
    while (ca < end) PEAK_SUB1_STEP(pa, ca, sa0, aa0)
    while (cb < end) PEAK_SUB1_STEP(pb, cb, sb0, ab0)
#undef PEAK_SUB1_STEP
    if constexpr (SYM) {
        s[0] = sa0 + sa1, s[1] = sb0 + sb1, a[0] = a[1] = 0.f;
    } else {
        s[0] = pair_lo(aa0) + pair_lo(aa1), s[1] = pair_lo(ab0) + pair_lo(ab1);
        a[0] = pair_hi(aa0) + pair_hi(aa1), a[1] = pair_hi(ab0) + pair_hi(ab1);
    }
}

// Rows [ra, ra + n) and [rb, rb + n) of y (two blocks' rows, paired), as fused_rows.
template <typename SymT, int K, bool SYM>
inline void fused_rows2(const SymT* pa, const SymT* pb, const SymT* la, const SymT* lb, const uint16_t* tab,
                        const float* xb, int64_t in, const float* scale_pos, const float* scale_neg, float* y,
                        int64_t ra, int64_t rb, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float s[2], a[2];
        fused_row2<SymT, K, SYM>(pa, pb, la, lb, tab, xb, in, s, a);
        for (int j = 0; j < 2; j++) {
            const int64_t r = (j ? rb : ra) + i;
            const float p = scale_pos[r], q = SYM ? p : scale_neg[r];
            y[r] = SYM ? p * s[j] : 0.5f * (p + q) * s[j] + 0.5f * (p - q) * a[j];
        }
    }
}

// Blocks b0 and b0 + 1 (if any) of a matrix, rows paired where both blocks have them.
template <typename SymT, int K, bool SYM>
inline void fused_block_pair(const SymT* stream, const int32_t* block_offsets, int64_t block_rows, int64_t out,
                             int64_t b0, const uint16_t* tab, const float* xb, int64_t in, const float* scale_pos,
                             const float* scale_neg, float* y) {
    const int64_t ra = b0 * block_rows, rb = ra + block_rows;
    const SymT* pa = stream + block_offsets[b0];
    const SymT* la = stream + block_offsets[b0 + 1] - 1;
    if (rb >= out) {
        fused_rows<SymT, K, SYM>(pa, la, tab, xb, in, scale_pos, scale_neg, y, ra, out);
        return;
    }
    const int64_t nb = std::min(out, rb + block_rows) - rb;  // the second block may be the short last one
    const SymT* lb = stream + block_offsets[b0 + 2] - 1;
    fused_rows2<SymT, K, SYM>(pa, stream + block_offsets[b0 + 1], la, lb, tab, xb, in, scale_pos, scale_neg, y, ra,
                              rb, nb);
    if (nb < block_rows) {
        for (int64_t i = 0; i < nb; i++) {  // step the first block's stream past the rows already done
            float s, a;
            fused_row<SymT, K, SYM>(pa, la, tab, xb, in, s, a);
        }
        fused_rows<SymT, K, SYM>(pa, la, tab, xb, in, scale_pos, scale_neg, y, ra + nb, rb);
    }
}

// The same, K chosen at run time (the dictionary's largest nonzero count, 1..6).
template <typename SymT, bool SYM>
inline void fused_rows_k(int64_t K, const SymT* sp, const SymT* lim, const uint16_t* tab, const float* xb, int64_t in,
                         const float* spos, const float* sneg, float* y, int64_t r0, int64_t r1) {
    switch (K) {
        case 1: fused_rows<SymT, 1, SYM>(sp, lim, tab, xb, in, spos, sneg, y, r0, r1); break;
        case 2: fused_rows<SymT, 2, SYM>(sp, lim, tab, xb, in, spos, sneg, y, r0, r1); break;
        case 3: fused_rows<SymT, 3, SYM>(sp, lim, tab, xb, in, spos, sneg, y, r0, r1); break;
        case 4: fused_rows<SymT, 4, SYM>(sp, lim, tab, xb, in, spos, sneg, y, r0, r1); break;
        case 5: fused_rows<SymT, 5, SYM>(sp, lim, tab, xb, in, spos, sneg, y, r0, r1); break;
        default: fused_rows<SymT, 6, SYM>(sp, lim, tab, xb, in, spos, sneg, y, r0, r1); break;
    }
}

// fused_block_pair with K chosen at run time.
template <typename SymT, bool SYM>
inline void fused_block_pair_k(int64_t K, const SymT* stream, const int32_t* block_offsets, int64_t block_rows,
                               int64_t out, int64_t b0, const uint16_t* tab, const float* xb, int64_t in,
                               const float* spos, const float* sneg, float* y) {
#define PEAK_SUB1_PAIR(KK) \
    fused_block_pair<SymT, KK, SYM>(stream, block_offsets, block_rows, out, b0, tab, xb, in, spos, sneg, y)
    switch (K) {
        case 1: PEAK_SUB1_PAIR(1); break;
        case 2: PEAK_SUB1_PAIR(2); break;
        case 3: PEAK_SUB1_PAIR(3); break;
        case 4: PEAK_SUB1_PAIR(4); break;
        case 5: PEAK_SUB1_PAIR(5); break;
        default: PEAK_SUB1_PAIR(6); break;
    }
#undef PEAK_SUB1_PAIR
}

// Step sp past n rows without summing (the decode engine's rows of a block before its band).
template <typename SymT>
inline void fused_skip_rows_k(int64_t K, const SymT*& sp, const uint16_t* tab, int64_t in, int64_t n) {
    const int W = K <= 3 ? fused_width(3) : fused_width(6);
    const int64_t end = 3 * in;
    for (int64_t r = 0; r < n; r++)
        for (int64_t c = 0; c < end;) c += tab[W * (size_t)next_sym(sp)];
}

}  // namespace sub1k
