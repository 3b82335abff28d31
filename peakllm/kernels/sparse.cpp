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
#include "sparse_impl.h"
#include "sparse_bf16_impl.h"

#include <omp.h>
#include <type_traits>

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
#ifdef PEAK_AVX2
    if (B == 1 && V.kind == BF16 && n == 2 && m == 4) {  // sparse_bf16_impl.h
        std::vector<float> xq(bf16_xq_size(in));
        nm24_prepare_x(xf.data(), in, xq.data());
#pragma omp parallel for schedule(static) num_threads(pick_threads(threads, out * per_row))
        for (int64_t o = 0; o < out; o++)
            y[o] = nm24_bf16_row(xq.data(), xf.data(), in, indices + o * idx_row_bytes, (const uint16_t*)values + o * per_row);
        return 0;
    }
    if (B == 1 && V.kind == CODES && nm24_fast(n, m, V)) {  // the decode engine's batch-1 2:4 tile
#pragma omp parallel num_threads(pick_threads(threads, out * per_row))
        {
            int lo, hi;
            share((int)out, 4, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
            int o = lo;
            for (; o + 4 <= hi; o += 4) nm24_tile4_b1<CODES>(xf.data(), in, indices, idx_row_bytes, V, o, y);
            for (; o < hi; o++) nm_tile<1, CODES>(xf.data(), in, out, keep, m, indices, idx_row_bytes, V, o, 0, y, err);
        }
        return err ? 2 : 0;
    }
#endif
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
#ifdef PEAK_AVX2
    if (B == 1 && V.kind == BF16) {  // sparse_bf16_impl.h
        std::vector<float> xq(bf16_xq_size(in));
        bitmask_prepare_x(xf.data(), in, xq.data());
        const int64_t mbytes = (in + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(pick_threads(threads, out * in / 2))
        for (int64_t o = 0; o < out; o++)
            y[o] = bitmask_bf16_row(xq.data(), xf.data(), in, mask + o * mbytes, (const uint16_t*)values, row_offsets[o],
                                    row_offsets[o + 1] - row_offsets[o], n_values, err);
        return err ? 2 : 0;
    }
#endif
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
