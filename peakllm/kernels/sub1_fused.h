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
// addresses, not arithmetic. Four accumulators take turns so the fp add latency is not the bound.
// Sums are taken word by word in column order (the gather path sums 8 interleaved lanes), so the two
// paths differ by fp32 rounding only (tests bound it by a few ulps of sum |w x|).
#pragma once
#include <cstdint>
#include <cstring>

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

// One row from sp (advanced past it): s = signed sum, a = plain sum (asymmetric scales only).
template <typename SymT, int K, bool SYM>
inline void fused_row(const SymT*& sp, const uint16_t* tab, const float* xb, int64_t in, float& s, float& a) {
    constexpr int W = fused_width(K);
    const int64_t end = 3 * in;
    int64_t c = 0;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#define PEAK_SUB1_STEP(S, A)                                                  \
    {                                                                         \
        const uint16_t* e = tab + W * (size_t)next_sym(sp);                   \
        if (SYM) {                                                            \
            const float* xc = xb + c;                                         \
            float v = xc[e[1]];                                               \
            for (int k = 1; k < K; k++) v += xc[e[1 + k]];                    \
            S += v;                                                           \
        } else {                                                              \
            const float* xc = xb + 2 * c;                                     \
            float v = xc[2 * e[1]], w = xc[2 * e[1] + 1];                     \
            for (int k = 1; k < K; k++) v += xc[2 * e[1 + k]], w += xc[2 * e[1 + k] + 1]; \
            S += v;                                                           \
            A += w;                                                           \
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
    s = (s0 + s1) + (s2 + s3);
    a = SYM ? 0.f : (a0 + a1) + (a2 + a3);
}

// Rows [r0, r1) of y, one group per row, batch 1; sp points at row r0's first symbol. xb: fused_prepare'd x.
template <typename SymT, int K, bool SYM>
inline void fused_rows(const SymT* sp, const uint16_t* tab, const float* xb, int64_t in, const float* scale_pos,
                       const float* scale_neg, float* y, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        float s, a;
        fused_row<SymT, K, SYM>(sp, tab, xb, in, s, a);
        const float p = scale_pos[r], q = SYM ? p : scale_neg[r];
        y[r] = SYM ? p * s : 0.5f * (p + q) * s + 0.5f * (p - q) * a;
    }
}

// The same, K chosen at run time (the dictionary's largest nonzero count, 1..6).
template <typename SymT, bool SYM>
inline void fused_rows_k(int64_t K, const SymT* sp, const uint16_t* tab, const float* xb, int64_t in,
                         const float* spos, const float* sneg, float* y, int64_t r0, int64_t r1) {
    switch (K) {
        case 1: fused_rows<SymT, 1, SYM>(sp, tab, xb, in, spos, sneg, y, r0, r1); break;
        case 2: fused_rows<SymT, 2, SYM>(sp, tab, xb, in, spos, sneg, y, r0, r1); break;
        case 3: fused_rows<SymT, 3, SYM>(sp, tab, xb, in, spos, sneg, y, r0, r1); break;
        case 4: fused_rows<SymT, 4, SYM>(sp, tab, xb, in, spos, sneg, y, r0, r1); break;
        case 5: fused_rows<SymT, 5, SYM>(sp, tab, xb, in, spos, sneg, y, r0, r1); break;
        default: fused_rows<SymT, 6, SYM>(sp, tab, xb, in, spos, sneg, y, r0, r1); break;
    }
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
