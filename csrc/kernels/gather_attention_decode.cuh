// gather_attention, few-rows kernel (decode: a query block of at most 16 rows, one m16 tile).
//
// One CTA of 4 warps owns (sequence b, kv head h, query block beta, a split of the gathered
// keys). The warps sit side by side over a 64-key tile, each with its own online softmax
// state; their (m, l, O) meet through shared memory at the end. K/V tiles go through two
// cp.async stages, copied by two threads per key row so each row's cache token (the chunk
// lookup and its division, the page lookup) is found once; the threads that copy a warp's 16
// key rows are that warp's, and each tile's K and V rows are separate copy groups, so the tile
// loop has no CTA barrier: a warp rotates and scores its keys once its own K rows have landed
// and waits for its V rows only before P V. Each key is rotated in place.
// RoPE is most of the work of this kernel (its S and P V are one m16 tile), so at compact
// positions with 16-byte-aligned rotary units (R a multiple of 16, R/16 a power of two) a
// thread owns 8 frequencies of a fixed set of rows: per tile it takes sincosf of its first
// row's fp32 angle fl(pos * inv_freq), exactly as the prefill kernel and the reference do,
// then reaches its next rows (32 / units apart, within its warp's 16) by multiplying with the
// stride's (cos, sin). The angle of a stepped row is fl(pos0 * w) + stride * w instead of
// fl(pos * w): at most an ulp of the angle apart (5e-4 rad at 6K positions), far below the
// rounding of the rotated key to 16 bits. Seeds are per tile, so a key's rotation does not
// depend on the split plan (a call and its per-block calls, paged and contiguous caches
// rotate every key alike). Other RoPE shapes and original positions call sincosf per
// element, as before (a RoPE table's L2 loads would sit on the critical path of this
// latency-bound kernel, see gather_attention_prefill.cuh).
// Blocks of at most 8 rows (GQA <= 8 at Lq 1) take the transposed variant (kT): an 8-row Q
// tile and O^T accumulators (P V as V^T P^T, gather_attention_common.cuh), D/4 accumulator
// floats per thread instead of D/2, so at D 128 it fits 80 registers and, with one K/V stage
// (plan_attention's decode plan of one or two key tiles per split), 6 CTAs per SM instead of
// 3. The m16 variant keeps blocks of 9..16 rows.
#pragma once

#include <cstring>

#include "gather_attention_common.cuh"

namespace reattention::kernels {

constexpr int kAttnThreads = 128;

// The two variants of the kernel: the m16 one (a 16-row Q tile, two K/V stages) and the
// transposed one (kT, blocks of at most 8 rows, gather_attention_common.cuh: an 8-row Q tile,
// one K/V stage on plan_attention's usual decode plan of one or two key tiles per split, else
// two).
constexpr int kRowsT = 8;

// The stages of plan_attention's three-per-SM plan.
__host__ __device__ constexpr int attn_stages(bool t, int tiles_per_split) {
  return t && tiles_per_split == 1 ? 1 : 2;
}

// Epilogue row stride (floats), off the bank period; kT's D + 4 spreads the transposed stores
// of rows 2t4 and 2t4 + 1 over all 32 banks.
__host__ __device__ constexpr int attn_o_stride(int d, bool t) { return t ? d + 4 : d + 8; }

// Shared memory of a Q tile of `rows` rows and `stages` K and V stages (reused by the
// epilogue's per-warp outputs), key positions per stage, the fast RoPE path's row-stride
// (cos, sin), inverse frequencies, query positions, per-warp softmax state.
__host__ __device__ constexpr int attn_smem_bytes(int d, bool t, int stages) {
  constexpr TileShape kTile = kFewRowsTile;
  const int rows = t ? kRowsT : kTile.block_m;
  const int kv = stages * 2 * kTile.block_n * d * 2;
  const int epilogue = kTile.warps_n * rows * attn_o_stride(d, t) * 4;
  return rows * d * 2 + (kv > epilogue ? kv : epilogue) + stages * kTile.block_n * 4 +
         (d / 2) * 8 + (d / 2) * 4 + rows * 4 + 2 * kTile.warps_n * rows * 4;
}

// CTAs per SM of the transposed kernel with `stages` stages on an SM of smem_per_sm bytes of
// shared memory (1 KB reserved per CTA), capped where its registers would spill (ptxas, no
// spills): 80 registers (6 CTAs of 128 threads) at D 128; at D 64, 64 registers (8 CTAs) on
// sm90 (228 KB per SM) and 72 (7 CTAs) on sm80, whose code needs more. Both the kernel's
// register bound (one stage, decode_smem_per_sm) and plan_attention (the device's shared
// memory) use it, so registers never cut the planned occupancy.
__host__ __device__ constexpr int attn_t_ctas_per_sm(int d, int stages, int smem_per_sm) {
  const int by_smem = smem_per_sm / (attn_smem_bytes(d, true, stages) + 1024);
  const int by_regs = d > 64 ? 6 : smem_per_sm > 164 * 1024 ? 8 : 7;
  const int n = by_smem < by_regs ? by_smem : by_regs;
  return n < 1 ? 1 : n;
}

// Two 16-bit values of T packed in a 32-bit word, as floats (lo, hi).
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t x);

template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t x) {
  __half2 h;
  memcpy(&h, &x, sizeof(h));
  return __half22float2(h);
}

template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t x) {
  return make_float2(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
}

// Rotary units of the fast RoPE path (8 frequencies each), or 0 when it does not apply:
// compact positions (consecutive within a tile) and R/2 = 8 * units, units a power of two so
// a thread keeps the same unit for every row it rotates.
__device__ __forceinline__ int rope_units(const AttnParams& p) {
  const int units = p.half_rot >> 3;
  const bool fits = p.compact && units > 0 && (p.half_rot & 7) == 0 && (units & (units - 1)) == 0;
  return fits ? units : 0;
}

// Rotates frequencies [8u, 8u + 8) of row r of the swizzled K tile sk in place by
// (c[e], s[e]) (cos and sin times rope_scale). Half style pairs dims (i, i + R/2), element e of
// 16-byte chunks u and u + units; interleaved pairs (2i, 2i + 1): chunks 2u and 2u + 1.
template <typename T, int D>
__device__ __forceinline__ void rotate_unit(T* sk, int r, int u, int units, bool interleaved,
                                            const float (&c)[8], const float (&s)[8]) {
  const int ca = interleaved ? 2 * u : u;
  const int cb = interleaved ? 2 * u + 1 : u + units;
  uint4* pa = reinterpret_cast<uint4*>(sk + swz<D>(r, ca * 8));
  uint4* pb = reinterpret_cast<uint4*>(sk + swz<D>(r, cb * 8));
  const uint4 va = *pa, vb = *pb;
  uint32_t a[4] = {va.x, va.y, va.z, va.w}, b[4] = {vb.x, vb.y, vb.z, vb.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 x = unpack2<T>(a[j]), y = unpack2<T>(b[j]);
    if (interleaved) {  // word j of chunk a: frequency j, of chunk b: frequency 4 + j
      rope_apply(x.x, x.y, make_float2(c[j], s[j]));
      rope_apply(y.x, y.y, make_float2(c[4 + j], s[4 + j]));
    } else {  // word j: frequencies 2j and 2j + 1, first halves in a, second in b
      rope_apply(x.x, y.x, make_float2(c[2 * j], s[2 * j]));
      rope_apply(x.y, y.y, make_float2(c[2 * j + 1], s[2 * j + 1]));
    }
    a[j] = Dtype<T>::pack2(x.x, x.y);
    b[j] = Dtype<T>::pack2(y.x, y.y);
  }
  *pa = make_uint4(a[0], a[1], a[2], a[3]);
  *pb = make_uint4(b[0], b[1], b[2], b[3]);
}

// Asks for the L1 line of a global address ahead of its load (no register waits on it).
__device__ __forceinline__ void prefetch_l1(const void* ptr) {
  asm volatile("prefetch.global.L1 [%0];\n" ::"l"(ptr));
}

// The prologue's copy of the block's idx row: lane l of every warp holds entries l + 32 j,
// j < kSelWords (-1 past topk), so each warp counts the selected chunks with ballots and the
// first two tiles find their chunk ids by shuffles, with no barrier and no second load.
// Entries from kSelWords * 32 on (topk > 32 kSelWords) are read from memory. 8 words (topk
// 256) fit the registers of D >= 128; D = 64 (capped at 80 registers on sm_90a) keeps 4.
template <int kSelWords>
struct SelRow {
  int w[kSelWords];
  int words;  // words holding entries: min(ceil(topk / 32), kSelWords)

  // Issues the loads of the idx row `sel` (no wait).
  __device__ __forceinline__ void load(const int* sel, int topk, int lane) {
    words = min((topk + 31) >> 5, kSelWords);
#pragma unroll
    for (int j = 0; j < kSelWords; ++j) {
      const int i = lane + 32 * j;
      w[j] = i < topk ? __ldg(sel + i) : -1;
    }
  }

  // Entries of the row that are >= 0 (the whole warp calls it).
  __device__ __forceinline__ int count(const int* sel, int topk, int lane) const {
    int n = 0;
#pragma unroll
    for (int j = 0; j < kSelWords; ++j) n += __popc(__ballot_sync(0xffffffffu, w[j] >= 0));
    for (int i0 = kSelWords * 32; i0 < topk; i0 += 32) {
      const int i = i0 + lane;
      n += __popc(__ballot_sync(0xffffffffu, i < topk && __ldg(sel + i) >= 0));
    }
    return n;
  }

  // Entry c of the row for each lane when 0 <= c < kSelWords * 32, else -1 (the whole warp
  // calls it).
  __device__ __forceinline__ int entry(int c) const {
    int v = -1;
#pragma unroll
    for (int j = 0; j < kSelWords; ++j) {
      if (j < words) {  // uniform over the warp
        const int x = __shfl_sync(0xffffffffu, w[j], c & 31);
        if ((c >> 5) == j) v = x;
      }
    }
    return v;
  }
};

// Copies the K and V rows of gathered keys [tile * kBN, tile * kBN + kBN) into the swizzled
// tiles sk and sv (cp.async, two commit groups: the K rows, then the V rows, so a warp can
// rotate and score its keys while their values land; zero-filled past n_keys) and their cache
// tokens into kpos (INT_MAX past n_keys). kThreads / kBN threads share a row and find its token
// (gathered_row: chunk lookup, page) once; consecutive threads take consecutive 16-byte
// chunks, so each copy instruction still covers whole 32-byte sectors.
// With sel_row (the prologue's tiles; every thread calls it), the chunk ids come from its
// registers by shuffles; without, from g.sel.
template <typename T, int D, int kBN, int kThreads, int kSelWords>
__device__ __forceinline__ void load_decode_tile(T* sk, T* sv, int* kpos, const GatheredKeys& g,
                                                 const AttnParams& p, const T* k_base,
                                                 const T* v_base, int tile,
                                                 const SelRow<kSelWords>* sel_row) {
  constexpr int kPerRow = kThreads / kBN;  // threads per row
  static_assert(kThreads % kBN == 0 && (D / 8) % kPerRow == 0, "whole rows per thread group");
  const int r = threadIdx.x / kPerRow, sub = threadIdx.x % kPerRow;
  const int key = tile * kBN + r;
  GatheredRow<T> row;
  if (sel_row != nullptr) {
    // The slot of a middle key, as GatheredKeys::token computes it (any value elsewhere).
    const int id = sel_row->entry((key - g.sink_len) / p.chunk);
    row = gathered_row(g, p, key, k_base, v_base, [&](int c) {
      return c < kSelWords * 32 ? id : __ldg(g.sel + c);
    });
  } else {
    row = gathered_row(g, p, key, k_base, v_base);
  }
  // Rows r..r+3 of a quarter warp take their chunk pairs in different orders, so its
  // 16-byte writes land in 8 different bank groups.
  const int order = kPerRow == 2 && D / 8 >= 8 ? (r & 3) << 1 : 0;
  if (sub == 0) kpos[r] = row.valid ? row.tok : INT_MAX;
  auto copy_group = [&](T* dst, const T* src) {  // this thread's chunks of row r, one group
#pragma unroll
    for (int j = 0; j < D / 8 / kPerRow; ++j) {
      const int ch = (j * kPerRow + sub) ^ order;
      cp_async_16(dst + swz<D>(r, ch * 8), src + ch * 8, row.valid);
    }
    cp_async_commit();
  };
  copy_group(sk, row.k);
  copy_group(sv, row.v);
}

// Two empty copy groups: the place of a tile past the split's end.
__device__ __forceinline__ void skip_decode_tile() {
  cp_async_commit();
  cp_async_commit();
}

// Shared memory per SM the kernels' register bounds count with: 228 KB on sm90, 164 KB on
// sm80.
__host__ __device__ constexpr int decode_smem_per_sm() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  return 164 * 1024;
#else
  return 228 * 1024;
#endif
}

// CTAs per SM of the m16 kernel that shared memory allows (1 KB reserved per CTA). The
// kernel's registers are capped to match, so they never cut the occupancy further (on an
// H200, D = 64 would take 95 registers and lose a sixth of its CTAs).
template <int D>
constexpr int decode_min_blocks() {
  constexpr int n = decode_smem_per_sm() / (attn_smem_bytes(D, false, 2) + 1024);
  return n < 1 ? 1 : n;
}

// kT: the transposed variant for blocks of at most 8 rows (O^T accumulators, an 8-row Q tile);
// otherwise the m16 variant for up to 16 rows. kStages: the K/V stages. The m16 variant runs 2;
// the transposed one runs 1 (kStages 1: plan_attention's two key tiles per split) or, with
// kStages 0, 1 or 2 told apart at run time (one stage when each split is one key tile, as on the
// 1M step; two on the three-per-SM plan). Compiling the one-tile plan's single stage in too cut
// 12% of its code but made the 1M step, whose one-tile CTAs end it after the selection, 0.3-0.7
// us slower (bench/NOTES.md "Round twenty-four"), so that plan keeps kStages 0.
template <typename T, int D, bool kT, int kStages>
__global__ void __launch_bounds__(kAttnThreads,
                                  kT ? attn_t_ctas_per_sm(D, 1, decode_smem_per_sm())
                                     : decode_min_blocks<D>())
    gather_attention_kernel(AttnParams p, bool overlap) {
  constexpr TileShape kTile = kFewRowsTile;
  constexpr int kWarpsN = kTile.warps_n;
  constexpr int kBM = kT ? kRowsT : kTile.block_m, kBN = kTile.block_n;
  constexpr int kNW = kBN / kWarpsN;  // keys per warp per tile
  constexpr int kNT = kNW / 8;
  constexpr int kDT = D / 8;          // 8-wide output column tiles
  constexpr int kMT = D / 16;         // 16-row tiles of O^T (kT)
  constexpr int kOStride = attn_o_stride(D, kT);
  static_assert(kNW % 16 == 0, "each warp needs whole k16 steps of keys for PV");
  static_assert(kStages == 2 || kT, "the m16 variant runs two stages");
  // kStages 0: attn_stages spelled out (as a call it changed the SASS of both variants), which is
  // p.kv_stages on the plans that launch it; reading p.kv_stages instead slowed the 1M step.
  const int stages = kStages > 0 ? kStages : p.tiles_per_split == 1 ? 1 : 2;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_kv = s_q + kBM * D;  // K stage 0, [K stage 1,] V stage 0[, V stage 1]
  constexpr int kEpiBytes = kWarpsN * kBM * kOStride * 4;
  static_assert(!kT || kEpiBytes <= 2 * kBN * D * 2, "kT's epilogue fits one K/V stage");
  const int stage_bytes = stages * 2 * kBN * D * 2;
  float* s_o = reinterpret_cast<float*>(s_kv);
  int* s_kpos = reinterpret_cast<int*>(reinterpret_cast<unsigned char*>(s_kv) +
                                       (stage_bytes > kEpiBytes ? stage_bytes : kEpiBytes));
  float2* s_step = reinterpret_cast<float2*>(s_kpos + stages * kBN);
  float* s_invf = reinterpret_cast<float*>(s_step + D / 2);
  int* s_qpos = reinterpret_cast<int*>(s_invf + D / 2);
  float* s_m = reinterpret_cast<float*>(s_qpos + kBM);
  float* s_l = s_m + kWarpsN * kBM;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const AttnTile at = attn_tile(p, kBM);
  if (at.row0 >= at.rows) return;
  const int beta = at.beta, b = at.b, group = at.group;
  const int q0 = at.q0, rows = at.rows, row0 = at.row0;
  // overlap (attend): this grid may run beside the selection that writes idx. Its CTAs are
  // ordered by split, last split first, the kv heads of a split side by side, so the local
  // window's tiles are dispatched first and the selected chunks' last.
  const int h = overlap ? blockIdx.y % p.hkv : at.h;
  const int split = overlap ? p.num_splits - 1 - static_cast<int>(blockIdx.y) / p.hkv : at.split;

  // Prologue, one chain of latencies instead of several: the loads that do not depend on each
  // other go out first and together (the sequence's length, the block's idx row, this
  // thread's Q elements and their inverse frequency); each warp counts the selected chunks of
  // the idx row with ballots (no shared atomics, no barrier: the first one is the loop's); the
  // first two tiles take their chunk ids from that row by shuffles and their copies go out
  // before the Q rows are rotated into s_q. The arithmetic is the same as before, bit for bit.
  constexpr int kHalf = D / 2;
  static_assert(kAttnThreads % kHalf == 0, "a thread keeps one frequency of the Q rows");
  constexpr int kQIter = kBM * kHalf / kAttnThreads;  // Q pairs per thread
  constexpr int kQRowStep = kAttnThreads / kHalf;     // rows between them
  // D >= 128 loads its Q pairs first into registers; D = 64 (80 registers on sm_90a, which
  // that would spill) prefetches them into L1 and loads them as it rotates them.
  constexpr bool kQInRegs = D >= 128;
  const int n = __ldg(p.seqlens + b);
  const int* sel = p.idx + b * p.i_sb + h * p.i_sh + beta * p.i_sblk;
  constexpr int kSelWords = D <= 64 ? 4 : 8;
  SelRow<kSelWords> sel_row;
  if (!overlap) sel_row.load(sel, p.topk, lane);
  const int qi = tid % kHalf, qr0 = tid / kHalf;  // frequency qi of rows qr0 + k * kQRowStep
  int qd0, qd1;
  rope_pair(qi, p.half_rot, p.interleaved, qd0, qd1);
  const float q_invf = qi < p.half_rot ? __ldg(p.inv_freq + qi) : 0.f;
  const T* q_base = static_cast<const T*>(p.q) + b * p.q_sb;
  // Row qr0 + k * kQRowStep of the block is (query q0 + qq, head h * group + hh): one division
  // for k = 0, then steps of kQRowStep.
  const int gr0 = row0 + qr0;
  const int qq0 = gr0 / group, hh0 = gr0 - qq0 * group;
  // Steps (qq, hh) to the next row of this thread.
  auto next_row = [&](int& qq, int& hh) {
    hh += kQRowStep;
#pragma unroll
    for (int s = 0; s < kQRowStep; ++s) {
      if (hh >= group) {
        hh -= group;
        ++qq;
      }
    }
  };
  int qq = qq0, hh = hh0;
  uint32_t qx[kQIter];  // the raw pair (d0, d1) of row k (zero past `rows`), packed in a word
#pragma unroll
  for (int k = 0; k < kQIter; ++k) {
    if (k > 0) next_row(qq, hh);
    const T* qr = q_base + (h * group + hh) * p.q_sh + (q0 + qq) * p.q_sl;
    const bool in = gr0 + k * kQRowStep < rows;
    if constexpr (kQInRegs) {
      qx[k] = 0;
      if (in) {
        T x[2] = {qr[qd0], qr[qd1]};
        memcpy(&qx[k], x, sizeof(qx[k]));
      }
    } else if (in) {
      prefetch_l1(qr + qd0);
    }
  }

  int end;
  GatheredKeys gk = gathered_keys_start(p, n, b, h, beta, &end);
  if (overlap) {
    // The selection of this op emits exactly min(topk, M) chunks (docs/design.md 2.5), so the
    // gathered layout is known before idx is: only a CTA whose tiles reach the selected
    // chunks waits for the selection (and loads its idx row past the wait).
    const int n_sel = min(p.topk, (gk.mid_end - p.sink) / p.chunk);
    gathered_keys_finish(gk, p, end, n_sel);
    const int key0 = split * p.tiles_per_split * kBN;
    const int key1 = key0 + p.tiles_per_split * kBN;
    if (n_sel > 0 && key0 < gk.loc0 && key1 > gk.sink_len) {
      grid_dependency_wait();
      sel_row.load(sel, p.topk, lane);
    } else {
      sel_row.words = 0;
#pragma unroll
      for (int j = 0; j < kSelWords; ++j) sel_row.w[j] = -1;
    }
  } else {
    gathered_keys_finish(gk, p, end, sel_row.count(sel, p.topk, lane));
  }
  const int n_keys = gk.n_keys;
  const T *k_base, *v_base;
  kv_bases<T>(p, b, h, k_base, v_base);
  auto load_tile = [&](int stage, int tile, const SelRow<kSelWords>* from) {
    load_decode_tile<T, D, kBN, kAttnThreads>(s_kv + stage * kBN * D,
                                              s_kv + (stages + stage) * kBN * D,
                                              s_kpos + stage * kBN, gk, p, k_base, v_base, tile,
                                              from);
  };

  const int n_tiles = (n_keys + kBN - 1) / kBN;
  const int t_begin = split * p.tiles_per_split;
  const int t_end = min(n_tiles, t_begin + p.tiles_per_split);
  // The first two tiles (one with one stage) are in flight while the Q rows are rotated.
  // Every tile is two copy groups (K, then V; empty past the end), so at a tile's turn the
  // groups of at most one later tile are younger: its K has landed when at most 2 * stages - 1
  // groups are pending, its V at 2 * stages - 2.
  if (t_begin < t_end) load_tile(0, t_begin, &sel_row); else skip_decode_tile();
  if (stages == 2) {
    if (t_begin + 1 < t_end) load_tile(1, t_begin + 1, &sel_row); else skip_decode_tile();
  }

  // The Q rows [row0, row0 + kBM), rotated at their compact or original positions and rounded
  // once to T (rows at or past `rows` are zero), and each row's original position (-1:
  // padding); the inverse frequencies, zero past R/2. All read past the barrier before the loop.
  if (tid < kHalf) s_invf[tid] = q_invf;
  if constexpr (kQInRegs) {
    // The raw pairs go to their places in s_q first (the loads have had the copies' time to
    // land), then each thread rotates its own pairs there, with one sincosf call site.
#pragma unroll
    for (int k = 0; k < kQIter; ++k) {
      const int r = qr0 + k * kQRowStep;
      const uint32_t w = qx[k];
      T x[2];
      memcpy(x, &w, sizeof(w));
      s_q[RowSwizzled<D>{}(r, qd0)] = x[0];
      s_q[RowSwizzled<D>{}(r, qd1)] = x[1];
    }
    int rq = qq0, rh = hh0;
#pragma unroll 1
    for (int k = 0; k < kQIter; ++k, next_row(rq, rh)) {
      const int r = qr0 + k * kQRowStep;
      const int gr = row0 + r;
      if (gr < rows) {
        const int pos = gk.p0 + q0 + rq;
        T& q0_ref = s_q[RowSwizzled<D>{}(r, qd0)];
        T& q1_ref = s_q[RowSwizzled<D>{}(r, qd1)];
        float x0 = Dtype<T>::to_float(q0_ref), x1 = Dtype<T>::to_float(q1_ref);
        if (qi < p.half_rot) {
          rope_apply(x0, x1, rope_cos_sin(p.compact ? pos + gk.shift : pos, qi, nullptr, 0,
                                          p.half_rot, q_invf, p.rope_scale));
        }
        q0_ref = Dtype<T>::from_float(x0);
        q1_ref = Dtype<T>::from_float(x1);
        if (qi == 0) s_qpos[r] = pos;
      } else if (qi == 0) {
        s_qpos[r] = -1;
      }
    }
  } else {
    struct {  // this thread's inverse frequency: stage_rotated_q asks only for s_invf[qi]
      float v;
      __device__ float operator[](int) const { return v; }
    } invf{q_invf};
    stage_rotated_q<T, D, kBM, kAttnThreads, true>(s_q, s_qpos, p, gk, b, h, group, q0, row0,
                                                    rows, invf, nullptr, 0);
  }

  // The loop is warp-local: warp wn copies (load_decode_tile: two threads per row), rotates,
  // scores and reads the values of keys [wn * kNW, wn * kNW + kNW) of every tile alone, so it
  // waits only for its own copies and syncs only itself; the CTA meets once here (Q rows,
  // positions, frequencies) and once before the epilogue.
  static_assert(kWarpsN * 32 == kAttnThreads && 32 / (kAttnThreads / kBN) == kNW,
                "each warp copies exactly the key rows it reads");
  // Fast RoPE: this lane's unit u (frequencies 8u..8u+7), its first row r0 among the warp's
  // keys of every tile, the row stride, and the stride's (cos, sin) per frequency (the stride
  // is a power of two, so its fp32 angle stride * w is exact). Units <= D / 16 <= 32.
  static_assert(D / 16 <= 32, "a warp holds every rotary unit");
  const int units = rope_units(p);
  const int u = units ? lane & (units - 1) : 0;
  const int r_stride = units ? 32 / units : kNW;
  const int r0 = wn * kNW + (units ? lane / units : kNW);
  const int r_warp_end = wn * kNW + kNW;
  if (units && tid < p.half_rot) {  // tid < R/2 <= D/2: q_invf is inv_freq[tid]
    float sn, cs;
    sincosf(static_cast<float>(r_stride) * q_invf, &sn, &cs);
    s_step[tid] = make_float2(cs, sn);
  }
  __syncthreads();

  // kT: o holds O^T (kMT tiles) and m_run[0], l_run[0] are row g's state.
  float o[kT ? kMT : kDT][4], m_run[2], l_run[2];
  softmax_state_init(o, m_run, l_run);
  const int g = lane >> 2, t4 = lane & 3;
  const int ra = wm * 16 + g;  // this thread's two rows in the tile: ra and ra + 8 (kT: g)

  for (int tile = t_begin; tile < t_end; ++tile) {
    const int stage = (tile - t_begin) & (stages - 1);
    if (stages == 1) cp_async_wait<1>(); else cp_async_wait<3>();  // this tile's K rows
    __syncwarp();

    T* sk = s_kv + stage * kBN * D;
    const T* sv = s_kv + (stages + stage) * kBN * D;
    const int* kpos = s_kpos + stage * kBN;
    const int n_rows = min(r_warp_end, n_keys - tile * kBN);  // this warp's rows end
    if (units) {
      if (r0 < n_rows) {
        float co[8], si[8];  // (cos, sin) * rope_scale of row r's angles
        const float pos0 = static_cast<float>(tile * kBN + r0);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          sincosf(pos0 * s_invf[8 * u + e], &si[e], &co[e]);
          co[e] *= p.rope_scale;
          si[e] *= p.rope_scale;
        }
        for (int r = r0;;) {
          rotate_unit<T, D>(sk, r, u, units, p.interleaved, co, si);
          r += r_stride;
          if (r >= n_rows) break;
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float2 step = s_step[8 * u + e];
            const float c = co[e];
            co[e] = c * step.x - si[e] * step.y;
            si[e] = si[e] * step.x + c * step.y;
          }
        }
      }
    } else {
      for (int r = wn * kNW; r < n_rows; ++r) {
        const int key = tile * kBN + r;
        const int pos = p.compact ? key : kpos[r];
        for (int i = lane; i < p.half_rot; i += 32) {
          int d0, d1;
          rope_pair(i, p.half_rot, p.interleaved, d0, d1);
          float x0 = Dtype<T>::to_float(sk[swz<D>(r, d0)]);
          float x1 = Dtype<T>::to_float(sk[swz<D>(r, d1)]);
          rope_apply(x0, x1, rope_cos_sin(pos, i, nullptr, 0, p.half_rot, s_invf[i],
                                          p.rope_scale));
          sk[swz<D>(r, d0)] = Dtype<T>::from_float(x0);
          sk[swz<D>(r, d1)] = Dtype<T>::from_float(x1);
        }
      }
    }
    __syncwarp();

    float s[kNT][4];
    if constexpr (kT) {
      warp_gemm_abt<T, D, kNT, 8>(s, s_q, 0, sk, wn * kNW, lane);
      online_softmax_tile_t(s, o, m_run[0], l_run[0], kpos + wn * kNW, s_qpos[g], p.scale_log2,
                            lane);
    } else {
      warp_gemm_abt<T, D, kNT>(s, s_q, wm * 16, sk, wn * kNW, lane);
      const int qpos[2] = {s_qpos[ra], s_qpos[ra + 8]};
      online_softmax_tile(s, o, m_run, l_run, kpos + wn * kNW, qpos, p.scale_log2, t4);
    }
    if (stages == 1) cp_async_wait<0>(); else cp_async_wait<2>();  // this tile's V rows
    __syncwarp();
    if constexpr (kT) {
      pv_tile_t<T, D>(o, s, sv, wn * kNW, lane);
    } else {
      pv_tile<T, D>(o, s, sv, wn * kNW, lane);
    }
    __syncwarp();  // the warp is done with its rows of this stage before it refills them
    if (tile + stages < t_end) load_tile(stage, tile + stages, nullptr); else skip_decode_tile();
  }

  // overlap: the merge, launched as a programmatic dependent, may start once every CTA is
  // past its keys (it waits for this grid before it reads a partial).
  if (overlap) grid_dependents_launch();
  // Epilogue: per-warp (m, l, unnormalised O) through shared memory, merged over the warps
  // that split the key tile, normalised, written as the output or as this split's partial.
  cp_async_wait<0>();  // only empty groups can be left; s_o overlays the K/V stages
  __syncthreads();
  if constexpr (kT) {
    const float l = quad_sum(l_run[0]);
    if (t4 == 0) {
      s_m[wn * kBM + g] = m_run[0];
      s_l[wn * kBM + g] = l;
    }
    // O^T[16 mt + g (+ 8)][rows 2t4, 2t4 + 1] to rows 2t4, 2t4 + 1 of the warp's O.
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      float* dst = s_o + (wn * kBM + 2 * t4) * kOStride + mt * 16 + g;
      dst[0] = o[mt][0];
      dst[kOStride] = o[mt][1];
      dst[8] = o[mt][2];
      dst[kOStride + 8] = o[mt][3];
    }
  } else {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = ra + 8 * half;
      const float l = quad_sum(l_run[half]);
      if (t4 == 0) {
        s_m[wn * kBM + r] = m_run[half];
        s_l[wn * kBM + r] = l;
      }
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        float* dst = s_o + (wn * kBM + r) * kOStride + dt * 8 + 2 * t4;
        dst[0] = o[dt][2 * half];
        dst[1] = o[dt][2 * half + 1];
      }
    }
  }
  __syncthreads();

  const int64_t row_stride = static_cast<int64_t>(p.lq);
  for (int id = tid; id < kBM * (D / 4); id += kAttnThreads) {
    const int r = id / (D / 4), d = (id % (D / 4)) * 4;
    const int gr = row0 + r;
    if (gr >= rows) continue;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarpsN; ++w) m_all = fmaxf(m_all, s_m[w * kBM + r]);
    float l_all = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (m_all != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarpsN; ++w) {
        const float f = exp2f(s_m[w * kBM + r] - m_all);
        l_all += s_l[w * kBM + r] * f;
        const float4 x = *reinterpret_cast<const float4*>(s_o + (w * kBM + r) * kOStride + d);
        acc[0] += x.x * f;
        acc[1] += x.y * f;
        acc[2] += x.z * f;
        acc[3] += x.w * f;
      }
    }
    const float inv = l_all > 0.f ? 1.f / l_all : 0.f;
    const float lse = l_all > 0.f ? (m_all + log2f(l_all)) * 0.69314718055994531f : -INFINITY;
    const int head = h * group + gr % group, query = q0 + gr / group;
    const int64_t orow = (static_cast<int64_t>(b) * p.hq + head) * row_stride + query;
    if (p.num_splits == 1) {
      T* dst = static_cast<T*>(p.out) + orow * D + d;
      uint2 packed;
      packed.x = Dtype<T>::pack2(acc[0] * inv, acc[1] * inv);
      packed.y = Dtype<T>::pack2(acc[2] * inv, acc[3] * inv);
      *reinterpret_cast<uint2*>(dst) = packed;
      if (d == 0) p.lse[orow] = lse;
    } else {
      const int64_t prow = static_cast<int64_t>(split) * p.batch * p.hq * row_stride + orow;
      *reinterpret_cast<float4*>(p.o_part + prow * D + d) =
          make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
      if (d == 0) p.lse_part[prow] = lse;
    }
  }
}

// Blocks of at most 8 rows take the transposed kernel (with plan_attention's p.kv_stages),
// larger ones the m16 kernel.
// overlap: launched as a programmatic dependent of the selection ahead of it (attend; idx must
// hold exactly min(topk, M) chunks per block, as select_chunks writes it).
template <typename T, int D>
cudaError_t launch_decode_attention(const AttnParams& p, cudaStream_t stream, bool overlap) {
  const bool t = transposed_rows(p.lq, p.query_block, p.hq / p.hkv);
  const int smem = attn_smem_bytes(D, t, p.kv_stages);  // 2 on the m16 plans
  auto kernel = gather_attention_kernel<T, D, true, 0>;
  if (!t) {
    kernel = gather_attention_kernel<T, D, false, 2>;
  } else if (p.kv_stages == 1 && p.tiles_per_split > 1) {
    kernel = gather_attention_kernel<T, D, true, 1>;
  }
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.n_blocks * p.row_tiles, p.hkv * p.num_splits, p.batch);
  return launch_maybe_early(kernel, grid, dim3(kAttnThreads), smem, stream, overlap, p, overlap);
}

}  // namespace reattention::kernels
