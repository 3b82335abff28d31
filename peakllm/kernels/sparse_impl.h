// N:M and bitmask sparse matvec building blocks, shared by sparse.cpp (the standalone ops) and
// decode.cpp (the whole-step decode engine). See sparse.cpp for the layouts and the arithmetic.
#pragma once
#include <cstdint>
#include <cstring>
#include "common.h"

#include <atomic>
#include <vector>

enum { F32 = 0, BF16 = 1, F16 = 2, CODES = 3 };

// Kept values: floats of one dtype, or affine int-k codes grouped by their original column.
struct Values {
    const void* data; int kind; int bits; const uint16_t* scales; const uint8_t* zeros; int n_groups;
    int64_t group_size;

    // value k of a row whose floats / code stream start at `base` (element or byte offset), at column col
    inline float at(int64_t base, int64_t k, int64_t o, int64_t col) const {
        switch (kind) {
            case F32: return ((const float*)data)[base + k];
            case BF16: return bf16_to_f32(((const uint16_t*)data)[base + k]);
            case F16: return f16_to_f32(((const uint16_t*)data)[base + k]);
            default: {
                int64_t g = o * n_groups + col / group_size;
                float q = (float)code_at((const uint8_t*)data + base, k, bits);
                return f16_to_f32(scales[g]) * (q - (float)zeros[g]);
            }
        }
    }
};

static std::vector<float> load_x(const void* x, int x_bf16, int B, int64_t in) {
    std::vector<float> xf(B * in + 8, 0.f);  // +8: whole-vector loads of the last columns stay inside
    for (int b = 0; b < B; b++) load_x_row(x, x_bf16, nullptr, in, b, &xf[b * in]);
    return xf;
}

#ifdef PEAK_AVX2
alignas(32) static int32_t NM24_LANES[256][8];   // index byte -> lanes of its 4 kept columns among 8
alignas(32) static int32_t COMPRESS[256][8];     // mask byte -> kept lanes first
alignas(32) static int32_t FIRST_LANES[9][8];    // popcount -> all-ones in its first lanes
static bool init_tables() {
    for (int v = 0; v < 256; v++) {
        for (int k = 0; k < 4; k++) NM24_LANES[v][k] = NM24_LANES[v][k + 4] = (k / 2) * 4 + ((v >> (2 * k)) & 3);
        int n = 0;
        for (int c = 0; c < 8; c++)
            if (v >> c & 1) COMPRESS[v][n++] = c;
        for (; n < 8; n++) COMPRESS[v][n] = 0;
    }
    for (int p = 0; p <= 8; p++)
        for (int l = 0; l < 8; l++) FIRST_LANES[p][l] = l < p ? -1 : 0;
    return true;
}
static const bool tables_ready = init_tables();

// 8 consecutive kept values starting at k (k a multiple of 8 for codes of 4 / 8 bits), in registers.
template <int KIND>
static inline __m256 load8(const Values& V, int64_t base, int64_t k, __m256 scale, __m256 zs) {
    switch (KIND) {
        case F32: return _mm256_loadu_ps((const float*)V.data + base + k);
        case BF16: return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)V.data + base + k))), 16));
        case F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)V.data + base + k)));
        default: {
            const uint8_t* p = (const uint8_t*)V.data + base + k * V.bits / 8;
            __m256i q;
            if (V.bits == 8) {
                q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
            } else {
                uint32_t word;
                std::memcpy(&word, p, 4);
                q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word),
                                                       _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                     _mm256_set1_epi32(15));
            }
            return _mm256_fmsub_ps(_mm256_cvtepi32_ps(q), scale, zs);
        }
    }
}

// The 8 activations a 2:4 block of 16 columns starting at c keeps, in the order of its kept values.
static inline __m256 nm24_x(const float* xr, int64_t c, const uint8_t* idx) {
    const __m256i lo = _mm256_load_si256((const __m256i*)NM24_LANES[idx[c / 8]]);
    const __m256i hi = _mm256_load_si256((const __m256i*)NM24_LANES[idx[c / 8 + 1]]);
    return _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xr + c), lo),
                           _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr + c + 8), hi), 0xf0);
}

// The kept activations of mask byte j in their first lanes, and the 8 values from k with the lanes
// past the byte's popcount zeroed.
template <int KIND>
static inline __m256 bitmask_fma8(const Values& V, int64_t base, int64_t k, const float* xr, int64_t j, unsigned mb,
                                  int pc, __m256 acc) {
    const __m256 none = _mm256_setzero_ps();
    const __m256 w = _mm256_and_ps(load8<KIND>(V, base, k, none, none),
                                   _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)FIRST_LANES[pc])));
    const __m256 xs = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr + 8 * j),
                                               _mm256_load_si256((const __m256i*)COMPRESS[mb]));
    return _mm256_fmadd_ps(w, xs, acc);
}
#endif

// ------------------------------------------------------------------------------------------- N:M

template <int NB, int KIND>
static void nm_tile(const float* xf, int64_t in, int64_t out, int keep, int m, const uint8_t* indices,
                    int64_t idx_row_bytes, const Values& V, int64_t o, int b0, float* y, std::atomic<int>& err) {
    const int pos_bits = m <= 2 ? 1 : (32 - __builtin_clz((unsigned)(m - 1)));
    const int64_t per_row = in / m * keep;
    const uint8_t* idx = indices + o * idx_row_bytes;
    const int64_t base = V.kind == CODES ? o * ((per_row * V.bits + 7) / 8) : o * per_row;
    float acc[NB] = {0};
    int64_t k = 0;  // kept values done
#ifdef PEAK_AVX2
    const bool fast = m == 4 && keep == 2 && (KIND != CODES || ((V.bits == 4 || V.bits == 8) && V.group_size % 16 == 0));
    if constexpr (NB == 1 && KIND != CODES) {
        if (fast) {  // float values at batch 1: two accumulators, so the FMA latency is not the limit
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            const __m256 none = _mm256_setzero_ps();
            const float* xr = xf + b0 * in;
            int64_t c = 0;
            for (; c + 32 <= in; c += 32, k += 16) {
                a0 = _mm256_fmadd_ps(load8<KIND>(V, base, k, none, none), nm24_x(xr, c, idx), a0);
                a1 = _mm256_fmadd_ps(load8<KIND>(V, base, k + 8, none, none), nm24_x(xr, c + 16, idx), a1);
            }
            if (c + 16 <= in) {
                a0 = _mm256_fmadd_ps(load8<KIND>(V, base, k, none, none), nm24_x(xr, c, idx), a0);
                k += 8;
            }
            acc[0] = hsum(_mm256_add_ps(a0, a1));
        }
    } else if (fast) {
        __m256 vacc[NB];
        for (int b = 0; b < NB; b++) vacc[b] = _mm256_setzero_ps();
        __m256 scale = _mm256_setzero_ps(), zs = _mm256_setzero_ps();
        int64_t group = -1, next_group = 0;  // no division per block: groups are walked in order
        for (int64_t c = 0; c + 16 <= in; c += 16, k += 8) {
            if (KIND == CODES && c >= next_group) {
                group = c / V.group_size;
                next_group = (group + 1) * V.group_size;
                float s = f16_to_f32(V.scales[o * V.n_groups + group]);
                scale = _mm256_set1_ps(s);
                zs = _mm256_set1_ps(s * (float)V.zeros[o * V.n_groups + group]);
            }
            __m256 w = load8<KIND>(V, base, k, scale, zs);
            __m256i lo = _mm256_load_si256((const __m256i*)NM24_LANES[idx[c / 8]]);
            __m256i hi = _mm256_load_si256((const __m256i*)NM24_LANES[idx[c / 8 + 1]]);
            for (int b = 0; b < NB; b++) {
                const float* xr = xf + (b0 + b) * in + c;
                __m256 xs = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xr), lo),
                                            _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr + 8), hi), 0xf0);
                vacc[b] = _mm256_fmadd_ps(w, xs, vacc[b]);
            }
        }
        for (int b = 0; b < NB; b++) acc[b] = hsum(vacc[b]);
    }
#endif
    for (; k < per_row; k++) {
        unsigned pos = code_at(idx, k, pos_bits);
        if ((int)pos >= m) { err = 1; return; }
        int64_t col = k / keep * m + pos;
        float w = V.at(base, k, o, col);
        for (int b = 0; b < NB; b++) acc[b] += w * xf[(b0 + b) * in + col];
    }
    for (int b = 0; b < NB; b++) y[(b0 + b) * out + o] = acc[b];
}

#ifdef PEAK_AVX2
// Whether 2:4 rows with these kept values can take the AVX2 path (nm_tile's `fast` condition).
static inline bool nm24_fast(int n, int m, const Values& V) {
    return m == 4 && n == 2 && (V.kind != CODES || ((V.bits == 4 || V.bits == 8) && V.group_size % 16 == 0));
}

// 2:4 at batch 1: output features o..o+3 against one row of x. One load of x serves the four rows, and
// the four rows' accumulators are independent chains (nm_tile's single chain per row waits on the FMA
// latency at every 16 columns). Code scales change with the column, so they are looked up once per
// group for all four rows. Requires nm24_fast.
template <int KIND>
static void nm24_tile4_b1(const float* xf, int64_t in, const uint8_t* indices, int64_t idx_row_bytes,
                          const Values& V, int64_t o, float* y) {
    const int64_t per_row = in / 2;
    const uint8_t* idx[4];
    int64_t base[4];
    for (int r = 0; r < 4; r++) {
        idx[r] = indices + (o + r) * idx_row_bytes;
        base[r] = KIND == CODES ? (o + r) * ((per_row * V.bits + 7) / 8) : (o + r) * per_row;
    }
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    alignas(32) float sc[4] = {0.f, 0.f, 0.f, 0.f}, zsc[4] = {0.f, 0.f, 0.f, 0.f};
    int64_t next_group = 0, k = 0, c = 0;
    for (; c + 16 <= in; c += 16, k += 8) {
        if (KIND == CODES && c >= next_group) {
            const int64_t g = c / V.group_size;
            next_group = (g + 1) * V.group_size;
            for (int r = 0; r < 4; r++) {
                sc[r] = f16_to_f32(V.scales[(o + r) * V.n_groups + g]);
                zsc[r] = sc[r] * (float)V.zeros[(o + r) * V.n_groups + g];
            }
        }
        const __m256 x0 = _mm256_loadu_ps(xf + c), x1 = _mm256_loadu_ps(xf + c + 8);
        for (int r = 0; r < 4; r++) {
            const __m256 w = load8<KIND>(V, base[r], k, _mm256_broadcast_ss(sc + r), _mm256_broadcast_ss(zsc + r));
            const __m256i lo = _mm256_load_si256((const __m256i*)NM24_LANES[idx[r][c / 8]]);
            const __m256i hi = _mm256_load_si256((const __m256i*)NM24_LANES[idx[r][c / 8 + 1]]);
            const __m256 xs = _mm256_blend_ps(_mm256_permutevar8x32_ps(x0, lo), _mm256_permutevar8x32_ps(x1, hi), 0xf0);
            acc[r] = _mm256_fmadd_ps(w, xs, acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        float s = hsum(acc[r]);
        for (int64_t kk = k; kk < per_row; kk++) {  // columns past the last whole 16
            const int64_t col = kk / 2 * 4 + code_at(idx[r], kk, 2);
            s += V.at(base[r], kk, o + r, col) * xf[col];
        }
        y[o + r] = s;
    }
}
#endif

// ------------------------------------------------------------------------------------------ bitmask

template <int NB, int KIND>
static void bitmask_tile(const float* xf, int64_t in, int64_t out, const uint8_t* mask, const int64_t* row_offsets,
                         const int64_t* qrow_offsets, int64_t total, const Values& V, int64_t o, int b0, float* y,
                         std::atomic<int>& err) {
    const int64_t mbytes = (in + 7) / 8;
    const uint8_t* mrow = mask + o * mbytes;
    const int64_t row_end = row_offsets[o + 1] - row_offsets[o];
    // floats are indexed from the row's first kept value; codes from the row's first byte
    const int64_t base = V.kind == CODES ? qrow_offsets[o] : row_offsets[o];
    float acc[NB] = {0};
    int64_t k = 0, j = 0;
#ifdef PEAK_AVX2
    if constexpr (NB == 1 && KIND != CODES) {
        // float values at batch 1: two mask bytes per step into two accumulators (one chain waited on the
        // FMA latency at every byte). A row's values may be read past its end, never past the tensor's:
        // the row's count is checked once at the end (k != row_end).
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        const int64_t last = total - base - 8;  // the largest k from which 8 values can be read
        for (; j + 2 <= in / 8; j += 2) {
            const unsigned m0 = mrow[j], m1 = mrow[j + 1];
            const int p0 = __builtin_popcount(m0), p1 = __builtin_popcount(m1);
            if (k + p0 > last) break;
            a0 = bitmask_fma8<KIND>(V, base, k, xf + b0 * in, j, m0, p0, a0);
            a1 = bitmask_fma8<KIND>(V, base, k + p0, xf + b0 * in, j + 1, m1, p1, a1);
            k += p0 + p1;
        }
        acc[0] = hsum(_mm256_add_ps(a0, a1));
    }
    const bool fast = !(NB == 1 && KIND != CODES) &&
                      (KIND != CODES || ((V.bits == 4 || V.bits == 8) && V.group_size % 8 == 0));
    if (fast) {
        __m256 vacc[NB];
        for (int b = 0; b < NB; b++) vacc[b] = _mm256_setzero_ps();
        __m256 scale = _mm256_setzero_ps(), zs = _mm256_setzero_ps();
        int64_t group = -1, next_group = 0;
        // whole bytes whose 8 values (or 8 codes' bytes) can be read without passing the tensor's end
        for (; j < in / 8; j++) {
            const unsigned mb = mrow[j];
            if (!mb) continue;
            const int pc = __builtin_popcount(mb);
            if (k + pc > row_end) { err = 1; return; }
            // 8 values (8 bytes of codes) may be read from k on; the last few of the tensor go the scalar way
            const int64_t end_elem = KIND != CODES || V.bits == 8 ? base + k + 8 : base + k / 2 + 8;
            if (end_elem > total) break;
            if (KIND == CODES && j * 8 >= next_group) {
                group = j * 8 / V.group_size;
                next_group = (group + 1) * V.group_size;
                float s = f16_to_f32(V.scales[o * V.n_groups + group]);
                scale = _mm256_set1_ps(s);
                zs = _mm256_set1_ps(s * (float)V.zeros[o * V.n_groups + group]);
            }
            __m256 w;
            if (KIND == CODES && V.bits == 4) {
                // 8 codes from nibble k: one 8-byte load shifted by 0 or 4 bits, with no branch on k's
                // parity (a random one: mispredicting it cost more than the rest of the loop)
                uint64_t word;
                std::memcpy(&word, (const uint8_t*)V.data + base + k / 2, 8);
                uint32_t codes = (uint32_t)(word >> (4 * (k & 1)));
                __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)codes),
                                                               _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                             _mm256_set1_epi32(15));
                w = _mm256_fmsub_ps(_mm256_cvtepi32_ps(q), scale, zs);
            } else {
                w = load8<KIND>(V, base, k, scale, zs);
            }
            w = _mm256_and_ps(w, _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)FIRST_LANES[pc])));
            const __m256i lanes = _mm256_load_si256((const __m256i*)COMPRESS[mb]);
            for (int b = 0; b < NB; b++) {
                __m256 xs = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xf + (b0 + b) * in + 8 * j), lanes);
                vacc[b] = _mm256_fmadd_ps(w, xs, vacc[b]);
            }
            k += pc;
        }
        for (int b = 0; b < NB; b++) acc[b] = hsum(vacc[b]);
    }
#endif
    for (int64_t c = 8 * j; c < in; c++) {
        if (!(mrow[c / 8] >> (c % 8) & 1)) continue;
        if (k >= row_end) { err = 1; return; }
        float w = V.at(base, k, o, c);
        for (int b = 0; b < NB; b++) acc[b] += w * xf[(b0 + b) * in + c];
        k++;
    }
    if (k != row_end) { err = 1; return; }  // mask and row_offsets disagree
    for (int b = 0; b < NB; b++) y[(b0 + b) * out + o] = acc[b];
}

