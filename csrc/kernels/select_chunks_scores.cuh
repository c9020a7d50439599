// select_chunks, its scoring: the scores of the middle chunks of each (sequence, kv head, query
// block), for the top-k of select_chunks.cuh. Every score is a max over the block's rows (queries
// x the group's q heads, packed query-major: row = query * group + head) of a dot product, so
// one tensor-core GEMM tile serves all three reps: rows x column vectors, then a max over rows
// (and over a chunk's tokens):
//   max  : columns are the raw keys of the middle, A = q, reduced per chunk of C tokens
//   mean : columns are the mean reps,              A = q
//   bound: columns are [kmin | kmax] (2D long),     A = [min(q, 0) | max(q, 0)], since
//          max(q kmin, q kmax) = min(q,0) kmin + max(q,0) kmax whenever kmin <= kmax.
// A CTA owns one tile of rows (kept in shared memory) and a range of chunks; row tiles of the same
// chunk range are adjacent in the grid so their column reads share L2. Scores leave as
// order-preserving uint32 keys; with several row tiles per block they meet by atomicMax in a
// zeroed buffer (max is exact and order-free, so the result is deterministic).
//
// Block beta scores its own middle only, chunks j < M_beta (contract v2: M grows from block to
// block); grids and workspaces are planned for the largest M (the last block's at N = Nmax) and
// a CTA whose chunk range lies past its block's M has nothing to score. A chunk's score does
// not depend on where the chunk falls: every column runs the same mma sequence over its vector
// in the same k order whatever its tile, warp or CTA, and every other step (over rows, a
// chunk's tokens, row tiles, chunk ranges) is an exact max. So bit-identical chunks get
// bit-identical keys and the tie rule (lower index) decides between them.
// (For "max" on a paged cache the column copies find each key's page in the block table, one
// lookup per copied row; everything after the copy into shared memory is unchanged, so the
// keys equal the contiguous layout's bit for bit. Reps are never paged.)
//
// Two scoring kernels (select_chunks_sm90.cuh has the sm_90a version of the second, and
// select_chunks.cuh the top-k kernels and the launchers):
// 1. chunk_scores_kernel (few rows: decode, <= 16 rows): one m16 row tile, 4 warps side by side
//    over 32-column tiles (8 columns each); memory-bound, so a cp.async ring of 4 stages (3 on
//    long rows of 16 KB tiles) keeps 3 (2) tiles in flight per CTA and the launcher packs as
//    many CTAs per SM as shared memory allows.
// 2. chunk_scores_gemm_kernel (many rows: prefill blocks, exact selection): 8 warps, a CTA tile
//    of 128 rows x 256 columns (64 x 256 when a column holds 512 elements), warp tiles of
//    64 rows x 64 (or 32) columns, so each k16 step issues 4 A and 4 (2) B ldmatrix.x4 for
//    32 (16) mma. Column tiles stream through a cp.async ring in slices of 64 elements; the
//    epilogue reduces over rows in registers, then a butterfly reduce-scatter over the 8 row
//    lanes leaves each lane the max of its own columns, which meets the other M warps in a
//    shared atomicMax per column (per warp when the warp's columns lie in one chunk).
// The top-k's building blocks (block_topk and its parts) are here too: the few-rows kernel runs
// the decode step's top-k itself on long rows (fused_topk), as its CTAs finish.
#pragma once

#include <algorithm>

#include "device_utils.cuh"
#include "sm90_utils.cuh"

namespace reattention::kernels {

struct SelectParams {
  const void* q;          // [B, Hq, Lq, D]
  const void* cols;       // max: k_cache [B, Hkv, Nmax, D] or pages [num_pages, Hkv, page_size,
                          // D]; bound/mean: reps [B, Hkv, n_chunks, ...]
  const int* seqlens;     // [B]
  uint32_t* scores;       // [B, Hkv, n_blocks, n_cols] keys of the chunk scores (workspace)
  int* idx;               // [B, Hkv, n_blocks, topk] contiguous, the result
  int64_t q_sb, q_sh, q_sl;  // q strides (elements), last dim contiguous
  int64_t c_sb, c_sh, c_sn;  // column tensor strides of dims 0..2, inner dims contiguous
  PageTable pages;           // max on a paged cache: the block table (else table == nullptr)
  int batch, hq, hkv, lq, sink, local, chunk, topk, query_block, n_blocks;
  int n_cols;             // static upper bound of M over sequences and blocks (scores' last dim)
  int row_tiles;          // row tiles per query block
  int chunks_per_cta;     // chunk range of one scoring CTA (set at launch)
  int col_splits;         // ceil(n_cols / chunks_per_cta) (set at launch)
  bool atomic;            // row_tiles > 1: scores was zeroed, CTAs combine by atomicMax
  bool fused;             // decode top-k inside the scoring kernel (set at launch, see below)
};

// Bound on one few-rows scoring CTA's chunk range (its per-chunk maxima live in shared memory).
constexpr int kMaxChunksPerCta = 2048;

constexpr int kScoreThreads = 128;

// Column tiles of the few-rows scoring kernel: kScoreBlockN vectors (8 per warp), streamed
// through a ring of kStages buffers (a template parameter of chunk_scores_kernel) with
// kStages - 1 tiles in flight while one is scored. At bound D 128 a tile is 16 KB. Rows of
// reps long enough for the fused top-k (kFusedMinChunks chunks and more: the 1M step) take 3
// buffers when the tile is 16 KB: 32 KB in flight per CTA and, at 3 CTAs per SM on the H200
// (A tile, ring and up to 2 KB of chunk maxima: 58 KB each), 96 KB per SM. Against 4 buffers
// (144 KB per SM) the 1M bound step's scoring kernel took 1.9-2.4 us less in every run, H200
// and H100, and the step 0.6-0.9 us less on the H200, 0-1.5 us on H100s. Shorter rows keep 4,
// with which the 128K step measured 0.1-0.5 us faster (bench/NOTES.md "Round twenty-eight").
constexpr int kScoreBlockN = 32;
constexpr int kScoreStages = 4;
constexpr int kScoreStagesLongRows = 3;  // long rows of reps with 16 KB tiles

// The fused decode top-k (fused_topk) runs for rows of at least kFusedMinChunks chunks with at
// most kFusedMaxCandidates candidates (col_splits * topk; the last CTA's 128 threads then make
// at most 32 steps per radix pass). On the H200 (bf16, Hkv 8, topk 32) it took the decode
// selection at 1M tokens (16K chunks) from 70 to 36 us, but at 2K and 440 chunks it cost 18
// and 12 us against 15 and 11 us for scoring plus topk_kernel: its per-CTA radix passes are a
// fixed cost that only a long row repays.
constexpr int64_t kFusedMinChunks = 4096;
constexpr int64_t kFusedMaxCandidates = 4096;
// Candidates block_topk's filter may keep in the fused top-k (128 threads rank them): 4x the
// ~1.4 k expected at topk 32 on iid scores; more means many exact ties (radix fallback).
constexpr int kFusedFilterCap = 256;

// The fused top-k's part of `scores`, in uint32 words, for `rows` rows of `splits` chunk ranges:
// one arrival counter per row, then each row's 2 * topk group words, then each row's candidate
// keys (topk per range) followed by as many chunk ids. Every part and every row's part starts
// on 16 bytes from the workspace's start (a fresh allocation, so 16-byte aligned), so that the
// last CTA of a row can fetch its candidates and group words with bulk copies (fused_topk).
struct FusedWorkspace {
  int64_t groups_at, groups_stride;  // row r's group words at groups_at + r * groups_stride
  int64_t cand_at, cand_stride;      // row r's candidate keys at cand_at + r * cand_stride,
  int64_t ids_off;                   // their chunk ids ids_off words later
  int64_t words;                     // the whole part
};
__host__ __device__ inline FusedWorkspace fused_workspace(int64_t rows, int topk, int64_t splits) {
  const auto up4 = [](int64_t w) { return (w + 3) & ~int64_t{3}; };
  FusedWorkspace w;
  w.groups_at = up4(rows);
  w.groups_stride = up4(2 * static_cast<int64_t>(topk));
  w.cand_at = w.groups_at + rows * w.groups_stride;
  w.ids_off = up4(splits * topk);
  w.cand_stride = 2 * w.ids_off;
  w.words = w.cand_at + rows * w.cand_stride;
  return w;
}

// uint32 words of select_chunks' `scores` workspace (from static shapes only): the dense chunk
// scores of every row, or, when the few-rows kernel may fuse the top-k (bound/mean), the fused
// top-k's part for the most chunk ranges a row can have, ceil(n_cols / kScoreBlockN) (a range
// holds at least one column tile).
inline int64_t select_workspace_words(const SelectParams& p, RepMode rep, int head_dim) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.hkv * p.n_blocks;
  const int64_t dense = rows * p.n_cols;
  if (rep == RepMode::kMax || !few_rows(p.lq, p.query_block, p.hq / p.hkv)) return dense;
  const int block_n = kScoreBlockN;
  const int64_t splits = (static_cast<int64_t>(p.n_cols) + block_n - 1) / block_n;
  return std::max(dense, fused_workspace(rows, p.topk, splits).words);
}

// Rows of the many-rows (GEMM) kernel's CTA tile: its A tile of block_m x vec_len elements
// stays in shared memory, so the longest vectors (bound, D = 256) take half the rows.
__host__ __device__ constexpr int gemm_block_m(int vec_len) { return vec_len >= 512 ? 64 : 128; }

// Host-side plan of the row tiling: row_tiles and atomic (the caller zeroes `scores` when
// atomic). The chunk range of a CTA is chosen at launch, from the kernel's occupancy.
inline void plan_select(SelectParams& p, RepMode rep, int head_dim) {
  const int group = p.hq / p.hkv;
  const bool few = few_rows(p.lq, p.query_block, group);
  const int vec_len = rep == RepMode::kBound ? 2 * head_dim : head_dim;
  const int block_m = few ? kFewRowsTile.block_m : gemm_block_m(vec_len);
  const int rows = (p.lq < p.query_block ? p.lq : p.query_block) * group;
  p.row_tiles = (rows + block_m - 1) / block_m;
  p.atomic = p.row_tiles > 1;
}

// Dynamic shared memory of the few-rows scoring kernel: the A tile, the column ring, then one
// key per chunk of the CTA's range.
template <int kVec, int kBM, int kBN, int kStages>
__host__ __device__ constexpr int score_smem_bytes(int chunks_per_cta) {
  return (kBM * kVec + kStages * kBN * kVec) * 2 + chunks_per_cta * 4;
}

// What one scoring CTA owns: sequence b, kv head h, query block beta (first query q0, `rows`
// rows), the row tile starting at row0, and chunks [j0, j1) of the middle, whose columns are
// n_cols vectors from index col_first of the column tensor's dim 2 (tokens for "max").
struct ScoreTile {
  int b, h, beta, q0, rows, row0, j0, j1, n_cols;
  int64_t col_first;
  __device__ bool empty() const { return j0 >= j1 || row0 >= rows; }
};

// Grid: x = (chunk range * n_blocks + beta) * row_tiles + row tile, y = kv head, z = sequence.
__device__ __forceinline__ ScoreTile score_tile(const SelectParams& p, int block_m, bool tokens) {
  ScoreTile t;
  const int rt = blockIdx.x % p.row_tiles;
  const int cs = blockIdx.x / (p.row_tiles * p.n_blocks);
  t.beta = (blockIdx.x / p.row_tiles) % p.n_blocks;
  t.h = blockIdx.y;
  t.b = blockIdx.z;
  const int m = static_cast<int>(block_segments(p.seqlens[t.b], p.lq, p.query_block, t.beta,
                                                p.sink, p.local, p.chunk).n_mid);
  t.j0 = cs * p.chunks_per_cta;
  t.j1 = min(m, t.j0 + p.chunks_per_cta);
  t.q0 = t.beta * p.query_block;
  t.rows = (min(p.lq, t.q0 + p.query_block) - t.q0) * (p.hq / p.hkv);
  t.row0 = rt * block_m;
  t.n_cols = tokens ? (t.j1 - t.j0) * p.chunk : t.j1 - t.j0;
  t.col_first = tokens ? p.sink + static_cast<int64_t>(t.j0) * p.chunk : t.j0;
  return t;
}

// Where column c (< t.n_cols) of a scoring CTA starts: row col_first + c of the column tensor
// for (t.b, t.h). Reps and contiguous keys keep the plain strided address; the keys of a paged
// cache ("max", kTokens) find their page in the block table, one lookup per copied row.
template <typename T, bool kTokens>
struct ColumnRows {
  const T* base;     // column 0 (contiguous keys, reps), or the pool at head t.h (paged keys)
  const int* pages;  // paged keys: the sequence's table row, else nullptr
  int first;         // paged keys: the token of column 0

  __device__ __forceinline__ ColumnRows(const SelectParams& p, const ScoreTile& t) {
    const T* cols = static_cast<const T*>(p.cols);
    if (kTokens && p.pages.paged()) {
      base = cols + t.h * p.c_sh;
      pages = p.pages.row(t.b);
      first = static_cast<int>(t.col_first);
    } else {
      base = cols + t.b * p.c_sb + t.h * p.c_sh + t.col_first * p.c_sn;
      pages = nullptr;
      first = 0;
    }
  }

  __device__ __forceinline__ const T* operator()(int c, const SelectParams& p) const {
    if (kTokens && pages != nullptr) {
      return base + p.pages.offset(pages, first + c, p.c_sb, p.c_sn);
    }
    return base + c * p.c_sn;
  }
};

// The bound rep's A operand of 8 elements: neg = min(x, 0) and pos = max(x, 0), elementwise.
template <typename T>
__device__ __forceinline__ void split_by_sign(const uint4& raw, uint4& neg, uint4& pos) {
  const T* x = reinterpret_cast<const T*>(&raw);
  T* xn = reinterpret_cast<T*>(&neg);
  T* xp = reinterpret_cast<T*>(&pos);
  const T zero = Dtype<T>::from_float(0.f);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const bool negative = Dtype<T>::to_float(x[e]) < 0.f;
    xn[e] = negative ? x[e] : zero;
    xp[e] = negative ? zero : x[e];
  }
}

// Element id (< kRows * D / 8: 16 bytes `ch` of row r) of a tile's query rows, with the row
// padding of stage_query_rows; q_base is sequence t.b's first query element.
template <typename T, int D>
__device__ __forceinline__ uint4 load_query_chunk(const SelectParams& p, const ScoreTile& t,
                                                  const T* q_base, int group, int id) {
  const int r = id / (D / 8), ch = id % (D / 8);
  const int gr = t.row0 + r < t.rows ? t.row0 + r : t.row0;
  uint4 raw = make_uint4(0, 0, 0, 0);
  if (gr < t.rows) {
    const int head = t.h * group + gr % group, query = t.q0 + gr / group;
    raw = *reinterpret_cast<const uint4*>(q_base + head * p.q_sh + query * p.q_sl + ch * 8);
  }
  return raw;
}

// Stages rows [row0, row0 + kRows) of the tile's query block as the A tile (kVec elements per
// row, at Layout()(row, col); bound splits q by sign). Rows at or past `rows` repeat the tile's
// first row (zeros if the tile has no row): a copy of a real row cannot change a max over rows,
// so the epilogues need no row mask.
template <typename T, int D, RepMode kRep, int kRows, int kThreads,
          typename Layout = RowSwizzled<kRep == RepMode::kBound ? 2 * D : D>>
__device__ __forceinline__ void stage_query_rows(T* s_a, const SelectParams& p,
                                                 const ScoreTile& t) {
  const Layout at;
  const int group = p.hq / p.hkv;
  const T* q_base = static_cast<const T*>(p.q) + t.b * p.q_sb;
  for (int id = threadIdx.x; id < kRows * (D / 8); id += kThreads) {
    const int r = id / (D / 8), ch = id % (D / 8);
    const uint4 raw = load_query_chunk<T, D>(p, t, q_base, group, id);
    if constexpr (kRep == RepMode::kBound) {
      uint4 neg, pos;
      split_by_sign<T>(raw, neg, pos);
      *reinterpret_cast<uint4*>(s_a + at(r, ch * 8)) = neg;
      *reinterpret_cast<uint4*>(s_a + at(r, D + ch * 8)) = pos;
    } else {
      *reinterpret_cast<uint4*>(s_a + at(r, ch * 8)) = raw;
    }
  }
}

// stage_query_rows's store of element id, for QueryRowsInRegs. stage_query_rows keeps its
// stores inline: calling this helper there rescheduled most scoring kernels (sm_90a and sm_80).
template <typename T, int D, RepMode kRep, typename Layout>
__device__ __forceinline__ void store_query_chunk(T* s_a, int id, uint4 raw) {
  const Layout at;
  const int r = id / (D / 8), ch = id % (D / 8);
  if constexpr (kRep == RepMode::kBound) {
    uint4 neg, pos;
    split_by_sign<T>(raw, neg, pos);
    *reinterpret_cast<uint4*>(s_a + at(r, ch * 8)) = neg;
    *reinterpret_cast<uint4*>(s_a + at(r, D + ch * 8)) = pos;
  } else {
    *reinterpret_cast<uint4*>(s_a + at(r, ch * 8)) = raw;
  }
}

// The A tile in two steps, its loads held in registers between them: the few-rows scoring
// kernel of a short row loads its query rows before it issues the column copies, so that the
// rows arrive first instead of behind the CTA's copies (the first mma waits for them).
template <typename T, int D, RepMode kRep, int kRows, int kThreads>
struct QueryRowsInRegs {
  static constexpr int kIds = kRows * (D / 8);
  static_assert(kIds % kThreads == 0, "whole rounds of 16-byte elements");
  uint4 raw[kIds / kThreads];

  __device__ __forceinline__ void load(const SelectParams& p, const ScoreTile& t) {
    const int group = p.hq / p.hkv;
    const T* q_base = static_cast<const T*>(p.q) + t.b * p.q_sb;
#pragma unroll
    for (int j = 0; j < kIds / kThreads; ++j) {
      raw[j] = load_query_chunk<T, D>(p, t, q_base, group, threadIdx.x + j * kThreads);
    }
  }

  __device__ __forceinline__ void store(T* s_a) const {
#pragma unroll
    for (int j = 0; j < kIds / kThreads; ++j) {
      store_query_chunk<T, D, kRep, RowSwizzled<kRep == RepMode::kBound ? 2 * D : D>>(
          s_a, threadIdx.x + j * kThreads, raw[j]);
    }
  }
};

// Writes the CTA's per-chunk maxima (call after a barrier): a plain store with one row tile
// per block, else an atomicMax into the zeroed buffer.
template <int kThreads>
__device__ __forceinline__ void store_chunk_maxima(const SelectParams& p, const ScoreTile& t,
                                                   const uint32_t* s_best) {
  uint32_t* dst =
      p.scores + ((static_cast<int64_t>(t.b) * p.hkv + t.h) * p.n_blocks + t.beta) * p.n_cols;
  for (int i = threadIdx.x; i < t.j1 - t.j0; i += kThreads) {
    if (p.atomic) {
      atomicMax(dst + t.j0 + i, s_best[i]);
    } else {
      dst[t.j0 + i] = s_best[i];
    }
  }
}

// Exclusive prefix count of `flag` over the CTA in thread order; `total` gets the CTA's sum.
template <int kThreads>
__device__ __forceinline__ int block_prefix_count(bool flag, int* s_warp, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) s_warp[warp] = __popc(ballot);
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    const int c = s_warp[w];
    before += w < warp ? c : 0;
    total += c;
  }
  __syncthreads();
  return before + __popc(ballot & ((1u << lane) - 1u));
}

// Exclusive prefix sum of v over the CTA in thread order (a warp scan, then the warps' totals
// through s_warp, kThreads / 32 words); `total` gets the CTA's sum. lane and warp are the
// caller's own (passing them keeps the callers' SASS as it was when each held this scan inline).
// One barrier, after which s_warp is read: a caller rewrites it only past its own next barrier.
template <int kThreads>
__device__ __forceinline__ int block_exclusive_sum(int v, int lane, int warp, int* s_warp,
                                                   int& total) {
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  int before = incl - v, sum = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    before += w < warp ? s_warp[w] : 0;
    sum += s_warp[w];
  }
  total = sum;
  return before;
}

// Shared memory of block_topk. The filter's fields reuse the radix histogram's words, each in a
// phase of its own between barriers, so that the fused top-k adds only `count` to the scoring
// kernel, whose CTAs per SM are set by shared memory.
template <int kThreads>
struct TopkSmem {
  union {
    int hist[256];                                   // radix passes
    uint32_t tmax[kThreads > 256 ? kThreads : 256];  // filter: each thread's largest key,
    uint32_t bound;                                  // then the bound on the k-th largest key,
    int sel[256];                                    // then the selected positions, by rank
  };
  int warp[kThreads / 32];
  int digit, above;
  int count;  // filter: candidates found
};

// Top-k of the m keys load(0..m) over one CTA by radix select (block_topk's fallback): 4 passes
// of 8 bits find the k-th largest key T and how many keys equal to T to keep; one pass in
// position order then keeps key > T and the lowest-position keys == T and calls
// emit(rank, position) for them in ascending position order (rank 0, 1, ...). 0 < k <= m;
// every thread of the CTA must call it.
template <int kThreads, typename Load, typename Emit>
__device__ void block_topk_radix(int m, int k, Load load, Emit emit, TopkSmem<kThreads>& sm) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  uint32_t prefix = 0, mask = 0;
  int remaining = k;  // how many of the keys matching `prefix` are still to be taken
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) sm.hist[i] = 0;
    __syncthreads();
    // Scores cluster in few digits (a shared exponent): lanes hitting the same bin add
    // once per warp, or the atomics on one address would serialise the whole pass. Later
    // passes see few keys under the prefix, so warps without a hit skip the match.
    for (int base = 0; base < m; base += kThreads) {
      const int i = base + tid;
      const uint32_t key = i < m ? load(i) : 0u;
      const bool hit = i < m && (key & mask) == prefix;
      if (__any_sync(0xffffffffu, hit)) {
        const int bin = hit ? static_cast<int>((key >> shift) & 255u) : -1;
        const unsigned same = __match_any_sync(0xffffffffu, bin);
        if (hit && lane == __ffs(same) - 1) atomicAdd(&sm.hist[bin], __popc(same));
      }
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l holds digits 255-8l .. 248-8l, so a scan over lanes walks digits downwards.
      int c[8], sum = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        c[e] = sm.hist[255 - lane * 8 - e];
        sum += c[e];
      }
      int incl = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      int acc = incl - sum;
      if (acc < remaining && incl >= remaining) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (acc + c[e] >= remaining) {
            sm.digit = 255 - lane * 8 - e;
            sm.above = acc;
            break;
          }
          acc += c[e];
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(sm.digit) << shift;
    mask |= 255u << shift;
    remaining -= sm.above;
    __syncthreads();  // digit / above are rewritten by the next pass
  }

  // prefix is now the k-th largest key; keep every key above it and the first `remaining`
  // keys equal to it in position order.
  int eq_seen = 0, written = 0;
  for (int base = 0; base < m && written < k; base += kThreads) {
    const int i = base + tid;
    const uint32_t key = i < m ? load(i) : 0u;
    const bool eq = i < m && key == prefix;
    int eq_total;
    const int eq_rank = eq_seen + block_prefix_count<kThreads>(eq, sm.warp, eq_total);
    const bool take = (i < m && key > prefix) || (eq && eq_rank < remaining);
    int take_total;
    const int pos = written + block_prefix_count<kThreads>(take, sm.warp, take_total);
    if (take) emit(pos, i);
    eq_seen += eq_total;
    written += take_total;
  }
}

// The k-th largest of `groups` group maxima gmax[0..groups) (written before a barrier; ties to
// the lower group), returned to every thread. Groups that partition a set of keys have distinct
// keys as maxima (or 0, the max of nothing), so at least k keys are >= the result: it is at most
// the k-th largest key, and a key below it ranks below k others. k <= groups <= kThreads.
template <int kThreads>
__device__ __forceinline__ uint32_t group_bound(const uint32_t* gmax, int groups, int k,
                                                TopkSmem<kThreads>& sm) {
  const int tid = threadIdx.x;
  if (tid < groups) {  // exactly one group has rank k - 1
    const uint32_t g = gmax[tid];
    int rank = 0;
#pragma unroll 4
    for (int j = 0; j < groups; ++j) {
      const uint32_t o = gmax[j];
      rank += (o > g || (o == g && j < tid)) ? 1 : 0;
    }
    if (rank == k - 1) sm.bound = g;
  }
  __syncthreads();
  return sm.bound;
}

// block_topk's filter and rank under a given bound: the top k (key, then lower position) of the
// keys load(0..m) that are >= bound, or all of them when fewer than k are, emitted as block_topk
// does (emit(slot, position), ascending position). Returns how many, or -1 with nothing emitted
// when more than `cap` keys are >= bound (the caller falls back to block_topk_radix). A key's
// rank among the candidates is its rank among all keys >= bound, which is its rank among all m
// keys whenever the bound is at most the k-th largest key. Call with sm.count == 0, set before a
// barrier, and sm.sel unread; every thread of the CTA must call it.
template <int kThreads, typename Load, typename Emit>
__device__ int block_topk_above(int m, int k, uint32_t bound, Load load, Emit emit,
                                TopkSmem<kThreads>& sm, uint64_t* cand, int cap) {
  const int tid = threadIdx.x, lane = tid & 31;
  for (int base = 0; base < m; base += kThreads) {
    const int i = base + tid;
    const uint32_t key = i < m ? load(i) : 0u;
    const bool keep = i < m && key >= bound;
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (ballot == 0u) continue;
    int first = 0;
    if (lane == 0) first = atomicAdd(&sm.count, __popc(ballot));
    first = __shfl_sync(0xffffffffu, first, 0);
    const int slot = first + __popc(ballot & ((1u << lane) - 1u));
    if (keep && slot < cap) {
      cand[slot] = (static_cast<uint64_t>(key) << 32) | ~static_cast<uint32_t>(i);
    }
  }
  __syncthreads();
  const int n = sm.count;
  if (n > cap) return -1;
  const int kept = min(n, k);
  if (n > k) {
    int lanes = 32;  // lanes per candidate, a power of two: a warp's lanes split into groups
    while (lanes > 1 && lanes * n > kThreads) lanes >>= 1;
    for (int c0 = 0; c0 < n; c0 += kThreads / lanes) {
      const int c = c0 + tid / lanes, part = tid % lanes;
      const uint64_t me = c < n ? cand[c] : 0u;
      int above = 0;
      if (c < n) {
#pragma unroll 4
        for (int d = part; d < n; d += lanes) above += cand[d] > me ? 1 : 0;
      }
      for (int o = 1; o < lanes; o <<= 1) above += __shfl_xor_sync(0xffffffffu, above, o);
      if (part == 0 && c < n && above < k) {
        sm.sel[above] = static_cast<int>(~static_cast<uint32_t>(me));
      }
    }
  } else if (tid < n) {  // every candidate is selected
    sm.sel[tid] = static_cast<int>(~static_cast<uint32_t>(cand[tid]));
  }
  __syncthreads();
  if (tid < kept) {
    const int i = sm.sel[tid];
    int slot = 0;
#pragma unroll 4
    for (int j = 0; j < kept; ++j) slot += sm.sel[j] < i ? 1 : 0;
    emit(slot, i);
  }
  return kept;
}

// Rank and emit by one warp (every lane calls it): the top k (uint64 order) of the n candidate
// words cand[0..n) (key << 32 | ~position, in ascending position order), two per lane per
// round; each selected word's output slot is the number of selected words before it, so
// emit(slot, position) sees the selection in ascending position order.
template <typename Emit>
__device__ __forceinline__ void warp_rank_emit(const uint64_t* cand, int n, int k, Emit emit) {
  const int lane = threadIdx.x & 31;
  int written = 0;
  for (int c0 = 0; c0 < n; c0 += 64) {
    const int c1 = c0 + lane, c2 = c1 + 32;
    const uint64_t me1 = c1 < n ? cand[c1] : ~0ull, me2 = c2 < n ? cand[c2] : ~0ull;
    int above1 = 0, above2 = 0;
#pragma unroll 4
    for (int d = 0; d < n; ++d) {
      const uint64_t x = cand[d];
      above1 += x > me1 ? 1 : 0;
      above2 += x > me2 ? 1 : 0;
    }
    const unsigned take1 = __ballot_sync(0xffffffffu, c1 < n && above1 < k);
    const unsigned take2 = __ballot_sync(0xffffffffu, c2 < n && above2 < k);
    const unsigned below = (1u << lane) - 1u;
    if (take1 >> lane & 1u) {
      emit(written + __popc(take1 & below), static_cast<int>(~static_cast<uint32_t>(me1)));
    }
    written += __popc(take1);
    if (take2 >> lane & 1u) {
      emit(written + __popc(take2 & below), static_cast<int>(~static_cast<uint32_t>(me2)));
    }
    written += __popc(take2);
  }
}

// Step 1 of block_topk and of fused_topk: each thread's largest key among load(i), i = tid,
// tid + kThreads, ... < m (key 0, below every key, when it has none), then the maxima of the
// `groups` groups of threads (thread t in group t % groups) stored as out[group] =
// combine(max, group). Also zeroes sm.count for block_topk_above. Ends without a barrier after
// the stores. Unroll limits: the fused path inlines it into the scoring kernel, whose registers
// must stay low (no spills on sm_90a; registers bound its CTAs per SM at D 64).
template <int kThreads, typename Load, typename Combine>
__device__ __forceinline__ void group_maxima(int m, int groups, Load load, TopkSmem<kThreads>& sm,
                                             uint32_t* out, Combine combine) {
  const int tid = threadIdx.x;
  uint32_t mine = 0;
#pragma unroll 1
  for (int i = tid; i < m; i += kThreads) mine = max(mine, load(i));
  sm.tmax[tid] = mine;
  if (tid == 0) sm.count = 0;
  __syncthreads();
  if (tid < groups) {
    uint32_t g = 0;
    for (int t = tid; t < kThreads; t += groups) g = max(g, sm.tmax[t]);
    out[tid] = combine(g, tid);
  }
}

// Top-k of the m keys load(0..m) over one CTA under the order (key, then lower position), as
// block_topk_radix, with the same emit(rank, position) calls, in a fixed number of barriers
// instead of five passes over the keys:
//  1. Bound: the positions fall into G = 2k groups (group of thread t: t % G); group_bound of
//     their maxima, B, is at most the k-th largest key. On iid keys about 1.4 k keys are >= B
//     (B is the median group maximum), whatever m is.
//  2. Filter: keys >= B go to `cand` as (key << 32 | ~position), whose plain uint64 order is
//     the selection order. Every key of the top k is there, and so is every key that outranks
//     one of them, so a candidate's rank among the candidates is its rank among all keys.
//  3. Rank: each candidate counts the candidates above it (several lanes per candidate when
//     few); ranks < k are the selection, stored by rank, then each finds its output slot by
//     counting the selected positions below its own.
// Steps 2 and 3 are block_topk_above. More than `cap` candidates (many exact ties at the bound)
// fall back to block_topk_radix, as do k with 2k > min(kThreads, 256) or 4k > cap. `cand`: cap
// uint64 words of shared memory. 0 < k <= m; every thread of the CTA must call it.
template <int kThreads, typename Load, typename Emit>
__device__ void block_topk(int m, int k, Load load, Emit emit, TopkSmem<kThreads>& sm,
                           uint64_t* cand, int cap) {
  const int groups = 2 * k;
  if (groups > kThreads || groups > 256 || 4 * k > cap) {
    block_topk_radix<kThreads>(m, k, load, emit, sm);
    return;
  }
  // The group maxima wait in `cand`, which the filter fills only after the bound is read.
  uint32_t* gmax = reinterpret_cast<uint32_t*>(cand);
  group_maxima<kThreads>(m, groups, load, sm, gmax, [](uint32_t g, int) { return g; });
  __syncthreads();
  const uint32_t bound = group_bound<kThreads>(gmax, groups, k, sm);
  if (block_topk_above<kThreads>(m, k, bound, load, emit, sm, cand, cap) < 0) {
    block_topk_radix<kThreads>(m, k, load, emit, sm);
  }
}

// Decode top-k inside the few-rows scoring kernel (p.fused). Every scoring CTA of a (sequence,
// kv head, block) row keeps candidates from its own chunk range (keys and chunk ids, padded with
// key 0, which ranks below every score); the last CTA of the row to finish selects the row's
// top-k among the col_splits * topk candidate slots. The row's chunks fall into G = 2 topk
// groups (position i of a range: group (i % 128) % G), whose maxima the CTAs combine by
// atomicMax in G zeroed words of the row. At any moment each word is the max of a subset of its
// group, so group_bound of the words as a CTA reads them (its own maxima in) is a bound B <= the
// row's topk-th largest key, and it only grows as ranges come in:
//  - a CTA keeps its keys >= B, and of those at most topk, ranked (key, then lower index): a
//    chunk of the row's top-k is >= B and outranked by fewer than topk keys of its range, so
//    it is kept. Late CTAs see a bound near the row's and keep few, often without ranking.
//  - the last CTA reads the final words, group maxima of the whole row: its filter keeps ~1.4
//    topk candidates on iid scores with no pass over the candidates to find a bound. Candidate
//    positions grow with chunk ids, so the tie rule and the ascending output carry over. The
//    filter is one block scan (each thread counts, then writes, a contiguous run of positions,
//    so the kept words stay in position order) and one warp ranks them (warp_rank_emit): two
//    barriers, no atomics; on the H200 that took the 1M bound decode step from 50.4-50.6 to
//    49.8-49.9 us in one lease (bench/NOTES.md "Round twenty-one", calls f and g).
// Many exact ties (more than kFusedFilterCap keys >= B) fall back to block_topk_radix. The
// launcher fuses only for 2 topk <= kScoreThreads. Workspace p.scores: fused_workspace, whose
// counters and group words the launcher zeroes.
// The last CTA copies the row's candidates into shared memory once, so that its filter and
// rank read shared memory instead of waiting on L2: s_stage, the scoring kernel's column
// stages (idle by then), gets the keys, and with kStageIds their chunk ids after them; s_cand,
// kFusedFilterCap words of 8 bytes (the A tile, idle too), gets the group words, then the
// filtered candidates. kStageIds (sm_90a, stages of at least 2 kFusedMaxCandidates words): keys,
// ids and group words come by bulk copies of the copy engine, counted on an mbarrier in s_best
// (idle too, and at least 32 words: a range holds a column tile), so the selection has no global
// load left; on the H200 that took the 1M bound decode step from 52.2-52.6 to 51.0-51.7 us
// (bench/NOTES.md "Round twenty-one"). Otherwise the keys come by L2 loads (__ldcg) and each
// selected chunk's id by one more.
template <bool kStageIds>
__device__ __forceinline__ void fused_topk(const SelectParams& p, const ScoreTile& t,
                                           uint32_t* s_best, uint32_t* s_stage,
                                           uint64_t* s_cand) {
  __shared__ TopkSmem<kScoreThreads> sm;
  __shared__ bool s_last;
  const int tid = threadIdx.x;
  const int64_t row = (static_cast<int64_t>(t.b) * p.hkv + t.h) * p.n_blocks + t.beta;
  const int64_t n_rows = static_cast<int64_t>(p.batch) * p.hkv * p.n_blocks;
  const int groups = 2 * p.topk;
  const int n_cand = p.col_splits * p.topk;
  const FusedWorkspace ws = fused_workspace(n_rows, p.topk, p.col_splits);
  uint32_t* row_groups = p.scores + ws.groups_at + row * ws.groups_stride;
  uint32_t* keys = p.scores + ws.cand_at + row * ws.cand_stride;
  int* ids = reinterpret_cast<int*>(keys + ws.ids_off);
  const int slot = blockIdx.x / (p.row_tiles * p.n_blocks);  // this CTA's chunk range
  const int mine = max(0, t.j1 - t.j0);

  // This range's group maxima into the row's words; the words as returned give the bound.
  uint32_t* s_groups = reinterpret_cast<uint32_t*>(s_cand);
  group_maxima<kScoreThreads>(
      mine, groups, [&](int i) { return s_best[i]; }, sm, s_groups,
      [&](uint32_t g, int group) { return max(g, atomicMax(row_groups + group, g)); });
  __syncthreads();
  const uint32_t bound = group_bound<kScoreThreads>(s_groups, groups, p.topk, sm);
  auto local_key = [&](int i) { return s_best[i]; };
  auto publish = [&](int rank, int i) {
    keys[slot * p.topk + rank] = s_best[i];
    ids[slot * p.topk + rank] = t.j0 + i;
  };
  int kept = 0;
  if (mine > 0) {
    kept = block_topk_above<kScoreThreads>(mine, p.topk, bound, local_key, publish, sm, s_cand,
                                           kFusedFilterCap);
    if (kept < 0) {  // many ties at the bound: this range's own top-k
      kept = min(p.topk, mine);
      block_topk_radix<kScoreThreads>(mine, kept, local_key, publish, sm);
    }
  }
  for (int i = kept + tid; i < p.topk; i += kScoreThreads) keys[slot * p.topk + i] = 0u;
  // Publish the candidates, then count this CTA in; the last one sees every slot and word.
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    s_last = atomicAdd(p.scores + row, 1u) == static_cast<uint32_t>(p.col_splits - 1);
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();

  const int m = static_cast<int>(block_segments(p.seqlens[t.b], p.lq, p.query_block, t.beta,
                                                p.sink, p.local, p.chunk).n_mid);
  const int k = min(p.topk, m);
  int* out = p.idx + row * p.topk;
  for (int i = k + tid; i < p.topk; i += kScoreThreads) out[i] = -1;
  if (k == 0) return;
  // Other CTAs wrote the candidates and words: read them from L2 (bulk copies or __ldcg), never
  // a stale L1 line.
  const int* s_ids = reinterpret_cast<const int*>(s_stage + ws.ids_off);
  if constexpr (kStageIds) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)  // else kStageIds is false
    const uint32_t bar = static_cast<uint32_t>(__cvta_generic_to_shared(s_best));
    if (tid == 0) {
      mbar_init(bar, 1);
      fence_mbarrier_init();
    }
    __syncthreads();
    if (tid == 0) {
      // The stages and the A tile were last used by generic code; the words were acquired
      // above.
      fence_proxy_async();
      const uint32_t cand_bytes = static_cast<uint32_t>(ws.cand_stride * 4);
      const uint32_t group_bytes = static_cast<uint32_t>(ws.groups_stride * 4);
      mbar_arrive_expect_tx(bar, cand_bytes + group_bytes);
      bulk_copy_g2s(static_cast<uint32_t>(__cvta_generic_to_shared(s_stage)), keys, cand_bytes,
                    bar);
      bulk_copy_g2s(static_cast<uint32_t>(__cvta_generic_to_shared(s_groups)), row_groups,
                    group_bytes, bar);
    }
    mbar_wait(bar, 0);
#endif
  } else {
    for (int i = tid; i < n_cand; i += kScoreThreads) s_stage[i] = __ldcg(keys + i);
    if (tid < groups) s_groups[tid] = __ldcg(row_groups + tid);
  }
  __syncthreads();
  // Real keys are never 0 (a NaN pattern), so the floor of 1 drops the padding when fewer than
  // topk groups hold a chunk (a short row): every real key still passes.
  const uint32_t final_bound = max(group_bound<kScoreThreads>(s_groups, groups, p.topk, sm), 1u);
  auto cand_key = [&](int i) { return s_stage[i]; };
  auto select = [&](int rank, int i) { out[rank] = kStageIds ? s_ids[i] : __ldcg(ids + i); };
  // Filter: the keys >= final_bound, compacted in position order by an exclusive scan of each
  // thread's count over its contiguous run; then one warp ranks them.
  const int lane = tid & 31, warp = tid >> 5;
  const int per = (n_cand + kScoreThreads - 1) / kScoreThreads;
  const int i0 = min(n_cand, tid * per), i1 = min(n_cand, i0 + per);
  int mine_c = 0;
  for (int i = i0; i < i1; ++i) mine_c += s_stage[i] >= final_bound ? 1 : 0;
  int n;
  int at = block_exclusive_sum<kScoreThreads>(mine_c, lane, warp, sm.warp, n);
  if (n > kFusedFilterCap) {  // many exact ties at the bound
    block_topk_radix<kScoreThreads>(n_cand, k, cand_key, select, sm);
    return;
  }
  for (int i = i0; i < i1; ++i) {
    const uint32_t key = s_stage[i];
    if (key >= final_bound) {
      s_cand[at++] = (static_cast<uint64_t>(key) << 32) | ~static_cast<uint32_t>(i);
    }
  }
  __syncthreads();
  if (warp == 0) warp_rank_emit(s_cand, n, k, select);
}

// One CTA: the m16 A tile, then column tiles of kScoreBlockN vectors through the cp.async ring
// (wait for tile t, refill the buffer that tile t - 1 used, score tile t), so kStages - 1
// tiles are in flight while one is scored. Each warp owns 8 columns of a tile and runs the
// k16 steps in order, two per B ldmatrix.x4; with vectors of at most 256 elements the A
// fragments stay in registers (64 at 256), so a tile costs the warps its B reads only, else
// each step reloads A from shared memory. Every column sees the same mma sequence as ever,
// so the keys do not depend on the tile shape.
template <typename T, int D, RepMode kRep, int kStages>
__global__ void __launch_bounds__(kScoreThreads) chunk_scores_kernel(SelectParams p) {
  constexpr int kVec = kRep == RepMode::kBound ? 2 * D : D;
  constexpr int kBM = kFewRowsTile.block_m, kBN = kScoreBlockN;
  constexpr int kWarps = kScoreThreads / 32;
  static_assert(kBN == 8 * kWarps, "each warp owns one n8 tile of the column tile");
  constexpr int kSteps = kVec / 16;  // k16 steps, taken in pairs
  static_assert(kSteps % 2 == 0, "vectors are a multiple of 32 elements");
  constexpr bool kARegs = kVec <= 256;
  constexpr int kChunksPerRow = kVec / 8;
  constexpr int kCopies = kBN * kChunksPerRow / kScoreThreads;  // 16-byte copies per thread
  static_assert(kCopies * kScoreThreads == kBN * kChunksPerRow, "whole copy rounds");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_a = reinterpret_cast<T*>(smem_raw);
  T* s_b = s_a + kBM * kVec;  // kStages buffers of kBN x kVec
  uint32_t* s_best = reinterpret_cast<uint32_t*>(s_b + kStages * kBN * kVec);

  // attend's decode attention, launched as a programmatic dependent, may start now (with the
  // fused top-k this kernel is the one ahead of it): only its CTAs that read selected chunks
  // wait for the selection.
  grid_dependents_launch();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  constexpr bool kTokens = kRep == RepMode::kMax;
  // Only reps fuse the top-k (launch_chunk_scores): "max" kernels leave its code out, and
  // its registers with it.
  constexpr bool kMayFuse = !kTokens;
  const ScoreTile t = score_tile(p, kBM, kTokens);
  static_assert(kStages * kBN * kVec * sizeof(T) >= kFusedMaxCandidates * sizeof(uint32_t),
                "fused_topk stages the candidates in the column ring");
  // fused_topk's bulk copies (sm_90a) stage the ids beside the keys when the ring holds both.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kStageIds =
      kStages * kBN * kVec * sizeof(T) >= 2 * kFusedMaxCandidates * sizeof(uint32_t);
#else
  constexpr bool kStageIds = false;
#endif
  static_assert(kBM * kVec * sizeof(T) >= kFusedFilterCap * sizeof(uint64_t),
                "fused_topk keeps the filtered candidates in the A tile");
  uint32_t* s_stage = reinterpret_cast<uint32_t*>(s_b);
  uint64_t* s_cand = reinterpret_cast<uint64_t*>(s_a);
  if (t.empty()) {
    // Its slot still counts for the last CTA.
    if (kMayFuse && p.fused) fused_topk<kStageIds>(p, t, s_best, s_stage, s_cand);
    return;
  }

  // Columns of this CTA: chunks [j0, j1) or, for "max", their keys.
  const int n_cols = t.n_cols;
  const ColumnRows<T, kTokens> col_rows(p, t);
  const int n_tiles = (n_cols + kBN - 1) / kBN;

  // Copy i of a thread moves 16 bytes `ch` of column row r0 + i * kRowStep (r0 < kRowStep, a
  // power of two, so that row's swizzle is r0's XOR a constant). Columns past n_cols land as
  // zeros. Strided columns step by one 64-bit add per copy; the keys of a paged cache find
  // each row's page.
  constexpr int kRowStep = kScoreThreads / kChunksPerRow;
  static_assert(kRowStep * kChunksPerRow == kScoreThreads, "a copy round covers whole rows");
  const int cp_r0 = tid / kChunksPerRow, cp_ch = tid % kChunksPerRow;
  const int cp_dst = swz<kVec>(cp_r0, cp_ch * 8);
  const bool paged = kTokens && col_rows.pages != nullptr;
  const T* const cp_first = col_rows(0, p);
  const int64_t cp_step = static_cast<int64_t>(kRowStep) * p.c_sn;

  // Always commits a group (empty past the last tile), so that the wait below counts tiles.
  auto load_tile = [&](int stage, int tile) {
    if (tile < n_tiles) {
      T* dst = s_b + stage * kBN * kVec;
      const int c0 = tile * kBN + cp_r0;
      const T* src = cp_first + static_cast<int64_t>(c0) * p.c_sn + cp_ch * 8;
#pragma unroll
      for (int i = 0; i < kCopies; ++i) {
        const int c = c0 + i * kRowStep;
        const bool valid = c < n_cols;
        const int off = (cp_dst ^ (((i * kRowStep) & 7) << 3)) + i * kRowStep * kVec;
        const T* from = paged ? col_rows(valid ? c : 0, p) + cp_ch * 8 : (valid ? src : cp_first);
        cp_async_16(dst + off, from, valid);
        src += cp_step;
      }
    }
    cp_async_commit();
  };

  // The first column tiles are in flight while A is built. When they are the whole range (a
  // short row: the decode step at 32K and 128K tokens), the query rows go out before them, so
  // that the first mma need not wait for them behind the CTA's last data (0.3 and 0.9 us per
  // step at those lengths on the H200); a longer range streams through the ring and its copies
  // lead (rows first cost the 1M step ~1 us; bench/NOTES.md "Round sixteen").
  const bool rows_first = n_tiles < kStages;
  QueryRowsInRegs<T, D, kRep, kBM, kScoreThreads> query;
  if (rows_first) query.load(p, t);
#pragma unroll 1
  for (int s = 0; s < kStages - 1; ++s) load_tile(s, s);
  if (rows_first) {
    query.store(s_a);
  } else {
    stage_query_rows<T, D, kRep, kBM, kScoreThreads>(s_a, p, t);
  }
  for (int i = tid; i < t.j1 - t.j0; i += kScoreThreads) s_best[i] = 0u;
  __syncthreads();

  // A fragment of k16 step kk (rows 0..15 of the tile).
  auto load_a = [&](uint32_t(&a)[4], int kk) {
    ldmatrix_x4(a, s_a + swz<kVec>(lane & 15, kk * 16 + (lane >> 4) * 8));
  };
  uint32_t a_regs[kARegs ? kSteps : 1][4];
  if constexpr (kARegs) {
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) load_a(a_regs[kk], kk);
  }

  const int g = lane >> 2, t4 = lane & 3;
  const bool row_a_ok = t.row0 + g < t.rows;
  const bool row_b_ok = t.row0 + g + 8 < t.rows;
  // This lane's B rows: column warp * 8 + lane % 8, k offset 8 * (lane / 8) of each pair of
  // k16 steps (matrices 0, 1: step kk; 2, 3: step kk + 1).
  const int b_row = warp * 8 + (lane & 7), b_k = (lane >> 3) * 8;
#pragma unroll 1
  for (int tile = 0; tile < n_tiles; ++tile) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile `tile` landed for all; tile - 1's buffer is free
    load_tile((tile + kStages - 1) % kStages, tile + kStages - 1);

    const T* sb = s_b + (tile % kStages) * kBN * kVec;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int kk = 0; kk < kSteps; kk += 2) {
      uint32_t b[4];
      ldmatrix_x4(b, sb + swz<kVec>(b_row, kk * 16 + b_k));
      if constexpr (kARegs) {
        mma_16816<T>(s, a_regs[kk], b[0], b[1]);
        mma_16816<T>(s, a_regs[kk + 1], b[2], b[3]);
      } else {
        uint32_t a[4];
        load_a(a, kk);
        mma_16816<T>(s, a, b[0], b[1]);
        load_a(a, kk + 1);
        mma_16816<T>(s, a, b[2], b[3]);
      }
    }
    // Row max: this lane's two rows, then over the 8 row groups (lanes with the same t4).
    uint32_t key[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = fmaxf(row_a_ok ? s[e] : -INFINITY, row_b_ok ? s[e + 2] : -INFINITY);
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
      key[e] = float_to_key(v);
    }
    const int c = tile * kBN + warp * 8 + 2 * t4;  // even
    if (g == 0) {
      if constexpr (kTokens) {
        // A chunk spans several columns (tiles, warps): they meet by atomicMax.
        if (c < n_cols) atomicMax(&s_best[c / p.chunk], key[0]);
        if (c + 1 < n_cols) atomicMax(&s_best[(c + 1) / p.chunk], key[1]);
      } else if (c + 1 < n_cols) {
        // One column per chunk, scored once by this CTA: plain stores, both in one.
        *reinterpret_cast<uint2*>(s_best + c) = make_uint2(key[0], key[1]);
      } else if (c < n_cols) {
        s_best[c] = key[0];
      }
    }
  }
  cp_async_wait<0>();  // only empty groups are left, but the ring is reused below
  __syncthreads();
  if (kMayFuse && p.fused) {
    // The ring and the A tile are idle: every copy has landed and every mma has read them.
    fused_topk<kStageIds>(p, t, s_best, s_stage, s_cand);
  } else {
    store_chunk_maxima<kScoreThreads>(p, t, s_best);
  }
}

// Shapes of the many-rows kernel for column vectors of kVec elements: 8 warps, kWarpsM x
// kWarpsN, each owning 64 rows x kWN columns of the kBM x kBN CTA tile. Column tiles arrive in
// slices of kKStep elements through a ring of kStages buffers. Shared memory (A tile, ring,
// per-chunk maxima) stays within 160 KB so that sm_80 (163 KB per CTA) runs the same tiles.
template <int kVec>
struct GemmTile {
  static constexpr int kThreads = 256;
  static constexpr int kBM = gemm_block_m(kVec);
  static constexpr int kBN = 256;
  static constexpr int kWM = 64;
  static constexpr int kWarpsM = kBM / kWM;
  static constexpr int kWarpsN = kThreads / 32 / kWarpsM;
  static constexpr int kWN = kBN / kWarpsN;
  static constexpr int kKStep = 64;
  static constexpr int kKSteps = kVec / kKStep;
  static constexpr int kMaxChunks = 4096;  // a CTA's chunk range (its maxima live in shared memory)
  static constexpr int kABytes = kBM * kVec * 2;
  static constexpr int kSliceBytes = kBN * kKStep * 2;
  static constexpr int kStages =
      kABytes + 3 * kSliceBytes + kMaxChunks * 4 <= 160 * 1024 ? 3 : 2;
  static constexpr int kFixedSmem = kABytes + kStages * kSliceBytes;  // + 4 bytes per chunk
  static_assert(kVec % kKStep == 0 && kBN * kKStep / 8 % kThreads == 0, "slice shape");
};

// One step of a butterfly reduce-scatter of a max over the lanes that differ in `lane_bit`:
// the lower lane keeps values [0, kHalf), the upper one [kHalf, 2 kHalf), each taking the max
// with its partner's copy; both end with their kept half in v[0, kHalf).
template <int kHalf>
__device__ __forceinline__ void max_fold(float* v, int lane, int lane_bit) {
  const bool upper = lane & lane_bit;
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const float keep = upper ? v[i + kHalf] : v[i];
    const float give = upper ? v[i] : v[i + kHalf];
    v[i] = fmaxf(keep, __shfl_xor_sync(0xffffffffu, give, lane_bit));
  }
}

// Copies the kStep-element slice from element k0 of columns col0 .. col0 + kBN - 1 into a
// swizzled tile of kBN rows of kStep elements (cp.async, the caller commits); columns at or past
// n_cols land as zeros. Thread i copies 16-byte piece i % kPieces of rows i / kPieces + j *
// kRowStep: on strided columns (reps, contiguous keys) one address per thread and slice, then
// a constant stride, and a swizzle that is the same for all its rows (kRowStep is a multiple
// of 8), so a copy costs a few instructions; paged keys find each row's page.
template <int kBN, int kStep, int kThreads, typename T, bool kTokens>
__device__ __forceinline__ void load_column_slice(T* dst, const ColumnRows<T, kTokens>& col_rows,
                                                  const SelectParams& p, int col0, int k0,
                                                  int n_cols) {
  constexpr int kPieces = kStep / 8;
  constexpr int kPer = kBN * kPieces / kThreads, kRowStep = kThreads / kPieces;
  static_assert(kBN * kPieces % kThreads == 0 && kThreads % kPieces == 0 && kRowStep % 8 == 0,
                "slice shape");
  const int r0 = threadIdx.x / kPieces, ch = threadIdx.x % kPieces;
  if (!kTokens || col_rows.pages == nullptr) {
    const T* src = col_rows.base + static_cast<int64_t>(col0 + r0) * p.c_sn + k0 + ch * 8;
    const int64_t stride = static_cast<int64_t>(kRowStep) * p.c_sn;
    const int left = n_cols - col0 - r0;  // this thread's rows below n_cols: j * kRowStep < left
    T* d = dst + swz<kStep>(r0, ch * 8);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const bool valid = j * kRowStep < left;
      cp_async_16(d + j * kRowStep * kStep, valid ? src + j * stride : col_rows.base, valid);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int r = r0 + j * kRowStep;
      const int c = col0 + r;
      const bool valid = c < n_cols;
      cp_async_16(dst + swz<kStep>(r, ch * 8), col_rows(valid ? c : 0, p) + k0 + ch * 8, valid);
    }
  }
}

// Epilogue of one warp's accumulator tile (m16n8 fragment layout: acc[mt][nt][0..1] at row
// warp_row0 + mt * 16 + lane / 4, acc[mt][nt][2..3] eight rows lower, columns warp_col0 +
// nt * 8 + 2 * (lane % 4) + {0, 1}); every row counts (stage_query_rows pads with copies of a
// real row). "max" with 64-aligned chunks (the usual case): each 64-column group of the warp
// lies in one chunk, so a thread folds its values of a group, a warp-wide max finishes it and
// one shared atomicMax per group and warp meets the other warps'. Otherwise the max over the
// rows of each column is reduce-scattered over the 8 row lanes (each lane keeps kNT / 4
// columns), then meets the other warps' in a shared atomicMax per column, or per chunk of tokens
// where the warp's or a lane quad's columns lie in one chunk.
template <int kMT, int kNT, bool kTokens>
__device__ __forceinline__ void warp_tile_maxima(const float (&acc)[kMT][kNT][4], const SelectParams& p,
                                                 const ScoreTile& t, int /*warp_row0*/,
                                                 int warp_col0, uint32_t* s_best, int lane) {
  static_assert(kNT % 4 == 0, "the reduce-scatter gives each lane kNT / 4 columns");
  constexpr int kPerLane = kNT / 4, kWN = kNT * 8;
  const int g = lane >> 2, t4 = lane & 3, n_cols = t.n_cols;
  float v[2 * kNT];  // v[2 nt + e]: column nt * 8 + 2 * t4 + e, max over the thread's rows
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) v[2 * nt + e] = fmaxf(acc[0][nt][e], acc[0][nt][e + 2]);
  }
#pragma unroll
  for (int mt = 1; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        v[2 * nt + e] = fmaxf(v[2 * nt + e], fmaxf(acc[mt][nt][e], acc[mt][nt][e + 2]));
      }
    }
  }
  if constexpr (kTokens && kWN % 64 == 0) {
    if (p.chunk % 64 == 0 && warp_col0 + kWN <= n_cols) {  // warp_col0 is a multiple of kWN
      constexpr int kGroups = kWN / 64;
      float m[kGroups];
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) {
        m[gi] = v[16 * gi];
#pragma unroll
        for (int i = 1; i < 16; ++i) m[gi] = fmaxf(m[gi], v[16 * gi + i]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m[gi] = fmaxf(m[gi], __shfl_xor_sync(0xffffffffu, m[gi], o));
      }
      if (lane < kGroups) {
        float mine = m[0];
#pragma unroll
        for (int gi = 1; gi < kGroups; ++gi) mine = lane == gi ? m[gi] : mine;
        atomicMax(&s_best[(warp_col0 + 64 * lane) / p.chunk], float_to_key(mine));
      }
      return;
    }
  }
  max_fold<kNT>(v, lane, 16);
  max_fold<kNT / 2>(v, lane, 8);
  max_fold<kNT / 4>(v, lane, 4);
  // Lane (g, t4) now holds v[i] = the max over the warp's rows of value g * kPerLane + i, so
  // the quad g owns the kPerLane * 4 columns from warp_col0 + g * kPerLane * 4.
  auto column = [&](int i) {
    const int x = g * kPerLane + i;
    return warp_col0 + (x >> 1) * 8 + 2 * t4 + (x & 1);
  };
  if constexpr (kTokens) {
    float m = v[0];
#pragma unroll
    for (int i = 1; i < kPerLane; ++i) m = fmaxf(m, v[i]);
    const int first = warp_col0 / p.chunk;
    if (warp_col0 + kWN <= n_cols && (warp_col0 + kWN - 1) / p.chunk == first) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      if (lane == 0) atomicMax(&s_best[first], float_to_key(m));
    } else {  // the warp's columns straddle chunks or run past the last one
      m = quad_max(m);
      const int quad_col0 = warp_col0 + g * kPerLane * 4, quad_last = quad_col0 + kPerLane * 4 - 1;
      if (quad_last < n_cols && quad_col0 / p.chunk == quad_last / p.chunk) {
        if (t4 == 0) atomicMax(&s_best[quad_col0 / p.chunk], float_to_key(m));
      } else {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int c = column(i);
          if (c < n_cols) atomicMax(&s_best[c / p.chunk], float_to_key(v[i]));
        }
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = column(i);
      if (c < n_cols) atomicMax(&s_best[c], float_to_key(v[i]));
    }
  }
}

template <typename T, int D, RepMode kRep>
__global__ void __launch_bounds__(256, 1) chunk_scores_gemm_kernel(SelectParams p) {
  constexpr int kVec = kRep == RepMode::kBound ? 2 * D : D;
  using G = GemmTile<kVec>;
  constexpr int kMT = G::kWM / 16, kNT = G::kWN / 8;
  static_assert(G::kThreads == 256, "warp layout");
  constexpr bool kTokens = kRep == RepMode::kMax;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_a = reinterpret_cast<T*>(smem_raw);
  T* s_b = s_a + G::kBM * kVec;
  uint32_t* s_best = reinterpret_cast<uint32_t*>(s_b + G::kStages * G::kBN * G::kKStep);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / G::kWarpsN, wn = warp % G::kWarpsN;
  const ScoreTile t = score_tile(p, G::kBM, kTokens);
  if (t.empty()) return;

  const int n_cols = t.n_cols;
  const ColumnRows<T, kTokens> col_rows(p, t);
  const int n_steps = (n_cols + G::kBN - 1) / G::kBN * G::kKSteps;  // (column tile, slice)

  auto load_step = [&](int step) {
    load_column_slice<G::kBN, G::kKStep, G::kThreads>(
        s_b + (step % G::kStages) * (G::kBN * G::kKStep), col_rows, p,
        step / G::kKSteps * G::kBN, step % G::kKSteps * G::kKStep, n_cols);
  };

  // The first kStages - 1 slices fly while the A tile is built. Every iteration commits one
  // group (empty past the end), so wait_group counts stay uniform.
#pragma unroll
  for (int s = 0; s < G::kStages - 1; ++s) {
    if (s < n_steps) load_step(s);
    cp_async_commit();
  }
  stage_query_rows<T, D, kRep, G::kBM, G::kThreads>(s_a, p, t);
  for (int i = tid; i < t.j1 - t.j0; i += G::kThreads) s_best[i] = 0u;

  const int warp_row0 = t.row0 + wm * G::kWM;
  float acc[kMT][kNT][4];
  for (int step = 0; step < n_steps; ++step) {
    cp_async_wait<G::kStages - 2>();
    __syncthreads();  // slice `step` landed for all; the buffer refilled below is free
    if (step + G::kStages - 1 < n_steps) load_step(step + G::kStages - 1);
    cp_async_commit();

    const int ks = step % G::kKSteps;
    if (ks == 0) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
        }
      }
    }
    const T* sb = s_b + (step % G::kStages) * (G::kBN * G::kKStep);
#pragma unroll
    for (int kk = 0; kk < G::kKStep / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        ldmatrix_x4(a[mt], s_a + swz<kVec>(wm * G::kWM + mt * 16 + (lane & 15),
                                           ks * G::kKStep + kk * 16 + (lane >> 4) * 8));
      }
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bf[4];
        ldmatrix_x4(bf, sb + swz<G::kKStep>(wn * G::kWN + np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                            kk * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(acc[mt][2 * np], a[mt], bf[0], bf[1]);
          mma_16816<T>(acc[mt][2 * np + 1], a[mt], bf[2], bf[3]);
        }
      }
    }
    if (ks != G::kKSteps - 1) continue;

    // Epilogue of column tile step / kKSteps.
    warp_tile_maxima<kMT, kNT, kTokens>(acc, p, t, warp_row0,
                                        step / G::kKSteps * G::kBN + wn * G::kWN, s_best, lane);
  }
  __syncthreads();
  store_chunk_maxima<G::kThreads>(p, t, s_best);
}

}  // namespace reattention::kernels
