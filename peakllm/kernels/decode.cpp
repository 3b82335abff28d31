// The whole-step decode engine: one call decodes one token for B sequences through every decoder layer
// and the lm_head, inside ONE OpenMP parallel region.
//
// Why: at 135M parameters a token is ~10 ms of work split into ~300 matvecs and small ops. Started one
// by one (a torch op, a ctypes call, an OpenMP region each), the calls and the waking of sleeping
// threads (OMP_WAIT_POLICY=PASSIVE, which peakllm sets so it never spins on a shared machine) cost as
// much as the arithmetic. Here the threads are woken once per token and meet at spin barriers between
// the dependent phases of a layer (~0.1 us each):
//   q, k, v rows | k/v RoPE + cache append | attention heads | o rows | residual + RMSNorm |
//   gate, up rows | SiLU * up | down rows | residual + next RMSNorm
// Each linear is a `Lin` descriptor: dense fp32 / bf16 weights (dense_impl.h) or group-wise int-k codes
// (intk_impl.h). Every thread takes a contiguous band of output rows of each linear (one stream through
// the weights per thread) and prepares its own copy of the activations (x widened / reordered for the
// kernel; a few KB, cheaper than another barrier). Arithmetic and rounding are those of the per-op
// kernels, so the engine computes exactly what the op-by-op path computes.
// A barrier that has spun for a while yields the core (sched_yield), so a busy machine degrades
// gracefully instead of collapsing.
#include "dense_impl.h"
#include "intk_impl.h"

#include <atomic>
#include <sched.h>

enum { LIN_F32 = 0, LIN_BF16 = 1, LIN_INTK = 2 };

// One linear layer y = x @ W.T + bias as the engine reads it.
struct Lin {
    int kind, in, out, bits, n_groups;
    const void* w;          // dense weights [out, in] (fp32 / bf16), or int-k codes [out, ceil(in*bits/8)]
    const float* bias;      // [out] or null
    const uint16_t* scales; // int-k: fp16 [out, n_groups]
    const uint8_t* zeros;   // int-k: uint8 [out, n_groups]
    const int32_t* gstart;  // int-k: group column ranges [n_groups + 1]
    const int32_t* perm;    // int-k act-order: x columns gathered by perm, or null
};

// One Llama-style decoder layer: the seven linears, norms, and this layer's KV cache [B, KV, S, D].
struct Layer {
    Lin q, k, v, o, g, u, d;
    const void *mlp_norm, *next_norm, *qn, *kn;
    void *kc, *vc;
    int dim, n_heads, n_kv, head_dim, inter, max_seq;
    float eps, next_eps, qk_eps, scale;
};

static constexpr int SPINS_BEFORE_YIELD = 1 << 14;

struct Barrier {
    std::atomic<int> arrived{0};
    std::atomic<unsigned> phase{0};

    void wait(int n) {
        if (n == 1) return;
        const unsigned p = phase.load(std::memory_order_acquire);
        if (arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
            arrived.store(0, std::memory_order_relaxed);
            phase.store(p + 1, std::memory_order_release);
            return;
        }
        for (int spin = 0; phase.load(std::memory_order_acquire) == p; ++spin) {
            if (spin < SPINS_BEFORE_YIELD) {
#if defined(__x86_64__) || defined(__i386__)
                _mm_pause();
#endif
            } else {
                sched_yield();
            }
        }
    }
};

// One thread's reusable buffers (thread_local: OpenMP keeps its worker threads between calls).
struct Work {
    std::vector<float> wide, split, yf, attn;
    PreparedX px;
};

// Thread t's share of the output rows of y [B, out] = x [B, in] @ W.T + bias.
template <typename TX>
static void lin_rows(const Lin& L, const TX* x, TX* y, int B, int t, int nt, Work& w) {
    int lo, hi;
    if (L.kind == LIN_INTK) {
        share(L.out, 1, t, nt, lo, hi);
        if (lo >= hi) return;
        intk_prepare(x, sizeof(TX) == 2, L.perm, B, L.in, L.bits, L.gstart, L.n_groups, w.px);
        float* yf;
        if constexpr (sizeof(TX) == sizeof(float)) {
            yf = (float*)y;
        } else {
            w.yf.resize((size_t)B * L.out);
            yf = w.yf.data();
        }
        const Problem P{(const uint8_t*)L.w, L.scales, L.zeros, L.gstart, L.in, L.out, ((int64_t)L.in * L.bits + 7) / 8,
                        L.bits, L.n_groups, B, w.px.xp.data(), w.px.xblk.data(), w.px.xsum.data(), yf};
        intk_rows_any(P, lo, hi);
        if (L.bias || sizeof(TX) != sizeof(float))
            for (int b = 0; b < B; ++b)
                for (int o = lo; o < hi; ++o) {
                    const size_t i = (size_t)b * L.out + o;
                    store1(y + i, yf[i] + (L.bias ? L.bias[o] : 0.f));
                }
    } else if (L.kind == LIN_F32) {
        share(L.out, 4, t, nt, lo, hi);
        if (lo >= hi) return;
        const float* xf = prepare_x<float, TX>(x, B, L.in, w.wide, w.split);
        dense_rows<float, TX>(xf, (const float*)L.w, L.bias, y, B, L.out, L.in, lo, hi);
    } else {
        share(L.out, 4, t, nt, lo, hi);
        if (lo >= hi) return;
        const float* xf = prepare_x<bf16_t, TX>(x, B, L.in, w.wide, w.split);
        dense_rows<bf16_t, TX>(xf, (const bf16_t*)L.w, L.bias, y, B, L.out, L.in, lo, hi);
    }
}

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

// x [B, dim]: the residual stream (updated in place); h [B, dim]: attn_norm(x) of layer 0 on entry,
// the final norm's output on return; logits [B, head->out] when head is given.
template <typename TX>
static void decode_step(const Layer* layers, int n_layers, const Lin* head, TX* x, TX* h, TX* logits, int B, int pos,
                        const TX* cos, const TX* sin_signed, TX* scratch, int nthreads) {
    Barrier bar;
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        static thread_local Work w;
        int lo, hi;
        for (int li = 0; li < n_layers; ++li) {
            const Layer& L = layers[li];
            const int dim = L.dim, H = L.n_heads, KV = L.n_kv, D = L.head_dim, I = L.inter;
            const size_t qd = (size_t)H * D, kvd = (size_t)KV * D;
            TX *q = scratch, *k = q + B * qd, *v = k + B * kvd, *a = v + B * kvd;
            TX *o = a + B * qd, *g = o + (size_t)B * dim, *u = g + (size_t)B * I, *act = u + (size_t)B * I;
            TX* d = act + (size_t)B * I;
            w.attn.resize(3 * (size_t)D + pos + 1);

            lin_rows<TX>(L.q, h, q, B, t, nt, w);
            lin_rows<TX>(L.k, h, k, B, t, nt, w);
            lin_rows<TX>(L.v, h, v, B, t, nt, w);
            bar.wait(nt);
            share(B * KV, 1, t, nt, lo, hi);
            for (int i = lo; i < hi; ++i)
                kv_append<TX>(k, v, (const TX*)L.kn, L.qk_eps, cos, sin_signed, (TX*)L.kc, (TX*)L.vc, i / KV, i % KV,
                              KV, D, L.max_seq, pos, w.attn.data());
            bar.wait(nt);
            share(B * H, 1, t, nt, lo, hi);
            for (int i = lo; i < hi; ++i)
                attend_head<TX>(q, (const TX*)L.qn, L.qk_eps, cos, sin_signed, (const TX*)L.kc, (const TX*)L.vc, a,
                                i / H, i % H, H, KV, D, L.max_seq, pos, L.scale, w.attn.data());
            bar.wait(nt);
            lin_rows<TX>(L.o, a, o, B, t, nt, w);
            bar.wait(nt);
            share(B, 1, t, nt, lo, hi);
            for (int b = lo; b < hi; ++b)
                add_rmsnorm<TX>(x + (size_t)b * dim, o + (size_t)b * dim, (const TX*)L.mlp_norm, h + (size_t)b * dim,
                                1, dim, L.eps);
            bar.wait(nt);
            lin_rows<TX>(L.g, h, g, B, t, nt, w);
            lin_rows<TX>(L.u, h, u, B, t, nt, w);
            bar.wait(nt);
            share(B * I, 8, t, nt, lo, hi);
            if (lo < hi) silu_mul<TX>(g + lo, u + lo, act + lo, hi - lo);
            bar.wait(nt);
            lin_rows<TX>(L.d, act, d, B, t, nt, w);
            bar.wait(nt);
            share(B, 1, t, nt, lo, hi);
            for (int b = lo; b < hi; ++b)
                add_rmsnorm<TX>(x + (size_t)b * dim, d + (size_t)b * dim, (const TX*)L.next_norm, h + (size_t)b * dim,
                                1, dim, L.next_eps);
            bar.wait(nt);
        }
        if (head) lin_rows<TX>(*head, h, logits, B, t, nt, w);
    }
}

extern "C" {
unsigned long decode_scratch_size(const Layer* layers, int n_layers, int B) {
    return (unsigned long)scratch_size(layers, n_layers, B);
}

// One linear through the engine's row split (for tests: must equal the per-op kernels).
void lin_apply_f32(const Lin* L, const float* x, float* y, int B, int nthreads) {
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads)
    {
        static thread_local Work w;
        lin_rows<float>(*L, x, y, B, omp_get_thread_num(), omp_get_num_threads(), w);
    }
}

#define STEP_EXPORT(X, S)                                                                                   \
    void decode_step_##S(const Layer* layers, int n_layers, const Lin* head, X* x, X* h, X* logits, int B,   \
                         int pos, const X* cos, const X* sin_signed, X* scratch, int nthreads) {             \
        decode_step<X>(layers, n_layers, head, x, h, logits, B, pos, cos, sin_signed, scratch, nthreads);   \
    }
STEP_EXPORT(float, f32)
STEP_EXPORT(bf16_t, bf16)
}
