// Decode-while-multiplying for the sub-1-bit ternary format (peakllm/formats/sub1.py, docs/SUB1_FORMAT.md).
//
// y[b, r] = sum_g scale_pos[r,g] * sum_{+ in g} x[b,c] - scale_neg[r,g] * sum_{- in g} x[b,c]
//
// The dense matrix is never built. Each thread takes whole blocks of rows (block_offsets says where a
// block's symbols start) and, per row, works in two branch-free phases:
//   1. decode: every symbol's 8-byte dictionary entry [len, nnz, 6 x (pos | neg << 7)] is widened to
//      eight uint32 "col | neg << 31" and stored at buf + n unconditionally; n += nnz keeps the valid
//      ones. No branch depends on the data except the row-end test, so variable-length words cost
//      no mispredictions.
//   2. accumulate: the row's nonzeros, ascending by column, are summed group by group: signed sum
//      (x with the sign bit flipped for -) and, for asymmetric scales, the plain sum, from which
//      sum+ and sum- follow. Batch 1 gathers 8 x values at a time; batches of 2..32 read x transposed,
//      so one nonzero adds a contiguous vector of batch values.
#include "sub1_impl.h"

extern "C" {

// x [batch, in] fp32 -> y [batch, out] fp32. Returns 0, or -1 for arguments it refuses.
int sub1_matmul_f32(const Sub1Matrix* m, const float* x, int64_t batch, float* y, int n_threads) {
    const int64_t out = m->out, in = m->in, block_rows = m->block_rows, sym_bits = m->sym_bits;
    const float* scale_neg = m->scale_neg;
    if (out < 1 || in < 1 || in >= (int64_t)sub1k::COL || block_rows < 1 || batch < 1) return -1;
    // a thread per block at most, and none extra for work smaller than a parallel region's start-up
    const int64_t n_blocks = (out + block_rows - 1) / block_rows;
    int threads = n_threads > 0 ? n_threads : omp_get_max_threads();
    if (out * in * batch < sub1k::MIN_PARALLEL_WORK) threads = 1;
    threads = (int)std::min<int64_t>(threads, n_blocks);
    const bool fused = m->fused != nullptr && m->fused_k >= 1 && m->fused_k <= 6;
    const sub1k::Args A{m->stream, m->block_offsets, m->dict, m->lanes, m->scale_pos, scale_neg,
                        fused ? m->fused : nullptr, m->fused_k, out, in,
                 m->group_size, block_rows, batch, threads, x, y};
    const bool sym = scale_neg == nullptr;
    if (sym_bits == 8) {
        sym ? sub1k::dispatch_bp<uint8_t, true>(A) : sub1k::dispatch_bp<uint8_t, false>(A);
    } else if (sym_bits == 16) {
        sym ? sub1k::dispatch_bp<uint16_t, true>(A) : sub1k::dispatch_bp<uint16_t, false>(A);
    } else {
        return -1;
    }
    return 0;
}

// The encoder's greedy longest-match parse of every row (formats/sub1.py `_encode_rows`, its reference):
// codes uint8 [out, in] in {0, 1, 2}; child int32 [n_nodes * 3] (node * 3 + code -> node, or -1; node 0 is
// the root); word int32 [n_nodes] (node -> symbol, or -1); `zero` the code the tree completes a row's last
// word with. Writes the symbols to syms (room for `cap`) and each row's symbol count to per_row. Returns
// the number of symbols, or -1 for a code out of range, a tree that does not parse, or too little room.
int64_t sub1_encode_rows(const uint8_t* codes, int64_t out, int64_t in, const int32_t* child, const int32_t* word,
                         int64_t n_nodes, int32_t zero, int32_t* syms, int64_t cap, int64_t* per_row) {
    int64_t n = 0;
    for (int64_t r = 0; r < out; r++) {
        const uint8_t* row = codes + r * in;
        const int64_t start = n;
        int32_t v = 0;
        for (int64_t c = 0; c < in; c++) {
            const uint32_t code = row[c];
            if (code > 2) return -1;
            int32_t nxt = child[3 * (int64_t)v + code];
            if (nxt < 0) {  // v is a word that cannot grow by this code: emit it, restart at the root
                if (word[v] < 0 || n >= cap) return -1;
                syms[n++] = word[v];
                nxt = child[code];
            }
            if (nxt < 0 || nxt >= n_nodes) return -1;
            v = nxt;
        }
        while (word[v] < 0) {  // the row ended inside the tree: complete the word with zeros
            v = child[3 * (int64_t)v + zero];
            if (v < 0 || v >= n_nodes) return -1;
        }
        if (n >= cap) return -1;
        syms[n++] = word[v];
        per_row[r] = n - start;
    }
    return n;
}

// The stream's structure checked before any kernel reads it (formats/sub1.py `parse` is the reference,
// which also returns every symbol's row and column; this keeps nothing). length / span int64
// [2^sym_bits]: values a symbol covers (0: not a word) and its last nonzero position + 1. block_offsets
// [n_blocks + 1] are known to run from 0 to the symbol count and to increase (checked by the caller).
// Returns 0, or the first fault in parse's order: -1 a symbol not in the dictionary (*where: the symbol's
// index), -2 a row that runs past the end of its block (the row), -3 symbols left after a block's last row
// (the block), -4 a nonzero past the end of a row (the row).
int64_t sub1_check_stream(const uint8_t* stream, int64_t sym_bits, const int32_t* block_offsets, int64_t out,
                          int64_t in, int64_t block_rows, const int64_t* length, const int64_t* span,
                          int64_t* where) {
    const int64_t n_blocks = (out + block_rows - 1) / block_rows, n_symbols = block_offsets[n_blocks];
    auto symbol = [&](int64_t s) -> int64_t {
        return sym_bits == 8 ? stream[s] : (int64_t)stream[2 * s] | (int64_t)stream[2 * s + 1] << 8;
    };
    for (int64_t s = 0; s < n_symbols; s++)
        if (length[symbol(s)] == 0) { *where = s; return -1; }
    int64_t r = 0, past_end = -1;
    for (int64_t b = 0; b < n_blocks; b++) {
        int64_t s = block_offsets[b];
        const int64_t e = block_offsets[b + 1];
        const int64_t rows = std::min(block_rows, out - r);
        for (int64_t i = 0; i < rows; i++, r++) {
            int64_t col = 0, sym = 0;
            while (col < in) {  // the row's last symbol is the first whose cumulative length reaches in
                if (s >= e) { *where = r; return -2; }
                sym = symbol(s++);
                col += length[sym];
            }
            if (past_end < 0 && col - length[sym] + span[sym] > in) past_end = r;
        }
        if (s != e) { *where = b; return -3; }
    }
    if (past_end >= 0) { *where = past_end; return -4; }
    return 0;
}

}  // extern "C"
