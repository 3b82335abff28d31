// Group-wise int-k (k = 2, 3, 4, 8) affine matmul y[b, o] = sum_c x[b, c] * w[o, c] read straight from
// the packed bitstreams of docs/DESIGN.md, never building the dense weight matrix:
//   y[b, o] = sum_g scale[o, g] * (sum_{c in g} q[o, c] * x[b, c] - zero[o, g] * xsum[b, g]),
// with the group sums xsum computed once per call. Groups are contiguous column ranges given by
// group_starts (act-order layers are permuted once at module construction, and x is gathered by
// perm per call). Inside each aligned block of 32 columns the SIMD decoder produces codes in a fixed
// lane order (e.g. int4: the even, then the odd columns of each 16); x is reordered once per call
// to match, so the weights are used exactly as stored. Columns outside whole blocks go through scalar code.
// Build: g++ -O3 -march=native -fopenmp (peakllm/kernels/build.py); AVX2+FMA path or scalar.
#include <cstdint>
#include <cstring>
#include "common.h"

#include <algorithm>
#include <vector>

enum { BLOCK = 32, MAX_TILE = 4 };

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

template <int BITS>
static void run_rows(const Problem& P, int threads) {
    const int64_t work = P.out * P.in * P.B;
#pragma omp parallel for schedule(static) num_threads(pick_threads(threads, work))
    for (int64_t o = 0; o < P.out; o++) {
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

// Sizes read from tensors are checked before use, so bad inputs return an error instead of reading out of bounds.
static bool groups_ok(const int32_t* gstart, int n_groups, int64_t in) {
    if (n_groups < 1 || gstart[0] != 0 || gstart[n_groups] != in) return false;
    for (int g = 0; g < n_groups; g++)
        if (gstart[g + 1] < gstart[g]) return false;
    return true;
}

extern "C" {

// y [B, out] fp32 = x [B, in] (fp32 or bf16, columns gathered by perm when not null) @ W.T, W given as
// qweight [out, ceil(in*bits/8)], scales fp16 [out, n_groups], zeros uint8 [out, n_groups] and the
// column ranges of the groups gstart [n_groups + 1] (groups contiguous in the stored column order).
int intk_gemm(const void* x, int x_bf16, const int32_t* perm, int B, int64_t in, const uint8_t* qweight,
              const uint16_t* scales, const uint8_t* zeros, const int32_t* gstart, int n_groups, int64_t out,
              int bits, float* y, int threads) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return 1;
    if (!groups_ok(gstart, n_groups, in)) return 2;
    if (perm)
        for (int64_t c = 0; c < in; c++)
            if (perm[c] < 0 || perm[c] >= in) return 3;
    std::vector<float> xp(B * in), xblk(B * in), xsum((size_t)B * n_groups, 0.f);
    int order[BLOCK];
    for (int i = 0; i < BLOCK; i++) order[i] = block_order(bits, i);
    for (int b = 0; b < B; b++) {
        float* r = &xp[b * in];
        load_x_row(x, x_bf16, perm, in, b, r);
        float* rb = &xblk[b * in];
        int64_t c = 0;
        for (; c + BLOCK <= in; c += BLOCK)
            for (int i = 0; i < BLOCK; i++) rb[c + i] = r[c + order[i]];
        for (; c < in; c++) rb[c] = r[c];
        for (int g = 0; g < n_groups; g++) {
            float s = 0.f;
            for (int64_t j = gstart[g]; j < gstart[g + 1]; j++) s += r[j];
            xsum[b * n_groups + g] = s;
        }
    }
    Problem P{qweight, scales, zeros, gstart, in, out, (in * bits + 7) / 8, bits, n_groups, B,
              xp.data(), xblk.data(), xsum.data(), y};
    switch (bits) {
        case 2: run_rows<2>(P, threads); break;
        case 3: run_rows<3>(P, threads); break;
        case 4: run_rows<4>(P, threads); break;
        default: run_rows<8>(P, threads); break;
    }
    return 0;
}

// Dense W [out, in] = scale * (q - zero) in the stored column order, fp32 or bf16 (for prefill GEMMs).
int intk_dequant(const uint8_t* qweight, const uint16_t* scales, const uint8_t* zeros, const int32_t* gstart,
                 int n_groups, int64_t in, int64_t out, int bits, void* dst, int dst_bf16, int threads) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return 1;
    if (!groups_ok(gstart, n_groups, in)) return 2;
    const int64_t row_bytes = (in * bits + 7) / 8;
#pragma omp parallel num_threads(pick_threads(threads, out * in))
    {
        std::vector<float> row(in);
#pragma omp for schedule(static)
        for (int64_t o = 0; o < out; o++) {
            const uint8_t* q = qweight + o * row_bytes;
            for (int g = 0; g < n_groups; g++) {
                const float scale = f16_to_f32(scales[o * n_groups + g]);
                const float zero = (float)zeros[o * n_groups + g];
                int64_t c = gstart[g];
                if (bits == 4) {  // the common case, two codes a byte, written so g++ vectorises it
                    for (; c < gstart[g + 1] && (c & 1); c++) row[c] = scale * ((float)code_at(q, c, 4) - zero);
                    for (; c + 2 <= gstart[g + 1]; c += 2) {
                        uint8_t v = q[c >> 1];
                        row[c] = scale * ((float)(v & 15) - zero);
                        row[c + 1] = scale * ((float)(v >> 4) - zero);
                    }
                }
                for (; c < gstart[g + 1]; c++) row[c] = scale * ((float)code_at(q, c, bits) - zero);
            }
            if (dst_bf16) {
                uint16_t* d = (uint16_t*)dst + o * in;
                for (int64_t c = 0; c < in; c++) d[c] = f32_to_bf16(row[c]);
            } else {
                std::memcpy((float*)dst + o * in, row.data(), in * sizeof(float));
            }
        }
    }
    return 0;
}

}  // extern "C"
