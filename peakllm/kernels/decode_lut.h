// The decode engine's lookup-table linear kind (LIN_LUT, decode.cpp): 2-bit int-k and ternary matrices in the
// LUT kernel's layout (lut_impl.h), computed with that kernel's own table build and tiles, so the engine's rows
// equal lut_gemm's (the op-by-op path) bit for bit.
//
// Each thread builds the tables of the whole x itself (a few KB; cheaper than a barrier) and keeps them for the
// next linear when its x and the table geometry are the same (q, k and v of a layer, the gate and up rows of
// one expert read one x): the x rows are compared in full, so a stale table is never used. A thread's band of
// rows is covered by whole 8-row tiles computed into its own fp32 buffer; a tile that straddles two bands
// (the MoE phase splits rows one by one) is computed by both threads, with the same result.
#pragma once
#include <algorithm>
#include <cstring>
#include <vector>

#include "lut_impl.h"

// One matrix as kernels/lut.py packs it (LutWeights), pointed to by Lin.w.
struct LutMatrix {
    const uint8_t* qlut;  // [out_pad/8, in_pad/16, 32]
    const uint16_t* s1;   // fp16 [out_pad/8, n_groups, 8]
    const void* p2;       // int2: uint8 zeros; asymmetric ternary: fp16 scale_pos; symmetric: null
    int kind, group, n_groups, kblock, exact;  // LUT_*; exact: fp32 tables (lut_row_exact)
    int64_t in_pad, out_pad;
};

// One thread's tables of its last x (lut_build_tables' layout) and what they were built for.
struct LutTables {
    std::vector<float> xp, xnew, tf, ts, xs;
    std::vector<int8_t> tq;
    int64_t in_pad = -1;
    int kblock = 0, B = 0;
};

// The tables of x (fp32 or bf16 [B, in]) for M in T: rebuilt unless T holds them for the same padded rows.
static void lut_tables_for(const LutMatrix& M, int64_t in, const void* x, int x_bf16, int B, LutTables& T) {
    const size_t n = (size_t)B * M.in_pad;
    T.xnew.resize(n);
    T.xs.resize((size_t)B * M.n_groups);
    lut_load_rows(x, x_bf16, B, in, M.in_pad, M.group, M.n_groups, T.xnew.data(), T.xs.data());
    if (T.in_pad == M.in_pad && T.kblock == M.kblock && T.B == B && !std::memcmp(T.xnew.data(), T.xp.data(), n * 4))
        return;
    std::swap(T.xp, T.xnew);
    const int64_t n4 = M.in_pad / 4, nk = M.in_pad / M.kblock;
    T.tf.resize(n4 * 16 * B);
    T.tq.resize(n4 * 16 * B);
    T.ts.resize((size_t)nk * B);
    for (int b = 0; b < B; b++)
        lut_build_tables(T.xp.data() + (size_t)b * M.in_pad, M.in_pad, M.kblock, 0, nk, T.tq.data() + b * n4 * 16,
                         T.tf.data() + b * n4 * 16, T.ts.data() + (size_t)b * nk);
    T.in_pad = M.in_pad, T.kblock = M.kblock, T.B = B;
}

// Rows [lo, hi) of yf [B, out] = x @ W.T (fp32, no bias) from the tables in T; rows of the tiles at either end
// outside [lo, hi) are written too (yf is the thread's own).
static void lut_rows(const LutMatrix& M, int64_t out, const LutTables& T, int B, int lo, int hi, float* yf) {
    const LutProblem P{M.qlut, M.s1, M.p2, M.kind, M.in_pad, out, M.out_pad, M.group, M.n_groups, M.kblock, B,
                       T.tq.data(), M.exact ? T.tf.data() : nullptr, T.ts.data(), T.xs.data(), yf};
    lut_tiles(P, lo / 8, (hi + 7) / 8);
}
