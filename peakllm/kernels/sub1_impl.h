// The sub-1-bit decode-while-multiply kernel's building blocks (see sub1.cpp for the method), shared by
// sub1.cpp (the standalone op) and decode.cpp (the whole-step decode engine), in namespace sub1k.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include "sub1_fused.h"

// One matrix, as prepared once by kernels/sub1.py (a ctypes.Structure with these fields in this order).
struct Sub1Matrix {
    const uint8_t* stream;
    const int32_t* block_offsets;
    const uint64_t* dict;
    const uint32_t* lanes;  // widened 8-bit dictionary, or nullptr
    const float* scale_pos;
    const float* scale_neg;  // nullptr: symmetric scales
    int64_t out, in, group_size, block_rows;  // group_size <= 0: one group per row
    int64_t sym_bits;  // 8 or 16
    const uint16_t* fused;  // the dictionary as fused-path entries (sub1_fused.h), or nullptr: gather path only
    int64_t fused_k;  // slots per fused entry: the dictionary's largest nonzero count (1..6)
};

namespace sub1k {

constexpr uint32_t SIGN = 0x80000000u;
constexpr uint32_t COL = 0x7fffffffu;
constexpr int MAXB = 32;  // batch columns handled per pass (more are done in chunks of 32)
constexpr int64_t MIN_PARALLEL_WORK = 1 << 15;  // weights x batch; below this one thread is faster

template <typename SymT>
inline int64_t decode_row(const SymT*& sp, const uint64_t* dict, const uint32_t* lanes, int64_t in, uint32_t* buf) {
    int64_t col = 0, n = 0;
    if (sizeof(SymT) == 1 && lanes) {  // 8-bit dictionaries come pre-widened, 256 x 32 bytes in L1: [6 x (pos | neg << 31), len, nnz]
        while (col < in) {
            const uint32_t* w = lanes + 8 * (size_t)*sp++;
#ifdef __AVX2__
            _mm256_storeu_si256((__m256i*)(buf + n), _mm256_add_epi32(_mm256_loadu_si256((const __m256i*)w),
                                                                      _mm256_set1_epi32((int)col)));
#else
            for (int k = 0; k < 6; k++) buf[n + k] = w[k] + (uint32_t)col;
#endif
            col += w[6];
            n += w[7];
        }
        return n;
    }
    while (col < in) {
        SymT sym;
        std::memcpy(&sym, sp++, sizeof(SymT));  // 16-bit symbols need not be aligned in the stream
        const uint64_t e = dict[sym];
#ifdef __AVX2__
        const __m256i w = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)(e >> 16)));
        const __m256i pos = _mm256_and_si256(w, _mm256_set1_epi32(127));
        const __m256i neg = _mm256_slli_epi32(_mm256_srli_epi32(w, 7), 31);
        _mm256_storeu_si256((__m256i*)(buf + n),
                            _mm256_or_si256(_mm256_add_epi32(pos, _mm256_set1_epi32((int)col)), neg));
#else
        for (int k = 0; k < 6; k++) {
            const uint32_t b = (uint32_t)(e >> (16 + 8 * k)) & 0xffu;
            buf[n + k] = ((uint32_t)col + (b & 127u)) | ((b >> 7) << 31);
        }
#endif
        n += (e >> 8) & 0xff;
        col += e & 0xff;
    }
    return n;
}

inline float flip(float v, uint32_t sign) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u ^= sign;
    std::memcpy(&v, &u, 4);
    return v;
}

#ifdef __AVX2__
inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
#endif

// Signed and plain sums of x over buf[lo, hi) (batch 1).
template <bool SYM>
inline void sum_range_1(const uint32_t* buf, int64_t lo, int64_t hi, const float* x, float& s, float& a) {
    int64_t k = lo;
    float ss = 0.f, aa = 0.f;
#ifdef __AVX2__
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    const __m256i colm = _mm256_set1_epi32((int)COL), signm = _mm256_set1_epi32((int)SIGN);
    for (; k + 16 <= hi; k += 16) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i*)(buf + k));
        const __m256i v1 = _mm256_loadu_si256((const __m256i*)(buf + k + 8));
        const __m256 g0 = _mm256_i32gather_ps(x, _mm256_and_si256(v0, colm), 4);
        const __m256 g1 = _mm256_i32gather_ps(x, _mm256_and_si256(v1, colm), 4);
        s0 = _mm256_add_ps(s0, _mm256_xor_ps(g0, _mm256_castsi256_ps(_mm256_and_si256(v0, signm))));
        s1 = _mm256_add_ps(s1, _mm256_xor_ps(g1, _mm256_castsi256_ps(_mm256_and_si256(v1, signm))));
        if (!SYM) {
            a0 = _mm256_add_ps(a0, g0);
            a1 = _mm256_add_ps(a1, g1);
        }
    }
    if (k + 8 <= hi) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i*)(buf + k));
        const __m256 g0 = _mm256_i32gather_ps(x, _mm256_and_si256(v0, colm), 4);
        s0 = _mm256_add_ps(s0, _mm256_xor_ps(g0, _mm256_castsi256_ps(_mm256_and_si256(v0, signm))));
        if (!SYM) a0 = _mm256_add_ps(a0, g0);
        k += 8;
    }
    if (k < hi) {  // the last 1..7 nonzeros: one masked gather instead of a scalar loop
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(hi - k)), lane);
        const __m256i v0 = _mm256_maskload_epi32((const int*)(buf + k), live);
        const __m256 g0 = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, _mm256_and_si256(v0, colm),
                                                   _mm256_castsi256_ps(live), 4);
        s0 = _mm256_add_ps(s0, _mm256_xor_ps(g0, _mm256_castsi256_ps(_mm256_and_si256(v0, signm))));
        if (!SYM) a0 = _mm256_add_ps(a0, g0);
        k = hi;
    }
    ss = hsum(_mm256_add_ps(s0, s1));
    if (!SYM) aa = hsum(_mm256_add_ps(a0, a1));
#endif
    for (; k < hi; k++) {
        const float v = x[buf[k] & COL];
        ss += flip(v, buf[k] & SIGN);
        if (!SYM) aa += v;
    }
    s = ss;
    a = aa;
}

// Same over a batch: xt is x transposed, [in][BP] (BP = batch padded to 8); s, a hold BP sums each.
template <int BP, bool SYM>
inline void sum_range_b(const uint32_t* buf, int64_t lo, int64_t hi, const float* xt, float* s, float* a) {
#ifdef __AVX2__
    constexpr int NV = BP / 8;
    constexpr int U = NV == 1 ? 2 : 1;  // independent accumulator sets, so an add's latency is hidden
    __m256 sv[U][NV], av[U][NV];
    for (int u = 0; u < U; u++)
        for (int j = 0; j < NV; j++) sv[u][j] = av[u][j] = _mm256_setzero_ps();
    int64_t k = lo;
    for (; k + U <= hi; k += U) {
        for (int u = 0; u < U; u++) {
            const uint32_t v = buf[k + u];
            const float* xp = xt + (int64_t)(v & COL) * BP;
            const __m256 sg = _mm256_castsi256_ps(_mm256_set1_epi32((int)(v & SIGN)));
            for (int j = 0; j < NV; j++) {
                const __m256 xv = _mm256_loadu_ps(xp + 8 * j);
                sv[u][j] = _mm256_add_ps(sv[u][j], _mm256_xor_ps(xv, sg));
                if (!SYM) av[u][j] = _mm256_add_ps(av[u][j], xv);
            }
        }
    }
    for (; k < hi; k++) {
        const uint32_t v = buf[k];
        const float* xp = xt + (int64_t)(v & COL) * BP;
        const __m256 sg = _mm256_castsi256_ps(_mm256_set1_epi32((int)(v & SIGN)));
        for (int j = 0; j < NV; j++) {
            const __m256 xv = _mm256_loadu_ps(xp + 8 * j);
            sv[0][j] = _mm256_add_ps(sv[0][j], _mm256_xor_ps(xv, sg));
            if (!SYM) av[0][j] = _mm256_add_ps(av[0][j], xv);
        }
    }
    for (int u = 1; u < U; u++)
        for (int j = 0; j < NV; j++) {
            sv[0][j] = _mm256_add_ps(sv[0][j], sv[u][j]);
            av[0][j] = _mm256_add_ps(av[0][j], av[u][j]);
        }
    for (int j = 0; j < NV; j++) {
        _mm256_storeu_ps(s + 8 * j, sv[0][j]);
        _mm256_storeu_ps(a + 8 * j, av[0][j]);
    }
#else
    for (int j = 0; j < BP; j++) s[j] = a[j] = 0.f;
    for (int64_t k = lo; k < hi; k++) {
        const uint32_t v = buf[k];
        const float* xp = xt + (int64_t)(v & COL) * BP;
        for (int j = 0; j < BP; j++) {
            s[j] += flip(xp[j], v & SIGN);
            if (!SYM) a[j] += xp[j];
        }
    }
#endif
}

// First index in buf[lo, hi) whose column is >= bound (columns ascend).
inline int64_t lower(const uint32_t* buf, int64_t lo, int64_t hi, int64_t bound) {
    return std::lower_bound(buf + lo, buf + hi, (uint32_t)bound,
                            [](uint32_t v, uint32_t b) { return (v & COL) < b; }) - buf;
}

struct Args {
    const uint8_t* stream;
    const int32_t* block_offsets;
    const uint64_t* dict;
    const uint32_t* lanes;
    const float* scale_pos;
    const float* scale_neg;
    const uint16_t* fused;
    int64_t fused_k;
    int64_t out, in, group_size, block_rows, batch;
    int n_threads;
    const float* x;
    float* y;
};

template <typename SymT, bool SYM, int BP>
void run(const Args& A, const float* xt, int64_t nb_chunks) {
    const int64_t gs = A.group_size > 0 ? A.group_size : A.in;
    const int64_t n_groups = (A.in + gs - 1) / gs;
    const int64_t n_blocks = (A.out + A.block_rows - 1) / A.block_rows;
#pragma omp parallel num_threads(A.n_threads)
    {
        const bool fused = BP == 1 && n_groups == 1 && A.fused != nullptr;  // the common matvec
        std::vector<uint32_t> buf(fused ? 0 : A.in + 8);
        std::vector<float> xb(fused ? fused_xb_floats<SYM>(A.in) : 0);
        if (fused) fused_prepare<SYM>(A.x, A.in, xb.data());
        alignas(32) float s[MAXB], a[MAXB];
        if (fused) {  // blocks in pairs, one row of each in lockstep (sub1_fused.h)
#pragma omp for schedule(static)
            for (int64_t pr = 0; pr < (n_blocks + 1) / 2; pr++)
                fused_block_pair_k<SymT, SYM>(A.fused_k, (const SymT*)A.stream, A.block_offsets, A.block_rows, A.out,
                                              2 * pr, A.fused, xb.data(), A.in, A.scale_pos, A.scale_neg, A.y);
        } else
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < n_blocks; blk++) {
            const SymT* sp = (const SymT*)A.stream + A.block_offsets[blk];
            const int64_t r_end = std::min(A.out, (blk + 1) * A.block_rows);
            if constexpr (BP == 1) {
                if (n_groups == 1) {  // one group per row, no batch loops: gather path
                    for (int64_t r = blk * A.block_rows; r < r_end; r++) {
                        const int64_t n = decode_row<SymT>(sp, A.dict, A.lanes, A.in, buf.data());
                        sum_range_1<SYM>(buf.data(), 0, n, A.x, s[0], a[0]);
                        const float p = A.scale_pos[r], q = SYM ? p : A.scale_neg[r];
                        A.y[r] = SYM ? p * s[0] : 0.5f * (p + q) * s[0] + 0.5f * (p - q) * a[0];
                    }
                    continue;
                }
            }
            for (int64_t r = blk * A.block_rows; r < r_end; r++) {
                const int64_t n = decode_row<SymT>(sp, A.dict, A.lanes, A.in, buf.data());
                const float* sp_r = A.scale_pos + r * n_groups;
                const float* sn_r = SYM ? sp_r : A.scale_neg + r * n_groups;
                for (int64_t c0 = 0; c0 < nb_chunks; c0++) {
                    const int64_t b0 = c0 * MAXB, nb = std::min<int64_t>(MAXB, A.batch - b0);
                    float acc[MAXB] = {0.f};
                    int64_t lo = 0;
                    for (int64_t g = 0; g < n_groups; g++) {
                        const int64_t hi = g + 1 == n_groups ? n : lower(buf.data(), lo, n, (g + 1) * gs);
                        if constexpr (BP == 1) {
                            sum_range_1<SYM>(buf.data(), lo, hi, A.x + b0 * A.in, s[0], a[0]);
                        } else {
                            sum_range_b<BP, SYM>(buf.data(), lo, hi, xt + c0 * A.in * BP, s, a);
                        }
                        // sum+ = (a + s)/2 and sum- = (a - s)/2, so y = s (p + q)/2 + a (p - q)/2
                        const float p = sp_r[g], q = sn_r[g];
                        for (int64_t j = 0; j < nb; j++)
                            acc[j] += SYM ? p * s[j] : 0.5f * (p + q) * s[j] + 0.5f * (p - q) * a[j];
                        lo = hi;
                    }
                    for (int64_t j = 0; j < nb; j++) A.y[(b0 + j) * A.out + r] = acc[j];
                }
            }
        }
    }
}

template <typename SymT, bool SYM>
void dispatch_bp(const Args& A) {
    if (A.batch == 1) {
        run<SymT, SYM, 1>(A, nullptr, 1);
        return;
    }
    // BP: the batch padded to a multiple of 8 (one chunk), or 32 with several chunks
    const int64_t BP = A.batch > MAXB ? MAXB : ((A.batch + 7) / 8) * 8;
    const int64_t chunks = (A.batch + MAXB - 1) / MAXB;
    std::vector<float> xt((size_t)(chunks * A.in * BP), 0.f);
#pragma omp parallel for schedule(static) num_threads(A.n_threads) if (A.in * A.batch > MIN_PARALLEL_WORK)
    for (int64_t c = 0; c < A.in; c++)
        for (int64_t b = 0; b < A.batch; b++)
            xt[(size_t)(((b / MAXB) * A.in + c) * BP + b % MAXB)] = A.x[b * A.in + c];
    switch (BP) {
        case 8: run<SymT, SYM, 8>(A, xt.data(), chunks); break;
        case 16: run<SymT, SYM, 16>(A, xt.data(), chunks); break;
        case 24: run<SymT, SYM, 24>(A, xt.data(), chunks); break;
        default: run<SymT, SYM, 32>(A, xt.data(), chunks); break;
    }
}



// uint32 words of scratch that rows_b1 needs for a matrix of `in` columns (either path).
inline int64_t rows_b1_buf_words(int64_t in) { return std::max<int64_t>(in + 8, fused_xb_floats<false>(in)); }

// Rows [lo, hi) of y = W x for ONE row of x (the decode engine's row split): decoding starts at the block
// holding row lo, and the rows of that block before lo are decoded and dropped. buf: rows_b1_buf_words(in).
template <typename SymT, bool SYM>
void rows_b1(const Sub1Matrix& m, const float* x, float* y, int64_t lo, int64_t hi, uint32_t* buf) {
    const int64_t gs = m.group_size > 0 ? m.group_size : m.in;
    const int64_t n_groups = (m.in + gs - 1) / gs;
    if (n_groups == 1 && m.fused != nullptr && m.fused_k >= 1 && m.fused_k <= 6) {
        float* xb = reinterpret_cast<float*>(buf);  // only ever accessed as float in this path
        fused_prepare<SYM>(x, m.in, xb);
        const SymT* sp = (const SymT*)m.stream + m.block_offsets[lo / m.block_rows];
        fused_skip_rows_k<SymT>(m.fused_k, sp, m.fused, m.in, lo % m.block_rows);
        for (int64_t r0 = lo; r0 < hi;) {  // block by block: a block's first row starts at its offset
            const int64_t r1 = std::min(hi, (r0 / m.block_rows + 1) * m.block_rows);
            if (r0 % m.block_rows == 0) sp = (const SymT*)m.stream + m.block_offsets[r0 / m.block_rows];
            const SymT* lim = (const SymT*)m.stream + m.block_offsets[r0 / m.block_rows + 1] - 1;
            fused_rows_k<SymT, SYM>(m.fused_k, sp, lim, m.fused, xb, m.in, m.scale_pos, m.scale_neg, y, r0, r1);
            r0 = r1;
        }
        return;
    }
    const SymT* sp = nullptr;
    for (int64_t r = lo / m.block_rows * m.block_rows; r < hi; r++) {
        if (r % m.block_rows == 0) sp = (const SymT*)m.stream + m.block_offsets[r / m.block_rows];
        const int64_t n = decode_row<SymT>(sp, m.dict, m.lanes, m.in, buf);
        if (r < lo) continue;
        float acc = 0.f, s = 0.f, a = 0.f;
        int64_t k0 = 0;
        for (int64_t g = 0; g < n_groups; g++) {
            const int64_t k1 = g + 1 == n_groups ? n : lower(buf, k0, n, (g + 1) * gs);
            sum_range_1<SYM>(buf, k0, k1, x, s, a);
            const float p = m.scale_pos[r * n_groups + g], q = SYM ? p : m.scale_neg[r * n_groups + g];
            acc += SYM ? p * s : 0.5f * (p + q) * s + 0.5f * (p - q) * a;
            k0 = k1;
        }
        y[r] = acc;
    }
}

inline void rows_b1_any(const Sub1Matrix& m, const float* x, float* y, int64_t lo, int64_t hi, uint32_t* buf) {
    const bool sym = m.scale_neg == nullptr;
    if (m.sym_bits == 8) {
        sym ? rows_b1<uint8_t, true>(m, x, y, lo, hi, buf) : rows_b1<uint8_t, false>(m, x, y, lo, hi, buf);
    } else {
        sym ? rows_b1<uint16_t, true>(m, x, y, lo, hi, buf) : rows_b1<uint16_t, false>(m, x, y, lo, hi, buf);
    }
}

}  // namespace sub1k
