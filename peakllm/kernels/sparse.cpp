// Sparse matmuls y[b, o] = sum_c x[b, c] * w[o, c] straight from the packed sparse layouts of
// docs/DESIGN.md, never building the dense weight matrix:
//  - N:M (N zeros in every M columns, K = M - N kept): kept values row-major `[out, in*K/M]` as floats
//    (fp32 / bf16 / fp16) or int-k codes (affine groups over the original columns), plus a bitstream of
//    ceil(log2 M)-bit positions. 2:4 has an AVX2 path: one byte of positions covers 8 columns, and a
//    256-entry table turns it into the lane permutation that gathers the 4 matching activations.
//  - bitmask: one bit a column, kept values row-major with row_offsets; the AVX2 path compresses the
//    8 activations of a mask byte with a table-driven permutation and masks the unused lanes.
// int-k kept values are dequantized in registers (w = q * scale - zero * scale), once per 8 values,
// and reused by every row of x. Everything else (other N:M, other bit widths, tails) is scalar.
// Build: g++ -O3 -march=native -fopenmp (peakllm/kernels/build.py); AVX2+FMA path or scalar.
// (Shared helpers live in common.h.)
#include <cstdint>
#include <cstring>
#include "common.h"

#include <atomic>
#include <vector>

enum { MAX_TILE = 4, F32 = 0, BF16 = 1, F16 = 2, CODES = 3 };

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
    if (fast) {
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
    const bool fast = KIND != CODES || ((V.bits == 4 || V.bits == 8) && V.group_size % 8 == 0);
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

template <typename F>
static void over_rows(int64_t out, int B, int threads, int64_t work, F tile_at) {
#pragma omp parallel for schedule(static) num_threads(pick_threads(threads, work))
    for (int64_t o = 0; o < out; o++) {
        int b0 = 0;
        for (; b0 + MAX_TILE <= B; b0 += MAX_TILE) tile_at(std::integral_constant<int, MAX_TILE>{}, o, b0);
        switch (B - b0) {
            case 1: tile_at(std::integral_constant<int, 1>{}, o, b0); break;
            case 2: tile_at(std::integral_constant<int, 2>{}, o, b0); break;
            case 3: tile_at(std::integral_constant<int, 3>{}, o, b0); break;
            default: break;
        }
    }
}

// Writes the kept values of row o into row[] at their columns, given in ascending order by next_col(k).
// Groups are walked along with the columns, so there is no division per value.
template <int KIND, typename NextCol>
static int64_t scatter_row(const Values& V, int64_t base, int64_t count, int64_t o, float* row, NextCol next_col) {
    int64_t g = -1, next_group = 0;
    float scale = 0.f, zs = 0.f;
    for (int64_t k = 0; k < count; k++) {
        const int64_t col = next_col(k);
        if (col < 0) return k;
        float w;
        if constexpr (KIND == F32) {
            w = ((const float*)V.data)[base + k];
        } else if constexpr (KIND == BF16) {
            w = bf16_to_f32(((const uint16_t*)V.data)[base + k]);
        } else if constexpr (KIND == F16) {
            w = f16_to_f32(((const uint16_t*)V.data)[base + k]);
        } else {
            while (col >= next_group) {
                g++;
                next_group += V.group_size;
                scale = f16_to_f32(V.scales[o * V.n_groups + g]);
                zs = scale * (float)V.zeros[o * V.n_groups + g];
            }
            w = (float)code_at((const uint8_t*)V.data + base, k, V.bits) * scale - zs;
        }
        row[col] = w;
    }
    return count;
}

template <typename NextCol>
static int64_t scatter_any(const Values& V, int64_t base, int64_t count, int64_t o, float* row, NextCol next_col) {
    switch (V.kind) {
        case F32: return scatter_row<F32>(V, base, count, o, row, next_col);
        case BF16: return scatter_row<BF16>(V, base, count, o, row, next_col);
        case F16: return scatter_row<F16>(V, base, count, o, row, next_col);
        default: return scatter_row<CODES>(V, base, count, o, row, next_col);
    }
}

static void store_row(const float* row, int64_t in, int64_t o, void* dst, int dst_bf16) {
    if (dst_bf16) {
        uint16_t* d = (uint16_t*)dst + o * in;
        for (int64_t c = 0; c < in; c++) d[c] = f32_to_bf16(row[c]);
    } else {
        std::memcpy((float*)dst + o * in, row, in * sizeof(float));
    }
}

extern "C" {

// N:M: y [B, out] fp32 = x [B, in] (fp32 / bf16) @ W.T. values: [out, in*K/M] floats of value_kind, or
// (value_kind 3) int-k codes qweight [out, ceil(in*K/M*bits/8)] with scales fp16 / zeros uint8
// [out, n_groups] over original columns. indices: [out, ceil(in*K/M*ceil(log2 M)/8)].
int nm_gemm(const void* x, int x_bf16, int B, int64_t in, int64_t out, int n, int m, const void* values,
            int value_kind, const uint8_t* qweight, int bits, const uint16_t* scales, const uint8_t* zeros,
            int group_size, const uint8_t* indices, float* y, int threads) {
    const int keep = m - n;
    if (m < 2 || keep < 1 || keep > m || in % m) return 1;
    if (value_kind == CODES && (bits < 1 || bits > 8)) return 1;
    const int pos_bits = m <= 2 ? 1 : (32 - __builtin_clz((unsigned)(m - 1)));
    const int64_t per_row = in / m * keep, idx_row_bytes = (per_row * pos_bits + 7) / 8;
    const int64_t gsz = group_size == -1 ? (in > 0 ? in : 1) : group_size;
    if (gsz <= 0) return 1;
    Values V{value_kind == CODES ? (const void*)qweight : values, value_kind, bits, scales, zeros,
             (int)((in + gsz - 1) / gsz), gsz};
    std::vector<float> xf = load_x(x, x_bf16, B, in);
    std::atomic<int> err{0};
    over_rows(out, B, threads, out * per_row * B, [&](auto nb, int64_t o, int b0) {
        constexpr int NB = decltype(nb)::value;
        switch (V.kind) {
            case F32: nm_tile<NB, F32>(xf.data(), in, out, keep, m, indices, idx_row_bytes, V, o, b0, y, err); break;
            case BF16: nm_tile<NB, BF16>(xf.data(), in, out, keep, m, indices, idx_row_bytes, V, o, b0, y, err); break;
            case F16: nm_tile<NB, F16>(xf.data(), in, out, keep, m, indices, idx_row_bytes, V, o, b0, y, err); break;
            default: nm_tile<NB, CODES>(xf.data(), in, out, keep, m, indices, idx_row_bytes, V, o, b0, y, err);
        }
    });
    return err ? 2 : 0;
}

// Bitmask: mask [out, ceil(in/8)], row_offsets int64 [out+1]; kept values either floats (flat, row-major,
// value_kind 0-2) or int-k codes (value_kind 3): a flat byte buffer of per-row bitstreams, row o starting at
// byte qrow_offsets[o]. n_values: elements (floats) or bytes (codes) in that buffer.
int bitmask_gemm(const void* x, int x_bf16, int B, int64_t in, int64_t out, const uint8_t* mask,
                 const int64_t* row_offsets, const void* values, int value_kind, const uint8_t* qweight,
                 const int64_t* qrow_offsets, int bits, const uint16_t* scales, const uint8_t* zeros,
                 int group_size, float* y, int64_t n_values, int threads) {
    if (value_kind == CODES && (bits < 1 || bits > 8)) return 1;
    const int64_t gsz = group_size == -1 ? (in > 0 ? in : 1) : group_size;
    if (gsz <= 0) return 1;
    // every offset is checked before any read that depends on it
    if (row_offsets[0] != 0) return 2;
    for (int64_t o = 0; o < out; o++) {
        int64_t cnt = row_offsets[o + 1] - row_offsets[o];
        if (cnt < 0 || cnt > in) return 2;
        if (value_kind == CODES && (qrow_offsets[o] < 0 || qrow_offsets[o + 1] - qrow_offsets[o] != (cnt * bits + 7) / 8))
            return 2;
    }
    if ((value_kind == CODES ? qrow_offsets[out] : row_offsets[out]) > n_values) return 2;
    Values V{value_kind == CODES ? (const void*)qweight : values, value_kind, bits, scales, zeros,
             (int)((in + gsz - 1) / gsz), gsz};
    std::vector<float> xf = load_x(x, x_bf16, B, in);
    std::atomic<int> err{0};
    over_rows(out, B, threads, out * in * B / 2, [&](auto nb, int64_t o, int b0) {
        constexpr int NB = decltype(nb)::value;
        const float* xd = xf.data();
        switch (V.kind) {
            case F32: bitmask_tile<NB, F32>(xd, in, out, mask, row_offsets, qrow_offsets, n_values, V, o, b0, y, err); break;
            case BF16: bitmask_tile<NB, BF16>(xd, in, out, mask, row_offsets, qrow_offsets, n_values, V, o, b0, y, err); break;
            case F16: bitmask_tile<NB, F16>(xd, in, out, mask, row_offsets, qrow_offsets, n_values, V, o, b0, y, err); break;
            default: bitmask_tile<NB, CODES>(xd, in, out, mask, row_offsets, qrow_offsets, n_values, V, o, b0, y, err);
        }
    });
    return err ? 2 : 0;
}

// Dense W [out, in] (fp32 or bf16) of an N:M layout, for prefill GEMMs; arguments as nm_gemm.
int nm_dequant(int64_t in, int64_t out, int n, int m, const void* values, int value_kind, const uint8_t* qweight,
               int bits, const uint16_t* scales, const uint8_t* zeros, int group_size, const uint8_t* indices,
               void* dst, int dst_bf16, int threads) {
    const int keep = m - n;
    if (m < 2 || keep < 1 || keep > m || in % m) return 1;
    if (value_kind == CODES && (bits < 1 || bits > 8)) return 1;
    const int pos_bits = m <= 2 ? 1 : (32 - __builtin_clz((unsigned)(m - 1)));
    const int64_t per_row = in / m * keep, idx_row_bytes = (per_row * pos_bits + 7) / 8;
    const int64_t gsz = group_size == -1 ? (in > 0 ? in : 1) : group_size;
    if (gsz <= 0) return 1;
    Values V{value_kind == CODES ? (const void*)qweight : values, value_kind, bits, scales, zeros,
             (int)((in + gsz - 1) / gsz), gsz};
    std::atomic<int> err{0};
#pragma omp parallel num_threads(pick_threads(threads, out * in))
    {
        std::vector<float> row(in);
#pragma omp for schedule(static)
        for (int64_t o = 0; o < out; o++) {
            std::fill(row.begin(), row.end(), 0.f);
            const uint8_t* idx = indices + o * idx_row_bytes;
            const int64_t base = V.kind == CODES ? o * ((per_row * V.bits + 7) / 8) : o * per_row;
            int64_t group_col = 0, in_group = 0;  // column of the current group of M, kept values seen in it
            auto next_col = [&](int64_t k) -> int64_t {
                unsigned pos = code_at(idx, k, pos_bits);
                if ((int)pos >= m) return -1;
                int64_t col = group_col + pos;
                if (++in_group == keep) { in_group = 0; group_col += m; }
                return col;
            };
            if (scatter_any(V, base, per_row, o, row.data(), next_col) != per_row) err = 1;
            store_row(row.data(), in, o, dst, dst_bf16);
        }
    }
    return err ? 2 : 0;
}

// Dense W [out, in] (fp32 or bf16) of a bitmask layout, for prefill GEMMs; arguments as bitmask_gemm.
int bitmask_dequant(int64_t in, int64_t out, const uint8_t* mask, const int64_t* row_offsets, const void* values,
                    int value_kind, const uint8_t* qweight, const int64_t* qrow_offsets, int bits,
                    const uint16_t* scales, const uint8_t* zeros, int group_size, int64_t n_values, void* dst,
                    int dst_bf16, int threads) {
    if (value_kind == CODES && (bits < 1 || bits > 8)) return 1;
    const int64_t gsz = group_size == -1 ? (in > 0 ? in : 1) : group_size;
    if (gsz <= 0) return 1;
    if (row_offsets[0] != 0) return 2;
    for (int64_t o = 0; o < out; o++) {
        int64_t cnt = row_offsets[o + 1] - row_offsets[o];
        if (cnt < 0 || cnt > in) return 2;
        if (value_kind == CODES && (qrow_offsets[o] < 0 || qrow_offsets[o + 1] - qrow_offsets[o] != (cnt * bits + 7) / 8))
            return 2;
    }
    if ((value_kind == CODES ? qrow_offsets[out] : row_offsets[out]) > n_values) return 2;
    Values V{value_kind == CODES ? (const void*)qweight : values, value_kind, bits, scales, zeros,
             (int)((in + gsz - 1) / gsz), gsz};
    const int64_t mbytes = (in + 7) / 8;
    std::atomic<int> err{0};
#pragma omp parallel num_threads(pick_threads(threads, out * in))
    {
        std::vector<float> row(in);
#pragma omp for schedule(static)
        for (int64_t o = 0; o < out; o++) {
            std::fill(row.begin(), row.end(), 0.f);
            const int64_t cnt = row_offsets[o + 1] - row_offsets[o];
            const int64_t base = V.kind == CODES ? qrow_offsets[o] : row_offsets[o];
            const uint8_t* mrow = mask + o * mbytes;
            int64_t j = 0;
            unsigned bits_left = mbytes ? mrow[0] : 0;
            auto next_col = [&](int64_t) -> int64_t {  // the next set bit of the row's mask, -1 past the end
                while (!bits_left) {
                    if (++j >= mbytes) return -1;
                    bits_left = mrow[j];
                }
                int64_t col = j * 8 + __builtin_ctz(bits_left);
                bits_left &= bits_left - 1;
                return col < in ? col : -1;
            };
            // every kept value needs a set bit, and no set bit may be left over after them
            if (scatter_any(V, base, cnt, o, row.data(), next_col) != cnt || next_col(0) != -1) err = 1;
            store_row(row.data(), in, o, dst, dst_bf16);
        }
    }
    return err ? 2 : 0;
}

}  // extern "C"
