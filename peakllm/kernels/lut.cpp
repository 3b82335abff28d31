// Lookup-table matmul y [B, out] = x [B, in] @ W.T for 2-bit int-k and ternary weights repacked into bit-plane
// indices (lut_impl.h, docs/LUT_KERNEL.md): per call, one 16-entry sign table per token and 4 columns, then
// every weight row reads its indices and looks the partial sums up (vpshufb on AVX2, plain loads otherwise).
// Build: g++ -O3 -march=native -fopenmp (peakllm/kernels/build.py); AVX2 path or scalar.
#include "lut_impl.h"

#include <omp.h>

extern "C" {

// x fp32 or bf16 [B, in]; qlut/s1/p2 as lut_impl.h (kind LUT_*); group: columns per weight group in the padded
// column order (a multiple of kblock, or >= in_pad for one group a row); exact: fp32 tables.
int lut_gemm(const void* x, int x_bf16, int B, int64_t in, int64_t in_pad, int64_t out, int64_t out_pad,
             const uint8_t* qlut, const uint16_t* s1, const void* p2, int kind, int group, int n_groups, int kblock,
             float* y, int threads, int exact) {
    if (kind < 0 || kind > 2 || ((kind == LUT_INT2 || kind == LUT_TERN_ASYM) && !p2)) return 1;
    if (kblock < 16 || kblock % 16 || in_pad % kblock || in < 1 || in > in_pad || in_pad - in >= kblock) return 2;
    if (group < kblock || group % kblock || n_groups != (int)((in_pad + group - 1) / group)) return 3;
    if (out < 1 || out_pad % 8 || out > out_pad || B < 1) return 4;
    const int64_t nk = in_pad / kblock, n4 = in_pad / 4;
    // per calling thread, kept between calls: a decode step calls this for every matrix
    thread_local std::vector<float> xp, tf, ts, xs;
    thread_local std::vector<int8_t> tq;
    xp.resize((size_t)B * in_pad);
    tf.resize((size_t)B * n4 * 16);
    ts.resize((size_t)B * nk);
    xs.resize((size_t)B * n_groups);
    tq.resize((size_t)B * n4 * 16);
    lut_load_rows(x, x_bf16, B, in, in_pad, group, n_groups, xp.data(), xs.data());
    // raw pointers: inside the parallel region the names xp, tq, ... would be each thread's own (empty) copies
    float* const xpp = xp.data();
    float* const tfp = tf.data();
    float* const tsp = ts.data();
    int8_t* const tqp = tq.data();
    const LutProblem P{qlut, s1, p2, kind, in_pad, out, out_pad, group, n_groups, kblock, B,
                       tqp, exact ? tfp : nullptr, tsp, xs.data(), y};
    const int64_t tiles = out_pad / 8;
#pragma omp parallel num_threads(pick_threads(threads, out * in * B))
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int lo, hi;
        share((int)(B * nk), 1, t, nt, lo, hi);  // tables: (token, k-block) pairs
        for (int i = lo; i < hi; i++) {
            const int b = i / (int)nk, k = i % (int)nk;
            lut_build_tables(xpp + (size_t)b * in_pad, in_pad, kblock, k, k + 1, tqp + (size_t)b * n4 * 16,
                             tfp + (size_t)b * n4 * 16, tsp + (size_t)b * nk);
        }
#pragma omp barrier
        share((int)tiles, 1, t, nt, lo, hi);
        lut_tiles(P, lo, hi);
    }
    return 0;
}

// Which path the int8-table kernel runs in this build (for tests): 0 scalar, 1 AVX2.
int lut_path() {
#ifdef PEAK_AVX2
    return 1;
#else
    return 0;
#endif
}

}  // extern "C"
