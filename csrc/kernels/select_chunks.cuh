// select_chunks: score the middle chunks of each (sequence, kv head, query block) and keep the
// top-k, ascending, -1 padded. Three headers:
// - select_chunks_scores.cuh: the parameters, the scoring kernels (few rows: decode; many rows:
//   prefill blocks and the exact selection) and the top-k's building blocks, which the
//   few-rows kernel also runs fused for the decode step;
// - select_chunks_sm90.cuh: the many-rows scoring on Hopper's wgmma, built on the former;
// - this one: the top-k kernels over the scores, and the launchers (launch_select_chunks picks
//   the kernels for a call, and whether the decode step's top-k is fused or launched early).
//
// The top-k kernels:
// - topk_kernel, one CTA per (sequence, kv head, block), runs block_topk
//   (select_chunks_scores.cuh): a cheap bound on the K-th largest key (from 2K group maxima)
//   leaves ~1.4 K candidates, which are ranked by (key, then lower index) and written
//   ascending; more candidates than the CTA can rank (many exact ties) fall back to a radix
//   select (4 passes of 8 bits) that finds the K-th largest key T, then keeps key > T and the
//   lowest-index keys == T (ties go low).
// - topk_short_kernel: rows of at most 4096 chunks with topk <= 32 (decode below ~260K tokens),
//   the same order and output with the row held in registers (its steps are below).
#pragma once

#include <type_traits>

#include "select_chunks_scores.cuh"
#include "select_chunks_sm90.cuh"

namespace reattention::kernels {

constexpr int kTopkThreads = 1024;

// Rows whose keys fit in this much shared memory are staged there once (block_topk's passes then
// re-read shared memory instead of L2).
constexpr int kTopkSmemRowBytes = 64 * 1024;
// Candidates block_topk's filter may keep in topk_kernel: ranking n of them costs each of the
// 1024 threads about n^2 / 1024 comparisons, 256 at this cap.
constexpr int kTopkFilterCap = 512;

template <int kThreads>
__global__ void __launch_bounds__(kThreads) topk_kernel(SelectParams p, bool stage_row) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ TopkSmem<kThreads> sm;
  // The decode step's attention may start now (see chunk_scores_kernel).
  grid_dependents_launch();
  const int row = blockIdx.x;  // (b * hkv + h) * n_blocks + beta
  const int b = row / (p.hkv * p.n_blocks), beta = row % p.n_blocks;
  const int tid = threadIdx.x;
  const int m = static_cast<int>(
      block_segments(p.seqlens[b], p.lq, p.query_block, beta, p.sink, p.local, p.chunk).n_mid);
  const int k = min(p.topk, m);
  int* out = p.idx + static_cast<int64_t>(row) * p.topk;
  for (int i = k + tid; i < p.topk; i += kThreads) out[i] = -1;
  if (k == 0) return;

  uint64_t* s_cand = reinterpret_cast<uint64_t*>(smem_raw);
  const uint32_t* src = p.scores + static_cast<int64_t>(row) * p.n_cols;
  if (stage_row) {
    uint32_t* s_row = reinterpret_cast<uint32_t*>(s_cand + kTopkFilterCap);
    for (int i = tid; i < m; i += kThreads) s_row[i] = src[i];
    src = s_row;  // generic addressing: the passes read shared or global alike
  }
  block_topk<kThreads>(
      m, k, [&](int i) { return src[i]; }, [&](int rank, int i) { out[rank] = i; }, sm, s_cand,
      kTopkFilterCap);
}

// topk_short_kernel: the top-k of rows short enough to sit in registers (m <= 256 * kPer keys,
// topk <= 32: the decode step below a few hundred thousand tokens), in three barriers of eight
// warps. topk_kernel's phases are each a short loop behind a barrier of 32 warps, and its row
// load waits for the length; on the decode step's critical path (between the scoring and the
// selected attention tiles) that chain, not the work, sets its time. Here:
//  1. Thread t loads keys [t * kPer, (t + 1) * kPer) of the row (up to n_cols, issued before the
//     length arrives; keys at or past m count as 0, below every score) and takes their maximum:
//     256 group maxima. Each warp sorts its 32 maxima (bitonic, descending) into shared memory.
//  2. Every warp merges the eight sorted lists into the top 32 of all 256 (the elementwise max
//     of a descending list and an ascending one holds the top of both, as a bitonic sequence:
//     three rounds of merges) and reads B, the k-th largest group maximum. k groups have a key
//     >= B, so B is at most the row's k-th largest key, as in block_topk's bound, with ~1.1 k
//     candidates on iid scores instead of ~1.4 k.
//  3. The keys >= B are compacted in position order (a scan of the per-thread counts), as
//     (key << 32 | ~position) words, whose uint64 order is the selection order.
//  4. One warp ranks them (each candidate counts the ones above it); ranks < k are the
//     selection, and since the candidates are in position order a ballot gives each its slot.
// Many exact ties (more than kTopkShortCap candidates) fall back to block_topk_radix over the
// row, as block_topk does.
// early (attend's decode step, rows of at least kTopkEarlyMinChunks chunks): launched as a
// programmatic dependent of the scoring kernel, so its CTAs are resident and past their
// prologue when the scoring ends; they wait (griddepcontrol.wait) before reading the scores,
// and only then let the attention launch, whose CTAs would otherwise take the SMs beside the
// scoring. Otherwise the attention may launch at once, as with topk_kernel.
constexpr int kTopkShortThreads = 256;
constexpr int kTopkShortCap = 512;
constexpr int kTopkShortMaxK = 32;
// Rows from which attend's decode step launches topk_short_kernel early. On the H200 (bf16, Hkv
// 8, topk 32, local 4096, bound) the early launch took the step at 128K tokens (1983 chunks)
// from 28.4-28.9 to 25.4-26.5 us, and cost 0.4 us at 32K (447 chunks), where the top-k ran
// longer beside the attention's CTAs.
constexpr int kTopkEarlyMinChunks = 1024;

// Bitonic merge of bitonic sequences held one element per lane, each 2 * kFirst lanes long:
// descending (its first lane largest) or ascending. kFirst = 16 merges the whole warp; a sort is
// merges of growing length with alternating directions.
template <int kFirst = 16>
__device__ __forceinline__ uint32_t warp_bitonic_merge(uint32_t v, bool descending) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int stride = kFirst; stride > 0; stride >>= 1) {
    const uint32_t o = __shfl_xor_sync(0xffffffffu, v, stride);
    const bool lower = (lane & stride) == 0;
    v = lower == descending ? max(v, o) : min(v, o);
  }
  return v;
}

template <int kPer>
__global__ void __launch_bounds__(kTopkShortThreads) topk_short_kernel(SelectParams p,
                                                                        bool early) {
  constexpr int kThreads = kTopkShortThreads, kWarps = kThreads / 32;
  static_assert(kWarps == 8, "the merge of step 2 takes eight sorted lists");
  __shared__ uint32_t s_lists[kWarps][32];
  __shared__ int s_count[kWarps];
  __shared__ uint64_t s_cand[kTopkShortCap];
  __shared__ TopkSmem<kThreads> sm;
  // The decode step's attention may start now (see chunk_scores_kernel), or past the wait.
  if (!early) grid_dependents_launch();
  const int row = blockIdx.x;  // (b * hkv + h) * n_blocks + beta
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t* src = p.scores + static_cast<int64_t>(row) * p.n_cols;
  const int first = tid * kPer;
  const int b = row / (p.hkv * p.n_blocks), beta = row % p.n_blocks;
  const int n_tok = p.seqlens[b];
  grid_dependency_wait();  // returns at once unless launched early
  if (early) grid_dependents_launch();
  // The row's loads do not wait for its length: keys at or past m are dropped below.
  uint32_t key[kPer];
#pragma unroll
  for (int e = 0; e < kPer; ++e) key[e] = first + e < p.n_cols ? src[first + e] : 0u;

  const int m = static_cast<int>(
      block_segments(n_tok, p.lq, p.query_block, beta, p.sink, p.local, p.chunk).n_mid);
  const int k = min(p.topk, m);
  int* out = p.idx + static_cast<int64_t>(row) * p.topk;
  for (int i = k + tid; i < p.topk; i += kThreads) out[i] = -1;
  if (k == 0) return;

  // 1. Group maxima, sorted per warp.
  uint32_t gmax = 0;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    if (first + e >= m) key[e] = 0u;
    gmax = max(gmax, key[e]);
  }
  gmax = warp_bitonic_merge<1>(gmax, (lane & 2) == 0);
  gmax = warp_bitonic_merge<2>(gmax, (lane & 4) == 0);
  gmax = warp_bitonic_merge<4>(gmax, (lane & 8) == 0);
  gmax = warp_bitonic_merge<8>(gmax, (lane & 16) == 0);
  s_lists[warp][lane] = warp_bitonic_merge(gmax, true);
  __syncthreads();

  // 2. The top 32 of the 256 maxima, in every warp: pairs of lists, then pairs of those.
  uint32_t l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    l[i] = warp_bitonic_merge(max(s_lists[2 * i][lane], s_lists[2 * i + 1][31 - lane]),
                              (i & 1) == 0);
  }
  l[0] = warp_bitonic_merge(max(l[0], l[1]), true);
  l[2] = warp_bitonic_merge(max(l[2], l[3]), false);
  const uint32_t bound = __shfl_sync(0xffffffffu, warp_bitonic_merge(max(l[0], l[2]), true), k - 1);

  // 3. The candidates (keys >= bound) in position order.
  int mine = 0;
#pragma unroll
  for (int e = 0; e < kPer; ++e) mine += first + e < m && key[e] >= bound ? 1 : 0;
  int n;
  int slot = block_exclusive_sum<kThreads>(mine, lane, warp, s_count, n);
  if (n > kTopkShortCap) {  // many exact ties at the bound
    block_topk_radix<kThreads>(
        m, k, [&](int i) { return src[i]; }, [&](int rank, int i) { out[rank] = i; }, sm);
    return;
  }
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    if (first + e < m && key[e] >= bound) {
      s_cand[slot++] = (static_cast<uint64_t>(key[e]) << 32) | ~static_cast<uint32_t>(first + e);
    }
  }
  __syncthreads();

  // 4. Rank and emit, one warp.
  if (warp != 0) return;
  warp_rank_emit(s_cand, n, k, [&](int slot, int i) { out[slot] = i; });
}

// Launches a scoring kernel as one wave of equal CTAs: every (sequence, head, block, row tile)
// is split into chunk ranges so that all CTAs fit on the GPU at once, with at least one column
// tile each. A second, partly filled wave would leave most SMs idle at the end of a
// memory-bound decode step. Dynamic shared memory: fixed_smem + 4 bytes per chunk of the range.
// With may_fuse (few-rows bound/mean) the decode top-k runs inside the kernel (fused_topk) when
// the row's candidates stay few; *fused says whether it did, else topk_kernel must follow.
// fill_sms (the few-rows kernel) searches for the most CTAs per SM that still fit.
template <typename Kernel>
cudaError_t launch_scores_one_wave(Kernel kernel, const SelectParams& plan, int threads,
                                   int fixed_smem, int block_n, int max_chunks,
                                   int cols_per_chunk, bool may_fuse, bool* fused,
                                   cudaStream_t stream, bool fill_sms = false) {
  const int max_smem = fixed_smem + max_chunks * 4;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem);
  if (err != cudaSuccess) return err;
  int device = 0, sms = 0, per_sm = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
    return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, max_smem);
  if (err != cudaSuccess) return err;

  SelectParams p = plan;
  const int64_t col_tiles =
      (static_cast<int64_t>(p.n_cols) * cols_per_chunk + block_n - 1) / block_n;
  const int64_t units = static_cast<int64_t>(p.batch) * p.hkv * p.n_blocks * p.row_tiles;
  auto chunks_for = [&](int ctas_per_sm) {
    const int64_t slots = static_cast<int64_t>(ctas_per_sm > 0 ? ctas_per_sm : 1) * sms;
    const int64_t splits_wanted = std::max<int64_t>(1, slots / std::max<int64_t>(1, units));
    const int64_t tiles_per_cta =
        std::max<int64_t>(1, (col_tiles + splits_wanted - 1) / splits_wanted);
    const int64_t chunks = (tiles_per_cta * block_n + cols_per_chunk - 1) / cols_per_chunk;
    return static_cast<int>(std::min<int64_t>(std::max<int64_t>(chunks, 1), max_chunks));
  };
  p.chunks_per_cta = chunks_for(per_sm);
  auto splits_of = [&](int chunks) { return (p.n_cols + chunks - 1) / chunks; };
  auto fusable = [&](int chunks) {
    return may_fuse && p.row_tiles == 1 && p.n_cols >= kFusedMinChunks &&
           2 * p.topk <= kScoreThreads &&  // fused_topk's group words
           static_cast<int64_t>(splits_of(chunks)) * p.topk <= kFusedMaxCandidates;
  };
  if (fill_sms) {
    // The occupancy above assumed the largest chunk range; a shorter one may leave room for
    // more CTAs per SM (more bytes in flight for a memory-bound decode step): take the most,
    // up to kFillCtasPerSm, that still fit with their own range, unless the row's candidates
    // would outgrow the fused top-k. Bound D 128 at 16K chunks on the H200: 2 CTAs of 512
    // chunks would need 75.8 KB each (3 do not fit), 3 of 352 chunks 73.4 KB.
    constexpr int kFillCtasPerSm = 4;
    for (int ctas = per_sm + 1; ctas <= kFillCtasPerSm; ++ctas) {
      const int chunks = chunks_for(ctas);
      int fit = 0;
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, kernel, threads,
                                                          fixed_smem + chunks * 4);
      if (err != cudaSuccess) return err;
      if (fit < ctas || (fusable(p.chunks_per_cta) && !fusable(chunks))) break;
      p.chunks_per_cta = chunks;
    }
  } else {
    // The occupancy above assumed the largest chunk range; the planned one may leave room for
    // more CTAs per SM: plan for those.
    int per_sm_planned = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_planned, kernel, threads,
                                                        fixed_smem + p.chunks_per_cta * 4);
    if (err != cudaSuccess) return err;
    if (per_sm_planned > per_sm) p.chunks_per_cta = chunks_for(per_sm_planned);
  }
  p.col_splits = splits_of(p.chunks_per_cta);
  p.fused = fusable(p.chunks_per_cta);
  *fused = p.fused;
  if (p.fused) {  // the arrival counters and the group words
    const int64_t rows = static_cast<int64_t>(p.batch) * p.hkv * p.n_blocks;
    const size_t words = static_cast<size_t>(fused_workspace(rows, p.topk, p.col_splits).cand_at);
    if ((err = cudaMemsetAsync(p.scores, 0, words * sizeof(uint32_t), stream)) != cudaSuccess)
      return err;
  }
  const dim3 grid(p.col_splits * p.n_blocks * p.row_tiles, p.hkv, p.batch);
  kernel<<<grid, threads, fixed_smem + p.chunks_per_cta * 4, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D, RepMode kRep>
cudaError_t launch_chunk_scores(const SelectParams& plan, bool* fused, cudaStream_t stream) {
  constexpr int kVec = kRep == RepMode::kBound ? 2 * D : D;
  auto launch = [&](auto stages) {
    constexpr int kStages = decltype(stages)::value;
    return launch_scores_one_wave(chunk_scores_kernel<T, D, kRep, kStages>, plan, kScoreThreads,
                                  score_smem_bytes<kVec, kFewRowsTile.block_m, kScoreBlockN,
                                                   kStages>(0),
                                  kScoreBlockN, kMaxChunksPerCta,
                                  kRep == RepMode::kMax ? plan.chunk : 1,
                                  /*may_fuse=*/kRep != RepMode::kMax, fused, stream,
                                  /*fill_sms=*/true);
  };
  // Long rows of reps (those the fused top-k may take) with 16 KB tiles: kScoreStagesLongRows.
  if constexpr (kRep != RepMode::kMax && kVec == 256) {
    if (plan.n_cols >= kFusedMinChunks) {
      return launch(std::integral_constant<int, kScoreStagesLongRows>{});
    }
  }
  return launch(std::integral_constant<int, kScoreStages>{});
}

// The many-rows scoring GEMM: on a device and build that run sm_90a code (sm90a_code_usable),
// the wgmma kernel of this instantiation's vector length, picked at compile time
// (WgmmaTile::kWarpSpecialized: chunk_scores_wgmma_ws_kernel for kVec <= 256, else
// chunk_scores_wgmma_kernel; docs/design.md section 4); else the mma.sync (sm80) one.
template <typename T, int D, RepMode kRep>
cudaError_t launch_chunk_scores_gemm(const SelectParams& plan, bool* fused, cudaStream_t stream) {
  constexpr int kVec = kRep == RepMode::kBound ? 2 * D : D;
  const int cols_per_chunk = kRep == RepMode::kMax ? plan.chunk : 1;
  using W = WgmmaTile<kVec>;
  void (*const wgmma_kernel)(SelectParams) = [] {
    if constexpr (W::kWarpSpecialized) {
      return chunk_scores_wgmma_ws_kernel<T, D, kRep>;
    } else {
      return chunk_scores_wgmma_kernel<T, D, kRep>;
    }
  }();
  bool wgmma = false;
  cudaError_t err = sm90a_code_usable(reinterpret_cast<const void*>(wgmma_kernel), &wgmma);
  if (err != cudaSuccess) return err;
  if (wgmma) {
    return launch_scores_one_wave(wgmma_kernel, plan, W::kThreads, W::kFixedSmem, W::kBN,
                                  W::kMaxChunks, cols_per_chunk, false, fused, stream);
  }
  using G = GemmTile<kVec>;
  return launch_scores_one_wave(chunk_scores_gemm_kernel<T, D, kRep>, plan, G::kThreads,
                                G::kFixedSmem, G::kBN, G::kMaxChunks, cols_per_chunk, false, fused,
                                stream);
}

// Scores (when any middle chunk can exist) then top-k. `p.scores` must be zeroed by the
// caller when p.atomic. overlap: attend's decode step on sm_90 (its attention follows as a
// programmatic dependent of the selection's last kernel), which may launch the top-k early.
template <typename T, int D>
cudaError_t launch_select_chunks(const SelectParams& p, RepMode rep, cudaStream_t stream,
                                 bool overlap = false) {
  if (p.batch == 0 || p.hkv == 0) return cudaSuccess;
  bool fused = false;
  const bool few = few_rows(p.lq, p.query_block, p.hq / p.hkv);
  if (p.n_cols > 0) {
    cudaError_t err = cudaSuccess;
    switch (rep) {
      case RepMode::kMax:
        err = few ? launch_chunk_scores<T, D, RepMode::kMax>(p, &fused, stream)
                  : launch_chunk_scores_gemm<T, D, RepMode::kMax>(p, &fused, stream);
        break;
      case RepMode::kBound:
        err = few ? launch_chunk_scores<T, D, RepMode::kBound>(p, &fused, stream)
                  : launch_chunk_scores_gemm<T, D, RepMode::kBound>(p, &fused, stream);
        break;
      case RepMode::kMean:
        err = few ? launch_chunk_scores<T, D, RepMode::kMean>(p, &fused, stream)
                  : launch_chunk_scores_gemm<T, D, RepMode::kMean>(p, &fused, stream);
        break;
    }
    if (err != cudaSuccess || fused) return err;
  }
  if (p.topk <= kTopkShortMaxK && p.n_cols <= kTopkShortThreads * 16) {
    // Early only right behind the few-rows scoring kernel, which lets its dependents launch.
    const bool early = overlap && p.n_cols >= kTopkEarlyMinChunks && few;
    auto kernel = p.n_cols <= kTopkShortThreads * 8 ? topk_short_kernel<8> : topk_short_kernel<16>;
    return launch_maybe_early(kernel, dim3(p.batch * p.hkv * p.n_blocks), dim3(kTopkShortThreads),
                              0, stream, early, p, early);
  }
  const bool stage_row = static_cast<int64_t>(p.n_cols) * 4 <= kTopkSmemRowBytes;
  constexpr int kCandBytes = kTopkFilterCap * static_cast<int>(sizeof(uint64_t));
  const int smem = kCandBytes + (stage_row ? p.n_cols * 4 : 0);
  auto kernel = topk_kernel<kTopkThreads>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         kCandBytes + kTopkSmemRowBytes);
  if (err != cudaSuccess) return err;
  kernel<<<p.batch * p.hkv * p.n_blocks, kTopkThreads, smem, stream>>>(p, stage_row);
  return cudaGetLastError();
}

}  // namespace reattention::kernels
