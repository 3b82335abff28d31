// A LoRA adapter run beside a linear of the decode engine, unmerged (runtime/adapter.py; docs/RECOVER.md):
// y += B (A x) with A [r, in] and B [out, r] (B already times the adapter's scale), fp32 or bf16
// (Lin.lora_bf16). Each thread computes all of t = A x for the rows of x itself (r * in multiply-adds, a few
// microseconds at r = 16) and then adds B t to whichever rows of y it computed, so the term needs no barrier
// of its own, rows stolen from another thread (RowClaim) included. Each row of x is taken alone: a row's
// result does not depend on how many rows a call has (lin_row_exact stays true).
#pragma once
#include <vector>

#include "common.h"
#include "decode_types.h"
#include "dense_impl.h"

// sum_k w[k] * x[k] for n weights, fp32 or bf16 (w_bf16), fp32 x.
static inline float lora_dot(const void* w, int w_bf16, const float* x, int64_t n) {
    int64_t k = 0;
    float s = 0.f;
#ifdef PEAK_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    if (w_bf16) {
        const uint16_t* wb = (const uint16_t*)w;
        for (; k + 16 <= n; k += 16) {
            const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(wb + k)));
            const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(wb + k + 8)));
            acc0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_loadu_ps(x + k), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)), _mm256_loadu_ps(x + k + 8), acc1);
        }
    } else {
        const float* wf = (const float*)w;
        for (; k + 16 <= n; k += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(wf + k), _mm256_loadu_ps(x + k), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(wf + k + 8), _mm256_loadu_ps(x + k + 8), acc1);
        }
    }
    s = hsum(_mm256_add_ps(acc0, acc1));
#endif
    if (w_bf16)
        for (; k < n; ++k) s += bf16_to_f32(((const uint16_t*)w)[k]) * x[k];
    else
        for (; k < n; ++k) s += ((const float*)w)[k] * x[k];
    return s;
}

// t [B, r] = x [B, in] @ A.T, x fp32 or bf16 (xrow: one row of x as fp32, reused).
template <typename TX>
static void lora_prepare(const Lin& L, const TX* x, int B, std::vector<float>& xrow, std::vector<float>& t) {
    const int r = L.lora_r;
    const size_t a_row = (size_t)L.in * (L.lora_bf16 ? 2 : 4);
    xrow.resize((size_t)L.in);
    t.resize((size_t)B * r);
    for (int b = 0; b < B; ++b) {
        load_x_row(x, sizeof(TX) == 2, nullptr, L.in, b, xrow.data());
        for (int j = 0; j < r; ++j)
            t[(size_t)b * r + j] = lora_dot((const char*)L.lora_a + j * a_row, L.lora_bf16, xrow.data(), L.in);
    }
}

// Rows [lo, hi) of y [B, out] += t [B, r] @ B.T, y rounded once more to TX.
template <typename TX>
static void lora_add(const Lin& L, const float* t, TX* y, int B, int lo, int hi) {
    const int r = L.lora_r;
    const size_t b_row = (size_t)r * (L.lora_bf16 ? 2 : 4);
    for (int b = 0; b < B; ++b)
        for (int o = lo; o < hi; ++o) {
            TX* out = y + (size_t)b * L.out + o;
            store1(out, load1(out) + lora_dot((const char*)L.lora_b + o * b_row, L.lora_bf16, t + (size_t)b * r, r));
        }
}
