// Group-wise int-k matvec with int8 activations (the optional path of intk.cpp / decode.cpp): x is
// quantized once per call to int8 with one fp32 scale per block of 32 columns,
//   x ~ sx[b] * xq[c],  sx[b] = max|x in block b| / 127,  xq = round(x / sx) in [-127, 127],
// and each block's sum of codes times xq is an exact integer dot product (u8 codes x s8 activations:
// AVX-512 VNNI / AVX-VNNI vpdpbusd, AVX2 vpmaddubsw + vpmaddwd, or scalar):
//   y[b, o] = sum_k scale[o, g(k)] * sx[k] * (dot(q[o, k], xq[k]) - zero[o, g(k)] * sum(xq[k]))
// over the blocks k (g(k): the block's group), the bracket an exact int32 (|.| <= 2 * 32 * 255 * 127), so
// the zero point meets the same quantized x as the codes. The SIMD path reduces the dot products of
// eight blocks at once to one vector of eight block sums and applies sx, zero and scale to all eight
// with vector ops: at 32-column groups the per-group scalar work otherwise costs as much as the dots.
// Error against the fp32-activation product: each x is moved by at most sx/2, so
//   |y - y_f32| <= sum_c |w[o, c]| * sx[block of c] / 2   (plus fp32 rounding),
// the bound tests/test_kernels_intk_int8act.py asserts. Applies when every group is made of one or more
// whole 32-column blocks and bits is 2, 4 or 8 (a8_applies); the callers take the fp32-activation path
// otherwise.
#pragma once
#include <cmath>

#include "intk_impl.h"

#ifdef PEAK_AVX2
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define PEAK_VNNI 1  // vpdpbusd on 256-bit registers (AVX-512 VNNI + VL)
#elif defined(__AVXVNNI__)
#define PEAK_VNNI 2  // the VEX-encoded vpdpbusd (AVX-VNNI)
#endif
#endif

// Where the int8 path's SIMD decoders want each quantized x: column c of block k (of nb in a row) goes to
// xq[row * in + a8_pos(bits, k, nb, c)].
// - 4 bits: blocks go in pairs (k, k + 1), whose 32 code bytes one 256-bit load reads; the low nibbles of
//   those bytes are the pair's even columns and the high nibbles its odd ones, so the pair's 64 x values are
//   [k even, k + 1 even, k odd, k + 1 odd] (16 each). An unpaired last block: [even, odd].
// - 2 bits: lane 8s + j of a block is the code at shift 2s of byte j, column 4j + s.
// - 8 bits and the scalar path: natural order.
static int64_t a8_pos(int bits, int64_t k, int64_t nb, int c) {
#ifdef PEAK_AVX2
    switch (bits) {
        case 4: {
            const int e = c % 2, i = c / 2;
            if (k % 2 == 1 || k + 1 < nb) return (k / 2) * 64 + e * 32 + (k % 2) * 16 + i;
            return k * BLOCK + e * 16 + i;
        }
        case 2: return k * BLOCK + 8 * (c % 4) + c / 4;
        default: return k * BLOCK + c;
    }
#else
    (void)bits, (void)nb;
    return k * BLOCK + c;
#endif
}

static inline bool a8_applies(int bits, const int32_t* gstart, int n_groups) {
    if (bits != 2 && bits != 4 && bits != 8) return false;
    for (int g = 0; g <= n_groups; g++)  // no empty group either: eight blocks then span at most eight groups
        if (gstart[g] % BLOCK || (g < n_groups && gstart[g + 1] <= gstart[g])) return false;
    return true;
}

// Thread-private quantized activations of one call; per-block arrays padded with zeros to whole chunks
// of 8 blocks (a padded block contributes 0).
struct PreparedQ {
    std::vector<int8_t> xq;     // [B, in], gathered by perm, each block in the decoder's lane order
    std::vector<float> sx;      // [B, nbp]  (nbp = in / 32 rounded up to a multiple of 8)
    std::vector<int32_t> isum;  // [B, nbp]  sum of xq over the block
    std::vector<int32_t> bg;    // [nbp]     group of each block (padding: the last group)
    std::vector<float> row;     // scratch: one fp32 row of x
};

static inline int64_t a8_padded_blocks(int64_t in) { return (in / BLOCK + 7) / 8 * 8; }

// Fill `pq` from x [B, in] (fp32 or bf16); a8_applies must hold.
static void intk_prepare_a8(const void* x, int x_bf16, const int32_t* perm, int B, int64_t in, int bits,
                            const int32_t* gstart, int n_groups, PreparedQ& pq) {
    const int64_t nb = in / BLOCK, nbp = a8_padded_blocks(in);
    pq.xq.resize((size_t)B * in);
    pq.sx.assign((size_t)B * nbp, 0.f);
    pq.isum.assign((size_t)B * nbp, 0);
    pq.bg.resize(nbp);
    pq.row.resize(in);
    int g = 0;
    for (int64_t k = 0; k < nbp; k++) {
        while (g < n_groups - 1 && gstart[g + 1] <= k * BLOCK) g++;
        pq.bg[k] = g;
    }
    for (int b = 0; b < B; b++) {
        const float* r = pq.row.data();
        load_x_row(x, x_bf16, perm, in, b, pq.row.data());
        for (int64_t k = 0; k < nb; k++) {
            const float* xb = r + k * BLOCK;
            float amax = 0.f;
            for (int i = 0; i < BLOCK; i++) amax = std::max(amax, std::fabs(xb[i]));
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            int8_t* q = &pq.xq[b * in];
            int isum = 0;
            for (int c = 0; c < BLOCK; c++) {
                const int v = (int)std::nearbyint(xb[c] * id);
                q[a8_pos(bits, k, nb, c)] = (int8_t)v;
                isum += v;
            }
            pq.sx[b * nbp + k] = amax / 127.f;
            pq.isum[b * nbp + k] = isum;
        }
    }
}

struct ProblemA8 {
    const uint8_t* qweight; const uint16_t* scales; const uint8_t* zeros;
    int64_t in, out, row_bytes; int n_groups, B;
    const int8_t* xq; const float* sx; const int32_t* isum; const int32_t* bg;  // PreparedQ
    float* y;                                                                  // [B, out]
};

#ifdef PEAK_AVX2
// The 32 codes of a block as u8 lanes in a8_order.
template <int BITS>
static inline __m256i a8_decode(const uint8_t* p) {
    if constexpr (BITS == 8) {
        return _mm256_loadu_si256((const __m256i*)p);
    } else if constexpr (BITS == 4) {
        // the 16 bytes in both halves, the upper half shifted right by 4: three instructions
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
        return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0f));
    } else {  // 2 bits: 8 bytes
        const __m128i m = _mm_set1_epi8(0x03), v = _mm_loadl_epi64((const __m128i*)p);
        const __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 2), m));
        const __m128i hi = _mm_unpacklo_epi64(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(_mm_srli_epi16(v, 6), m));
        return _mm256_set_m128i(hi, lo);
    }
}

// Eight int32 partial sums of dot(w, x) over one block (u8 codes w, s8 activations at x).
template <int BITS>
static inline __m256i a8_dot(__m256i w, const int8_t* x) {
#if PEAK_VNNI == 1
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, _mm256_loadu_si256((const __m256i*)x));
#elif PEAK_VNNI == 2
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, _mm256_loadu_si256((const __m256i*)x));
#else
    if constexpr (BITS == 8) {  // vpmaddubsw would saturate (255 * 127 * 2 > 32767): widen both to int16
        const __m256i lo = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(w)),
                                             _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)x)));
        const __m256i hi = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(w, 1)),
                                             _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(x + 16))));
        return _mm256_add_epi32(lo, hi);
    } else {  // codes <= 15: the int16 pair sums of vpmaddubsw cannot saturate
        return _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i*)x)), _mm256_set1_epi16(1));
    }
#endif
}

// Lane j = the sum of the eight lanes of d[j]: three rounds of horizontal adds.
static inline __m256i a8_reduce8(const __m256i d[8]) {
    const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
    const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}

// Scales (fp32) and zero points (int32) of output row o for blocks k..k+7, from its groups g0 + idx.
static inline void a8_params8(const ProblemA8& P, int64_t o, int64_t k, __m256& sc, __m256i& zp) {
    const int32_t g0 = P.bg[k];
    const __m256i idx = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i*)(P.bg + k)), _mm256_set1_epi32(g0));
    const int64_t at = o * P.n_groups + g0;
    __m128i s, z;
    if (at + 8 <= P.out * P.n_groups) {
        s = _mm_loadu_si128((const __m128i*)(P.scales + at));
        z = _mm_loadl_epi64((const __m128i*)(P.zeros + at));
    } else {  // the tensors' last groups: copy, do not read past their ends
        uint16_t sb[8] = {0};
        uint8_t zb[8] = {0};
        const int64_t n = P.out * P.n_groups - at;
        std::memcpy(sb, P.scales + at, n * 2);
        std::memcpy(zb, P.zeros + at, n);
        s = _mm_loadu_si128((const __m128i*)sb);
        z = _mm_loadl_epi64((const __m128i*)zb);
    }
    sc = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(s), idx);
    zp = _mm256_permutevar8x32_epi32(_mm256_cvtepu8_epi32(z), idx);
}
#endif

#ifdef PEAK_AVX2
// Lane j = the integer dot of block k + j (4 bits): v[pp] holds pair pp's two blocks as four int32 lanes
// each ([2pp | 2pp + 1]), so two rounds of horizontal adds and one permute reduce the eight blocks, against
// three rounds for eight one-block vectors (a8_reduce8); the pairs also need one load and three decode
// instructions per 64 codes instead of per 32.
static inline __m256i a8_reduce_pairs(const __m256i v[4]) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    return _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // [0 2 4 6 | 1 3 5 7]
}

// Pair pp of a chunk (4 bits): (even-column codes, odd-column codes) of its two blocks, 64 u8 lanes (a8_pos).
static inline void a8_decode_pair(const uint8_t* p, __m256i& lo, __m256i& hi) {
    const __m256i m = _mm256_set1_epi8(0x0f), v = _mm256_loadu_si256((const __m256i*)p);
    lo = _mm256_and_si256(v, m);
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
}

// The eight int32 dots of a chunk's blocks (4 bits) for one row of x (xq at the chunk's first block); n
// blocks exist. `w` holds the decoded pairs (lo, hi) or, for an unpaired last block, its a8_decode<4>.
template <int N>
static inline __m256i a8_dots4(const __m256i (*w)[2], const int8_t* xq, int n) {
    [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
    __m256i v[4];
    for (int pp = 0; pp < 4; pp++) {
        const int8_t* x = xq + 64 * pp;
        if (N || 2 * pp + 1 < n) {
            const __m256i xl = _mm256_loadu_si256((const __m256i*)x), xh = _mm256_loadu_si256((const __m256i*)(x + 32));
#if PEAK_VNNI == 1
            v[pp] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w[pp][0], xl), w[pp][1], xh);
#elif PEAK_VNNI == 2
            v[pp] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w[pp][0], xl), w[pp][1], xh);
#else  // |lo dot + hi dot| per int16 lane <= 4 * 15 * 127: no saturation
            v[pp] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(w[pp][0], xl), _mm256_maddubs_epi16(w[pp][1], xh)),
                                      ones);
#endif
        } else if (2 * pp < n) {  // the row's unpaired last block: its eight lanes folded into the pair's first half
            const __m256i d = a8_dot<4>(w[pp][0], x);
            v[pp] = _mm256_inserti128_si256(_mm256_setzero_si256(),
                                            _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1)), 0);
        } else {
            v[pp] = _mm256_setzero_si256();
        }
    }
    return a8_reduce_pairs(v);
}

// Blocks k..k+7 of output row o (codes at q) for NB rows of x into tot; N = 8, or 0: only the row's
// remaining blocks exist (the padding contributes 0).
template <int BITS, int NB, int N>
static inline void a8_chunk(const ProblemA8& P, const uint8_t* q, int64_t o, int64_t k, int b0,
                            uint8_t (*wbuf)[BLOCK], __m256 tot[NB]) {
    constexpr int BB = BLOCK * BITS / 8;
    const int n = N ? N : (int)(P.in / BLOCK - k);
    __m256i pairs[4][2];  // 4 bits: the chunk's decoded pairs (a8_dots4), once for all NB rows of x
    if constexpr (BITS == 4) {
        for (int pp = 0; pp < 4; pp++) {
            if (N || 2 * pp + 1 < n)
                a8_decode_pair(q + 2 * pp * BB, pairs[pp][0], pairs[pp][1]);
            else if (2 * pp < n)
                pairs[pp][0] = a8_decode<4>(q + 2 * pp * BB);
        }
    } else if constexpr (NB > 1) {
        for (int j = 0; j < n; j++) _mm256_store_si256((__m256i*)wbuf[j], a8_decode<BITS>(q + j * BB));
    }
    __m256 sc;
    __m256i zp;
    a8_params8(P, o, k, sc, zp);
    const int64_t nbp = a8_padded_blocks(P.in);
    for (int b = 0; b < NB; b++) {
        const int8_t* xq = P.xq + (b0 + b) * P.in + k * BLOCK;
        __m256i dots;
        if constexpr (BITS == 4) {
            dots = a8_dots4<N>(pairs, xq, n);
        } else {
            __m256i d[8];
            for (int j = 0; j < 8; j++) {
                if (N || j < n) {
                    const __m256i w = NB > 1 ? _mm256_load_si256((const __m256i*)wbuf[j]) : a8_decode<BITS>(q + j * BB);
                    d[j] = a8_dot<BITS>(w, xq + j * BLOCK);
                } else {
                    d[j] = _mm256_setzero_si256();
                }
            }
            dots = a8_reduce8(d);
        }
        const int64_t at = (b0 + b) * nbp + k;
        const __m256i isum = _mm256_loadu_si256((const __m256i*)(P.isum + at));
        // zero * isum: zp < 256 and |isum| <= 32 * 127 fit int16, so one vpmaddwd multiplies them exactly
        const __m256i s = _mm256_sub_epi32(dots, _mm256_madd_epi16(zp, isum));
        const __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_loadu_ps(P.sx + at));
        tot[b] = _mm256_fmadd_ps(sc, p, tot[b]);
    }
}
#endif

// How far ahead of its decoding a8_tile asks for the codes. The hardware prefetchers alone left the
// kernel at 10.7 GB/s on two threads over 944 MB of int4 g128 codes (11008 x 4096 and 4096 x 11008, Zen 3,
// AVX2), against ~21 GB/s with the same codes in cache; prefetching 1-8 KB ahead gave 14-15.5 GB/s,
// 2 KB (one 4096-column int4 row) 14.7.
enum { A8_PREFETCH = 2048 };

// Output feature o for rows b0..b0+NB-1 of x.
template <int BITS, int NB>
static void a8_tile(const ProblemA8& P, int64_t o, int b0) {
    const int64_t nb = P.in / BLOCK, nbp = a8_padded_blocks(P.in);
    const uint8_t* q = P.qweight + o * P.row_bytes;
    constexpr int BB = BLOCK * BITS / 8;  // bytes of a block of codes
#ifdef PEAK_AVX2
    __m256 tot[NB];
    for (int b = 0; b < NB; b++) tot[b] = _mm256_setzero_ps();
    alignas(32) uint8_t wbuf[8][BLOCK];  // NB > 1: the chunk's decoded codes, reused by every row of x
    for (int64_t k = 0; k < nbp; k += 8) {
        // the chunk A8_PREFETCH bytes ahead (past this row's end: the next rows', then nothing; a prefetch
        // never faults)
        for (int l = 0; l < 8 * BB; l += 64) _mm_prefetch((const char*)(q + k * BB + A8_PREFETCH + l), _MM_HINT_T0);
        if (k + 8 <= nb)
            a8_chunk<BITS, NB, 8>(P, q + k * BB, o, k, b0, wbuf, tot);
        else  // the row's last blocks: fewer than eight
            a8_chunk<BITS, NB, 0>(P, q + k * BB, o, k, b0, wbuf, tot);
    }
    for (int b = 0; b < NB; b++) P.y[(b0 + b) * P.out + o] = hsum(tot[b]);
#else
    float tot[NB] = {};
    for (int64_t k = 0; k < nb; k++) {
        const int64_t i = o * P.n_groups + P.bg[k];
        const float scale = f16_to_f32(P.scales[i]);
        const int zero = P.zeros[i];
        for (int b = 0; b < NB; b++) {
            const int8_t* xq = P.xq + (b0 + b) * P.in + k * BLOCK;
            int s = 0;
            for (int j = 0; j < BLOCK; j++) s += (int)code_at(q, k * BLOCK + j, BITS) * xq[j];
            s -= zero * P.isum[(b0 + b) * nbp + k];
            tot[b] += scale * (P.sx[(b0 + b) * nbp + k] * (float)s);
        }
    }
    for (int b = 0; b < NB; b++) P.y[(b0 + b) * P.out + o] = tot[b];
    (void)BB;
#endif
}

// Output features [o0, o1) of P.y for every row of x; each decoded chunk serves up to MAX_TILE rows of x.
template <int BITS>
static void intk_a8_rows(const ProblemA8& P, int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; o++) {
        int b0 = 0;
        for (; b0 + MAX_TILE <= P.B; b0 += MAX_TILE) a8_tile<BITS, MAX_TILE>(P, o, b0);
        switch (P.B - b0) {
            case 1: a8_tile<BITS, 1>(P, o, b0); break;
            case 2: a8_tile<BITS, 2>(P, o, b0); break;
            case 3: a8_tile<BITS, 3>(P, o, b0); break;
            default: break;
        }
    }
}

static void intk_a8_rows_any(const ProblemA8& P, int bits, int64_t o0, int64_t o1) {
    switch (bits) {
        case 2: intk_a8_rows<2>(P, o0, o1); break;
        case 4: intk_a8_rows<4>(P, o0, o1); break;
        default: intk_a8_rows<8>(P, o0, o1); break;
    }
}
