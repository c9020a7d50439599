// select_chunks: score the middle chunks of each (sequence, kv head, query block) and keep the
// top-k, ascending, -1 padded. Two kernels:
//
// 1. chunk_scores_kernel (multi-CTA). Every score is a max over the block's rows (queries x the
//    group's q heads, packed query-major) of a dot product, so one tensor-core GEMM tile serves
//    all three modes: rows x column vectors, then a max over rows (and over a chunk's tokens):
//      max  : columns are the raw keys of the middle, A = q, reduced per chunk of C tokens
//      mean : columns are the mean reps,              A = q
//      bound: columns are [kmin | kmax] (2D long),     A = [min(q, 0) | max(q, 0)], since
//             max(q kmin, q kmax) = min(q,0) kmin + max(q,0) kmax whenever kmin <= kmax.
//    A CTA owns one tile of BM rows and a range of chunks; row tiles of the same chunk range are
//    adjacent in the grid so their column reads share L2. Scores leave as order-preserving
//    uint32 keys; with several row tiles per block they meet by atomicMax in a zeroed buffer
//    (max is exact and order-free, so the result is deterministic).
// 2. topk_kernel, one CTA per (sequence, kv head, block): radix select (4 passes of 8 bits) finds
//    the K-th largest key T and how many keys equal to T to keep; one pass in index order then
//    keeps key > T and the lowest-index keys == T (ties go low) and writes them ascending.
#pragma once

#include <algorithm>

#include "device_utils.cuh"

namespace reattention::kernels {

enum class ScoreMode : int { kMax = 0, kBound = 1, kMean = 2 };

struct SelectParams {
  const void* q;          // [B, Hq, Lq, D]
  const void* cols;       // max: k_cache [B, Hkv, Nmax, D]; bound/mean: reps [B, Hkv, n_chunks, ...]
  const int* seqlens;     // [B]
  uint32_t* scores;       // [B, Hkv, n_blocks, n_cols] keys of the chunk scores (workspace)
  int* idx;               // [B, Hkv, n_blocks, topk] contiguous, the result
  int64_t q_sb, q_sh, q_sl;  // q strides (elements), last dim contiguous
  int64_t c_sb, c_sh, c_sn;  // column tensor strides of dims 0..2, inner dims contiguous
  int batch, hq, hkv, lq, sink, local, chunk, topk, query_block, n_blocks;
  int n_cols;             // static upper bound of M over the batch (scores' last dim)
  int row_tiles;          // row tiles per query block
  int chunks_per_cta;     // chunk range of one scoring CTA (set at launch)
  int col_splits;         // ceil(n_cols / chunks_per_cta) (set at launch)
  bool atomic;            // row_tiles > 1: scores was zeroed, CTAs combine by atomicMax
};

// Bound on one scoring CTA's chunk range (its per-chunk maxima live in shared memory).
constexpr int kMaxChunksPerCta = 2048;

constexpr int kScoreThreads = 128;

// Host-side plan of the row tiling: row_tiles and atomic (the caller zeroes `scores` when
// atomic). The chunk range of a CTA is chosen at launch, from the kernel's occupancy.
inline void plan_select(SelectParams& p, ScoreMode mode, int head_dim) {
  const int group = p.hq / p.hkv;
  const bool few = few_rows(p.lq, p.query_block, group);
  const int vec_len = mode == ScoreMode::kBound ? 2 * head_dim : head_dim;
  const TileShape tile = tile_shape(few, vec_len);
  const int rows = (p.lq < p.query_block ? p.lq : p.query_block) * group;
  p.row_tiles = (rows + tile.block_m - 1) / tile.block_m;
  p.atomic = p.row_tiles > 1;
}

template <int kVec, int kBM, int kBN>
__host__ __device__ constexpr int score_smem_bytes(int chunks_per_cta) {
  return (kBM * kVec + 2 * kBN * kVec) * 2 + chunks_per_cta * 4;
}

template <typename T, int D, ScoreMode kMode, int kWarpsN>
__global__ void __launch_bounds__(kScoreThreads) chunk_scores_kernel(SelectParams p) {
  constexpr int kVec = kMode == ScoreMode::kBound ? 2 * D : D;
  constexpr TileShape kTile = tile_shape(kWarpsN == 4, kVec);
  constexpr int kBM = kTile.block_m, kBN = kTile.block_n;
  constexpr int kNW = kBN / kWarpsN;  // columns per warp
  constexpr int kNT = kNW / 8;
  constexpr int kChunksPerRow = kVec / 8;
  static_assert(kTile.warps_n == kWarpsN, "tile shape and warp layout disagree");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_a = reinterpret_cast<T*>(smem_raw);
  T* s_b = s_a + kBM * kVec;                                   // 2 stages of kBN x kVec
  uint32_t* s_best = reinterpret_cast<uint32_t*>(s_b + 2 * kBN * kVec);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int rt = blockIdx.x % p.row_tiles;
  const int beta = (blockIdx.x / p.row_tiles) % p.n_blocks;
  const int cs = blockIdx.x / (p.row_tiles * p.n_blocks);
  const int h = blockIdx.y, b = blockIdx.z;
  const int group = p.hq / p.hkv;

  const Segments seg = segments(p.seqlens[b], p.lq, p.sink, p.local, p.chunk);
  const int j0 = cs * p.chunks_per_cta;
  const int j1 = min(seg.n_mid, j0 + p.chunks_per_cta);
  const int q0 = beta * p.query_block;
  const int rows = (min(p.lq, q0 + p.query_block) - q0) * group;
  const int row0 = rt * kBM;
  if (j0 >= j1 || row0 >= rows) return;

  // Columns of this CTA: chunks [j0, j1) or, for "max", their keys.
  constexpr bool kTokens = kMode == ScoreMode::kMax;
  const int n_cols = kTokens ? (j1 - j0) * p.chunk : j1 - j0;
  const int64_t col_first = kTokens ? p.sink + static_cast<int64_t>(j0) * p.chunk : j0;
  const T* c_base = static_cast<const T*>(p.cols) + b * p.c_sb + h * p.c_sh + col_first * p.c_sn;
  const int n_tiles = (n_cols + kBN - 1) / kBN;

  auto load_tile = [&](int stage, int tile) {
    T* dst = s_b + stage * kBN * kVec;
    for (int id = tid; id < kBN * kChunksPerRow; id += kScoreThreads) {
      const int r = id / kChunksPerRow, ch = id % kChunksPerRow;
      const int c = tile * kBN + r;
      const bool valid = c < n_cols;
      cp_async_16(dst + swz<kVec>(r, ch * 8), c_base + (valid ? c : 0) * p.c_sn + ch * 8, valid);
    }
    cp_async_commit();
  };

  load_tile(0, 0);  // in flight while the A tile is built

  // A tile: rows (query-major: row = query * group + head) x kVec.
  const T* q_base = static_cast<const T*>(p.q) + b * p.q_sb;
  for (int id = tid; id < kBM * (D / 8); id += kScoreThreads) {
    const int r = id / (D / 8), ch = id % (D / 8);
    const int gr = row0 + r;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (gr < rows) {
      const int head = h * group + gr % group, query = q0 + gr / group;
      raw = *reinterpret_cast<const uint4*>(q_base + head * p.q_sh + query * p.q_sl + ch * 8);
    }
    if constexpr (kMode == ScoreMode::kBound) {
      const T* x = reinterpret_cast<const T*>(&raw);
      uint4 neg, pos;
      T* xn = reinterpret_cast<T*>(&neg);
      T* xp = reinterpret_cast<T*>(&pos);
      const T zero = Dtype<T>::from_float(0.f);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const bool negative = Dtype<T>::to_float(x[e]) < 0.f;
        xn[e] = negative ? x[e] : zero;
        xp[e] = negative ? zero : x[e];
      }
      *reinterpret_cast<uint4*>(s_a + swz<kVec>(r, ch * 8)) = neg;
      *reinterpret_cast<uint4*>(s_a + swz<kVec>(r, D + ch * 8)) = pos;
    } else {
      *reinterpret_cast<uint4*>(s_a + swz<kVec>(r, ch * 8)) = raw;
    }
  }
  for (int i = tid; i < j1 - j0; i += kScoreThreads) s_best[i] = 0u;

  const int g = lane >> 2, t4 = lane & 3;
  const bool row_a_ok = row0 + wm * 16 + g < rows;
  const bool row_b_ok = row0 + wm * 16 + g + 8 < rows;
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (tile + 1 < n_tiles) load_tile(stage ^ 1, tile + 1);

    float s[kNT][4];
    warp_gemm_abt<T, kVec, kNT>(s, s_a, wm * 16, s_b + stage * kBN * kVec, wn * kNW, lane);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = fmaxf(row_a_ok ? s[nt][e] : -INFINITY, row_b_ok ? s[nt][e + 2] : -INFINITY);
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
        const int c = tile * kBN + wn * kNW + nt * 8 + 2 * t4 + e;
        if (g == 0 && c < n_cols) atomicMax(&s_best[kTokens ? c / p.chunk : c], float_to_key(v));
      }
    }
  }
  __syncthreads();

  uint32_t* dst = p.scores + ((static_cast<int64_t>(b) * p.hkv + h) * p.n_blocks + beta) * p.n_cols;
  for (int i = tid; i < j1 - j0; i += kScoreThreads) {
    if (p.atomic) {
      atomicMax(dst + j0 + i, s_best[i]);
    } else {
      dst[j0 + i] = s_best[i];
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

constexpr int kTopkThreads = 1024;

// Rows whose keys fit in this much shared memory are staged there once (the radix passes then
// re-read shared memory instead of L2).
constexpr int kTopkSmemRowBytes = 64 * 1024;

template <int kThreads>
__global__ void __launch_bounds__(kThreads) topk_kernel(SelectParams p, bool stage_row) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int s_hist[256];
  __shared__ int s_warp[kThreads / 32];
  __shared__ int s_digit, s_above;

  const int row = blockIdx.x;  // (b * hkv + h) * n_blocks + beta
  const int b = row / (p.hkv * p.n_blocks);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m = segments(p.seqlens[b], p.lq, p.sink, p.local, p.chunk).n_mid;
  const int k = min(p.topk, m);
  int* out = p.idx + static_cast<int64_t>(row) * p.topk;
  for (int i = k + tid; i < p.topk; i += kThreads) out[i] = -1;
  if (k == 0) return;

  const uint32_t* src = p.scores + static_cast<int64_t>(row) * p.n_cols;
  if (stage_row) {
    uint32_t* s_row = reinterpret_cast<uint32_t*>(smem_raw);
    for (int i = tid; i < m; i += kThreads) s_row[i] = src[i];
    src = s_row;  // generic addressing: the loops below read shared or global alike
  }

  uint32_t prefix = 0, mask = 0;
  int remaining = k;  // how many of the keys matching `prefix` are still to be taken
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) s_hist[i] = 0;
    __syncthreads();
    // Scores cluster in few digits (a shared exponent): lanes hitting the same bin add
    // once per warp, or the atomics on one address would serialise the whole pass. Later
    // passes see few keys under the prefix, so warps without a hit skip the match.
    for (int base = 0; base < m; base += kThreads) {
      const int i = base + tid;
      const uint32_t key = i < m ? src[i] : 0u;
      const bool hit = i < m && (key & mask) == prefix;
      if (__any_sync(0xffffffffu, hit)) {
        const int bin = hit ? static_cast<int>((key >> shift) & 255u) : -1;
        const unsigned same = __match_any_sync(0xffffffffu, bin);
        if (hit && lane == __ffs(same) - 1) atomicAdd(&s_hist[bin], __popc(same));
      }
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l holds digits 255-8l .. 248-8l, so a scan over lanes walks digits downwards.
      int c[8], sum = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        c[e] = s_hist[255 - lane * 8 - e];
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
            s_digit = 255 - lane * 8 - e;
            s_above = acc;
            break;
          }
          acc += c[e];
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(s_digit) << shift;
    mask |= 255u << shift;
    remaining -= s_above;
    __syncthreads();  // s_digit / s_above are rewritten by the next pass
  }

  // prefix is now the K-th largest key; keep every key above it and the first `remaining`
  // keys equal to it in index order, writing positions in index order (ascending output).
  int eq_seen = 0, written = 0;
  for (int base = 0; base < m && written < k; base += kThreads) {
    const int i = base + tid;
    const uint32_t key = i < m ? src[i] : 0u;
    const bool eq = i < m && key == prefix;
    int eq_total;
    const int eq_rank = eq_seen + block_prefix_count<kThreads>(eq, s_warp, eq_total);
    const bool take = (i < m && key > prefix) || (eq && eq_rank < remaining);
    int take_total;
    const int pos = written + block_prefix_count<kThreads>(take, s_warp, take_total);
    if (take) out[pos] = i;
    eq_seen += eq_total;
    written += take_total;
  }
}

template <typename T, int D, ScoreMode kMode, int kWarpsN>
cudaError_t launch_chunk_scores(const SelectParams& plan, cudaStream_t stream) {
  constexpr int kVec = kMode == ScoreMode::kBound ? 2 * D : D;
  constexpr TileShape kTile = tile_shape(kWarpsN == 4, kVec);
  constexpr int kMaxSmem = score_smem_bytes<kVec, kTile.block_m, kTile.block_n>(kMaxChunksPerCta);
  auto kernel = chunk_scores_kernel<T, D, kMode, kWarpsN>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem);
  if (err != cudaSuccess) return err;
  int device = 0, sms = 0, per_sm = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
    return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kScoreThreads, kMaxSmem);
  if (err != cudaSuccess) return err;

  // One wave of equal CTAs: split every (sequence, head, block, row tile) into chunk ranges
  // so that all CTAs fit on the GPU at once, with at least one column tile each. A second,
  // partly filled wave would leave most SMs idle at the end of a memory-bound decode step.
  SelectParams p = plan;
  const int64_t slots = static_cast<int64_t>(per_sm > 0 ? per_sm : 1) * sms;
  const int cols_per_chunk = kMode == ScoreMode::kMax ? p.chunk : 1;
  const int64_t col_tiles =
      (static_cast<int64_t>(p.n_cols) * cols_per_chunk + kTile.block_n - 1) / kTile.block_n;
  const int64_t units = static_cast<int64_t>(p.batch) * p.hkv * p.n_blocks * p.row_tiles;
  const int64_t splits_wanted = std::max<int64_t>(1, slots / std::max<int64_t>(1, units));
  const int64_t tiles_per_cta = std::max<int64_t>(1, (col_tiles + splits_wanted - 1) / splits_wanted);
  const int64_t chunks = (tiles_per_cta * kTile.block_n + cols_per_chunk - 1) / cols_per_chunk;
  p.chunks_per_cta = static_cast<int>(std::min<int64_t>(std::max<int64_t>(chunks, 1), kMaxChunksPerCta));
  p.col_splits = (p.n_cols + p.chunks_per_cta - 1) / p.chunks_per_cta;
  const int smem = score_smem_bytes<kVec, kTile.block_m, kTile.block_n>(p.chunks_per_cta);
  const dim3 grid(p.col_splits * p.n_blocks * p.row_tiles, p.hkv, p.batch);
  kernel<<<grid, kScoreThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Scores (when any middle chunk can exist) then top-k. `p.scores` must be zeroed by the
// caller when p.atomic.
template <typename T, int D>
cudaError_t launch_select_chunks(const SelectParams& p, ScoreMode mode, cudaStream_t stream) {
  if (p.batch == 0 || p.hkv == 0) return cudaSuccess;
  if (p.n_cols > 0) {
    const bool few = few_rows(p.lq, p.query_block, p.hq / p.hkv);
    cudaError_t err = cudaSuccess;
    switch (mode) {
      case ScoreMode::kMax:
        err = few ? launch_chunk_scores<T, D, ScoreMode::kMax, 4>(p, stream)
                  : launch_chunk_scores<T, D, ScoreMode::kMax, 1>(p, stream);
        break;
      case ScoreMode::kBound:
        err = few ? launch_chunk_scores<T, D, ScoreMode::kBound, 4>(p, stream)
                  : launch_chunk_scores<T, D, ScoreMode::kBound, 1>(p, stream);
        break;
      case ScoreMode::kMean:
        err = few ? launch_chunk_scores<T, D, ScoreMode::kMean, 4>(p, stream)
                  : launch_chunk_scores<T, D, ScoreMode::kMean, 1>(p, stream);
        break;
    }
    if (err != cudaSuccess) return err;
  }
  const bool stage_row = static_cast<int64_t>(p.n_cols) * 4 <= kTopkSmemRowBytes;
  const int smem = stage_row ? p.n_cols * 4 : 0;
  auto kernel = topk_kernel<kTopkThreads>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kTopkSmemRowBytes);
  if (err != cudaSuccess) return err;
  kernel<<<p.batch * p.hkv * p.n_blocks, kTopkThreads, smem, stream>>>(p, stage_row);
  return cudaGetLastError();
}

}  // namespace reattention::kernels
