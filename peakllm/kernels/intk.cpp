// Group-wise int-k (k = 2, 3, 4, 8) affine matmul y[b, o] = sum_c x[b, c] * w[o, c] read straight from
// the packed bitstreams of docs/DESIGN.md, never building the dense weight matrix:
//   y[b, o] = sum_g scale[o, g] * (sum_{c in g} q[o, c] * x[b, c] - zero[o, g] * xsum[b, g]),
// with the group sums xsum computed once per call. Groups are contiguous column ranges given by
// group_starts (act-order layers are permuted once at module construction, and x is gathered by
// perm per call). Inside each aligned block of 32 columns the SIMD decoder produces codes in a fixed
// lane order (e.g. int4: the even, then the odd columns of each 16); x is reordered once per call
// to match, so the weights are used exactly as stored. Columns outside whole blocks go through scalar code.
// Build: g++ -O3 -march=native -fopenmp (peakllm/kernels/build.py); AVX2+FMA path or scalar.
// With int8 activations (intk_gemm_a8): AVX-512 VNNI / AVX-VNNI, AVX2, or scalar integer dot products.
#include "intk_a8_impl.h"

#include <omp.h>

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
    PreparedX px;
    intk_prepare(x, x_bf16, perm, B, in, bits, gstart, n_groups, px);
    Problem P{qweight, scales, zeros, gstart, in, out, (in * bits + 7) / 8, bits, n_groups, B,
              px.xp.data(), px.xblk.data(), px.xsum.data(), y};
    const int64_t work = out * in * B;
#pragma omp parallel num_threads(pick_threads(threads, work))
    {   // contiguous bands of whole 4-row tiles, one per thread
        int lo, hi;
        share((int)out, 4, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
        intk_rows_any(P, lo, hi);
    }
    return 0;
}

// The same product with x quantized to int8 per 32-column block (intk_a8_impl.h: the arithmetic and its
// error bound); layers where that path does not apply (a8_applies) take the fp32-activation path.
int intk_gemm_a8(const void* x, int x_bf16, const int32_t* perm, int B, int64_t in, const uint8_t* qweight,
                 const uint16_t* scales, const uint8_t* zeros, const int32_t* gstart, int n_groups, int64_t out,
                 int bits, float* y, int threads) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return 1;
    if (!groups_ok(gstart, n_groups, in)) return 2;
    if (!a8_applies(bits, gstart, n_groups))
        return intk_gemm(x, x_bf16, perm, B, in, qweight, scales, zeros, gstart, n_groups, out, bits, y, threads);
    if (perm)
        for (int64_t c = 0; c < in; c++)
            if (perm[c] < 0 || perm[c] >= in) return 3;
    PreparedQ pq;
    intk_prepare_a8(x, x_bf16, perm, B, in, bits, gstart, n_groups, pq);
    const ProblemA8 P{qweight, scales, zeros, in, out, (in * bits + 7) / 8, n_groups, B,
                      pq.xq.data(), pq.sx.data(), pq.isum.data(), pq.bg.data(), y};
#pragma omp parallel num_threads(pick_threads(threads, out * in * B))
    {
        int lo, hi;
        share((int)out, 4, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
        intk_a8_rows_any(P, bits, lo, hi);
    }
    return 0;
}

// dst [B, in] fp32 = rows of x (fp32 or bf16) rotated by a rotated int-k layer's R (common.h: rotate_x_rows);
// block a power of two dividing in.
int intk_rotate(const void* x, int x_bf16, int B, int64_t in, const int8_t* signs, int block, float* dst) {
    if (block < 2 || (block & (block - 1)) || in % block) return 1;
    rotate_x_rows(x, x_bf16, B, in, signs, block, dst);
    return 0;
}

// Which int8-activation path this build runs (for tests): 0 scalar, 1 AVX2, 2 AVX-512 VNNI, 3 AVX-VNNI.
int intk_a8_path() {
#if defined(PEAK_VNNI)
    return 1 + PEAK_VNNI;
#elif defined(PEAK_AVX2)
    return 1;
#else
    return 0;
#endif
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
