// The many-rows chunk scoring GEMM on sm_90a: chunk_scores_gemm_kernel's work
// (select_chunks_scores.cuh, kernel 2) with Hopper's warpgroup MMA, wgmma.mma_async m64nNk16
// (fp32 accumulate), which reads both operands from shared memory: no ldmatrix, and one
// instruction per 64 x N x 16 product.
//
// Two kernels, picked at compile time per instantiation by launch_chunk_scores_gemm through
// WgmmaTile<kVec>::kWarpSpecialized (docs/design.md section 4):
// - chunk_scores_wgmma_ws_kernel for kVec <= 256 (max / mean at D 64, 128 and 256, bound at
//   D 64 and 128; the exact selection is kVec 128, the prefill call's bound scoring kVec 256):
//   384 threads, warp-specialized, a producer warpgroup and two consumer warpgroups that hold
//   their query rows in registers (wgmma's register A operand), so the A tile's shared memory
//   joins the column ring once they have loaded it; the ring of 6 slices then holds a column
//   tile plus two slices at every kVec and the consumers take column tiles in turn.
// - chunk_scores_wgmma_kernel for kVec 512 (bound at D 256): 256 threads, cp.async by all and
//   one CTA barrier per slice.
// Round nine (bench/NOTES.md) measured the warp-specialized kernel at kVec 256 11% faster than
// the CTA-barrier one once its producer announced slices as they landed.
//
// Both: two MMA warpgroups and a CTA tile of kBM x 256 (kBM = gemm_block_m(kVec), so the row
// tiling equals the sm80 kernel's). kBM = 128: MMA warpgroup w owns rows 64 w .. 64 w + 63 and
// all 256 columns (N = 256, 128 fp32 accumulators per thread); kBM = 64 (bound, D 256): both own
// the 64 rows and 128 columns each (N = 128).
//
// Shared memory layout: every operand tile is K-major in the 128-byte swizzle of wgmma, built
// of 1024-byte atoms of 8 rows x 64 elements: row r at byte 128 r, its 16-byte chunk c stored
// at chunk c ^ (r % 8), i.e. swz<64>. The A tile (query rows, kVec elements) is kept as kVec / 64
// such slices of kBM rows (Sliced64); the column ring holds kStages slices of 256 columns x 64
// elements, exactly what load_column_slice writes. The descriptor of a slice: start address
// >> 4, stride byte offset 1024 (from one 8-row atom to the next), leading byte offset unused
// (a k16 step stays inside one 128-byte row), swizzle mode 1 (128 B); the k16 step kk starts
// 32 kk bytes further, and the hardware applies the XOR to the final address, which is why the
// atoms must be 1024-byte aligned (the dynamic shared memory base is rounded up to 1024). The
// warp-specialized kernel keeps its mbarriers (128 bytes) after the ring; then the per-chunk
// maxima.
//
// Pipeline of chunk_scores_wgmma_kernel, one (column tile, 64-element slice) per step, all 256
// threads: cp.async the slice kAhead = kStages - 2 steps ahead; wait for this step's slice;
// fence.proxy.async (the copies were generic-proxy writes, wgmma reads through the async
// proxy); barrier; issue the 4 wgmma of the slice as one group and keep it in flight
// (wgmma.wait_group 1), so the slice a step refills (read by the group two steps back) is
// always retired. The last slice of a column tile waits for all groups and reduces the tile.
//
// Pipeline of chunk_scores_wgmma_ws_kernel, synchronized by mbarriers only after the A tile is
// staged (no CTA-wide barrier until the maxima are stored):
// - full[s] / empty[s] per ring slot. The producer warpgroup (setmaxnreg down to kProducerRegs)
//   copies every slice with load_column_slice over its 128 threads and follows each thread's
//   copies of a slice with cp.async.mbarrier.arrive.noinc on the slot's full barrier (128
//   arrivals), which the hardware makes once those copies have landed: the producer never waits
//   for its own copies, only on empty before refilling a slot (all 8 consumer warps released the
//   slot's previous use), so every free slot is refilled at once. (Round nine: announcing a
//   slice only after the thread's next kLag slices were issued, cp.async.wait_group kLag, tied
//   the announcement of slice s to the release of slice s + kLag - kStages, which held the
//   turn-taking consumers in lockstep; bench/NOTES.md.)
// - The A tile is staged in the ring's last kASlots slots. Each consumer warp loads its 16 rows
//   of every k16 step into registers (ldmatrix.x4: the fragment of mma.m16n8k16, which is what
//   the register A operand of wgmma takes); every consumer thread then arrives on the A barrier
//   (256 arrivals), on which the producer waits before its first fill of those slots. Each
//   thread releases its own reads, so the ordering needs no warp-level step in between.
// - A consumer warpgroup (setmaxnreg up to kConsumerRegs) waits on full, fences the slice to the
//   async proxy (the copies were generic-proxy writes of other threads, visible after the
//   acquire), issues the slice's 4 wgmma as one group and keeps it in flight (wgmma.wait_group
//   1); each warp releases the slot of the group that just retired. The last slice of a column
//   tile waits for all groups and reduces the tile.
// - The consumers take turns per column tile through two more mbarriers: consumer 1
//   issues tile i once consumer 0 has issued it, consumer 0 tile i + 1 once consumer 1 has
//   issued tile i, so one consumer's epilogue runs while the other's wgmma keep the tensor
//   cores busy. This needs the ring to hold a column tile plus two slices (kStages >= kKSteps
//   + 2), which the register A tile makes room for at kVec 256.
//
// The reduction of a column tile is warp_tile_maxima (shared with the sm80 kernel): wgmma's
// accumulators per warp are the m16n8 fragment layout of one m16 tile (warp i of the warpgroup
// holds rows 16 i .. 16 i + 15), so the epilogue semantics are the same: ragged rows -inf, max
// over rows, per-column (or per-chunk of tokens) shared atomicMax, then store_chunk_maxima after
// a CTA barrier. In both kernels every column runs the same wgmma sequence over its vector in
// the same k order wherever it falls, so bit-identical chunks still get bit-identical keys.
//
// Built on select_chunks_scores.cuh (the sm80 GEMM kernel's helpers); select_chunks.cuh launches
// it. The bodies are compiled for sm_90a only (__CUDA_ARCH_FEAT_SM90_ALL); elsewhere they trap,
// and the launcher (sm90a_code_usable) never picks them there.
#pragma once

#include "select_chunks_scores.cuh"
#include "sm90_utils.cuh"

namespace reattention::kernels {

// Shapes of the sm_90a scoring kernels for column vectors of kVec elements (every kVec the GEMM
// kernel serves: D and 2 D for D in 64, 128, 256).
template <int kVec>
struct WgmmaTile {
  // kVec <= 256: chunk_scores_wgmma_ws_kernel, else chunk_scores_wgmma_kernel.
  static constexpr bool kWarpSpecialized = kVec <= 256;
  static constexpr int kMmaWarpgroups = 2;
  static constexpr int kThreads = 128 * (kMmaWarpgroups + (kWarpSpecialized ? 1 : 0));
  static constexpr int kProducerRegs = 56;   // setmaxnreg: 128 x 56 + 256 x 224 = 384 x 168
  // Consumers: 128 accumulators plus kVec / 4 registers of A (64 at kVec 256); ptxas (CUDA
  // 13.0) uses up to R212 there and up to R36 on the producer path.
  static constexpr int kConsumerRegs = 224;
  static constexpr int kBM = gemm_block_m(kVec);
  static constexpr int kBN = 256;
  static constexpr int kWgM = kBM / 64;                // MMA warpgroups over the rows
  static constexpr int kWgN = kMmaWarpgroups / kWgM;   // and over the columns
  static constexpr int kN = kBN / kWgN;                // the wgmma's N
  static constexpr int kKStep = 64;                    // one 128-byte swizzle row
  static constexpr int kKSteps = kVec / kKStep;
  static constexpr int kMaxChunks = GemmTile<kVec>::kMaxChunks;
  static constexpr int kABytes = kBM * kVec * 2;
  static constexpr int kSliceBytes = kBN * kKStep * 2;
  static constexpr int kAlign = 1024;                  // swizzle atoms; the base is rounded up
  static constexpr int kBarrierBytes = kWarpSpecialized ? 128 : 0;  // full, empty, turn, A
  // The warp-specialized kernel's consumers keep their A rows in registers (wgmma's register A
  // operand) once the prologue has loaded them, so the A tile lies in the last kASlots slots of
  // the ring, which the producer first fills after both consumers have loaded their fragments.
  static constexpr bool kRegA = kWarpSpecialized;
  static constexpr int kASlots = kRegA ? (kABytes + kSliceBytes - 1) / kSliceBytes : 0;
  // As many ring slices as fit next to the A tile (unless it lies in the ring), the barriers
  // and the chunk maxima in 227 KB (4 to 6).
  static constexpr int kSmemLimit = 227 * 1024;
  static constexpr int kStagesFit =
      (kSmemLimit - kAlign - (kRegA ? 0 : kABytes) - kBarrierBytes - kMaxChunks * 4) /
      kSliceBytes;
  static constexpr int kStages = kStagesFit < 6 ? kStagesFit : 6;
  static constexpr int kAhead = kStages - 2;  // CTA-barrier kernel: slices in flight ahead
  static constexpr int kFixedSmem =
      kAlign + (kRegA ? 0 : kABytes) + kStages * kSliceBytes + kBarrierBytes;
  static_assert(kVec % kKStep == 0 && kWgM * kWgN == kMmaWarpgroups && kStages >= 3,
                "tile shape");
  // Register A: the consumers own 64 rows and all kN = 256 columns (m64n256k16), and the ring
  // keeps at least two slots the producer may fill before the A tile is released.
  static_assert(!kRegA || (kWgN == 1 && kN == 256 && kStages - kASlots >= 2), "register A");
  // The warp-specialized kernel: the consumers' turns need a column tile plus two slices in the
  // ring; the barriers fit (full and empty per slot, two turn words, A); setmaxnreg moves
  // registers within the launch's allocation (65536 / kThreads per thread, rounded down to 8:
  // 168 at 384 threads).
  static_assert(!kWarpSpecialized ||
                    (kStages >= kKSteps + 2 && 2 * kStages + 3 <= kBarrierBytes / 8 &&
                     128 * kProducerRegs + 256 * kConsumerRegs <=
                         kThreads * (65536 / kThreads / 8 * 8)),
                "warp-specialized shape");
};

// The dynamic shared memory of both kernels from the first 1024-byte boundary: the A tile then
// the ring (CTA-barrier kernel), or the ring with the A tile in its last kASlots slots
// (warp-specialized kernel, kRegA); the mbarriers (warp-specialized kernel only); the per-chunk
// maxima.
template <typename T, typename W>
struct WgmmaSmem {
  T* a;
  T* ring;
  uint64_t* barriers;
  uint32_t* best;

  __device__ __forceinline__ explicit WgmmaSmem(unsigned char* raw) {
    const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(raw));
    T* base = reinterpret_cast<T*>(raw + ((W::kAlign - raw_addr % W::kAlign) % W::kAlign));
    if constexpr (W::kRegA) {  // A in the ring's last kASlots slots
      ring = base;
      a = ring + (W::kStages - W::kASlots) * W::kBN * W::kKStep;
    } else {
      a = base;
      ring = a + W::kABytes / 2;
    }
    barriers = reinterpret_cast<uint64_t*>(ring + W::kStages * W::kBN * W::kKStep);
    best = reinterpret_cast<uint32_t*>(barriers + W::kBarrierBytes / 8);
  }
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// One step of the CTA-barrier kernel: the 4 wgmma (k16 steps) of A slice ks against ring slot
// `slot`, issued as one group and committed. a_addr / b_addr: the MMA warpgroup's rows of A
// slice 0 and columns of ring slot 0 (whole atoms: 64 rows, 128 or 256 columns, 128 bytes
// each); d: its kN / 2 accumulators, overwritten by the first slice of a column tile (ks = 0).
template <typename T, typename W>
__device__ __forceinline__ void wgmma_slice(float* d, uint32_t a_addr, uint32_t b_addr, int ks,
                                            int slot) {
  const uint64_t desc_a = wgmma_desc_sw128(a_addr + ks * W::kBM * W::kKStep * 2);
  const uint64_t desc_b = wgmma_desc_sw128(b_addr + slot * W::kSliceBytes);
  wgmma_fence();
  fence_accumulators<W::kN / 2>(d);
#pragma unroll
  for (int kk = 0; kk < W::kKStep / 16; ++kk) {
    // k16 step kk: 32 bytes further in the 128-byte rows (2 in the descriptor's units).
    wgmma_m64k16<T, W::kN>(d, desc_a + 2 * kk, desc_b + 2 * kk, ks > 0 || kk > 0);
  }
  wgmma_commit();
}
#endif  // sm_90a

// The CTA-barrier kernel (kVec 512).
template <typename T, int D, RepMode kRep>
__global__ void __launch_bounds__(256, 1) chunk_scores_wgmma_kernel(SelectParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kVec = kRep == RepMode::kBound ? 2 * D : D;
  using W = WgmmaTile<kVec>;
  static_assert(!W::kWarpSpecialized && W::kThreads == 256, "kVec >= 512 only");
  constexpr int kNT = W::kN / 8;
  constexpr bool kTokens = kRep == RepMode::kMax;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const WgmmaSmem<T, W> smem(smem_raw);
  T* s_a = smem.a;
  T* s_b = smem.ring;
  uint32_t* s_best = smem.best;

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
    wgmma_slice<T, W>(d, a_addr, b_addr, ks, step % W::kStages);
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
  __trap();  // compiled without sm_90a: the launcher never picks this
#endif
}

// The warp-specialized kernel (kVec <= 256; the header comment describes the pipeline).
template <typename T, int D, RepMode kRep>
__global__ void __launch_bounds__(384, 1) chunk_scores_wgmma_ws_kernel(SelectParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kVec = kRep == RepMode::kBound ? 2 * D : D;
  using W = WgmmaTile<kVec>;
  static_assert(W::kWarpSpecialized && W::kThreads == 384, "kVec <= 256 only");
  constexpr int kNT = W::kN / 8;
  constexpr bool kTokens = kRep == RepMode::kMax;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const WgmmaSmem<T, W> smem(smem_raw);
  const uint32_t bar0 = static_cast<uint32_t>(__cvta_generic_to_shared(smem.barriers));
  auto full_bar = [&](int st) { return bar0 + 8 * st; };
  auto empty_bar = [&](int st) { return bar0 + 8 * (W::kStages + st); };
  auto turn_bar = [&](int c) { return bar0 + 8 * (2 * W::kStages + c); };
  const uint32_t a_bar = bar0 + 8 * (2 * W::kStages + 2);  // the consumers have loaded A

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = warp / 4;
  const ScoreTile t = score_tile(p, W::kBM, kTokens);
  if (t.empty()) return;

  const int n_cols = t.n_cols;
  const int n_steps = (n_cols + W::kBN - 1) / W::kBN * W::kKSteps;  // (column tile, slice)
  if (threadIdx.x == 0) {
    for (int st = 0; st < W::kStages; ++st) {
      mbar_init(full_bar(st), 128);     // every producer thread's copies of the slice
      mbar_init(empty_bar(st), 4 * W::kMmaWarpgroups);  // one arrival per consumer warp
    }
    for (int c = 0; c < 2; ++c) mbar_init(turn_bar(c), 1);
    mbar_init(a_bar, 128 * W::kMmaWarpgroups);  // every consumer thread's ldmatrix of A
  }
  stage_query_rows<T, D, kRep, W::kBM, W::kThreads, Sliced64<W::kBM>>(smem.a, p, t);
  for (int i = threadIdx.x; i < t.j1 - t.j0; i += W::kThreads) smem.best[i] = 0u;
  __syncthreads();  // barriers initialized, A staged (read by ldmatrix below), maxima zeroed

  if (wg == 0) {
    // Producer: the slice of step s goes into slot s % kStages once that slot is free; the
    // hardware arrives on its full barrier when this thread's copies of it have landed. The
    // slots that hold the A tile are first filled once every consumer thread has loaded its
    // fragments of A (the A barrier).
    setmaxnreg_dec<W::kProducerRegs>();
    const ColumnRows<T, kTokens> col_rows(p, t);
    for (int step = 0; step < n_steps; ++step) {
      const int st = step % W::kStages;
      if (step == W::kStages - W::kASlots) mbar_wait(a_bar, 0);
      const int use = step / W::kStages;
      if (use > 0) mbar_wait(empty_bar(st), (use - 1) & 1);
      load_column_slice<W::kBN, W::kKStep, 128>(
          smem.ring + st * (W::kBN * W::kKStep), col_rows, p, step / W::kKSteps * W::kBN,
          step % W::kKSteps * W::kKStep, n_cols);
      cp_async_mbar_arrive(full_bar(st));
    }
  } else {
    // Consumer c: rows 64 c .. 64 c + 63 of the tile, all 256 columns of every column tile.
    setmaxnreg_inc<W::kConsumerRegs>();
    const int c = wg - 1;
    // This warp's A fragments (rows 64 c + 16 (warp % 4) .., every k16 step of the vector),
    // loaded once; then each thread releases its reads of the A slots to the producer.
    constexpr int kK16 = kVec / 16;
    uint32_t a_frag[kK16][4];
    {
      const int m = lane >> 3;  // ldmatrix matrix m: rows 8 (m % 2) .., k 8 (m / 2) ..
      const int r = c * 64 + (warp % 4) * 16 + (lane & 7) + 8 * (m & 1);
#pragma unroll
      for (int kk = 0; kk < kK16; ++kk) {
        ldmatrix_x4(a_frag[kk], smem.a + Sliced64<W::kBM>{}(r, kk * 16 + 8 * (m >> 1)));
      }
    }
    mbar_arrive(a_bar);
    const uint32_t b_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem.ring));
    const int warp_row0 = t.row0 + c * 64 + (warp % 4) * 16;
    auto release = [&](int step) {  // this warp's wgmma of `step` retired
      if (lane == 0) mbar_arrive(empty_bar(step % W::kStages));
    };
    float acc[1][kNT][4];
    float* d = &acc[0][0][0];
    const int n_tiles = n_steps / W::kKSteps;
    for (int tile = 0; tile < n_tiles; ++tile) {
      if (c == 1 || tile > 0) {
        // Consumer 1 takes tile i once consumer 0 has issued it; consumer 0 takes tile i + 1
        // once consumer 1 has issued tile i.
        mbar_wait(turn_bar(c), (c == 1 ? tile : tile - 1) & 1);
      }
#pragma unroll
      for (int ks = 0; ks < W::kKSteps; ++ks) {
        const int step = tile * W::kKSteps + ks, st = step % W::kStages;
        mbar_wait(full_bar(st), (step / W::kStages) & 1);
        fence_proxy_async_shared();  // the producer's copies of the slice -> the async proxy
        const uint64_t desc_b = wgmma_desc_sw128(b_addr + st * W::kSliceBytes);
        wgmma_fence();
        fence_accumulators<W::kN / 2>(d);
#pragma unroll
        for (int kk = 0; kk < W::kKStep / 16; ++kk) {
          // k16 step kk of the slice: 32 bytes further in the 128-byte rows (2 descriptor units).
          wgmma_m64n256k16_rs<T>(d, a_frag[ks * (W::kKStep / 16) + kk], desc_b + 2 * kk,
                                 ks > 0 || kk > 0);
        }
        wgmma_commit();
        if (ks != W::kKSteps - 1) {
          wgmma_wait<1>();  // the accumulators stay untouched while this group is in flight
          if (ks > 0) release(step - 1);
        }
      }
      const int last = (tile + 1) * W::kKSteps - 1;
      if (threadIdx.x % 128 == 0) mbar_arrive(turn_bar(1 - c));  // the other's turn
      wgmma_wait<0>();
      if (W::kKSteps > 1) release(last - 1);
      release(last);
      fence_accumulators<kNT * 4>(d);
      // Epilogue of column tile `tile` (in every warp: a branch around it would be a divergent
      // path for the accumulators, which serializes the wgmma).
      warp_tile_maxima<1, kNT, kTokens>(acc, p, t, warp_row0, tile * W::kBN, smem.best, lane);
    }
    wgmma_wait<0>();  // nothing is in flight (the last step closes a tile); tells the compiler so
  }
  __syncthreads();  // every consumer's maxima are in smem.best
  store_chunk_maxima<W::kThreads>(p, t, smem.best);
#else
  __trap();  // compiled without sm_90a: the launcher never picks this
#endif
}

}  // namespace reattention::kernels
