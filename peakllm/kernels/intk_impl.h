// Group-wise int-k (k = 2, 3, 4, 8) matvec building blocks, shared by intk.cpp (the standalone op)
// and decode.cpp (the whole-step decode engine). See intk.cpp for the layout and the arithmetic.
#pragma once
#include <cstdint>
#include <cstring>
#include "common.h"

#include <algorithm>
#include <vector>

enum { BLOCK = 32 };

// Lane order of the SIMD decoders: lane i of the 32 decoded values is column order<bits>(i) of the block.
static int block_order(int bits, int i) {
    int k = i / 8, j = i % 8;
    switch (bits) {
        case 4: return (k >> 1) * 16 + (k & 1) + 2 * j;          // bytes 0-7 lo, hi; bytes 8-15 lo, hi
        case 2: return 4 * j + k;                                // shift k of byte j
        case 3: return 8 * (j & 3) + 2 * k + (j >> 2);           // triple j&3, code 2k + (j>>2)
        default: return i;                                       // int8: natural order
    }
}

#ifdef PEAK_AVX2
template <int BITS>
static inline void decode32(const uint8_t* p, __m256 w[4]) {
    if constexpr (BITS == 8) {
        for (int k = 0; k < 4; k++)
            w[k] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * k))));
    } else if constexpr (BITS == 4) {
        // one byte per 32-bit lane: the low nibble is the even column, the high nibble the odd one
        const __m256i m = _mm256_set1_epi32(0x0f);
        __m256i d0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
        __m256i d1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
        w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(d0, m));
        w[1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(d0, 4));
        w[2] = _mm256_cvtepi32_ps(_mm256_and_si256(d1, m));
        w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(d1, 4));
    } else if constexpr (BITS == 2) {
        const __m128i m = _mm_set1_epi8(0x03);
        __m128i v = _mm_loadl_epi64((const __m128i*)p);
        for (int k = 0; k < 4; k++)
            w[k] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 2 * k), m)));
    } else {  // 3 bits: four 24-bit triples of eight codes, one triple per 32-bit lane
        // reads 16 bytes of which 12 are the block's: the caller guarantees 4 more are readable
        __m128i v = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)p),
                                     _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
        __m256i t = _mm256_broadcastsi128_si256(v);
        const __m256i m = _mm256_set1_epi32(7);
        for (int k = 0; k < 4; k++) {
            __m256i sh = _mm256_setr_epi32(6 * k, 6 * k, 6 * k, 6 * k, 6 * k + 3, 6 * k + 3, 6 * k + 3, 6 * k + 3);
            w[k] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(t, sh), m));
        }
    }
}
#endif

#ifdef PEAK_AVX2
// Block at column c of row q; for 3 bits near the end of the tensor, a copy with 4 readable spare bytes.
template <int BITS>
static inline const uint8_t* block_at(const uint8_t* q, int64_t c, const uint8_t* end, uint8_t* spare) {
    const uint8_t* p = q + ((c * BITS) >> 3);  // c >= 0: a shift, not a signed division
    if (BITS == 3 && p + 16 > end) {
        std::memset(spare, 0, 16);
        std::memcpy(spare, p, 12);
        return spare;
    }
    return p;
}
#endif

struct Problem {
    const uint8_t* qweight; const uint16_t* scales; const uint8_t* zeros; const int32_t* gstart;
    int64_t in, out, row_bytes; int bits, n_groups, B;
    const float* xp;    // [B, in] fp32, gathered by perm
    const float* xblk;  // [B, in] the same, reordered inside whole 32-column blocks to the decoder's lanes
    const float* xsum;  // [B, n_groups]
    float* y;           // [B, out]
};

// Rows b0..b0+NB-1 of y for output feature o.
template <int BITS, int NB>
static void tile(const Problem& P, int64_t o, int b0) {
    const uint8_t* q = P.qweight + o * P.row_bytes;
    const int64_t in = P.in;
    float corr[NB] = {0};
#ifdef PEAK_AVX2
    const uint8_t* end = P.qweight + P.out * P.row_bytes;
    uint8_t spare[16];
    __m256 tot[NB], vtot[4];  // vtot: four independent totals of the single-row path
    for (int b = 0; b < NB; b++) tot[b] = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) vtot[k] = _mm256_setzero_ps();
#endif
    for (int g = 0; g < P.n_groups; g++) {
        const int64_t a = P.gstart[g], e = P.gstart[g + 1];
        const float scale = f16_to_f32(P.scales[o * P.n_groups + g]);
        const float zero = (float)P.zeros[o * P.n_groups + g];
        float part[NB] = {0};  // scalar columns of this group: sum q * x
        int64_t c = a;
#ifdef PEAK_AVX2
        int64_t head = std::min(e, (a + BLOCK - 1) / BLOCK * BLOCK);
        for (; c < head; c++) {
            float qc = (float)code_at(q, c, BITS);
            for (int b = 0; b < NB; b++) part[b] += qc * P.xp[(b0 + b) * in + c];
        }
        if (c + BLOCK <= e) {
            if constexpr (NB == 1) {
                // one row of x: four independent chains, scale applied once per group
                __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
                const float* xr = P.xblk + b0 * in;
                for (; c + BLOCK <= e; c += BLOCK) {
                    __m256 w[4];
                    decode32<BITS>(block_at<BITS>(q, c, end, spare), w);
                    for (int k = 0; k < 4; k++) acc[k] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xr + c + 8 * k), acc[k]);
                }
                const __m256 vs = _mm256_set1_ps(scale);
                for (int k = 0; k < 4; k++) vtot[k] = _mm256_fmadd_ps(vs, acc[k], vtot[k]);
            } else {
                // several rows: scale folded into the decoded weights, which every row then reuses
                const __m256 vs = _mm256_set1_ps(scale);
                for (; c + BLOCK <= e; c += BLOCK) {
                    __m256 w[4];
                    decode32<BITS>(block_at<BITS>(q, c, end, spare), w);
                    for (int k = 0; k < 4; k++) w[k] = _mm256_mul_ps(w[k], vs);
                    for (int b = 0; b < NB; b++) {
                        const float* xr = P.xblk + (b0 + b) * in + c;
                        __m256 t0 = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xr), tot[b]);
                        __m256 t1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xr + 8));
                        t0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), t0);
                        t1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), t1);
                        tot[b] = _mm256_add_ps(t0, t1);
                    }
                }
            }
        }
#endif
        for (; c < e; c++) {
            float qc = (float)code_at(q, c, BITS);
            for (int b = 0; b < NB; b++) part[b] += qc * P.xp[(b0 + b) * in + c];
        }
        for (int b = 0; b < NB; b++) corr[b] += scale * (part[b] - zero * P.xsum[(b0 + b) * P.n_groups + g]);
    }
#ifdef PEAK_AVX2
    if constexpr (NB == 1) tot[0] = _mm256_add_ps(_mm256_add_ps(vtot[0], vtot[1]), _mm256_add_ps(vtot[2], vtot[3]));
#endif
    for (int b = 0; b < NB; b++) {
        float v = corr[b];
#ifdef PEAK_AVX2
        v += hsum(tot[b]);
#endif
        P.y[(b0 + b) * P.out + o] = v;
    }
}

// Thread-private prepared activations of one call: x gathered by perm (xp), reordered inside whole
// blocks to the decoder's lanes (xblk), and the sums of x over each group (xsum).
struct PreparedX {
    std::vector<float> xp, xblk, xsum;
};

// Fill `px` from x [B, in] (fp32 or bf16); gstart must already be checked (groups_ok).
static void intk_prepare(const void* x, int x_bf16, const int32_t* perm, int B, int64_t in, int bits,
                         const int32_t* gstart, int n_groups, PreparedX& px) {
    px.xp.resize(B * in);
    px.xblk.resize(B * in);
    px.xsum.assign((size_t)B * n_groups, 0.f);
    int order[BLOCK];
    for (int i = 0; i < BLOCK; i++) order[i] = block_order(bits, i);
    for (int b = 0; b < B; b++) {
        float* r = &px.xp[b * in];
        load_x_row(x, x_bf16, perm, in, b, r);
        float* rb = &px.xblk[b * in];
        int64_t c = 0;
        for (; c + BLOCK <= in; c += BLOCK)
            for (int i = 0; i < BLOCK; i++) rb[c + i] = r[c + order[i]];
        for (; c < in; c++) rb[c] = r[c];
        for (int g = 0; g < n_groups; g++) {
            float s = 0.f;
            for (int64_t j = gstart[g]; j < gstart[g + 1]; j++) s += r[j];
            px.xsum[b * n_groups + g] = s;
        }
    }
}

#ifdef PEAK_AVX2
// One row of x (decoding at batch 1) against 4 output features o..o+3 when every group is made of
// whole 32-column blocks: one load of x feeds the four rows, two accumulators per row hide the FMA
// latency, and the group's scale and zero point are applied once per group and row. At batch 1 the
// general `tile` spends more on per-row and per-group bookkeeping than on the weights (~5 G weights/s
// a core at 576 columns); this runs at about three times that.
template <int BITS>
static void tile4_b1(const Problem& P, int64_t o) {
    const uint8_t* q[4];
    for (int r = 0; r < 4; r++) q[r] = P.qweight + (o + r) * P.row_bytes;
    const uint8_t* end = P.qweight + P.out * P.row_bytes;
    uint8_t spare[16];
    __m256 tot[4];
    float corr[4] = {0.f, 0.f, 0.f, 0.f};
    for (int r = 0; r < 4; r++) tot[r] = _mm256_setzero_ps();
    const float* xr = P.xblk;
    for (int g = 0; g < P.n_groups; g++) {
        const int64_t a = P.gstart[g], e = P.gstart[g + 1];
        __m256 acc[4][2];
        for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t c = a; c < e; c += BLOCK) {
            const __m256 x0 = _mm256_loadu_ps(xr + c), x1 = _mm256_loadu_ps(xr + c + 8);
            const __m256 x2 = _mm256_loadu_ps(xr + c + 16), x3 = _mm256_loadu_ps(xr + c + 24);
            for (int r = 0; r < 4; r++) {
                __m256 w[4];
                decode32<BITS>(block_at<BITS>(q[r], c, end, spare), w);
                acc[r][0] = _mm256_fmadd_ps(w[0], x0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w[1], x1, acc[r][1]);
                acc[r][0] = _mm256_fmadd_ps(w[2], x2, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w[3], x3, acc[r][1]);
            }
        }
        for (int r = 0; r < 4; r++) {
            const int64_t i = (o + r) * P.n_groups + g;
            const float scale = f16_to_f32(P.scales[i]);
            tot[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_add_ps(acc[r][0], acc[r][1]), tot[r]);
            corr[r] -= scale * (float)P.zeros[i] * P.xsum[g];
        }
    }
    for (int r = 0; r < 4; r++) P.y[o + r] = hsum(tot[r]) + corr[r];
}
#endif

// Whether every group is a run of whole 32-column blocks (the layout tile4_b1 needs).
static inline bool blocks_aligned(const Problem& P) {
    for (int g = 0; g <= P.n_groups; g++)
        if (P.gstart[g] % BLOCK) return false;
    return true;
}

// Output features [o0, o1) of P.y for every row of x.
template <int BITS>
static void intk_rows(const Problem& P, int64_t o0, int64_t o1) {
    int64_t o = o0;
#ifdef PEAK_AVX2
    if (P.B == 1 && blocks_aligned(P))
        for (; o + 4 <= o1; o += 4) tile4_b1<BITS>(P, o);
#endif
    for (; o < o1; o++) {
        int b0 = 0;
        for (; b0 + MAX_TILE <= P.B; b0 += MAX_TILE) tile<BITS, MAX_TILE>(P, o, b0);
        switch (P.B - b0) {
            case 1: tile<BITS, 1>(P, o, b0); break;
            case 2: tile<BITS, 2>(P, o, b0); break;
            case 3: tile<BITS, 3>(P, o, b0); break;
            default: break;
        }
    }
}

static void intk_rows_any(const Problem& P, int64_t o0, int64_t o1) {
    switch (P.bits) {
        case 2: intk_rows<2>(P, o0, o1); break;
        case 3: intk_rows<3>(P, o0, o1); break;
        case 4: intk_rows<4>(P, o0, o1); break;
        default: intk_rows<8>(P, o0, o1); break;
    }
}

// Sizes read from tensors are checked before use, so bad inputs return an error instead of reading out of bounds.
static bool groups_ok(const int32_t* gstart, int n_groups, int64_t in) {
    if (n_groups < 1 || gstart[0] != 0 || gstart[n_groups] != in) return false;
    for (int g = 0; g < n_groups; g++)
        if (gstart[g + 1] < gstart[g]) return false;
    return true;
}
