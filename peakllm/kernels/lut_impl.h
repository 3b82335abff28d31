// Lookup-table matmul for 2-bit int-k and ternary weights (T-MAC's idea), shared by lut.cpp; layout and
// arithmetic in docs/LUT_KERNEL.md. In short:
//   * every weight is split into two bit-planes; 4 consecutive columns of one plane form a 4-bit index;
//   * per token, each group of 4 activations gets one 16-entry "sign table" T[idx] = sum_i (bit_i ? +x_i : -x_i),
//     quantized to int8 with one scale per k-block of columns (exact mode: kept fp32);
//   * a row's dot product over a weight group is  alpha * sum(T[i0] + c * T[i1]) (+ beta * sum T[i0])
//     + gamma * sum(x), with (alpha, beta, gamma, c) from the grid: see plane_coefs below.
// Weights: qlut [out_pad/8, in_pad/16, 32] bytes; byte 16L + 2r + p of column tile j holds, for row r of the
// 8-row tile and plane p, the index of 4-column group 4j + L in its low nibble and of group 4j + 2 + L in its
// high nibble. So one vpshufb with the tables of groups (4j, 4j+1) in its two lanes looks up 16 rows x 2 planes,
// and vpmaddubsw with the plane weights (1, c) sums the two planes of a row into one int16.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>
#include "common.h"

enum { LUT_INT2 = 0, LUT_TERN_SYM = 1, LUT_TERN_ASYM = 2 };

struct LutProblem {
    const uint8_t* qlut;  // [out_pad/8, in_pad/16, 32]
    const uint16_t* s1;   // fp16 [out_pad/8, n_groups, 8]: int2 scale; ternary scale_neg (sym: the scale)
    const void* p2;       // int2: uint8 zeros; asym ternary: fp16 scale_pos; same tiling as s1; sym: null
    int kind;
    int64_t in_pad, out, out_pad;
    int group, n_groups, kblock, B;
    const int8_t* tq;     // [B, in_pad/4, 16] int8 tables
    const float* tf;      // [B, in_pad/4, 16] fp32 tables (exact mode) or null
    const float* ts;      // [B, in_pad/kblock] table scales
    const float* xs;      // [B, n_groups] sums of x over each weight group
    float* y;             // [B, out]
};

// Per (row, group): y += alpha * S1 + beta * S2 + gamma * xsum, S1 = sum over the group's 4-column groups of
// T[i0] + c * T[i1], S2 = sum of T[i0] (asymmetric ternary only). Derivation in docs/LUT_KERNEL.md:
//   int2  (q = b0 + 2 b1):        alpha = s/2, c = 2, gamma = s * (1.5 - zero)
//   ternary sym (planes: q == 2, q != 0):  alpha = s/2, c = 1
//   ternary asym:                 alpha = sn/2, beta = (sp - sn)/2, gamma = (sp - sn)/2, c = 1
static inline int plane_c(int kind) { return kind == LUT_INT2 ? 2 : 1; }

static inline void plane_coefs(const LutProblem& P, int64_t tile, int g, int r, float& alpha, float& beta,
                               float& gamma) {
    const int64_t i = (tile * P.n_groups + g) * 8 + r;
    const float s = f16_to_f32(P.s1[i]);
    alpha = 0.5f * s;
    beta = gamma = 0.f;
    if (P.kind == LUT_INT2) {
        gamma = s * (1.5f - (float)((const uint8_t*)P.p2)[i]);
    } else if (P.kind == LUT_TERN_ASYM) {
        beta = gamma = 0.5f * (f16_to_f32(((const uint16_t*)P.p2)[i]) - s);
    }
}

// Tables of token b for k-blocks [k0, k1): fp32 sign tables (always, in tf_row scratch or P.tf), their int8
// quantization with one scale per k-block (amax / 127; entries round(T * (127 / amax)), half to even).
// x_row: the token's activations zero-padded to in_pad. Sums are formed x0 first, in order, as the reference does.
static void lut_build_tables(const float* x_row, int64_t in_pad, int kblock, int64_t k0, int64_t k1, int8_t* tq,
                             float* tf, float* ts) {
    for (int64_t k = k0; k < k1; k++) {
        const int64_t g0 = k * kblock / 4, g1 = (k + 1) * kblock / 4;
        float amax = 0.f;
        int64_t g4 = g0;
#ifdef PEAK_AVX2
        // the same sums as the scalar loop below: +-x0, then + (+-x1), ... (a sign flip is exact)
        const __m256 sgn = _mm256_set1_ps(-0.f);
        __m256 vmax = _mm256_setzero_ps();
        __m256 flip[4][2];
        for (int i = 0; i < 4; i++)
            for (int h = 0; h < 2; h++) {
                alignas(32) float f[8];
                for (int e = 0; e < 8; e++) f[e] = ((8 * h + e) >> i & 1) ? 0.f : -0.f;
                flip[i][h] = _mm256_load_ps(f);
            }
        for (; g4 < g1; g4++) {
            const float* xv = x_row + 4 * g4;
            for (int h = 0; h < 2; h++) {
                __m256 t = _mm256_xor_ps(_mm256_set1_ps(xv[0]), flip[0][h]);
                for (int i = 1; i < 4; i++) t = _mm256_add_ps(t, _mm256_xor_ps(_mm256_set1_ps(xv[i]), flip[i][h]));
                _mm256_storeu_ps(tf + 16 * g4 + 8 * h, t);
                vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sgn, t));
            }
        }
        alignas(32) float m8[8];
        _mm256_store_ps(m8, vmax);
        for (int e = 0; e < 8; e++) amax = std::fmax(amax, m8[e]);
#endif
        for (; g4 < g1; g4++) {
            const float* xv = x_row + 4 * g4;
            float* t = tf + 16 * g4;
            for (int idx = 0; idx < 16; idx++) {
                float v = (idx & 1) ? xv[0] : -xv[0];
                v += (idx & 2) ? xv[1] : -xv[1];
                v += (idx & 4) ? xv[2] : -xv[2];
                v += (idx & 8) ? xv[3] : -xv[3];
                t[idx] = v;
                amax = std::fmax(amax, std::fabs(v));
            }
        }
        const float inv = amax > 0.f ? 127.0f / amax : 0.f;
        ts[k] = amax / 127.0f;
        int64_t e = g0 * 16;
#ifdef PEAK_AVX2
        // two groups (32 entries) at a time: round half to even (the default MXCSR mode, as nearbyint)
        const __m256 vinv = _mm256_set1_ps(inv);
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (; e + 32 <= g1 * 16; e += 32) {
            __m256i q[4];
            for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(tf + e + 8 * i), vinv));
            const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256((__m256i*)(tq + e), _mm256_permutevar8x32_epi32(p, order));
        }
#endif
        for (; e < g1 * 16; e++) tq[e] = (int8_t)std::nearbyint(tf[e] * inv);
    }
    (void)in_pad;
}

// Token rows of x (fp32 or bf16 [B, in]) as fp32 zero-padded to in_pad (xp [B, in_pad]) and their sums over
// each weight group (xs [B, n_groups], summed in column order): what the tables and the gamma terms start from.
static void lut_load_rows(const void* x, int x_bf16, int B, int64_t in, int64_t in_pad, int group, int n_groups,
                          float* xp, float* xs) {
    for (int b = 0; b < B; b++) {
        float* row = xp + (size_t)b * in_pad;
        std::memset(row, 0, sizeof(float) * (size_t)in_pad);
        load_x_row(x, x_bf16, nullptr, in, b, row);
        for (int g = 0; g < n_groups; g++) {
            float s = 0.f;
            for (int64_t c = (int64_t)g * group; c < std::min<int64_t>((int64_t)(g + 1) * group, in_pad); c++) s += row[c];
            xs[(size_t)b * n_groups + g] = s;
        }
    }
}

// Exact mode, one row: fp32 tables, no quantization (any build; the reference for the fast path's error).
static void lut_row_exact(const LutProblem& P, int64_t o) {
    const int64_t tile = o / 8, r = o % 8, jt = P.in_pad / 16;
    const int c = plane_c(P.kind);
    for (int b = 0; b < P.B; b++) {
        const float* tf = P.tf + (int64_t)b * P.in_pad * 4;
        float y = 0.f;
        for (int g = 0; g < P.n_groups; g++) {
            const int64_t j0 = (int64_t)g * P.group / 16, j1 = std::min<int64_t>((int64_t)(g + 1) * P.group, P.in_pad) / 16;
            float a1 = 0.f, a2 = 0.f;
            for (int64_t j = j0; j < j1; j++) {
                const uint8_t* w = P.qlut + (tile * jt + j) * 32 + 2 * r;
                for (int m = 0; m < 4; m++) {  // group 4j + m: lane m & 1, nibble m >> 1
                    const int sh = 4 * (m >> 1);
                    const uint8_t* wl = w + 16 * (m & 1);
                    const float* t = tf + 16 * (4 * j + m);
                    const float t0 = t[(wl[0] >> sh) & 15], t1 = t[(wl[1] >> sh) & 15];
                    a1 += t0 + (float)c * t1;
                    a2 += t0;
                }
            }
            float alpha, beta, gamma;
            plane_coefs(P, tile, g, (int)r, alpha, beta, gamma);
            y = std::fma(alpha, a1, y);
            if (P.kind == LUT_TERN_ASYM) y = std::fma(beta, a2, y);
            y = std::fma(gamma, P.xs[b * P.n_groups + g], y);
        }
        P.y[b * P.out + o] = y;
    }
}

// int8 tables, one 8-row tile, scalar: the same integers and the same fp32 operations, in the same order, as
// the AVX2 tile below, so both builds give bit-identical results.
static void lut_tile_scalar(const LutProblem& P, int64_t tile) {
    const int64_t jt = P.in_pad / 16, nk = P.in_pad / P.kblock;
    const int c = plane_c(P.kind);
    for (int b = 0; b < P.B; b++) {
        const int8_t* tq = P.tq + (int64_t)b * P.in_pad * 4;
        float y[8] = {0.f};
        for (int g = 0; g < P.n_groups; g++) {
            const int64_t c0 = (int64_t)g * P.group, c1 = std::min<int64_t>(c0 + P.group, P.in_pad);
            float g1[8] = {0.f}, g2[8] = {0.f};
            for (int64_t k0 = c0; k0 < c1; k0 += P.kblock) {
                const float ts = P.ts[b * nk + k0 / P.kblock];
                for (int r = 0; r < 8; r++) {
                    int32_t s1 = 0, s2 = 0;
                    for (int64_t j = k0 / 16; j < (k0 + P.kblock) / 16; j++) {
                        const uint8_t* w = P.qlut + (tile * jt + j) * 32 + 2 * r;
                        for (int m = 0; m < 4; m++) {
                            const int sh = 4 * (m >> 1);
                            const uint8_t* wl = w + 16 * (m & 1);
                            const int8_t* t = tq + 16 * (4 * j + m);
                            const int t0 = t[(wl[0] >> sh) & 15], t1 = t[(wl[1] >> sh) & 15];
                            s1 += t0 + c * t1;
                            s2 += t0;
                        }
                    }
                    g1[r] = std::fma((float)s1, ts, g1[r]);
                    g2[r] = std::fma((float)s2, ts, g2[r]);
                }
            }
            for (int r = 0; r < 8; r++) {
                float alpha, beta, gamma;
                plane_coefs(P, tile, g, r, alpha, beta, gamma);
                y[r] = std::fma(alpha, g1[r], y[r]);
                if (P.kind == LUT_TERN_ASYM) y[r] = std::fma(beta, g2[r], y[r]);
                y[r] = std::fma(gamma, P.xs[b * P.n_groups + g], y[r]);
            }
        }
        for (int r = 0; r < 8 && tile * 8 + r < P.out; r++) P.y[b * P.out + tile * 8 + r] = y[r];
    }
}

#ifdef PEAK_AVX2
// The 8 per-row coefficients of one tile and group as vectors (plane_coefs, 8 lanes).
static inline void coef_vectors(const LutProblem& P, int64_t tile, int g, __m256& alpha, __m256& beta, __m256& gamma) {
    const int64_t i = (tile * P.n_groups + g) * 8;
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(P.s1 + i)));
    const __m256 half = _mm256_set1_ps(0.5f);
    alpha = _mm256_mul_ps(half, s);
    beta = gamma = _mm256_setzero_ps();
    if (P.kind == LUT_INT2) {
        const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)((const uint8_t*)P.p2 + i))));
        gamma = _mm256_mul_ps(s, _mm256_sub_ps(_mm256_set1_ps(1.5f), z));
    } else if (P.kind == LUT_TERN_ASYM) {
        const __m256 sp = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)P.p2 + i)));
        beta = gamma = _mm256_mul_ps(half, _mm256_sub_ps(sp, s));
    }
}

// int16 lanes [rows 0-7 | rows 0-7] -> fp32 rows 0-7 of their sum (exact: integers).
static inline __m256 fold16(__m256i acc) {
    const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc));
    const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc, 1));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
}

// NB tokens (b0 .. b0+NB-1) against one 8-row tile; ASYM: also the plane-0 sums.
template <int NB, bool ASYM>
static void lut_tile_avx2(const LutProblem& P, int64_t tile, int b0) {
    const int64_t jt = P.in_pad / 16, nk = P.in_pad / P.kblock;
    const __m256i mask = _mm256_set1_epi8(0x0f);
    const __m256i cw = P.kind == LUT_INT2 ? _mm256_set1_epi16(0x0201) : _mm256_set1_epi16(0x0101);
    const __m256i c0w = _mm256_set1_epi16(0x0001);
    const uint8_t* wt = P.qlut + tile * jt * 32;
    __m256 y[NB];
    for (int b = 0; b < NB; b++) y[b] = _mm256_setzero_ps();
    for (int g = 0; g < P.n_groups; g++) {
        const int64_t c0 = (int64_t)g * P.group, c1 = std::min<int64_t>(c0 + P.group, P.in_pad);
        __m256 g1[NB], g2[NB];
        for (int b = 0; b < NB; b++) g1[b] = g2[b] = _mm256_setzero_ps();
        for (int64_t k0 = c0; k0 < c1; k0 += P.kblock) {
            __m256i a1[NB], a2[NB];
            for (int b = 0; b < NB; b++) a1[b] = a2[b] = _mm256_setzero_si256();
            for (int64_t j = k0 / 16; j < (k0 + P.kblock) / 16; j++) {
                const __m256i w = _mm256_loadu_si256((const __m256i*)(wt + j * 32));
                const __m256i lo = _mm256_and_si256(w, mask);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
                for (int b = 0; b < NB; b++) {
                    const int8_t* t = P.tq + ((int64_t)(b0 + b) * P.in_pad / 4 + 4 * j) * 16;
                    const __m256i rl = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)t), lo);
                    const __m256i rh = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(t + 32)), hi);
                    a1[b] = _mm256_add_epi16(a1[b], _mm256_add_epi16(_mm256_maddubs_epi16(cw, rl),
                                                                       _mm256_maddubs_epi16(cw, rh)));
                    if constexpr (ASYM)
                        a2[b] = _mm256_add_epi16(a2[b], _mm256_add_epi16(_mm256_maddubs_epi16(c0w, rl),
                                                                           _mm256_maddubs_epi16(c0w, rh)));
                }
            }
            for (int b = 0; b < NB; b++) {
                const __m256 ts = _mm256_set1_ps(P.ts[(b0 + b) * nk + k0 / P.kblock]);
                g1[b] = _mm256_fmadd_ps(fold16(a1[b]), ts, g1[b]);
                if constexpr (ASYM) g2[b] = _mm256_fmadd_ps(fold16(a2[b]), ts, g2[b]);
            }
        }
        __m256 alpha, beta, gamma;
        coef_vectors(P, tile, g, alpha, beta, gamma);
        for (int b = 0; b < NB; b++) {
            y[b] = _mm256_fmadd_ps(alpha, g1[b], y[b]);
            if constexpr (ASYM) y[b] = _mm256_fmadd_ps(beta, g2[b], y[b]);
            y[b] = _mm256_fmadd_ps(gamma, _mm256_set1_ps(P.xs[(b0 + b) * P.n_groups + g]), y[b]);
        }
    }
    for (int b = 0; b < NB; b++) {
        float* dst = P.y + (int64_t)(b0 + b) * P.out + tile * 8;
        if (tile * 8 + 8 <= P.out) {
            _mm256_storeu_ps(dst, y[b]);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, y[b]);
            for (int r = 0; tile * 8 + r < P.out; r++) dst[r] = tmp[r];
        }
    }
}

template <bool ASYM>
static void lut_tile_batch(const LutProblem& P, int64_t tile) {
    int b0 = 0;
    for (; b0 + 4 <= P.B; b0 += 4) lut_tile_avx2<4, ASYM>(P, tile, b0);
    switch (P.B - b0) {
        case 1: lut_tile_avx2<1, ASYM>(P, tile, b0); break;
        case 2: lut_tile_avx2<2, ASYM>(P, tile, b0); break;
        case 3: lut_tile_avx2<3, ASYM>(P, tile, b0); break;
        default: break;
    }
}
#endif

// Row tiles [t0, t1) of P.y for every token.
static void lut_tiles(const LutProblem& P, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
        if (P.tf) {
            for (int64_t o = t * 8; o < std::min<int64_t>(t * 8 + 8, P.out); o++) lut_row_exact(P, o);
            continue;
        }
#ifdef PEAK_AVX2
        if (P.kind == LUT_TERN_ASYM) lut_tile_batch<true>(P, t);
        else lut_tile_batch<false>(P, t);
#else
        lut_tile_scalar(P, t);
#endif
    }
}
