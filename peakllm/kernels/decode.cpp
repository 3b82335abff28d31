// The whole-step decode engine: one call decodes one token for B sequences through every decoder layer
// and the lm_head, inside ONE OpenMP parallel region.
//
// Why: at 135M parameters a token is ~10 ms of work split into ~300 matvecs and small ops. Started one
// by one (a torch op, a ctypes call, an OpenMP region each), the calls and the waking of sleeping
// threads (OMP_WAIT_POLICY=PASSIVE, which peakllm sets so it never spins on a shared machine) cost as
// much as the arithmetic. Here the threads are woken once per token and meet at spin barriers between
// the dependent phases of a layer (~0.1 us each):
//   q, k, v rows | k/v RoPE + cache append | attention heads | o rows | (RMSNorm of o +) residual + RMSNorm |
//   gate, up rows | SiLU (or GELU) * up | down rows | (RMSNorm of down +) residual + next RMSNorm
// Each linear is a `Lin` descriptor: dense fp32 / bf16 weights (dense_impl.h), group-wise int-k codes
// (intk_impl.h), N:M / bitmask sparse weights with float or int-k kept values (sparse_impl.h), or a
// sub-1-bit stream (sub1_impl.h), 2-bit / ternary lookup tables (decode_lut.h), each with an optional unmerged LoRA term (lora_impl.h). A layer's MLP
// may instead be a mixture of experts (`Moe`, batch 1):
//   router + top-k | gate/up rows of each chosen expert, SiLU * up | down rows of each, weighted and summed.
// OLMoE's q/k norms span the whole q / k (not each head): one more phase after the q, k, v rows.
// Every thread takes a contiguous band of output rows of each linear (one stream through the weights per
// thread; int8-activation int-k bands can be taken over from the back by a thread done early: lin_rows)
// and prepares its own copy of the activations (a few KB, cheaper than another barrier). Arithmetic and
// rounding are those of the per-op kernels, so the engine computes exactly what the op-by-op path computes.
// A barrier that has spun for a while yields the core (sched_yield), so a busy machine degrades
// gracefully instead of collapsing.
#include <memory>

#include "dense_impl.h"
#include "intk_a8_impl.h"
#include "intk_impl.h"
#include "sparse_impl.h"
#include "sparse_bf16_impl.h"
#include "sub1_impl.h"
#include "decode_types.h"
#include "decode_lut.h"
#include "lora_impl.h"

// Rows [lo, hi) of y [B, out] from their fp32 values yf [B, out], plus the bias, rounded once to TX.
template <typename TX>
static void store_band(const float* yf, const float* bias, TX* y, int B, int out, int lo, int hi) {
    for (int b = 0; b < B; ++b)
        for (int o = lo; o < hi; ++o) {
            const size_t i = (size_t)b * out + o;
            store1(y + i, yf[i] + (bias ? bias[o] : 0.f));
        }
}

// Bytes of one row of N:M positions (ceil(log2 M) bits per kept value).
static inline int64_t nm_index_row_bytes(const Lin& L) {
    const int pos_bits = L.m <= 2 ? 1 : (32 - __builtin_clz((unsigned)(L.m - 1)));
    return ((int64_t)L.in / L.m * (L.m - L.n) * pos_bits + 7) / 8;
}

// One sparse tile: rows b0..b0+NB-1 of x against output feature o (errors: positions or offsets that
// disagree with the layout, which the modules' checks at load time rule out).
template <int NB>
static void sparse_tile(const Lin& L, const Values& V, const float* xf, int64_t o, int b0, float* yf,
                        std::atomic<int>& err) {
    if (L.kind == LIN_NM) {
        const int keep = L.m - L.n;
        const int64_t idx_row_bytes = nm_index_row_bytes(L);
        switch (V.kind) {
            case F32: nm_tile<NB, F32>(xf, L.in, L.out, keep, L.m, L.index, idx_row_bytes, V, o, b0, yf, err); break;
            case BF16: nm_tile<NB, BF16>(xf, L.in, L.out, keep, L.m, L.index, idx_row_bytes, V, o, b0, yf, err); break;
            case F16: nm_tile<NB, F16>(xf, L.in, L.out, keep, L.m, L.index, idx_row_bytes, V, o, b0, yf, err); break;
            default: nm_tile<NB, CODES>(xf, L.in, L.out, keep, L.m, L.index, idx_row_bytes, V, o, b0, yf, err);
        }
        return;
    }
#define PEAK_BITMASK(K) bitmask_tile<NB, K>(xf, L.in, L.out, L.index, L.row_offsets, L.qrow_offsets, L.total, V, o, b0, yf, err)
    switch (V.kind) {
        case F32: PEAK_BITMASK(F32); break;
        case BF16: PEAK_BITMASK(BF16); break;
        case F16: PEAK_BITMASK(F16); break;
        default: PEAK_BITMASK(CODES);
    }
#undef PEAK_BITMASK
}

// One thread's reusable buffers (thread_local: OpenMP keeps its worker threads between calls).
struct Work {
    std::vector<float> wide, split, yf, attn, xq, rot, lora_x, lora_t;
    std::vector<uint32_t> sub1buf;
    PreparedX px;
    PreparedQ pq;
    LutTables lut;
};

// Bytes of one row of int-k codes.
static inline int64_t intk_row_bytes(const Lin& L) { return ((int64_t)L.in * L.bits + 7) / 8; }

// Whether other threads may take over rows of L: the int8-activation int-k path computes every row alone
// (a8_tile), so which thread computes a row does not change its value. (The fp32-activation path's 4-row
// tiles depend on where a band starts.)
static inline bool lin_stealable(const Lin& L) {
    return L.kind == LIN_INTK && L.act_bits == 8 && a8_applies(L.bits, L.gstart, L.n_groups);
}

// The int8-activation int-k path in two parts: this thread's quantized copy of x (once per linear), then
// any rows [lo, hi) of y.
// What an int-k layer's codes multiply: x itself, or (a rotated layer) this thread's copy of x times R.
template <typename TX>
static const void* intk_input(const Lin& L, const TX* x, int B, Work& w, int& x_bf16) {
    x_bf16 = sizeof(TX) == 2;
    if (!L.rot_signs) return x;
    w.rot.resize((size_t)B * L.in);
    rotate_x_rows(x, x_bf16, B, L.in, L.rot_signs, L.rot_block, w.rot.data());
    x_bf16 = 0;
    return w.rot.data();
}

template <typename TX>
static void a8_prepare(const Lin& L, const TX* x, int B, Work& w) {
    int xb;
    const void* xin = intk_input<TX>(L, x, B, w, xb);
    intk_prepare_a8(xin, xb, L.perm, B, L.in, L.bits, L.gstart, L.n_groups, w.pq);
    if constexpr (sizeof(TX) != sizeof(float)) w.yf.resize((size_t)B * L.out);
}

template <typename TX>
static void a8_range(const Lin& L, TX* y, int B, int lo, int hi, Work& w) {
    float* yf = sizeof(TX) == sizeof(float) ? (float*)y : w.yf.data();
    const ProblemA8 P{(const uint8_t*)L.w, L.scales, L.zeros, L.in, L.out, intk_row_bytes(L),
                      L.n_groups, B, w.pq.xq.data(), w.pq.sx.data(), w.pq.isum.data(), w.pq.bg.data(), yf};
    intk_a8_rows_any(P, L.bits, lo, hi);
    if (L.bias || sizeof(TX) != sizeof(float)) store_band<TX>(yf, L.bias, y, B, L.out, lo, hi);
}

// Rows [lo, hi) of y [B, out] = x [B, in] @ W.T + bias.
template <typename TX>
static void lin_range(const Lin& L, const TX* x, TX* y, int B, int lo, int hi, Work& w, std::atomic<int>& err) {
    if (lo >= hi) return;
    if (L.kind == LIN_LUT) {  // decode_lut.h; a rotated 2-bit layer's tables are those of x times R
        int xb;
        const void* xin = intk_input<TX>(L, x, B, w, xb);
        w.yf.resize((size_t)B * L.out);
        lut_tables_for(*(const LutMatrix*)L.w, L.in, xin, xb, B, w.lut);
        lut_rows(*(const LutMatrix*)L.w, L.out, w.lut, B, lo, hi, w.yf.data());
        return store_band<TX>(w.yf.data(), L.bias, y, B, L.out, lo, hi);
    }
    if (L.kind == LIN_SUB1) {  // one row of x at a time: the stream is decoded per row of x
        const Sub1Matrix& m = *(const Sub1Matrix*)L.w;
        w.wide.resize((size_t)L.in);
        w.yf.resize((size_t)B * L.out);
        w.sub1buf.resize((size_t)sub1k::rows_b1_buf_words(L.in));
        for (int b = 0; b < B; ++b) {
            load_x_row(x, sizeof(TX) == 2, nullptr, L.in, b, w.wide.data());
            sub1k::rows_b1_any(m, w.wide.data(), w.yf.data() + (size_t)b * L.out, lo, hi, w.sub1buf.data());
        }
        store_band<TX>(w.yf.data(), L.bias, y, B, L.out, lo, hi);
        return;
    }
    if (L.kind == LIN_NM || L.kind == LIN_BITMASK) {
        w.wide.assign((size_t)B * L.in + 8, 0.f);  // +8: whole-vector loads of the last columns stay inside
        for (int b = 0; b < B; ++b) load_x_row(x, sizeof(TX) == 2, nullptr, L.in, b, &w.wide[(size_t)b * L.in]);
        w.yf.resize((size_t)B * L.out);
        float* yf = w.yf.data();
        const int64_t gsz = L.group_size == -1 ? (L.in > 0 ? L.in : 1) : L.group_size;
        const Values V{L.w, L.value_kind, L.bits, L.scales, L.zeros, (int)((L.in + gsz - 1) / gsz), gsz};
        int o = lo;
#ifdef PEAK_AVX2
        if (B == 1 && V.kind == BF16 && (L.kind == LIN_BITMASK || (L.n == 2 && L.m == 4))) {  // sparse_bf16_impl.h
            w.xq.resize((size_t)bf16_xq_size(L.in));
            const uint16_t* vals = (const uint16_t*)L.w;
            if (L.kind == LIN_BITMASK) {
                bitmask_prepare_x(w.wide.data(), L.in, w.xq.data());
                const int64_t mbytes = ((int64_t)L.in + 7) / 8;
                for (; o < hi; ++o)
                    yf[o] = bitmask_bf16_row(w.xq.data(), w.wide.data(), L.in, L.index + o * mbytes, vals,
                                             L.row_offsets[o], L.row_offsets[o + 1] - L.row_offsets[o], L.total, err);
            } else {
                nm24_prepare_x(w.wide.data(), L.in, w.xq.data());
                const int64_t ib = nm_index_row_bytes(L);
                for (; o < hi; ++o)
                    yf[o] = nm24_bf16_row(w.xq.data(), w.wide.data(), L.in, L.index + o * ib, vals + (int64_t)o * (L.in / 2));
            }
        }
        // int-k kept values are compute-bound: four rows per x load pay off. Float kept values are
        // memory-bound, and eight concurrent streams (values and positions of four rows) measured slower
        // than one row at a time (2:4 fp32 layers 10-12 vs 13-19 ms a token on the dev machine).
        if (B == 1 && L.kind == LIN_NM && V.kind == CODES && nm24_fast(L.n, L.m, V))
            for (; o + 4 <= hi; o += 4)
                nm24_tile4_b1<CODES>(w.wide.data(), L.in, L.index, nm_index_row_bytes(L), V, o, yf);
#endif
        for (; o < hi; ++o) {
            int b0 = 0;
            for (; b0 + MAX_TILE <= B; b0 += MAX_TILE) sparse_tile<MAX_TILE>(L, V, w.wide.data(), o, b0, yf, err);
            switch (B - b0) {
                case 1: sparse_tile<1>(L, V, w.wide.data(), o, b0, yf, err); break;
                case 2: sparse_tile<2>(L, V, w.wide.data(), o, b0, yf, err); break;
                case 3: sparse_tile<3>(L, V, w.wide.data(), o, b0, yf, err); break;
                default: break;
            }
        }
        store_band<TX>(yf, L.bias, y, B, L.out, lo, hi);
    } else if (lin_stealable(L)) {
        a8_prepare<TX>(L, x, B, w);
        a8_range<TX>(L, y, B, lo, hi, w);
    } else if (L.kind == LIN_INTK) {
        float* yf;
        if constexpr (sizeof(TX) == sizeof(float)) {
            yf = (float*)y;
        } else {
            w.yf.resize((size_t)B * L.out);
            yf = w.yf.data();
        }
        const int64_t row_bytes = intk_row_bytes(L);
        int xb;
        const void* xin = intk_input<TX>(L, x, B, w, xb);
        intk_prepare(xin, xb, L.perm, B, L.in, L.bits, L.gstart, L.n_groups, w.px);
        const Problem P{(const uint8_t*)L.w, L.scales, L.zeros, L.gstart, L.in, L.out, row_bytes,
                        L.bits, L.n_groups, B, w.px.xp.data(), w.px.xblk.data(), w.px.xsum.data(), yf};
        intk_rows_any(P, lo, hi);
        if (L.bias || sizeof(TX) != sizeof(float)) store_band<TX>(yf, L.bias, y, B, L.out, lo, hi);
    } else if (L.kind == LIN_F32) {
        const float* xf = prepare_x<float, TX>(x, B, L.in, w.wide, w.split);
        dense_rows<float, TX>(xf, (const float*)L.w, L.bias, y, B, L.out, L.in, lo, hi);
    } else {
        const float* xf = prepare_x<bf16_t, TX>(x, B, L.in, w.wide, w.split);
        dense_rows<bf16_t, TX>(xf, (const bf16_t*)L.w, L.bias, y, B, L.out, L.in, lo, hi);
    }
}

// Rows a claim takes at once: 64 KB of codes (16-32 int4 rows of a 7B model's linears), so the owner's
// stream through its band stays long and a claim costs ~1/1000 of reading its rows.
enum { CLAIM_BYTES = 1 << 16 };

// Thread t's band of the output rows (whole 4-row tiles, except for int-k whose tiles start anywhere).
// With claims (one per thread, zeroed) and a stealable L, a thread that finishes its band takes chunks
// from the back of the others' bands: on a shared machine one core often runs slower for a while, and
// the other would otherwise wait at the next barrier (measured: one thread busy 20% less than the other
// over a 944 MB int4 sweep).
template <typename TX>
static void lin_rows(const Lin& L, const TX* x, TX* y, int B, int t, int nt, Work& w, std::atomic<int>& err,
                     RowClaim* claims = nullptr) {
    int lo, hi;
    share(L.out, L.kind == LIN_INTK ? 1 : L.kind == LIN_LUT ? 8 : 4, t, nt, lo, hi);
    const bool lora = L.lora_r > 0;  // an adapter's B (A x) is added to each band of rows once it is computed
    if (!claims || nt == 1 || !lin_stealable(L)) {
        lin_range<TX>(L, x, y, B, lo, hi, w, err);
        if (lora && lo < hi) {
            lora_prepare<TX>(L, x, B, w.lora_x, w.lora_t);
            lora_add<TX>(L, w.lora_t.data(), y, B, lo, hi);
        }
        return;
    }
    a8_prepare<TX>(L, x, B, w);
    if (lora) lora_prepare<TX>(L, x, B, w.lora_x, w.lora_t);
    const int chunk = (int)std::max<int64_t>(1, CLAIM_BYTES / intk_row_bytes(L));
    auto rows = [&](int r0, int r1) {
        a8_range<TX>(L, y, B, r0, r1, w);
        if (lora) lora_add<TX>(L, w.lora_t.data(), y, B, r0, r1);
    };
    int a, b;
    while (claim_rows(claims[t], hi - lo, chunk, false, a, b)) rows(lo + a, lo + b);
    for (int i = 1; i < nt; ++i) {
        const int v = (t + i) % nt;
        int vlo, vhi;
        share(L.out, 1, v, nt, vlo, vhi);
        while (claim_rows(claims[v], vhi - vlo, chunk, true, a, b)) rows(vlo + a, vlo + b);
    }
}

// Whether row b of y = x @ W.T comes out the same whatever the number of rows of x: dense rows, the
// int8-activation int-k path, the sub-1-bit stream and the lookup tables compute each row of x alone; the fp32-activation
// int-k and the sparse paths pick other tiles at one row (tile4_b1, nm24_tile4_b1).
static inline bool lin_row_exact(const Lin& L) {
    return L.kind == LIN_F32 || L.kind == LIN_BF16 || L.kind == LIN_SUB1 || L.kind == LIN_LUT || lin_stealable(L);
}

// lin_rows for the R = B * T rows of a multi-token step: a linear whose rows would not equal the one-token
// step's takes them one row at a time (its weights read R times), so a verified token's logits are the
// logits that decoding it alone gives, bit for bit.
template <typename TX>
static void lin_rows_multi(const Lin& L, const TX* x, TX* y, int R, int t, int nt, Work& w, std::atomic<int>& err,
                           RowClaim* claims) {
    if (R == 1 || lin_row_exact(L)) return lin_rows<TX>(L, x, y, R, t, nt, w, err, claims);
    for (int r = 0; r < R; ++r) lin_rows<TX>(L, x + (size_t)r * L.in, y + (size_t)r * L.out, 1, t, nt, w, err);
}

// The MoE MLP of one token (B = 1, fp32) from h = mlp_norm(x) into d [dim]: router + top-k by thread 0,
// then every thread takes the same band of the I rows of each selected expert's gate and up (so it
// can apply SiLU * up itself), then a band of the dim output rows of every expert's down, summed.
static void moe_mlp(const Moe& M, int dim, const float* h, float* d, int t, int nt, Work& w, std::atomic<int>& err,
                    Barrier& bar);

// Scratch TX elements the step needs for batch B (the largest layer).
static size_t scratch_size(const Layer* layers, int n_layers, int B) {
    size_t most = 0;
    for (int i = 0; i < n_layers; ++i) {
        const Layer& L = layers[i];
        const size_t qd = (size_t)L.n_heads * L.head_dim, kvd = (size_t)L.n_kv * L.head_dim;
        most = std::max(most, (size_t)B * (2 * qd + 2 * kvd + 2 * (size_t)L.dim + 3 * (size_t)L.inter));
    }
    return most;
}

// x [B*T, dim]: the residual stream (updated in place); h [B*T, dim]: attn_norm(x) of layer 0 on entry,
// the final norm's output on return; logits [B*T, head->out] when head is given. T tokens of each sequence
// at positions pos .. pos+T-1 (T > 1: speculative verification; row r is sequence r / T at position
// pos + r % T): every row's key and value go into the cache before any row attends, row r attending to the
// keys up to its own position, so each row's numbers are those of decoding its token alone. cos / sin_signed
// point at position pos of a [positions, head_dim] table (T > 1 reads the rows after it).
template <typename TX>
static int decode_step(const Layer* layers, int n_layers, const Lin* head, TX* x, TX* h, TX* logits, int B, int T,
                        int pos, const TX* cos, const TX* sin_signed, TX* scratch, int nthreads) {
    Barrier bar;
    std::atomic<int> err{0};
    // one RowClaim per thread for each linear of the step (at most seven a layer and the head), in the order
    // every thread meets them
    const int most = nthreads < 1 ? 1 : nthreads;
    std::unique_ptr<RowClaim[]> claims(new RowClaim[((size_t)n_layers * 7 + 1) * most]);
#pragma omp parallel num_threads(most)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        static thread_local Work w;
        size_t seq = 0;
        const int R = B * T;  // rows of every linear
        auto next = [&] { return claims.get() + most * seq++; };
        int lo, hi;
        for (int li = 0; li < n_layers; ++li) {
            const Layer& L = layers[li];
            const int dim = L.dim, H = L.n_heads, KV = L.n_kv, D = L.head_dim, I = L.inter;
            const size_t qd = (size_t)H * D, kvd = (size_t)KV * D;
            TX *q = scratch, *k = q + R * qd, *v = k + R * kvd, *a = v + R * kvd;
            TX *o = a + R * qd, *g = o + (size_t)R * dim, *u = g + (size_t)R * I, *act = u + (size_t)R * I;
            TX* d = act + (size_t)R * I;
            w.attn.resize(3 * (size_t)D + pos + T);
            const TX* lcos = L.rope_cos ? (const TX*)L.rope_cos + (size_t)pos * D : cos;
            const TX* lsin = L.rope_sin ? (const TX*)L.rope_sin + (size_t)pos * D : sin_signed;

            lin_rows_multi<TX>(L.q, h, q, R, t, nt, w, err, next());
            lin_rows_multi<TX>(L.k, h, k, R, t, nt, w, err, next());
            lin_rows_multi<TX>(L.v, h, v, R, t, nt, w, err, next());
            bar.wait(nt);
            if (L.qk_norm_full) {  // in place, one row of q or k per item; the heads below see no norm
                share(2 * R, 1, t, nt, lo, hi);
                for (int i = lo; i < hi; ++i) {
                    TX* r = i < R ? q + (size_t)i * qd : k + (size_t)(i - R) * kvd;
                    add_rmsnorm<TX>(r, nullptr, i < R ? L.qn : L.kn, L.norm_f32w, r, 1, i < R ? (int)qd : (int)kvd,
                                    L.qk_eps);
                }
                bar.wait(nt);
            }
            const void *head_qn = L.qk_norm_full ? nullptr : L.qn, *head_kn = L.qk_norm_full ? nullptr : L.kn;
            share(R * KV, 1, t, nt, lo, hi);
            for (int i = lo; i < hi; ++i) {  // row r's keys and values: the source rows shifted to r, batch r / T
                const int r = i / KV, at = r % T;
                kv_append<TX>(k + (size_t)(r - r / T) * kvd, v + (size_t)(r - r / T) * kvd, head_kn, L.norm_f32w,
                              L.qk_eps, lcos + (size_t)at * D, lsin + (size_t)at * D, (TX*)L.kc, (TX*)L.vc, r / T,
                              i % KV, KV, D, L.max_seq, pos + at, w.attn.data());
            }
            bar.wait(nt);
            share(R * H, 1, t, nt, lo, hi);
            for (int i = lo; i < hi; ++i) {
                const int r = i / H, at = r % T;
                attend_head<TX>(q + (size_t)(r - r / T) * qd, head_qn, L.norm_f32w, L.qk_eps, lcos + (size_t)at * D,
                                lsin + (size_t)at * D, (const TX*)L.kc, (const TX*)L.vc, a + (size_t)(r - r / T) * qd,
                                r / T, i % H, H, KV, D, L.max_seq, pos + at, L.scale, L.window, w.attn.data());
            }
            bar.wait(nt);
            lin_rows_multi<TX>(L.o, a, o, R, t, nt, w, err, next());
            bar.wait(nt);
            share(R, 1, t, nt, lo, hi);
            for (int b = lo; b < hi; ++b) {
                if (L.post_attn_norm)  // in place: o = rmsnorm(o) * w
                    add_rmsnorm<TX>(o + (size_t)b * dim, nullptr, L.post_attn_norm, L.norm_f32w, o + (size_t)b * dim,
                                    1, dim, L.eps);
                add_rmsnorm<TX>(x + (size_t)b * dim, o + (size_t)b * dim, L.mlp_norm, L.norm_f32w, h + (size_t)b * dim,
                                1, dim, L.eps);
            }
            bar.wait(nt);
            if constexpr (sizeof(TX) == sizeof(float)) {
                if (L.moe) {
                    moe_mlp(*L.moe, dim, (const float*)h, (float*)d, t, nt, w, err, bar);
                    goto residual;
                }
            }
            lin_rows_multi<TX>(L.g, h, g, R, t, nt, w, err, next());
            lin_rows_multi<TX>(L.u, h, u, R, t, nt, w, err, next());
            bar.wait(nt);
            share(R * I, 8, t, nt, lo, hi);
            if (lo < hi) gated_act<TX>(L.act, g + lo, u + lo, act + lo, hi - lo);
            bar.wait(nt);
            lin_rows_multi<TX>(L.d, act, d, R, t, nt, w, err, next());
            bar.wait(nt);
        residual:
            share(R, 1, t, nt, lo, hi);
            for (int b = lo; b < hi; ++b) {
                if (L.post_mlp_norm)
                    add_rmsnorm<TX>(d + (size_t)b * dim, nullptr, L.post_mlp_norm, L.norm_f32w, d + (size_t)b * dim,
                                    1, dim, L.eps);
                add_rmsnorm<TX>(x + (size_t)b * dim, d + (size_t)b * dim, L.next_norm, L.norm_f32w, h + (size_t)b * dim,
                                1, dim, L.next_eps);
            }
            bar.wait(nt);
        }
        if (head) lin_rows_multi<TX>(*head, h, logits, R, t, nt, w, err, next());
    }
    return err.load();
}

static void moe_mlp(const Moe& M, int dim, const float* h, float* d, int t, int nt, Work& w, std::atomic<int>& err,
                    Barrier& bar) {
    const int E = M.n_experts, K = M.top_k, I = M.inter;
    float* scores = M.work;
    float* gu = scores + E;                      // [K, 2I]
    float* act = gu + (size_t)K * 2 * I;          // [K, I]
    float* parts = act + (size_t)K * I;           // [K, dim]
    float* weight = parts + (size_t)K * dim;      // [K]
    int* chosen = (int*)(weight + K);             // [K] (room for it is counted in work; the last K floats)
    if (t == 0) {
        lin_range<float>(M.router, h, scores, 1, 0, E, w, err);
        // top k by score, highest first; ties keep the lower index (torch.topk's order does not matter:
        // the experts' outputs are summed)
        for (int j = 0; j < K; ++j) {
            int best = -1;
            for (int e = 0; e < E; ++e) {
                bool taken = false;
                for (int i = 0; i < j; ++i) taken |= chosen[i] == e;
                if (!taken && (best < 0 || scores[e] > scores[best])) best = e;
            }
            chosen[j] = best;
        }
        for (int j = 0; j < K; ++j) weight[j] = 1.f;
        if (M.weighting != MOE_SUM) {  // softmax as torch computes it in fp32: exp(s - max) / sum
            const float mx = scores[chosen[0]];
            float sum = 0.f, top = 0.f;
            for (int e = 0; e < E; ++e) sum += std::exp(scores[e] - mx);
            for (int j = 0; j < K; ++j) top += (weight[j] = std::exp(scores[chosen[j]] - mx) / sum);
            if (M.weighting == MOE_SOFTMAX_TOPK)
                for (int j = 0; j < K; ++j) weight[j] /= top;
        }
    }
    bar.wait(nt);
    int lo, hi;
    share(I, 1, t, nt, lo, hi);
    for (int j = 0; j < K; ++j) {
        const Lin& G = M.gate_up[chosen[j]];
        float* out = gu + (size_t)j * 2 * I;
        lin_range<float>(G, h, out, 1, lo, hi, w, err);          // gate rows
        lin_range<float>(G, h, out, 1, I + lo, I + hi, w, err);  // up rows
        if (lo < hi) silu_mul<float>(out + lo, out + I + lo, act + (size_t)j * I + lo, hi - lo);
    }
    bar.wait(nt);
    share(dim, 4, t, nt, lo, hi);
    for (int j = 0; j < K; ++j) lin_range<float>(M.down[chosen[j]], act + (size_t)j * I, parts + (size_t)j * dim, 1, lo, hi, w, err);
    for (int r = lo; r < hi; ++r) {
        float s = 0.f;
        for (int j = 0; j < K; ++j) s += parts[(size_t)j * dim + r] * weight[j];
        d[r] = s;
    }
    bar.wait(nt);
}

extern "C" {
unsigned long decode_scratch_size(const Layer* layers, int n_layers, int B) {
    return (unsigned long)scratch_size(layers, n_layers, B);
}

// One linear through the engine's row split (for tests: must equal the per-op kernels).
int lin_apply_f32(const Lin* L, const float* x, float* y, int B, int nthreads) {
    std::atomic<int> err{0};
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads)
    {
        static thread_local Work w;
        lin_rows<float>(*L, x, y, B, omp_get_thread_num(), omp_get_num_threads(), w, err);
    }
    return err.load();
}

// lin_apply_f32 with claims, thread `idle` starting only when every other thread has finished, so they take
// its whole band from the back (tests: stolen rows equal the plain split's). idle = -1: no thread waits.
int lin_apply_f32_claims(const Lin* L, const float* x, float* y, int B, int nthreads, int idle) {
    std::atomic<int> err{0}, finished{0};
    const int most = nthreads < 1 ? 1 : nthreads;
    std::unique_ptr<RowClaim[]> claims(new RowClaim[most]);
#pragma omp parallel num_threads(most)
    {
        static thread_local Work w;
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        while (t == idle && finished.load() < nt - 1) sched_yield();
        lin_rows<float>(*L, x, y, B, t, nt, w, err, claims.get());
        finished.fetch_add(1);
    }
    return err.load();
}

// `reps` sweeps over n linears of one shape in one parallel region, each applied to the same x (batch 1)
// and met by a barrier, as a decode step meets them (benchmarks: a matvec's speed as the engine runs it).
int lin_sweep_f32(const Lin* lins, int n, const float* x, float* y, int reps, int nthreads) {
    std::atomic<int> err{0};
    Barrier bar;
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads)
    {
        static thread_local Work w;
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int r = 0; r < reps; ++r)
            for (int i = 0; i < n; ++i) {
                lin_rows<float>(lins[i], x, y, 1, t, nt, w, err);
                bar.wait(nt);
            }
    }
    return err.load();
}

#define STEP_EXPORT(X, S)                                                                                   \
    int decode_step_##S(const Layer* layers, int n_layers, const Lin* head, X* x, X* h, X* logits, int B,    \
                        int T, int pos, const X* cos, const X* sin_signed, X* scratch, int nthreads) {       \
        return decode_step<X>(layers, n_layers, head, x, h, logits, B, T, pos, cos, sin_signed, scratch,       \
                              nthreads);                                                                     \
    }
STEP_EXPORT(float, f32)
STEP_EXPORT(bf16_t, bf16)
}
