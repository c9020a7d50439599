// gather_attention, many-rows layout on sm_90a: gather_attention_prefill_kernel's work (same CTA
// tile, plan, splits, masks and outputs; the softmax order below) with Hopper's warpgroup MMA, one
// wgmma.mma_async per 64 x N x 16 product instead of a warp instruction per 16 x 8 x 16 plus its
// ldmatrix, and K rotated once per query block by a pre-pass instead of in the attention loop.
//
// Pre-pass (prerot_k_kernel): the row_tiles CTAs of a (sequence b, kv head h, query block beta)
// attend to the same gathered keys at the same positions, so rotating K in each of them did the
// work (and read the RoPE table) row_tiles times. One CTA per 64-key plan tile of gathered keys of
// a block copies the K rows (gathered_row's lookup), rotates them (rotate_k_tile: the same fp32
// math rounded once to T, so the rows equal what the in-place rotation produced) and stores them to
// the workspace p.k_rot, one slot of prerot_rows(p, D) rows x D per (b, h, block): plan tile t of
// the slot (gathered keys 64 t .. 64 t + 63, zero past the block's n_keys in its last tile) is the
// byte image of the attention's stage layout, Sliced64<64> (D / 64 swizzled slices of 8 KB), and
// the slot's cache tokens (INT_MAX past n_keys) follow all K rows of the group. So the attention
// kernel fetches a tile's K and tokens with D / 64 + 1 bulk copies issued by one thread, no page
// lookup, no rotation and no per-thread address work, and finds each V row from its token (one
// page lookup in a paged cache, no segment or chunk lookup). Memory stays bounded
// whatever Lq is: the launcher runs pre-pass + attention on groups of prerot_group_blocks(p, D)
// query blocks, sized from static shapes so the workspace holds at most kPrerotBytes (at least one
// block per group); the op layer allocates prerot_elems(p, D).
//
// CTA: 256 threads = 2 warpgroups over kBM = 128 rows of (sequence b, kv head h, query block
// beta, split); warpgroup w owns rows 64 w .. 64 w + 63, its warp i rows 64 w + 16 i .. + 15
// (so warp k of the CTA owns rows 16 k .. 16 k + 15, as in the sm80 kernel), each warp with its
// own exp2-domain online softmax: no cross-warp merge.
//
// Iteration width kBN: each loop iteration consumes kIterTiles of plan_attention's 64-key tiles,
// two at D 128 (kBN = 128 keys: one turn, one softmax and one O rescale per 128 keys, so the
// per-iteration chain of a warpgroup is paid half as often), one at D 64 (kBN = 64: 128-key
// stages would not let two CTAs share an SM). plan_attention, the splits and
// the pre-pass keep 64-key tiles: a split's range may hold an odd number of them, and then the
// second half of its last iteration lies past the range; that half is never copied (no read past
// the split's keys or the workspace slot): its K and V rows are zero filled and its key tokens
// are INT_MAX, so the mask drops them by key index, they add nothing to the max or the sum, and
// P V adds exact zeros: the same results as an iteration of the first half alone.
//
// Shared memory (1024-byte aligned base): the rotated Q tile, kStages K stages, kStages V stages
// (kBN gathered keys each), kStages slots of key tokens, inverse frequencies: 227 KB at D 128 (3 +
// 3 stages of 32 KB with the 32 KB Q tile: the opt-in limit, one CTA per SM), 99 KB at D 64 (5 + 5
// stages of 8 KB, two CTAs per SM). Every tile is stored as D / 64 slices of 64 elements
// (Sliced64): slice j holds columns 64 j .. 64 j + 63 of all its rows, row r at byte 128 r of the
// slice, 16-byte chunk c at chunk c ^ (r % 8) (the 128-byte swizzle of wgmma; slices are 8 or 16
// KB, so every 8-row atom is 1024-byte aligned). A 128-key stage holds its two 64-key tiles as rows
// 0 .. 63 and 64 .. 127 of one Sliced64<128> tile.
// - S = Q K^T: wgmma m64nkBNk16 (m64n128k16 at D 128), A = the warpgroup's 64 rows of Q, B = the
//   K stage, both K-major over D (descriptor wgmma_desc_sw128: stride byte offset 1024 between
//   8-row atoms); k16 step kk reads slice kk / 4, 32 (kk % 4) bytes into each 128-byte row.
// - O += P V: wgmma m64nDk16 with A = P from registers and B = the V stage, kBN / 16 k16 steps.
//   The S accumulator of a warp is the m16n8 fragment layout (s[nt][0..1]: row g, keys
//   8 nt + 2 t4 + {0, 1}; s[nt][2..3]: row g + 8), and the register A fragment of m64nNk16 is
//   mma.m16n8k16's A layout for the warp's 16 rows, so P packs as in pv_tile: a[kk] = {S tiles
//   2 kk, 2 kk + 1} rounded to T. V rows are keys with D contiguous: for B (K = keys, N = D) an
//   MN-major tile, read with the B-transpose immediate; descriptor wgmma_desc_sw128_mn: rows of
//   64 D-columns per key, 8-key atoms 1024 bytes apart (stride byte offset), the next 64
//   D-columns one slice (kBN * 128 bytes) on (leading byte offset); k16 step kk starts 16 keys =
//   2048 bytes further. The O accumulator is again the m16n8 layout: o[dt][..] as in the sm80
//   kernel, so the online softmax (online_softmax_tile) and the epilogue (store_prefill_rows)
//   are shared.
// - Softmax order: one online-softmax update per iteration, the running max taken over the
//   iteration's kBN keys at once (at D 128 over 128 keys, where the sm80 kernel updates every
//   64); the per-element math (scale, mask, exp2 against the running max, fp32 sums, P rounded
//   to T) is the same, only the max that a group of keys is rescaled against may differ.
//
// Pipeline: rings of kStages K stages (with their key tokens) and kStages V stages. K and the
// tokens of iteration j arrive by bulk copies that one lane of the producer warp (warp 4 with the
// ping-pong, warp 0 without) issues, counted on mbarrier s_full[j % kStages], whose phase every
// thread waits for at the top of turn j (and before it reads the tokens to copy V). V travels by
// every thread's cp.async: copy group j holds V of iteration j - 1 (group 0 is empty). Both are
// read by turn j: each warpgroup's turn j issues S = Q K^T on
// iteration j, then P V on iteration j - 1 (two wgmma groups in flight together), and turn
// n_iters P V on the last iteration. After its turn a warpgroup waits for S, runs the softmax
// (unmasked when the iteration's keys all precede the warp's first row) with O's rescale
// factors caught aside, waits for P V, rescales O and packs P into registers (pa) for the next
// turn: its "body" j.
// - D 64 (kPingPong false) keeps the lock-step schedule, which measured faster there: one CTA
//   barrier at the top of each iteration, after which the producer warp fetches K of it +
//   kStages - 1 and every thread commits group it + kStages - 1 (the stages of it - 1 and it - 2
//   are free for both warpgroups) before the wgmma.
// - Ping-pong (D 128): the two warpgroups take turns issuing, ordered by two named barriers of
//   256 threads (ids 1 and 2, never the CTA barrier inside the loop). Warpgroup w waits on barrier
//   1 + w (bar.sync) before the wgmma of a turn and arrives on the other one (bar.arrive)
//   after them, so the issues go 0, 1, 0, 1, ...: while one warpgroup runs its softmax the
//   other's GEMMs keep the tensor cores busy, and warpgroup 1 runs about half an iteration
//   behind. Warpgroup 1 arrives once before its turn 0 and not after its turn n_iters, so each
//   thread meets each barrier n_iters + 1 times, as its 128 waiters do (none when n_iters is 0:
//   the branch is uniform over the CTA). It cannot deadlock: turn k of warpgroup 0 waits only
//   for warpgroup 1's arrival after its turn k - 1 (its first arrival for k = 0), turn k of
//   warpgroup 1 only for warpgroup 0's arrival after its turn k, so the turns run in one order
//   (0 of wg 0, 0 of wg 1, 1 of wg 0, ...), each waiting only on the one before it; and no
//   arrival runs a phase ahead (a warpgroup arrives again only after a turn that needed the
//   other's wait on its previous arrival to have completed).
// - Ring: each thread copies its rows of every group. A barrier completion orders the
//   arrivers' earlier work before the waiters' later work, so at the top of its turn c
//   warpgroup 0 knows warpgroup 1 has finished body c - 2 (it issued turn c - 1), and
//   warpgroup 1 knows warpgroup 0 has finished body c - 1. After the wgmma and arrival of turn c,
//   warpgroup w therefore commits group c + kStages - 2 + w (V into the stage of iteration
//   c - 3 + w), and the producer warp (in warpgroup 1) fetches K and tokens of c + kStages - 1
//   into the stages of c - 1: both warpgroups have waited S, run the softmax and waited P V of
//   those iterations (the prologue fetches K of 0 .. kStages - 2 and commits the first groups
//   after staging Q). The wgmma then in flight read other stages. Data: before waiting on its
//   barrier at turn c a thread waits for its part of group c + w (at most kStages - 3 of its
//   groups pending), runs fence.proxy.async (cp.async and Q stores are generic-proxy writes;
//   wgmma reads through the async proxy) and waits for phase c / kStages of s_full[c %
//   kStages], so group c and K of c are complete for both warpgroups at turn c: warpgroup 0's
//   part of the group through its own barrier, warpgroup 1's through its arrival after turn
//   c - 1 (before turn 0, its first arrival, which also publishes its Q stores). K gets about
//   two iterations before it is waited, a V copy kStages - 2 (one at D 128). The tokens travel
//   with K since the softmax reads them right after S and the V copies before that.
// The accumulators and pa are touched only between a wait and the next wgmma.fence; the
// branches around a wgmma are uniform over its warpgroup (no P V before the first turn, only
// P V in turn n_iters), and which barriers a thread meets depends only on n_iters and its
// warpgroup (counted above).
//
// Masks, RoPE of Q, positions, splits and outputs: exactly the sm80 kernel's (shared code:
// gathered_keys, copy_q_tile + rotate_q_tile or stage_rotated_q with the Sliced64 layout,
// prefill_softmax_tile, store_prefill_rows). Padding rows are computed (Q rows are zero, every
// key masked) and never written, since a warpgroup must run its wgmma whole. The bodies are
// compiled for sm_90a only (__CUDA_ARCH_FEAT_SM90_ALL); elsewhere they trap, and
// prefill_sm90_usable never picks them there.
#pragma once

#include "gather_attention_prefill.cuh"
#include "sm90_utils.cuh"

namespace reattention::kernels {

// Head dims the sm_90a kernel serves (the others run gather_attention_prefill_kernel).
__host__ __device__ constexpr bool prefill_sm90_covers(int head_dim) {
  return head_dim == 64 || head_dim == 128;
}

template <int D>
struct PrefillSm90Shape {
  static_assert(prefill_sm90_covers(D), "head dims of the sm_90a kernel");
  static constexpr int kBM = kPrefillBlockM;
  static constexpr int kTileN = prefill_block_n(D);  // 64 keys: plan_attention's tiles
  // Plan tiles per loop iteration: two at D 128 (S = m64n128k16, P V over 8 k16 steps, one
  // softmax and one turn per 128 keys); one at D 64, whose 128-key stages would not let two
  // CTAs share an SM.
  static constexpr int kIterTiles = D == 128 ? 2 : 1;
  static constexpr int kBN = kTileN * kIterTiles;  // keys per iteration and per ring stage
  // The two warpgroups take turns issuing their GEMMs (see the pipeline in the header comment)
  // at D 128; at D 64 they stay in lock step with one CTA barrier per iteration, which measured
  // faster there (the 4096-query call at 512K: 1.76 ms in lock step, 1.84 ms with turns).
  static constexpr bool kPingPong = D == 128;
  // K and V stages (kBN keys each): at D 128 3 + 3 of 32 KB (with the 32 KB Q tile just under
  // the 227 KB opt-in limit), at D 64 5 + 5 of 8 KB. See the pipeline in the header comment.
  static constexpr int kStages = kIterTiles == 2 ? 3 : 5;
  static constexpr int kAlign = 1024;
  static constexpr int kQElems = kBM * D, kTileElems = kBN * D;
  static constexpr int kSmem =
      kAlign + (kQElems + 2 * kStages * kTileElems) * 2 + kStages * kBN * 4 + (D / 2) * 4;
  static constexpr int kMinBlocks = D <= 64 ? 2 : 1;  // 99 KB or 227 KB of shared memory
  static_assert(kTileN == 64 && kBM == 128, "two warpgroups of 64 rows, 64-key plan tiles");
  static_assert(kSmem + 256 <= 227 * 1024, "opt-in shared memory limit (with static shared)");
  static_assert(kMinBlocks * (kSmem + 1024 + 256) <= 228 * 1024, "CTAs per SM of kMinBlocks");
};

// Workspace bound of the rotated K rows: groups of query blocks are sized to stay under it.
constexpr int64_t kPrerotBytes = int64_t{256} << 20;

// Rows of a (sequence, kv head, block) slot of the workspace: the longest gathered sequence of
// any block (static shapes) in whole key tiles.
inline int64_t prerot_rows(const AttnParams& p, int head_dim) {
  const int bn = prefill_block_n(head_dim);
  return (gathered_keys_max(p) + bn - 1) / bn * bn;
}

// Query blocks per pre-pass + attention launch: as many as keep the workspace (rotated K rows
// and their int32 cache tokens) within kPrerotBytes, at least one, at most n_blocks.
inline int prerot_group_blocks(const AttnParams& p, int head_dim) {
  const int64_t per_block =
      static_cast<int64_t>(p.batch) * p.hkv * prerot_rows(p, head_dim) * (head_dim * 2 + 4);
  const int64_t n = per_block > 0 ? kPrerotBytes / per_block : p.n_blocks;
  return static_cast<int>(n < 1 ? 1 : (n > p.n_blocks ? p.n_blocks : n));
}

// Elements (of the call's dtype) of the workspace p.k_rot the op layer allocates: 0 unless the
// call may run the sm_90a many-rows kernel (a head dim it covers, more rows than decode, and
// `sm90_device`: a compute capability 9.0 device; a build without sm_90a code allocates it
// there, unused, and runs the sm80 kernel).
inline int64_t prerot_elems(const AttnParams& p, int head_dim, bool sm90_device) {
  if (!sm90_device || !prefill_sm90_covers(head_dim) || p.batch == 0 || p.hq == 0 ||
      p.lq == 0 || few_rows(p.lq, p.query_block, p.hq / p.hkv))
    return 0;
  // Each slot row: D elements of K, then (after all K rows) an int32 token = 2 elements.
  return static_cast<int64_t>(p.batch) * p.hkv * prerot_group_blocks(p, head_dim) *
         prerot_rows(p, head_dim) * (head_dim + 2);
}

// The query blocks [beta0, beta0 + n_blocks) of one pre-pass + attention launch, and the rows
// of a workspace slot; slot (b, h, beta) starts at row ((b * Hkv + h) * n_blocks + beta - beta0)
// * rows.
struct PrerotGroup {
  int beta0, n_blocks, rows;
};

__device__ __forceinline__ int64_t prerot_slot(const AttnParams& p, const PrerotGroup& g, int b,
                                               int h, int beta) {
  return ((static_cast<int64_t>(b) * p.hkv + h) * g.n_blocks + (beta - g.beta0)) * g.rows;
}

// The group's cache tokens, one int32 per slot row (INT_MAX past the block's n_keys), after
// the K rows of all its slots: row i of slot s at prerot_tokens(...)[s + i].
template <int D>
__device__ __forceinline__ int* prerot_tokens(const AttnParams& p, const PrerotGroup& g) {
  const int64_t k_bytes = static_cast<int64_t>(p.batch) * p.hkv * g.n_blocks * g.rows * D * 2;
  return reinterpret_cast<int*>(static_cast<char*>(p.k_rot) + k_bytes);
}

// Pre-pass: CTA (tile, block * Hkv + h, b) copies gathered keys [tile * kBN, tile * kBN + kBN)
// of block beta0 + block, kv head h, sequence b (zero past n_keys), rotates them as the sm80
// kernel does in its loop and stores the rows to their workspace slot with 16-byte stores.
// Tiles wholly past the block's n_keys are never read and not written.
template <typename T, int D>
__global__ void __launch_bounds__(kPrefillThreads)
    prerot_k_kernel(AttnParams p, const float2* __restrict__ table, int n_pos, PrerotGroup grp) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kBN = prefill_block_n(D), kTPR = prefill_row_threads<D>();
  using L = RowSwizzled<D>;
  __shared__ __align__(128) T s_k[kBN * D];
  __shared__ int s_kpos[kBN];
  __shared__ float s_invf[D / 2];
  __shared__ int s_nsel;
  const int tile = blockIdx.x, h = blockIdx.y % p.hkv, b = blockIdx.z;
  const int beta = grp.beta0 + static_cast<int>(blockIdx.y) / p.hkv;
  const GatheredKeys gk = gathered_keys<D, kPrefillThreads>(p, b, h, beta, s_invf, &s_nsel);
  if (tile * kBN >= gk.n_keys) return;  // uniform over the CTA

  const T *k_base, *v_base;
  kv_bases<T>(p, b, h, k_base, v_base);
  {
    const int r = threadIdx.x / kTPR, sub = threadIdx.x % kTPR;
    const GatheredRow<T> row = gathered_row(gk, p, tile * kBN + r, k_base, v_base);
#pragma unroll
    for (int j = 0; j < D / 8 / kTPR; ++j) {
      const int col = (sub + kTPR * j) * 8;
      cp_async_16(s_k + L{}(r, col), row.k + col, row.valid);
    }
    if (sub == 0) s_kpos[r] = row.valid ? row.tok : INT_MAX;
    cp_async_commit();
  }
  cp_async_wait<0>();
  __syncthreads();
  rotate_k_tile<T, D, L>(s_k, s_kpos, tile, gk.n_keys, prefill_rotation_row<D>(threadIdx.x),
                         threadIdx.x % kTPR, prefill_rope_units(p), p, table, n_pos, s_invf);
  __syncthreads();
  const int64_t slot_row = prerot_slot(p, grp, b, h, beta) + tile * kBN;
  T* dst = static_cast<T*>(p.k_rot) + slot_row * D;
  if (threadIdx.x < kBN) prerot_tokens<D>(p, grp)[slot_row + threadIdx.x] = s_kpos[threadIdx.x];
  // The tile's image in the attention's stage layout (Sliced64<kBN>): consecutive 16-byte
  // pieces of each slice, so the stores stay coalesced whatever the swizzle.
  for (int e = threadIdx.x; e < kBN * D / 8; e += kPrefillThreads) {
    const int r = e / (D / 8), col = e % (D / 8) * 8;
    *reinterpret_cast<uint4*>(dst + Sliced64<kBN>{}(r, col)) =
        *reinterpret_cast<const uint4*>(s_k + L{}(r, col));
  }
#else
  __trap();  // compiled without sm_90a: prefill_sm90_usable never launches this
#endif
}

// K rows and cache tokens of plan tiles [tile, tile + kIterTiles) of the CTA's workspace slot
// (k_rows: its pre-swizzled tile images; tok_rows: its tokens) into K stage sk (a
// Sliced64<kIterTiles * 64> tile at shared address sk) and its token slot kpos, by bulk copies
// counted on the stage's mbarrier `full`; called by one whole warp. Lane 0 arrives on `full` with
// the bytes of the live tiles (tile < t_end) and issues their copies: D / 64 slices of 8 KB and
// 256 bytes of tokens per tile. A tile past t_end (the second half of a split's last 128-key
// iteration) is not copied: its K rows keep whatever the stage held, and the warp stores INT_MAX
// to its tokens, so the softmax masks those keys (by select: a stale or non-finite S is
// discarded) and P V meets zero weights against its zero-filled V rows. Only a split's last
// iteration can hold such a tile, so no later bulk copy writes a token slot the warp stored to.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <int D, int kIterTiles>
__device__ __forceinline__ void bulk_load_k_tiles(uint32_t sk, int* kpos, uint32_t full,
                                                  const void* k_rows, const int* tok_rows,
                                                  int tile, int t_end, int lane) {
  constexpr int kTileN = prefill_block_n(D);
  constexpr uint32_t kSliceBytes = kTileN * 128, kTokBytes = kTileN * 4;
  constexpr uint32_t kTileBytes = (D / 64) * kSliceBytes + kTokBytes;
  const int live = min(kIterTiles, max(0, t_end - tile));
  if (lane == 0) {
    mbar_arrive_expect_tx(full, live * kTileBytes);
    for (int half = 0; half < live; ++half) {
      const char* src = static_cast<const char*>(k_rows) +
                        static_cast<int64_t>(tile + half) * (D / 64) * kSliceBytes;
#pragma unroll
      for (int j = 0; j < D / 64; ++j) {
        // Slice j of the stage holds all kIterTiles * 64 rows: this tile's at row 64 half.
        bulk_copy_g2s(sk + j * (kIterTiles * kSliceBytes) + half * kSliceBytes,
                      src + j * kSliceBytes, kSliceBytes, full);
      }
      bulk_copy_g2s(static_cast<uint32_t>(__cvta_generic_to_shared(kpos + half * kTileN)),
                    tok_rows + static_cast<int64_t>(tile + half) * kTileN, kTokBytes, full);
    }
  }
  for (int i = live * kTileN + lane; i < kIterTiles * kTileN; i += 32) kpos[i] = INT_MAX;
}
#endif

// V rows of plan tiles [tile, tile + kIterTiles) into V stage sv (Sliced64<kIterTiles * 64>)
// by cp.async, kTPR threads per row as the pre-pass copies K; the caller commits the group.
// Each row's cache token comes from the iteration's token slot kpos (the bulk copy of
// bulk_load_k_tiles, whose phase the caller has waited for): no segment or chunk lookup. Rows
// past n_keys (token INT_MAX) and tiles past t_end are zero filled without a read.
template <typename T, int D, int kIterTiles>
__device__ __forceinline__ void load_v_tiles(T* sv, const int* kpos, const GatheredKeys& g,
                                             const AttnParams& p, const T* v_base, int tile,
                                             int t_end) {
  using L = Sliced64<kIterTiles * prefill_block_n(D)>;
  constexpr int kTileN = prefill_block_n(D), kTPR = prefill_row_threads<D>();
  constexpr int kPieces = D / 8 / kTPR;
  static_assert(kPrefillThreads == kTileN * kTPR && kPieces * kTPR * 8 == D, "whole rows");
  const int r = threadIdx.x / kTPR, sub = threadIdx.x % kTPR;
#pragma unroll
  for (int half = 0; half < kIterTiles; ++half) {
    const int row = half * kTileN + r;
    const int tok = tile + half < t_end ? kpos[row] : INT_MAX;
    const bool valid = tok != INT_MAX;
    const T* src = v_base;
    if (valid) {
      src += g.pages == nullptr ? tok * p.v_sn : p.pages.offset(g.pages, tok, p.v_sb, p.v_sn);
    }
#pragma unroll
    for (int j = 0; j < kPieces; ++j) {
      const int col = (sub + kTPR * j) * 8;
      cp_async_16(sv + L{}(row, col), src + col, valid);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kPrefillThreads, PrefillSm90Shape<D>::kMinBlocks)
    gather_attention_prefill_sm90_kernel(AttnParams p, const float2* __restrict__ table,
                                         int n_pos, PrerotGroup grp) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = PrefillSm90Shape<D>;
  constexpr int kBM = Shape::kBM, kBN = Shape::kBN, kStages = Shape::kStages;
  constexpr bool kPingPong = Shape::kPingPong;
  constexpr int kTileN = Shape::kTileN, kIterTiles = Shape::kIterTiles;
  constexpr int kNT = kBN / 8;  // 8-wide key column tiles of S
  constexpr int kDT = D / 8;    // 8-wide output column tiles
  static_assert(kStages >= 3, "the ring holds the stage in use, the one P V reads, one in flight");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  T* s_q = reinterpret_cast<T*>(smem_raw +
                                ((Shape::kAlign - raw_addr % Shape::kAlign) % Shape::kAlign));
  T* s_k = s_q + Shape::kQElems;
  T* s_v = s_k + kStages * Shape::kTileElems;
  int* s_kpos = reinterpret_cast<int*>(s_v + kStages * Shape::kTileElems);
  float* s_invf = reinterpret_cast<float*>(s_kpos + kStages * kBN);
  __shared__ int s_nsel;
  __shared__ __align__(8) uint64_t s_full[kStages];  // K stage s (and its tokens) landed

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  const AttnTile at = attn_tile(p, kBM, grp.beta0);
  if (at.row0 >= at.rows) return;
  const uint32_t full_addr = static_cast<uint32_t>(__cvta_generic_to_shared(s_full));
  if (tid == 0) {
#pragma unroll
    for (int st = 0; st < kStages; ++st) mbar_init(full_addr + 8 * st, 1);  // the producer's
    fence_mbarrier_init();  // published to the other threads by gathered_keys' barriers
  }
  const int beta = at.beta, h = at.h, b = at.b, group = at.group;
  const int q0 = at.q0, rows = at.rows, row0 = at.row0;
  // Q raw in 16-byte pieces first (their own copy group, waited before the rotation below), so
  // their latency hides under gathered_keys'; stage_rotated_q for the R/2 that rotate_key_row
  // cannot take.
  const bool q_units = prefill_rope_units(p);
  if (q_units) {
    copy_q_tile<T, D, kBM, Sliced64<kBM>>(s_q, p, b, h, group, q0, row0, rows);
    cp_async_commit();
  }

  const GatheredKeys gk = gathered_keys<D, kPrefillThreads>(p, b, h, beta, s_invf, &s_nsel);

  const T *k_base, *v_base;
  kv_bases<T>(p, b, h, k_base, v_base);
  const int64_t slot = prerot_slot(p, grp, b, h, beta);
  const T* k_rows = static_cast<const T*>(p.k_rot) + slot * D;
  const int* tok_rows = prerot_tokens<D>(p, grp) + slot;

  // plan_attention's 64-key tiles [t_begin, t_end) of the split, kIterTiles per iteration: the
  // split's range may hold an odd number of tiles, so the last iteration's second half may lie
  // past t_end; it is not copied (its tokens INT_MAX, its V rows zero: masked by key index).
  int t_begin, t_end;
  prefill_tile_range<kBM, kTileN>(p, at, gk, t_begin, t_end);
  const int n_iters = max(0, (t_end - t_begin + kIterTiles - 1) / kIterTiles);
  const uint32_t k_addr = static_cast<uint32_t>(__cvta_generic_to_shared(s_k));
  const uint32_t v_addr = static_cast<uint32_t>(__cvta_generic_to_shared(s_v));
  constexpr uint32_t kTileBytes = Shape::kTileElems * 2, kSliceBytes = kBN * 128;
  // K and tokens of iteration it: bulk copies into K stage and token slot it % kStages, issued
  // by the producer warp (kProducerWarp, one lane), counted on s_full[it % kStages], whose
  // phase (it / kStages) % 2 every thread waits for before reading them.
  constexpr int kProducerWarp = kPingPong ? 4 : 0;
  auto full_bar = [&](int it) { return full_addr + 8 * (it % kStages); };
  auto full_parity = [&](int it) { return static_cast<uint32_t>(it / kStages) & 1u; };
  auto load_k = [&](int it) {
    const int stage = it % kStages;
    bulk_load_k_tiles<D, kIterTiles>(k_addr + stage * kTileBytes, s_kpos + stage * kBN,
                                     full_bar(it), k_rows, tok_rows,
                                     t_begin + it * kIterTiles, t_end, lane);
  };
  // V of iteration it into V stage it % kStages by this thread's cp.async (no commit), each
  // row's address from its token in the iteration's token slot.
  auto load_v = [&](int it) {
    mbar_wait(full_bar(it), full_parity(it));
    const int stage = it % kStages;
    load_v_tiles<T, D, kIterTiles>(s_v + stage * Shape::kTileElems, s_kpos + stage * kBN, gk, p,
                                   v_base, t_begin + it * kIterTiles, t_end);
  };
  // K of iterations 0 .. kStages - 2 now (every stage is empty); K of iteration it + kStages - 1
  // goes into the stage of it - 1 as soon as both warpgroups are past S of it - 1: at the top of
  // iteration it without the ping-pong, at warpgroup 1's turn it with it (see the pipeline in
  // the header comment).
  if (warp == kProducerWarp) {
#pragma unroll
    for (int j = 0; j < kStages - 1; ++j) {
      if (j < n_iters) load_k(j);
    }
  }
  // cp.async group j holds V of iteration j - 1 (group 0 is empty), read by turn j (P V of
  // j - 1). Every thread copies its rows of every group; warpgroup w commits group j at its turn
  // j - lead (after that turn's wgmma), the prologue groups 0 .. lead - 1 (after the Q tile):
  // the turn's barrier has shown it that both warpgroups are past every read of the stage it
  // refills. At the top of its turn it warpgroup w needs its part of group it + w landed
  // (it + lead - 1 committed): at most kStages - 3 of its groups pending.
  // Without the ping-pong (D 64) every thread commits group j at iteration j - (kStages - 1),
  // after the iteration's CTA barrier, and needs group it at the top of iteration it: at most
  // kStages - 2 groups pending.
  const int lead = kPingPong ? kStages - 2 + wg : kStages - 1;
  using Yes = std::true_type;
  using No = std::false_type;

  if (q_units) {
    cp_async_wait<0>();  // the Q group, the only one so far (K travels by bulk copies)
    __syncthreads();     // ... for every thread
    rotate_q_tile<T, D, kBM, Sliced64<kBM>>(s_q, p, gk, group, q0, row0, rows, table, n_pos,
                                            s_invf);
  } else {
    stage_rotated_q<T, D, kBM, kPrefillThreads, false, Sliced64<kBM>>(
        s_q, nullptr, p, gk, b, h, group, q0, row0, rows, s_invf, table, n_pos);
  }
#pragma unroll
  for (int j = 0; j < kStages - 1; ++j) {
    if (j < lead) {
      if (j >= 1 && j - 1 < n_iters) load_v(j - 1);
      cp_async_commit();
    }
  }

  const int g = lane >> 2, t4 = lane & 3;
  const int ra = warp * 16 + g;  // this thread's two rows in the tile: ra and ra + 8
  int qpos[2], warp_q0;
  prefill_row_positions(at, gk, warp, ra, qpos, warp_q0);

  // The warpgroup's 64 rows of each Q slice; the K and V rings.
  const uint32_t q_addr =
      static_cast<uint32_t>(__cvta_generic_to_shared(s_q)) + wg * 64 * 128;

  float o[kDT][4], m_run[2], l_run[2];
  softmax_state_init(o, m_run, l_run);
  float s[kNT][4];
  // P of the previous iteration, rounded to T in mma.m16n8k16's A layout (see the header
  // comment).
  uint32_t pa[kNT / 2][4];
  // O += P V on the V stage at v_stage, A = pa (one wgmma group, committed by the caller).
  auto issue_pv = [&](uint32_t v_stage) {
    fence_accumulators<kDT * 4>(&o[0][0]);
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      wgmma_m64k16_rs<T, D>(&o[0][0], pa[kk],
                            wgmma_desc_sw128_mn(v_stage + kk * 2048, kSliceBytes), 1);
    }
  };

  // Turns (ping-pong): warpgroup w issues the wgmma of its turn only after named barrier
  // kTurnBar + w has completed, then arrives on the other warpgroup's, so the issues alternate
  // 0, 1, 0, 1, ... and one warpgroup's GEMMs run while the other computes its softmax. Each
  // barrier counts 256 threads: the 128 that wait on it and the 128 that arrive. Warpgroup 1
  // arrives once before its first turn (its part of group 0 and its Q stores published) and
  // not after its last, so both barriers see n_iters + 1 waits and n_iters + 1 arrivals per
  // thread (turns 0 .. n_iters; none at all when n_iters is 0).
  constexpr int kTurnBar = 1;  // ids 1 and 2 (0 is __syncthreads')
  auto turn_begin = [&] {
    if (wg == 0) {
      named_bar_sync<kTurnBar, kPrefillThreads>();
    } else {
      named_bar_sync<kTurnBar + 1, kPrefillThreads>();
    }
  };
  auto turn_end = [&] {
    if (wg == 0) {
      named_bar_arrive<kTurnBar + 1, kPrefillThreads>();
    } else {
      named_bar_arrive<kTurnBar, kPrefillThreads>();
    }
  };
  if (kPingPong && wg == 1 && n_iters > 0) {
    cp_async_wait<kStages - 2>();  // group 0 (empty: the V copies start with group 1)
    fence_proxy_async_shared();    // this thread's copies and Q stores -> async proxy
    turn_end();
  }

  // One iteration; the first (kFirst) has no P V to issue. It is compiled apart rather than
  // branching on it == 0: an empty wgmma group there made ptxas emit a placeholder group after
  // P V on every iteration, so that the wait for S below also waited for P V.
  auto iteration = [&](int it, auto first) {
    constexpr bool kFirst = decltype(first)::value;
    cp_async_wait<kPingPong ? kStages - 3 : kStages - 2>();  // this thread's part of group it + wg
    fence_proxy_async_shared();  // this thread's copies and Q stores -> async proxy
    mbar_wait(full_bar(it), full_parity(it));  // K and the tokens of iteration it
    if constexpr (kPingPong) {
      // The other warpgroup has issued its turn it - 1 + wg: its parts of groups up to it have
      // landed, and it is past S, the softmax and P V of iteration it - 2 + wg (the refill
      // below); this warpgroup's threads are all here, their parts of group it + wg landed.
      turn_begin();
    } else {
      // Group it has landed for every thread; S of it - 1 and P V of it - 2 have retired in
      // both warpgroups: the K stage of it - 1 and the V stage of it - 2 are free.
      __syncthreads();
      if (warp == kProducerWarp && it + lead < n_iters) load_k(it + lead);
      if (it + lead - 1 < n_iters) load_v(it + lead - 1);
      cp_async_commit();  // empty near the end
    }

    const int stage = it % kStages;
    const uint32_t k_stage = k_addr + stage * kTileBytes;
    // S = Q K^T on this stage, then P V on the previous one: two groups in flight together.
    wgmma_fence();
    fence_accumulators<kNT * 4>(&s[0][0]);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t desc_q = wgmma_desc_sw128(q_addr + (kk >> 2) * (kBM * 128)) + 2 * (kk & 3);
      const uint64_t desc_k = wgmma_desc_sw128(k_stage + (kk >> 2) * kSliceBytes) + 2 * (kk & 3);
      wgmma_m64k16<T, kBN>(&s[0][0], desc_q, desc_k, kk > 0);
    }
    wgmma_commit();
    if constexpr (!kFirst) {
      issue_pv(v_addr + (it + kStages - 1) % kStages * kTileBytes);
      wgmma_commit();
    }
    if constexpr (kPingPong) {
      turn_end();
      // K of iteration it + kStages - 1 into the stage of it - 1 (warpgroup 1: warpgroup 0 has
      // finished its body it - 1 before its turn it, this one before its turn it); this
      // warpgroup's part of group it + lead: V of it + lead - 1 into the stage of
      // it + lead - 1 - kStages.
      if (warp == kProducerWarp && it + kStages - 1 < n_iters) load_k(it + kStages - 1);
      if (it + lead - 1 < n_iters) load_v(it + lead - 1);
      cp_async_commit();  // empty near the end
    }
    if constexpr (kFirst) {
      wgmma_wait<0>();  // S, the only group
    } else {
      wgmma_wait<1>();  // S; P V of the previous iteration may still run
    }
    fence_accumulators<kNT * 4>(&s[0][0]);

    // The softmax of this iteration's kBN keys at once (one running max and sum update per
    // row) with O's rescale factors caught in alpha (online_softmax_tile multiplies its "O" of
    // ones by them), applied once P V of the previous iteration has landed: the same products
    // o * alpha as rescaling in place.
    float alpha[1][4] = {{1.f, 1.f, 1.f, 1.f}};
    const int* kpos = s_kpos + stage * kBN;
    prefill_softmax_tile<kBN>(s, alpha, m_run, l_run, kpos, qpos, warp_q0, p.scale_log2, lane);
    wgmma_wait<0>();  // P V of the previous iteration
    fence_accumulators<kDT * 4>(&o[0][0]);
    // A warp whose rows all kept their running max (every alpha 1: most iterations once a row
    // has met its largest scores) skips the multiplies, which would leave O as it is.
    if (__any_sync(0xffffffffu, alpha[0][0] != 1.f || alpha[0][2] != 1.f)) {
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[0][e];
      }
    }
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      pa[kk][0] = Dtype<T>::pack2(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = Dtype<T>::pack2(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = Dtype<T>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = Dtype<T>::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
  };
  if (n_iters > 0) iteration(0, Yes{});
  for (int it = 1; it < n_iters; ++it) iteration(it, No{});
  // Turn n_iters: P V on the last iteration, once its V (group n_iters) is visible.
  cp_async_wait<0>();  // past group n_iters only empty groups are left
  if (n_iters > 0) {   // uniform over the CTA
    fence_proxy_async_shared();
    if constexpr (kPingPong) {
      turn_begin();
    } else {
      __syncthreads();
    }
  }
  wgmma_fence();
  if (n_iters > 0) {
    issue_pv(v_addr + (n_iters - 1) % kStages * kTileBytes);
    wgmma_commit();
  }
  if (kPingPong && n_iters > 0 && wg == 0) turn_end();  // wg 1's last turn; it arrives no more
  wgmma_wait<0>();
  fence_accumulators<kDT * 4>(&o[0][0]);

  store_prefill_rows<T, D>(p, o, m_run, l_run, at, ra, t4);
#else
  __trap();  // compiled without sm_90a: prefill_sm90_usable never launches this
#endif
}

// Whether the many-rows attention runs gather_attention_prefill_sm90_kernel<T, D>: a head dim
// it covers, a compute capability 9.0 device and a build whose binary for it was compiled for
// sm_90a (the kernel's binary version is 90). Everything else runs the sm80 kernel.
template <typename T, int D>
inline cudaError_t prefill_sm90_usable(bool* usable) {
  *usable = false;
  if constexpr (prefill_sm90_covers(D)) {
    return sm90a_code_usable(reinterpret_cast<const void*>(
                                 gather_attention_prefill_sm90_kernel<T, D>),
                             usable);
  }
  return cudaSuccess;
}

// Launches the pre-pass and the sm_90a kernel on plan_attention's row tiles and splits, one
// pair per group of prerot_group_blocks(p, D) query blocks sharing the workspace p.k_rot (the
// RoPE table is filled: table/n_pos from launch_rope_table).
template <typename T, int D>
cudaError_t launch_prefill_sm90(const AttnParams& p, int n_pos, cudaStream_t stream) {
  if constexpr (prefill_sm90_covers(D)) {
    if (p.k_rot == nullptr) return cudaErrorInvalidValue;  // prerot_elems sized it
    constexpr int smem = PrefillSm90Shape<D>::kSmem;
    auto kernel = gather_attention_prefill_sm90_kernel<T, D>;
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    const int per_group = prerot_group_blocks(p, D);
    const int64_t rows = prerot_rows(p, D);
    for (int beta0 = 0; beta0 < p.n_blocks; beta0 += per_group) {
      const int left = p.n_blocks - beta0;
      const PrerotGroup grp{beta0, left < per_group ? left : per_group, static_cast<int>(rows)};
      const dim3 pre_grid(static_cast<unsigned>(rows / prefill_block_n(D)), grp.n_blocks * p.hkv,
                          p.batch);
      prerot_k_kernel<T, D><<<pre_grid, kPrefillThreads, 0, stream>>>(p, p.rope_table, n_pos, grp);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      const dim3 grid(grp.n_blocks * p.row_tiles, p.hkv * p.num_splits, p.batch);
      kernel<<<grid, kPrefillThreads, smem, stream>>>(p, p.rope_table, n_pos, grp);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    return cudaSuccess;
  } else {
    return cudaErrorInvalidValue;  // prefill_sm90_usable is false for this head dim
  }
}

}  // namespace reattention::kernels
