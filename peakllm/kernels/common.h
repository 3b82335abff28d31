// Helpers shared by the packed-weight kernels (intk.cpp, sparse.cpp): fp16/bf16 conversion, bitstream
// reads, activation loading, thread choice and row shares, horizontal sums. build.py hashes this header with each source.
#pragma once
#include <cmath>
#include <cstdint>

enum { MAX_TILE = 4 };  // rows of x a packed-weight tile serves at once
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
// The SIMD paths use AVX2 integer ops, FMA and F16C together (every AVX2 CPU has the other two).
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PEAK_AVX2 1
#endif

static inline float f16_to_f32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: renormalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            u = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000 | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // keep NaN a NaN
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

// Code c of a little-endian k-bit bitstream; the second byte is read only when the code straddles it.
static inline unsigned code_at(const uint8_t* row, int64_t c, int bits) {
    int64_t bit = c * bits;
    const uint8_t* p = row + (bit >> 3);
    unsigned sh = (unsigned)(bit & 7);
    unsigned v = p[0];
    if (sh + bits > 8) v |= (unsigned)p[1] << 8;
    return (v >> sh) & ((1u << bits) - 1);
}

// Activations as fp32, row b of x ([B, in], fp32 or bf16), columns gathered by perm when given.
static inline void load_x_row(const void* x, int x_bf16, const int32_t* perm, int64_t in, int64_t b, float* dst) {
    if (x_bf16) {
        const uint16_t* xb = (const uint16_t*)x + b * in;
        for (int64_t c = 0; c < in; c++) dst[c] = bf16_to_f32(xb[perm ? perm[c] : c]);
    } else {
        const float* xf = (const float*)x + b * in;
        for (int64_t c = 0; c < in; c++) dst[c] = xf[perm ? perm[c] : c];
    }
}

// Rows of x ([B, in], fp32 or bf16) times R = blockdiag(H_block) diag(signs) / sqrt(block), into dst [B, in]
// fp32: the input rotation of a rotated int-k layer (formats/rotation.py; `rotate_rows` there is the
// reference, computed in the same order: signs, the butterfly passes h = 1, 2, 4, ..., then the division).
static inline void rotate_x_rows(const void* x, int x_bf16, int64_t B, int64_t in, const int8_t* signs, int block,
                                 float* dst) {
    const float norm = (float)std::sqrt((double)block);
    for (int64_t b = 0; b < B; b++) {
        float* r = dst + b * in;
        load_x_row(x, x_bf16, nullptr, in, b, r);
        for (int64_t c = 0; c < in; c++) r[c] *= (float)signs[c];
        for (int64_t c0 = 0; c0 < in; c0 += block) {
            float* v = r + c0;
            for (int h = 1; h < block; h *= 2)
                for (int i = 0; i < block; i += 2 * h)
                    for (int j = i; j < i + h; j++) {
                        const float a = v[j], e = v[j + h];
                        v[j] = a + e;
                        v[j + h] = a - e;
                    }
        }
        for (int64_t c = 0; c < in; c++) r[c] = r[c] / norm;
    }
}

// Thread t's share [lo, hi) of n items, in units of `align` (the last share takes the remainder).
static inline void share(int n, int align, int t, int nt, int& lo, int& hi) {
    const int units = (n + align - 1) / align;
    lo = (int)((long)units * t / nt) * align;
    hi = (int)((long)units * (t + 1) / nt) * align;
    if (hi > n) hi = n;
    if (lo > n) lo = n;
}

static inline int pick_threads(int threads, int64_t work) {
    // a parallel region costs a few microseconds; below ~64k multiply-adds one thread is faster
    if (work < (1 << 16) || threads < 1) return 1;
    return threads;
}

#ifdef PEAK_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif
