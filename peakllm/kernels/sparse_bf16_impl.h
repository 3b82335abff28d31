// Batch-1 rows of the sparse layouts with bf16 kept values (the default `peakllm prune` writes), without
// lane-crossing shuffles: those were the limit of the generic paths in sparse_impl.h (two vpermps, a blend
// and a widening per 16 columns, on the one or two shuffle ports), not memory.
//
// Two bf16 values in a 32-bit lane become two fp32 values by integer ops alone: a left shift by 16 gives the
// lower (even) one, a mask of the upper half the odd one. So 16 kept values make two vectors of 8, and the
// activations they meet are rearranged once per call to match (`*_prepare_x`, a few KB, every row reuses it):
//  - 2:4: the kept values of a group of 4 columns are a pair, so the even vector holds the first kept value of
//    8 groups (32 columns) and the odd one the second. x is stored as XQ[p][g] = x[c + 4g + p] (4 vectors per
//    32 columns), and each lane picks its position with two blends whose masks are the position bits shifted to
//    the sign bit (one broadcast of the 4 index bytes, per-lane shifts): position a in {0, 1, 2} of the
//    first value, b in {1, 2, 3} of the second (ascending positions, which the formats check on load).
//  - bitmask: the 8 values of a mask byte are spread to their columns by one in-lane byte shuffle (pshufb,
//    zeros elsewhere) with a table indexed by the byte; two bytes (16 columns) share one 256-bit shuffle, and
//    x is stored as the 8 even then the 8 odd columns of each 16.
// Sums run in a different order than the generic paths (per-lane partial sums), so results agree with
// them and with dequantize-then-matmul to fp32 rounding; the per-op kernels and the decode engine share
// these functions and agree with each other exactly.
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>
#include "common.h"

#ifdef PEAK_AVX2
alignas(16) static uint8_t BITMASK_SPREAD[256][16];  // mask byte -> pshufb control: kept value s to its column
static bool init_spread() {
    for (int v = 0; v < 256; v++) {
        int s = 0;
        for (int c = 0; c < 8; c++) {
            const bool kept = v >> c & 1;
            BITMASK_SPREAD[v][2 * c] = kept ? (uint8_t)(2 * s) : 0x80;
            BITMASK_SPREAD[v][2 * c + 1] = kept ? (uint8_t)(2 * s + 1) : 0x80;
            s += kept;
        }
    }
    return true;
}
static const bool spread_ready = init_spread();

// Floats of x the rearranged copy needs (columns past the last whole block are read from x itself).
static inline int64_t bf16_xq_size(int64_t in) { return in + 32; }

static inline void nm24_prepare_x(const float* x, int64_t in, float* xq) {
    for (int64_t c = 0; c + 32 <= in; c += 32)
        for (int p = 0; p < 4; p++)
            for (int g = 0; g < 8; g++) xq[c + 8 * p + g] = x[c + 4 * g + p];
}

static inline void bitmask_prepare_x(const float* x, int64_t in, float* xq) {
    for (int64_t c = 0; c + 16 <= in; c += 16)
        for (int i = 0; i < 8; i++) {
            xq[c + i] = x[c + 2 * i];
            xq[c + 8 + i] = x[c + 2 * i + 1];
        }
}

static inline __m256 sign_mask(__m256i bits, __m256i shift) {
    return _mm256_castsi256_ps(_mm256_sllv_epi32(bits, shift));
}

// One 2:4 row: idx its positions (2 bits a kept value), vals its in/2 bf16 values.
static inline float nm24_bf16_row(const float* xq, const float* x, int64_t in, const uint8_t* idx,
                                  const uint16_t* vals) {
    const __m256i s0 = _mm256_setr_epi32(31, 27, 23, 19, 15, 11, 7, 3);  // bit 4g of the word to bit 31
    const __m256i s1 = _mm256_sub_epi32(s0, _mm256_set1_epi32(1)), s2 = _mm256_sub_epi32(s0, _mm256_set1_epi32(2));
    const __m256i s3 = _mm256_sub_epi32(s0, _mm256_set1_epi32(3));
    const __m256i upper = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= in; c += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(vals + c / 2));
        int32_t word;
        std::memcpy(&word, idx + c / 8, 4);
        const __m256i bits = _mm256_set1_epi32(word);
        const float* q = xq + c;
        const __m256 q1 = _mm256_loadu_ps(q + 8), q2 = _mm256_loadu_ps(q + 16);
        __m256 xa = _mm256_blendv_ps(_mm256_loadu_ps(q), q1, sign_mask(bits, s0));  // a's bit 0
        xa = _mm256_blendv_ps(xa, q2, sign_mask(bits, s1));                          // a's bit 1
        const __m256 hi = _mm256_blendv_ps(q2, _mm256_loadu_ps(q + 24), sign_mask(bits, s2));  // b = 2 or 3
        const __m256 xb = _mm256_blendv_ps(q1, hi, sign_mask(bits, s3));                       // b = 1 if bit 1 clear
        acc0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xa, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, upper)), xb, acc1);
    }
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (int64_t k = c / 2; k < in / 2; k++) s += bf16_to_f32(vals[k]) * x[k / 2 * 4 + code_at(idx, k, 2)];
    return s;
}

// 16 columns (mask bytes m0, m1 of the 16-column block at xq16) whose values start at v: 8 bf16 from v for m0,
// 8 from v + p0 for m1, spread to their columns, multiplied into two accumulators.
static inline void bitmask_bf16_16(const uint16_t* v, int64_t p0, unsigned m0, unsigned m1, const float* xq16,
                                   __m256& acc0, __m256& acc1) {
    const __m256i upper = _mm256_set1_epi32((int)0xffff0000u);
    const __m256i w = _mm256_loadu2_m128i((const __m128i*)(v + p0), (const __m128i*)v);
    const __m256i spread = _mm256_loadu2_m128i((const __m128i*)BITMASK_SPREAD[m1], (const __m128i*)BITMASK_SPREAD[m0]);
    const __m256i e = _mm256_shuffle_epi8(w, spread);  // 16 bf16 at their columns, zeros elsewhere
    acc0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(e, 16)), _mm256_loadu_ps(xq16), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(e, upper)), _mm256_loadu_ps(xq16 + 8), acc1);
}

// One bitmask row: mrow its mask, vals every row's bf16 values (total of them), the row's from base, row_end
// of them. Values may be read past the row, never past the tensor: a row whose 8 values past any column
// stay inside it (all but the last few) runs 32 columns a step without a check; the row's count is checked
// at the end.
static inline float bitmask_bf16_row(const float* xq, const float* x, int64_t in, const uint8_t* mrow,
                                     const uint16_t* vals, int64_t base, int64_t row_end, int64_t total,
                                     std::atomic<int>& err) {
    const uint16_t* v = vals + base;
    const int64_t last = total - base - 8;  // the largest k from which 8 values can be read
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    int64_t k = 0, j = 0;
    if (in <= last) {  // k <= 8 j <= in: no read in this loop passes the tensor's end
        for (; j + 4 <= in / 8; j += 4) {
            uint32_t mw;
            std::memcpy(&mw, mrow + j, 4);
            const int64_t p0 = _mm_popcnt_u32(mw & 0xff), p01 = _mm_popcnt_u32(mw & 0xffff);
            const int64_t p012 = _mm_popcnt_u32(mw & 0xffffff);
            bitmask_bf16_16(v + k, p0, mw & 0xff, mw >> 8 & 0xff, xq + 8 * j, acc0, acc1);
            bitmask_bf16_16(v + k + p01, p012 - p01, mw >> 16 & 0xff, mw >> 24, xq + 8 * j + 16, acc2, acc3);
            k += _mm_popcnt_u32(mw);
        }
    }
    for (; j + 2 <= in / 8; j += 2) {
        const unsigned m0 = mrow[j], m1 = mrow[j + 1];
        const int64_t p0 = _mm_popcnt_u32(m0);
        if (k + p0 > last) break;
        bitmask_bf16_16(v + k, p0, m0, m1, xq + 8 * j, acc0, acc1);
        k += p0 + _mm_popcnt_u32(m1);
    }
    float s = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (int64_t c = 8 * j; c < in; c++) {
        if (!(mrow[c / 8] >> (c % 8) & 1)) continue;
        if (k >= row_end) { err = 1; return 0.f; }
        s += bf16_to_f32(v[k++]) * x[c];
    }
    if (k != row_end) err = 1;  // mask and row_offsets disagree
    return s;
}
#endif
