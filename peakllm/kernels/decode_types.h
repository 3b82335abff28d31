// The whole-step decode engine's descriptors (decode.cpp; kernels/decode.py builds them with ctypes, field for
// field): one linear layer (`Lin`), a mixture-of-experts MLP (`Moe`), one decoder layer (`Layer`), the
// spin barrier the engine's threads meet at between the dependent phases of a layer, and the claims by
// which a thread that has finished its rows of a linear takes over another's (`RowClaim`).
#pragma once
#include <atomic>
#include <cstdint>
#include <sched.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

enum { LIN_F32 = 0, LIN_BF16 = 1, LIN_INTK = 2, LIN_NM = 3, LIN_BITMASK = 4, LIN_SUB1 = 5, LIN_LUT = 6 };

// One linear layer y = x @ W.T + bias as the engine reads it.
struct Lin {
    int kind, in, out, bits, n_groups;
    int n, m, value_kind, group_size;  // sparse: N zeros per M; kept values' kind (sparse_impl.h) and code groups
    const void* w;          // dense weights [out, in] (fp32 / bf16), int-k codes [out, ceil(in*bits/8)],
                            // the sparse layouts' kept values / codes, a Sub1Matrix (sub1_impl.h) or a
                            // LutMatrix (decode_lut.h)
    const float* bias;      // [out] or null
    const uint16_t* scales; // int-k codes (dense or sparse): fp16 [out, n_groups]
    const uint8_t* zeros;   // int-k codes: uint8 [out, n_groups]
    const int32_t* gstart;  // int-k: group column ranges [n_groups + 1]
    const int32_t* perm;    // int-k act-order: x columns gathered by perm, or null
    const uint8_t* index;   // N:M positions or the bitmask
    const int64_t* row_offsets;   // bitmask: first kept value of each row [out + 1]
    const int64_t* qrow_offsets;  // bitmask with codes: first code byte of each row [out + 1]
    int64_t total;          // bitmask: elements (floats) or bytes (codes) of the kept values
    int act_bits;           // int-k: 8 = x quantized to int8 per 32 columns where a8_applies (intk_a8_impl.h), 0 = fp32
    const int8_t* rot_signs;  // rotated int-k (and 2-bit LUT): x times R (common.h rotate_x_rows) before the codes; null: none
    int rot_block;
    const void* lora_a;     // an unmerged LoRA adapter beside the layer (lora_impl.h): A [lora_r, in], or null
    const void* lora_b;     // B [out, lora_r], times the adapter's scale
    int lora_r, lora_bf16;  // rank; A and B are bf16 (1) or fp32 (0)
};

// A mixture-of-experts MLP (batch 1, fp32): a linear router scores the E experts, the top k run
// (gate_up [2I, dim]: gate rows first; down [dim, I]) and their outputs are summed, each times its weight:
// 1 (MOE_SUM: peakllm_moe), its softmax probability over all E scores (MOE_SOFTMAX: OLMoE), or that
// probability over the sum of the top k's (MOE_SOFTMAX_TOPK: norm_topk_prob). Softmax keeps the order of
// the scores, so the top k are the same either way.
enum { MOE_SUM = 0, MOE_SOFTMAX = 1, MOE_SOFTMAX_TOPK = 2 };
struct Moe {
    Lin router;            // [E, dim] (+ bias)
    const Lin* gate_up;    // E of them
    const Lin* down;       // E of them
    int n_experts, top_k, inter;
    float* work;           // E + 3 * top_k * inter + top_k * dim + 2 * top_k floats
    int weighting;         // MOE_*
};

// One Llama-style decoder layer: the seven linears (g, u, d unused when moe is set), norms, and this
// layer's KV cache [B, KV, S, D]. Gemma-3 adds: RMSNorms on the attention's and the MLP's outputs before
// they join the residual (post_attn_norm, post_mlp_norm), GeGLU (act), sliding-window layers (window > 0)
// and per-layer RoPE tables [S, D] (rope_cos / rope_sin; null: the step's cos / sin_signed rows).
struct Layer {
    Lin q, k, v, o, g, u, d;
    const void *mlp_norm, *next_norm, *qn, *kn;
    void *kc, *vc;
    int dim, n_heads, n_kv, head_dim, inter, max_seq;
    float eps, next_eps, qk_eps, scale;
    const Moe* moe;
    const void *post_attn_norm, *post_mlp_norm, *rope_cos, *rope_sin;
    int act, window;
    int norm_f32w;  // every norm weight of the layer (and next_norm) is fp32, Gemma's rounding (norm_mul)
    int qk_norm_full;  // qn / kn span all of q / k (OLMoE), not each head
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

// One thread's band of a linear's rows, shared out for stealing: its owner takes chunks from the front, a
// thread done with its own band takes chunks from the back. The word counts rows taken from the front (low
// half) and from the back (high half); 0 = untouched. One cache line each: the owners' claims must not
// bounce a line between cores.
struct alignas(64) RowClaim {
    std::atomic<uint64_t> taken{0};
};

// Claim up to `chunk` untaken rows of a band of `len` rows, from its front or its back: rows [a, b) of the
// band. False when none are left.
static inline bool claim_rows(RowClaim& c, int len, int chunk, bool back, int& a, int& b) {
    uint64_t cur = c.taken.load(std::memory_order_relaxed);
    for (;;) {
        const int front = (int)(uint32_t)cur, rear = (int)(cur >> 32), left = len - front - rear;
        if (left <= 0) return false;
        const int n = left < chunk ? left : chunk;
        if (c.taken.compare_exchange_weak(cur, back ? cur + ((uint64_t)n << 32) : cur + (uint64_t)n,
                                          std::memory_order_relaxed)) {
            a = back ? len - rear - n : front;
            b = a + n;
            return true;
        }
    }
}
