// The many-rows chunk scoring GEMM on sm_90a: chunk_scores_gemm_kernel's work (select_chunks.cuh,
// kernel 2) with Hopper's warpgroup MMA, wgmma.mma_async m64nNk16 (fp32 accumulate), which reads
// both operands from shared memory: no ldmatrix, and one instruction per 64 x N x 16 product.
//
// CTA: 256 threads = 2 warpgroups; the CTA tile is kBM x 256 (kBM = gemm_block_m(kVec), so the
// row tiling equals the sm80 kernel's). kBM = 128: warpgroup w owns rows 64 w .. 64 w + 63 and
// all 256 columns (N = 256, 128 fp32 accumulators per thread); kBM = 64 (bound, D 256): both own
// the 64 rows and 128 columns each (N = 128).
//
// Shared memory layout: every operand tile is K-major in the 128-byte swizzle of wgmma, built
// of 1024-byte atoms of 8 rows x 64 elements: row r at byte 128 r, its 16-byte chunk c stored
// at chunk c ^ (r % 8), i.e. swz<64>. The A tile (query rows, kVec elements) is kept as kVec / 64
// such slices of kBM rows; the column ring holds kStages slices of 256 columns x 64 elements,
// exactly what load_column_slice writes. The descriptor of a slice: start address >> 4, stride
// byte offset 1024 (from one 8-row atom to the next), leading byte offset unused (a k16 step
// stays inside one 128-byte row), swizzle mode 1 (128 B); the k16 step kk starts 32 kk bytes
// further, and the hardware applies the XOR to the final address, which is why the atoms must
// be 1024-byte aligned (the dynamic shared memory base is rounded up to 1024).
//
// Pipeline, one (column tile, 64-element slice) per step, all 256 threads: cp.async the slice
// kAhead = kStages - 2 steps ahead; wait for this step's slice; fence.proxy.async (the copies
// were generic-proxy writes, wgmma reads through the async proxy); barrier; issue the 4 wgmma
// of the slice as one group and keep it in flight (wgmma.wait_group 1), so the slice a step
// refills (read by the group two steps back) is always retired. The last slice of a column tile
// waits for all groups, and warp_tile_maxima (shared with the sm80 kernel) reduces the tile:
// wgmma's accumulators per warp are the m16n8 fragment layout of one m16 tile (warp i of the
// warpgroup holds rows 16 i .. 16 i + 15), so the epilogue semantics are the same: ragged rows
// -inf, max over rows, per-column (or per-chunk of tokens) shared atomicMax, then
// store_chunk_maxima. Every column runs the same wgmma sequence over its vector in the same k
// order wherever it falls, so bit-identical chunks still get bit-identical keys.
//
// Included by select_chunks.cuh after the sm80 GEMM kernel, whose helpers it uses. The body is
// compiled for sm_90a only (__CUDA_ARCH_FEAT_SM90_ALL); elsewhere it traps, and the launcher
// (wgmma_scores_usable) never picks it there.
#pragma once

#include "sm90_utils.cuh"

namespace reattention::kernels {

// Shapes of the sm_90a scoring kernel for column vectors of kVec elements (every kVec the GEMM
// kernel serves: D and 2 D for D in 64, 128, 256).
template <int kVec>
struct WgmmaTile {
  static constexpr int kThreads = 256;
  static constexpr int kBM = gemm_block_m(kVec);
  static constexpr int kBN = 256;
  static constexpr int kWgM = kBM / 64;           // warpgroups over the rows
  static constexpr int kWgN = 2 / kWgM;           // and over the columns
  static constexpr int kN = kBN / kWgN;           // the wgmma's N
  static constexpr int kKStep = 64;               // one 128-byte swizzle row
  static constexpr int kKSteps = kVec / kKStep;
  static constexpr int kMaxChunks = GemmTile<kVec>::kMaxChunks;
  static constexpr int kABytes = kBM * kVec * 2;
  static constexpr int kSliceBytes = kBN * kKStep * 2;
  static constexpr int kAlign = 1024;              // swizzle atoms; the base is rounded up
  // As many ring slices as fit next to the A tile and the chunk maxima in 227 KB (4 to 6).
  static constexpr int kSmemLimit = 227 * 1024;
  static constexpr int kStagesFit =
      (kSmemLimit - kAlign - kABytes - kMaxChunks * 4) / kSliceBytes;
  static constexpr int kStages = kStagesFit < 6 ? kStagesFit : 6;
  static constexpr int kAhead = kStages - 2;      // slices in flight ahead of the one consumed
  static constexpr int kFixedSmem = kAlign + kABytes + kStages * kSliceBytes;
  static_assert(kVec % kKStep == 0 && kWgM * kWgN == 2 && kStages >= 3, "tile shape");
};

template <typename T, int D, RepMode kRep>
__global__ void __launch_bounds__(256, 1) chunk_scores_wgmma_kernel(SelectParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kVec = kRep == RepMode::kBound ? 2 * D : D;
  using W = WgmmaTile<kVec>;
  constexpr int kNT = W::kN / 8;
  constexpr bool kTokens = kRep == RepMode::kMax;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  T* s_a = reinterpret_cast<T*>(smem_raw + ((W::kAlign - raw_addr % W::kAlign) % W::kAlign));
  T* s_b = s_a + W::kBM * kVec;
  uint32_t* s_best = reinterpret_cast<uint32_t*>(s_b + W::kStages * W::kBN * W::kKStep);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = warp / 4;
  const int wg_m = wg / W::kWgN, wg_n = wg % W::kWgN;
  const ScoreTile t = score_tile(p, W::kBM, kTokens);
  if (t.empty()) return;

  const int n_cols = t.n_cols;
  const ColumnRows<T, kTokens> col_rows(p, t);
  const int n_steps = (n_cols + W::kBN - 1) / W::kBN * W::kKSteps;  // (column tile, slice)
  auto load_step = [&](int step) {
    load_column_slice<W::kBN, W::kKStep, W::kThreads>(
        s_b + (step % W::kStages) * (W::kBN * W::kKStep), col_rows, p,
        step / W::kKSteps * W::kBN, step % W::kKSteps * W::kKStep, n_cols);
  };

  // The first kAhead slices fly while the A tile is built. Every step commits one cp.async
  // group (empty past the end), so the wait_group count stays uniform.
#pragma unroll
  for (int s = 0; s < W::kAhead; ++s) {
    if (s < n_steps) load_step(s);
    cp_async_commit();
  }
  stage_query_rows<T, D, kRep, W::kBM, W::kThreads, Sliced64<W::kBM>>(s_a, p, t);
  for (int i = threadIdx.x; i < t.j1 - t.j0; i += W::kThreads) s_best[i] = 0u;

  // This warpgroup's rows of every A slice, and its columns of every ring slice (whole atoms:
  // 64 rows and 128 or 256 columns of 128 bytes).
  const uint32_t a_addr =
      static_cast<uint32_t>(__cvta_generic_to_shared(s_a)) + wg_m * 64 * W::kKStep * 2;
  const uint32_t b_addr =
      static_cast<uint32_t>(__cvta_generic_to_shared(s_b)) + wg_n * W::kN * W::kKStep * 2;
  const int warp_row0 = t.row0 + wg_m * 64 + (warp % 4) * 16;
  float acc[1][kNT][4];
  float* d = &acc[0][0][0];
  for (int step = 0; step < n_steps; ++step) {
    cp_async_wait<W::kAhead - 1>();
    fence_proxy_async_shared();  // this thread's copies (and A stores) -> the async proxy
    __syncthreads();             // slice `step` landed for all; the group 2 steps back retired
    if (step + W::kAhead < n_steps) load_step(step + W::kAhead);
    cp_async_commit();

    const int ks = step % W::kKSteps;
    const uint64_t desc_a = wgmma_desc_sw128(a_addr + ks * W::kBM * W::kKStep * 2);
    const uint64_t desc_b =
        wgmma_desc_sw128(b_addr + step % W::kStages * W::kSliceBytes);
    wgmma_fence();
    fence_accumulators<kNT * 4>(d);
#pragma unroll
    for (int kk = 0; kk < W::kKStep / 16; ++kk) {
      // k16 step kk: 32 bytes further in the 128-byte rows (2 in the descriptor's units);
      // the first k16 step of a column tile overwrites the accumulators.
      wgmma_m64k16<T, W::kN>(d, desc_a + 2 * kk, desc_b + 2 * kk, ks > 0 || kk > 0);
    }
    wgmma_commit();
    if (ks != W::kKSteps - 1) {
      wgmma_wait<1>();  // the accumulators stay untouched while this group is in flight
      continue;
    }
    wgmma_wait<0>();
    fence_accumulators<kNT * 4>(d);
    // Epilogue of column tile step / kKSteps (in every warp: a branch around it would be a
    // divergent path for the accumulators, which serializes the wgmma).
    warp_tile_maxima<1, kNT, kTokens>(acc, p, t, warp_row0,
                                      step / W::kKSteps * W::kBN + wg_n * W::kN, s_best, lane);
  }
  wgmma_wait<0>();  // nothing is in flight (the last step closes a tile); tells the compiler so
  __syncthreads();
  store_chunk_maxima<W::kThreads>(p, t, s_best);
#else
  __trap();  // compiled without sm_90a: wgmma_scores_usable never launches this
#endif
}

// Whether the scoring GEMM runs chunk_scores_wgmma_kernel<T, D, kRep> on the current device
// (sm90a_code_usable's rule). Every shape the GEMM kernel serves is covered; other devices and
// builds run chunk_scores_gemm_kernel.
template <typename T, int D, RepMode kRep>
inline cudaError_t wgmma_scores_usable(bool* usable) {
  return sm90a_code_usable(reinterpret_cast<const void*>(chunk_scores_wgmma_kernel<T, D, kRep>),
                           usable);
}

}  // namespace reattention::kernels
