// The arithmetic of docs/design.md section 2 (contract v2) that every compiled backend shares:
// the rep modes, the query blocks of a call and where each block's tokens go (sink, middle
// chunks, local window, compact positions).
//
// Every query block is handled as a call of its own: block beta of a call of Lq queries on N
// tokens holds the call's queries [s, e), s = beta * query_block, e = min(Lq, s + query_block),
// and gets the segments of a call of e - s queries on N - Lq + e tokens (it sees the keys
// [0, P1], P1 = N - Lq + e - 1). So a block attends to at most scope() keys whatever Lq is.
//
// Torch-free and host + device, so the CPU library (through common.h) and the torch-free CUDA
// kernel headers include the same definitions. Lengths and positions are int64_t; device code
// calls these a few times per CTA, never per key.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RA_HOST_DEVICE inline
#endif

namespace reattention {

// How a chunk is scored: exact max over its raw keys, the min/max box bound, or its centroid.
enum class RepMode : int { kMax = 0, kBound = 1, kMean = 2 };

// The segments of one query block whose queries are the last of `end` tokens: sink
// [0, sink_len), middle [sink, mid_end) = n_mid whole chunks, local [mid_end, end).
struct Segments {
  int64_t sink_len;  // min(S, P1 + 1)
  int64_t mid_end;   // S + C * M
  int64_t n_mid;     // M
  int64_t q_start;   // P0, the block's first query position
  int64_t end;       // P1 + 1: the block sees the keys [0, end)
};

RA_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Segments of a call of ONE block: n tokens whose last lq are the block's queries.
RA_HOST_DEVICE Segments segments(int64_t n, int64_t lq, int64_t sink, int64_t local,
                                 int64_t chunk) {
  const int64_t p0 = n - lq;
  const int64_t room = p0 - local - sink;
  const int64_t n_mid = room > 0 ? room / chunk : 0;
  return Segments{n < sink ? n : sink, sink + chunk * n_mid, n_mid, p0, n};
}

// Queries [first, last) of block beta of a call of lq queries.
RA_HOST_DEVICE int64_t block_first(int64_t beta, int64_t query_block) {
  return beta * query_block;
}

RA_HOST_DEVICE int64_t block_last(int64_t beta, int64_t lq, int64_t query_block) {
  const int64_t e = (beta + 1) * query_block;
  return e < lq ? e : lq;
}

// Segments of block beta of a call of lq queries on n tokens: those of a call of its own.
RA_HOST_DEVICE Segments block_segments(int64_t n, int64_t lq, int64_t query_block, int64_t beta,
                                       int64_t sink, int64_t local, int64_t chunk) {
  const int64_t s = block_first(beta, query_block), e = block_last(beta, lq, query_block);
  return segments(n - lq + e, e - s, sink, local, chunk);
}

// M of the call's last block, the largest of its blocks (M never shrinks from block to block).
RA_HOST_DEVICE int64_t max_middle_chunks(int64_t n, int64_t lq, int64_t query_block,
                                         int64_t sink, int64_t local, int64_t chunk) {
  return block_segments(n, lq, query_block, ceil_div(lq, query_block) - 1, sink, local, chunk)
      .n_mid;
}

// Keys one block attends to at most, its own queries included, for any Lq: the sink, topk
// chunks, a local window of fewer than local + chunk keys before the block, and the block.
// Compact positions of keys and queries are gathered indices, so they stay below it too.
RA_HOST_DEVICE int64_t scope(int64_t sink, int64_t local, int64_t chunk, int64_t topk,
                             int64_t query_block) {
  return sink + topk * chunk + local + chunk + query_block;
}

// Chunks whose tokens all lie below N: the ones chunk_reps may fill.
RA_HOST_DEVICE int64_t complete_chunks(int64_t n, int64_t sink, int64_t chunk) {
  return n > sink ? (n - sink) / chunk : 0;
}

// Compact RoPE position of the query at original position p when n_sel chunks are gathered:
// its index in [sink | chunks | local]. With P1 < sink, mid_end = sink and this is p itself.
RA_HOST_DEVICE int64_t compact_query_pos(int64_t p, const Segments& s, int64_t sink,
                                         int64_t n_sel, int64_t chunk) {
  return p + sink + n_sel * chunk - s.mid_end;
}

// Where the keys (or values) of a cache live: the contiguous layout [B, Hkv, Nmax, D], or the
// paged one (docs/design.md section 3): pages [num_pages, Hkv, page_size, D] and a block table
// int32 [B, max_pages], token t of sequence b at page table[b, t / page_size], row
// t % page_size. The contiguous layout is the paged one with one page of Nmax tokens per
// sequence and page b for sequence b (table == nullptr). Strides are in elements. A page id
// outside [0, num_pages) is clamped, so a bad table entry gives a wrong result, never an
// out-of-bounds read (the CPU launcher checks the table's values; the CUDA one cannot read
// them without a sync).
struct KvLayout {
  int64_t s_page = 0;  // stride of dim 0 (a sequence, or a page)
  int64_t s_head = 0;  // stride of dim 1
  int64_t s_tok = 0;   // stride of dim 2
  const int32_t* table = nullptr;  // paged: block_table; contiguous: nullptr
  int64_t t_sb = 0, t_sp = 0;      // block_table strides (elements)
  int64_t page_size = 1;           // tokens per page (contiguous: Nmax)
  int64_t num_pages = 1;           // pages in the pool (contiguous: B)

  RA_HOST_DEVICE bool paged() const { return table != nullptr; }

  // The page holding token t of sequence b (for a paged cache: the clamped table entry).
  RA_HOST_DEVICE int64_t page(int64_t b, int64_t t) const {
    if (table == nullptr) return b;
    const int64_t p = table[b * t_sb + (t / page_size) * t_sp];
    return p < 0 ? 0 : (p >= num_pages ? num_pages - 1 : p);
  }

  // Element offset of token t, head h, dim 0 of sequence b.
  RA_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t t) const {
    if (table == nullptr) return b * s_page + h * s_head + t * s_tok;
    return page(b, t) * s_page + h * s_head + (t % page_size) * s_tok;
  }
};

}  // namespace reattention
