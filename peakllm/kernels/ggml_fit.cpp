// llama.cpp block types' parameters fitted on a weight: the C++ twin of peakllm/solvers/ggml_fit.py (the
// reference), one block of 32 or 256 weights at a time in a few KB of stack, rows spread over OpenMP threads.
//
// Same algorithm, candidate order, tie rules and rounding as the reference, operation by operation in fp32:
//   - products as torch forms them ((w * x) * L, never fused: build.py compiles this file -ffp-contract=off);
//   - every sum over a group or block accumulated in double and rounded to fp32 once, as the reference's
//     `fsum` does, so the order of the terms (torch's vectorised reduction, this loop) does not matter;
//   - `c / t` for a Python number c is torch's reciprocal(t) * c; `t / c` and tensor / tensor are divisions;
//   - round half to even (rintf), fp16 round to nearest even (F16C, or the same conversion in software);
//   - max |x| ties go to the first element (torch.argmax), bucketize's ties to the lower value.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr float EPS = 1e-15f;  // GROUP_MAX_EPS
constexpr int MAX_BLOCK = 256, MAX_GROUPS = 16;

// What the reference reads from its tables for one type (solvers/ggml_fit.py builds it: FitSpec there).
struct FitSpec {
    int32_t kind;            // 0: symmetric (make_qx_quants), 1: with a min (make_qkx2_quants), 2: IQ4_NL
    int32_t block, group;
    int32_t nmax;            // kind 0: levels [-nmax, nmax - 1]; kind 1: [0, nmax]
    double rmin, rdelta;     // kind 1's iscale candidates (rmin + rdelta * k + nmax) / span
    int32_t nstep;           // kind 1: k = 0..nstep; kind 2: ntry
    int32_t level_lo, level_hi;  // the levels a weight rounds onto (BlockType.solve_levels)
    int32_t int_lo, int_hi;      // the K-quants' integer sub-block scales (and mins)
    int32_t rounds;              // refine_superblock's rounds
    const float* values;         // IQ4_NL's 16 values, ascending
};

#if defined(__F16C__)
inline uint16_t to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
inline float from_half(uint16_t h) { return _cvtsh_ss(h); }
#else
inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint16_t to_half(float f) {  // FP16's fp16_ieee_from_fp32_value (what c10::Half uses)
    float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = bits_of(base);
    const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
inline float from_half(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
    if (e == 31) return float_of(sign | 0x7F800000u | (m << 13));
    float v = e ? std::ldexp((float)(m | 1024), (int)e - 25) : std::ldexp((float)m, -24);
    return sign ? -v : v;
}
#endif

inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The element of largest magnitude, with its sign; the first on ties (torch.argmax).
float signed_max(const float* x, int n) {
    int at = 0;
    float best = std::fabs(x[0]);
    for (int i = 1; i < n; i++)
        if (std::fabs(x[i]) > best) best = std::fabs(x[i]), at = i;
    return x[at];
}

// One candidate of best_ls_scale: (sum w x L, sum w L^2) over the group.
inline void ls_sums(const float* x, const float* w, const float* L, int n, float& sumlx, float& suml2) {
    double slx = 0, sl2 = 0;
#pragma omp simd reduction(+ : slx, sl2)
    for (int i = 0; i < n; i++) {
        slx += (double)((w[i] * x[i]) * L[i]);
        sl2 += (double)((w[i] * L[i]) * L[i]);
    }
    sumlx = (float)slx, suml2 = (float)sl2;
}

// best_ls_scale's step: candidate c replaces the best when it is the first, or valid and scores higher.
inline void ls_step(int c, float sumlx, float suml2, float& best_scale, float& best_score) {
    const bool ok = suml2 > 0;
    const float scale = ok ? sumlx / suml2 : 0.0f, score = scale * sumlx;
    if (c == 0 || (ok && score > best_score)) best_scale = scale, best_score = score;
}

// make_qx_quants: iscale = -(nmax + 0.1 k) / max for k = 0, -9..-1, 1..9.
float sym_scale(const float* x, const float* w, int n, int nmax) {
    const float mx = signed_max(x, n);
    if (std::fabs(mx) < EPS) return 0.0f;
    const float r = 1.0f / mx;
    float L[MAX_BLOCK], best_scale = 0, best_score = 0;
    for (int c = 0; c < 19; c++) {
        const int k = c == 0 ? 0 : (c <= 9 ? c - 10 : c - 9);
        const float iscale = r * (float)(-(nmax + 0.1 * k));
#pragma omp simd
        for (int i = 0; i < n; i++) L[i] = clampf(rintf(iscale * x[i]), (float)-nmax, (float)(nmax - 1));
        float sumlx, suml2;
        ls_sums(x, w, L, n, sumlx, suml2);
        ls_step(c, sumlx, suml2, best_scale, best_score);
    }
    return best_scale;
}

// quantize_row_iq4_nl_impl's search: d = max / v for v = -127, then (k - 127) for k = -ntry..ntry.
float iq4nl_scale(const float* x, const float* w, int n, const float* values, int ntry) {
    const float mx = signed_max(x, n);
    if (std::fabs(mx) < EPS) return 0.0f;
    float mids[15];
    for (int j = 0; j < 15; j++) mids[j] = (values[j + 1] + values[j]) / 2.0f;
    float L[MAX_BLOCK], best_scale = 0, best_score = 0;
    for (int c = 0; c < 2 * ntry + 2; c++) {
        const float iscale = c == 0 ? -values[0] / mx : ((float)(c - 1 - ntry) + values[0]) / mx;
        for (int i = 0; i < n; i++) {
            const float t = iscale * x[i];
            int j = 0;
            for (int m = 0; m < 15; m++) j += mids[m] < t;  // bucketize: a tie goes to the lower value
            L[i] = values[j];
        }
        float sumlx, suml2;
        ls_sums(x, w, L, n, sumlx, suml2);
        ls_step(c, sumlx, suml2, best_scale, best_score);
    }
    return best_scale;
}

float asym_err(const float* x, const float* w, const float* L, int n, float scale, float mn) {
    double e = 0;
#pragma omp simd reduction(+ : e)
    for (int i = 0; i < n; i++) {
        const float r = ((scale * L[i]) + mn) - x[i];
        e += (double)(w[i] * (r * r));
    }
    return (float)e;
}

// make_qkx2_quants as the reference runs it: (scale, the_min >= 0).
void asym_scale_min(const float* x, const float* w, int n, const FitSpec& s, float& scale_out, float& min_out) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
    }
    if (lo > 0) lo = 0;
    float span = hi - lo;
    const bool flat = span <= 0;
    if (flat) span = 1;
    const float r = 1.0f / span, nmax = (float)s.nmax;
    float xl[MAX_BLOCK], L[MAX_BLOCK];
    for (int i = 0; i < n; i++) xl[i] = x[i] - lo;
    const float is0 = r * nmax;
#pragma omp simd
    for (int i = 0; i < n; i++) L[i] = clampf(rintf(is0 * xl[i]), 0.0f, nmax);
    float best_scale = span / nmax, best_min = lo, best_err = asym_err(x, w, L, n, best_scale, best_min);
    double sw = 0, swx = 0;
#pragma omp simd reduction(+ : sw, swx)
    for (int i = 0; i < n; i++) sw += (double)w[i], swx += (double)(w[i] * x[i]);
    const float sum_w = (float)sw, sum_x = (float)swx;
    for (int k = 0; k <= s.nstep; k++) {
        const float iscale = r * (float)(s.rmin + s.rdelta * k + s.nmax);
        double sl = 0, sl2 = 0, sxl = 0;
#pragma omp simd reduction(+ : sl, sl2, sxl)
        for (int i = 0; i < n; i++) {
            L[i] = clampf(rintf(iscale * xl[i]), 0.0f, nmax);
            const float wl = w[i] * L[i];
            sl += (double)wl, sl2 += (double)(wl * L[i]), sxl += (double)(wl * x[i]);
        }
        const float sum_l = (float)sl, sum_l2 = (float)sl2, sum_xl = (float)sxl;
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (!(D > 0)) continue;
        float scale = (sum_w * sum_xl - sum_x * sum_l) / D, mn = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        if (mn > 0) scale = sum_xl / (sum_l2 > 0 ? sum_l2 : 1.0f), mn = 0.0f;  // a min above 0 cannot be stored
        const float e = asym_err(x, w, L, n, scale, mn);
        if (e < best_err) best_scale = scale, best_min = mn, best_err = e;
    }
    scale_out = flat ? 0.0f : best_scale;
    min_out = -(flat ? lo : best_min);
}

// superblock_ints: nonnegative s as ints in [0, qmax] times one fp16 d.
uint16_t superblock_ints(const float* s, int G, int qmax, int16_t* ints) {
    float top = s[0];
    for (int g = 1; g < G; g++)
        if (s[g] > top) top = s[g];
    const float inv = top > 0 ? (1.0f / top) * (float)qmax : 0.0f;
    for (int g = 0; g < G; g++) ints[g] = (int16_t)clampf(rintf(inv * s[g]), 0.0f, (float)qmax);
    return to_half(top / (float)qmax);
}

// superblock_signed: the largest |s| maps to lo.
uint16_t superblock_signed(const float* s, int G, int lo, int hi, int16_t* ints) {
    const float mx = signed_max(s, G);
    const bool zero = mx == 0;
    const float iscale = zero ? 0.0f : (1.0f / mx) * (float)lo;
    for (int g = 0; g < G; g++) ints[g] = (int16_t)clampf(rintf(iscale * s[g]), (float)lo, (float)hi);
    return to_half(zero ? 0.0f : 1.0f / iscale);
}

// group_error: the weighted error of one group on the grid d * sc (- dmin * mn); its levels into `level`.
float group_error(const float* x, const float* w, int n, const FitSpec& s, float d, float dmin, int sc, int mn,
                  float* level) {
    const bool asym = s.kind == 1;
    const float scale = d * (float)sc, bias = asym ? -(dmin * (float)mn) : 0.0f;
    const bool zero = scale == 0;
    const float lo = (float)s.level_lo, hi = (float)s.level_hi;
    double e = 0;
#pragma omp simd reduction(+ : e)
    for (int i = 0; i < n; i++) {
        const float target = asym ? x[i] - bias : x[i];
        const float lv = clampf(rintf(zero ? 0.0f : target / scale), lo, hi);
        const float q = asym ? scale * lv + bias : scale * lv;
        const float r = x[i] - q;
        e += (double)(w[i] * (r * r));
        level[i] = lv;
    }
    return (float)e;
}

// The block's error from its groups' (the reference's fsum over groups of each group's fp32 error).
float block_error(const float* gerr, int G) {
    double e = 0;
    for (int g = 0; g < G; g++) e += (double)gerr[g];
    return (float)e;
}

// Each group's error and levels on the grid d * sc (- dmin * mn).
void group_errors(const float* x, const float* w, const FitSpec& s, int G, float d, float dmin, const int16_t* sc,
                  const int16_t* mn, float* gerr, float* level) {
    for (int g = 0; g < G; g++)
        gerr[g] = group_error(x + g * s.group, w + g * s.group, s.group, s, d, dmin, sc[g], mn ? mn[g] : 0,
                              level + g * s.group);
}

// nudge_ints: per group, scale -1, scale +1 (then min -1, min +1), each kept where the group's error drops.
// gerr and level hold each group's error and levels at the current ints, and are kept up to date.
void nudge_ints(const float* x, const float* w, const FitSpec& s, int G, float d, float dmin, int16_t* sc,
                int16_t* mn, float* gerr, float* level) {
    float trial[MAX_BLOCK];
    const int n = s.group;
    for (int g = 0; g < G; g++) {
        const float* xg = x + g * n;
        const float* wg = w + g * n;
        for (int key = 0; key < (mn ? 2 : 1); key++) {
            int16_t& cur = key == 0 ? sc[g] : mn[g];
            for (int step = -1; step <= 1; step += 2) {
                const int cand = std::min(std::max(cur + step, s.int_lo), s.int_hi);
                const float e = key == 0 ? group_error(xg, wg, n, s, d, dmin, cand, mn ? mn[g] : 0, trial)
                                         : group_error(xg, wg, n, s, d, dmin, sc[g], cand, trial);
                if (e < gerr[g]) {
                    gerr[g] = e, cur = (int16_t)cand;
                    std::memcpy(level + g * n, trial, sizeof(float) * n);
                }
            }
        }
    }
}

// refine_superblock (nudge on): each round nudges the ints, then refits d (and dmin) by weighted least squares
// on the block, re-rounded to fp16 and kept where the block's error drops. The group errors and levels of the
// current values are carried from step to step instead of recomputed: the same numbers, fewer passes.
void refine_superblock(const float* x, const float* w, const FitSpec& s, int G, uint16_t& d, uint16_t& dmin,
                       int16_t* sc, int16_t* mn) {
    const bool asym = mn != nullptr;
    float level[MAX_BLOCK], new_level[MAX_BLOCK], gerr[MAX_GROUPS], new_gerr[MAX_GROUPS];
    group_errors(x, w, s, G, from_half(d), asym ? from_half(dmin) : 0.0f, sc, mn, gerr, level);
    for (int round = 0; round < s.rounds; round++) {
        const float df = from_half(d), dminf = asym ? from_half(dmin) : 0.0f;
        nudge_ints(x, w, s, G, df, dminf, sc, mn, gerr, level);
        const float best = block_error(gerr, G);
        double waa = 0, wax = 0, wab = 0, wbb = 0, wbx = 0;
        for (int g = 0; g < G; g++) {
            const float scg = (float)sc[g], b = asym ? -(float)mn[g] : 0.0f;
            const float* xg = x + g * s.group;
            const float* wg = w + g * s.group;
            const float* lg = level + g * s.group;
#pragma omp simd reduction(+ : waa, wax, wab, wbb, wbx)
            for (int i = 0; i < s.group; i++) {
                const float a = scg * lg[i], wa = wg[i] * a, wb = wg[i] * b;
                waa += (double)(wa * a), wax += (double)(wa * xg[i]);
                wab += (double)(wa * b), wbb += (double)(wb * b), wbx += (double)(wb * xg[i]);
            }
        }
        const float A = (float)waa, X = (float)wax, AB = (float)wab, B = (float)wbb, BX = (float)wbx;
        float nd, ndmin = 0.0f;
        if (!asym) {
            nd = A > 0 ? X / A : df;
        } else {
            const float AxB = A * B, det = A * B - AB * AB;
            const bool ok = det > 1e-30f * (AxB < 1e-30f ? 1e-30f : AxB);
            nd = ok ? (X * B - BX * AB) / det : df;
            ndmin = ok ? (BX * A - X * AB) / det : dminf;
        }
        const uint16_t hd = to_half(nd), hdmin = asym ? to_half(ndmin) : 0;
        const bool finite = std::isfinite(from_half(hd)) && (!asym || std::isfinite(from_half(hdmin)));
        if (!finite) continue;
        group_errors(x, w, s, G, from_half(hd), asym ? from_half(hdmin) : 0.0f, sc, mn, new_gerr, new_level);
        if (block_error(new_gerr, G) < best) {
            d = hd, dmin = hdmin;
            std::memcpy(gerr, new_gerr, sizeof(float) * G);
            std::memcpy(level, new_level, sizeof(float) * G * s.group);
        }
    }
}

// One block of `s.block` weights: its element weights, search, and (K-quants) integer scales and refinement.
void fit_block(const float* x, const float* imp, const FitSpec& s, uint16_t* d, uint16_t* dmin, int16_t* sc,
               int16_t* mn) {
    const int n = s.block;
    float w[MAX_BLOCK];
    double sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int i = 0; i < n; i++) sq += (double)(x[i] * x[i]);
    const float sigma2 = (float)(sq / n);
    const bool symmetric = s.kind != 1;
    for (int i = 0; i < n; i++)
        w[i] = imp ? imp[i] * std::sqrt(sigma2 + x[i] * x[i])
                   : (symmetric ? x[i] * x[i] : std::sqrt(sigma2) + std::fabs(x[i]));
    if (s.block == s.group) {
        if (s.kind == 2) {
            *d = to_half(iq4nl_scale(x, w, n, s.values, s.nstep));
        } else if (s.kind == 0) {
            *d = to_half(sym_scale(x, w, n, s.nmax));
        } else {
            float scale, the_min;
            asym_scale_min(x, w, n, s, scale, the_min);
            *d = to_half(scale), *dmin = to_half(-the_min);
        }
        return;
    }
    const int G = s.block / s.group;
    float scales[MAX_GROUPS], mins[MAX_GROUPS];
    if (s.kind == 0) {
        for (int g = 0; g < G; g++) scales[g] = sym_scale(x + g * s.group, w + g * s.group, s.group, s.nmax);
        uint16_t dd = superblock_signed(scales, G, s.int_lo, s.int_hi, sc), unused = 0;
        refine_superblock(x, w, s, G, dd, unused, sc, nullptr);
        *d = dd;
        return;
    }
    for (int g = 0; g < G; g++) {
        asym_scale_min(x + g * s.group, w + g * s.group, s.group, s, scales[g], mins[g]);
        if (scales[g] < 0) scales[g] = 0.0f;  // clamp_min(0)
    }
    uint16_t dd = superblock_ints(scales, G, s.int_hi, sc), dm = superblock_ints(mins, G, s.int_hi, mn);
    refine_superblock(x, w, s, G, dd, dm, sc, mn);
    *d = dd, *dmin = dm;
}

}  // namespace

extern "C" {

// W [rows, cols] fp32 (cols a multiple of spec->block), imp [cols] fp32 >= 0 or null. Writes fp16 bits
// d [rows, cols / block] (and dmin: the legacy types' m, the K-quants' dmin), int16 scales and mins
// [rows, cols / group] (K-quants). Returns 0, or 1 for a spec it does not take.
int ggml_fit(const FitSpec* spec, const float* W, int64_t rows, int64_t cols, const float* imp, uint16_t* d,
             uint16_t* dmin, int16_t* scales, int16_t* mins, int threads) {
    const FitSpec s = *spec;
    if (s.block < 1 || s.block > MAX_BLOCK || s.group < 1 || s.block % s.group || s.block / s.group > MAX_GROUPS ||
        cols % s.block || s.kind < 0 || s.kind > 2 || (s.kind == 2 && !s.values) || s.nmax < 1)
        return 1;
    const bool k_quant = s.block != s.group;
    if (!d || (s.kind == 1 && !dmin) || (k_quant && (!scales || (s.kind == 1 && !mins)))) return 1;
    const int64_t nb = cols / s.block, G = s.block / s.group;
    const int64_t work = rows * nb;
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads > 0 ? threads : 1) if (work > 64)
    for (int64_t j = 0; j < work; j++) {
        const int64_t row = j / nb, b = j % nb;
        fit_block(W + row * cols + b * s.block, imp ? imp + b * s.block : nullptr, s, d + j,
                  dmin ? dmin + j : nullptr, k_quant ? scales + j * G : nullptr,
                  k_quant && s.kind == 1 ? mins + j * G : nullptr);
    }
    return 0;
}

}  // extern "C"
