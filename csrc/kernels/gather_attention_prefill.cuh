// gather_attention, many-rows layout (query blocks of more than 16 rows): FlashAttention-2 shape.
//
// One CTA of 8 warps owns (sequence b, kv head h, query block beta, a tile of kBM = 128 rows,
// a split of the gathered keys); warp w owns rows 16w..16w+15 of the tile (row = query * group
// + head, as in gather_attention_kernel) with its own online softmax, so no cross-warp merge.
// The block has the segments of a call of its own (contract v2), so a CTA attends to at most
// sink + topk*chunk + local + chunk + query_block keys however long the call is.
// Q is rotated once and, for D <= 128, kept in registers as mma A fragments. K/V tiles of kBN
// gathered keys (GatheredKeys::token: sink, the chunks of idx, local) go through a ring of
// kStages cp.async stages with one barrier per tile: past it the CTA issues the copy of tile
// t + kStages - 1, rotates tile t + 1 in place and runs S = Q K^T, the exp2-domain online
// softmax and P V on tile t, so one tile's rotation overlaps the tensor-core work on the
// previous one across warps. The loop keeps its integer work per key row, not per element:
// - copy (load_kv_rows): kTPR = 256 / kBN threads share a key row; each finds the row's cache
//   token (and page) once and issues its 16-byte pieces of K and V from that base;
// - rotation (rotate_key_row): a thread owns one key row of every tile and a fixed set of
//   16-byte rotary units of it (4 interleaved pairs, or 8 half-style pairs with their second
//   halves R/2 columns on), unrolled, one table row pointer per key; R/2 not a multiple of 4
//   (interleaved) or 8 (half) takes the per-pair loop;
// - masks: a warp whose tile holds only keys at or before its first row's position (sink,
//   chunks, all but the last local tiles; the copy gives keys past n_keys INT_MAX) runs the
//   softmax without the per-element compare, which would hold everywhere: the same values.
// RoPE at compact positions reads (cos, sin) * rope_scale from a table filled once per call
// by rope_table_kernel with the same sincosf on the same fp32 angle, hence bit-identical to
// computing it in place; positions past the table and original positions (any token, angles
// up to ~1e6 rad) call sincosf. Masking compares original positions (padding rows -1, tail
// keys INT_MAX); local keys after the CTA's last query are invisible to all its rows, so their
// tiles are skipped. Outputs and lse are written as gather_attention_kernel writes them
// (o_part/lse_part when the keys are split).
#pragma once

#include <cstring>

#include "gather_attention_common.cuh"

namespace reattention::kernels {

constexpr int kPrefillThreads = 256;
// Positions covered by the RoPE table (larger ones fall back to sincosf): 32 MiB at R/2 = 64.
constexpr int64_t kRopeTableMaxPositions = int64_t{1} << 16;

constexpr int kPrefillBlockM = 128;  // rows per CTA, 16 per warp
__host__ __device__ constexpr int prefill_block_n(int head_dim) {
  return head_dim >= 256 ? 32 : 64;  // keys per tile
}

template <int D>
struct PrefillShape {
  static constexpr int kBM = kPrefillBlockM;
  static constexpr int kBN = prefill_block_n(D);     // keys per tile
  static constexpr int kStages = D >= 256 ? 3 : 4;  // K/V tiles in the ring
  static constexpr bool kQInRegs = D <= 128;         // D = 256 rereads Q from shared memory
  static constexpr int kMinBlocks = D <= 64 ? 2 : 1;  // CTAs per SM (shared memory allows it)
};

// Shared memory: Q tile, kStages K tiles, kStages V tiles, key positions, inverse frequencies.
template <int D>
__host__ __device__ constexpr int prefill_smem_bytes() {
  using S = PrefillShape<D>;
  return S::kBM * D * 2 + 2 * S::kStages * S::kBN * D * 2 + S::kStages * S::kBN * 4 + (D / 2) * 4;
}

// Rows of the RoPE table of the many-rows kernel (0: none, every angle through sincosf).
// Compact positions only: they are gathered indices, the same few thousand for every
// (sequence, head, block, row tile), so one table serves all CTAs; original positions are any
// token of the cache. Decode does not use it: on the H200 its attention kernel took 34 us with
// the table against 27 us with sincosf (1M tokens, bf16, D 128, one CTA per 2 key tiles: the
// table's L2 loads sit on the critical path and nothing amortises the fill).
inline int rope_table_positions(const AttnParams& p) {
  if (!p.compact || p.half_rot == 0 || few_rows(p.lq, p.query_block, p.hq / p.hkv)) return 0;
  const int64_t n = gathered_keys_max(p);
  return static_cast<int>(n < kRopeTableMaxPositions ? n : kRopeTableMaxPositions);
}

// float2 elements of the RoPE table workspace the launcher must allocate ([positions, R/2]).
inline int64_t rope_table_elems(const AttnParams& p) {
  return static_cast<int64_t>(rope_table_positions(p)) * p.half_rot;
}

// Two T in one 32-bit word (element 0 in the low half, as Dtype<T>::pack2 stores them).
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u) {
  T h[2];
  memcpy(h, &u, sizeof(u));
  return make_float2(Dtype<T>::to_float(h[0]), Dtype<T>::to_float(h[1]));
}

// table[pos * R/2 + i] = (cos, sin)(fl(pos * inv_freq[i])) * rope_scale for pos < n_pos.
// (A template, so every instantiation file may define it: header kernels need weak linkage.)
template <int kThreads>
__global__ void __launch_bounds__(kThreads) rope_table_kernel(float2* table, const float* inv_freq,
                                                              int n_pos, int half_rot,
                                                              float rope_scale) {
  const int64_t n = static_cast<int64_t>(n_pos) * half_rot;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int pos = static_cast<int>(e / half_rot), i = static_cast<int>(e % half_rot);
    table[e] = rope_cos_sin(pos, i, nullptr, 0, half_rot, inv_freq[i], rope_scale);
  }
}

// Fills p.rope_table (rope_table_elems(p) float2 from the launcher, or null); *n_pos gets the
// rows the attention kernels may read from it (0: none, every angle through sincosf).
inline cudaError_t launch_rope_table(const AttnParams& p, int* n_pos, cudaStream_t stream) {
  *n_pos = p.rope_table != nullptr ? rope_table_positions(p) : 0;
  if (*n_pos == 0) return cudaSuccess;
  const int64_t elems = static_cast<int64_t>(*n_pos) * p.half_rot;
  constexpr int kThreads = 256;
  const int64_t blocks = (elems + kThreads - 1) / kThreads;
  rope_table_kernel<kThreads><<<static_cast<unsigned>(blocks < 4096 ? blocks : 4096), kThreads,
                                0, stream>>>(p.rope_table, p.inv_freq, *n_pos, p.half_rot,
                                             p.rope_scale);
  return cudaGetLastError();
}

// Threads that share a key row in the copy and the rotation of a K/V tile.
template <int D>
__host__ __device__ constexpr int prefill_row_threads() {
  return kPrefillThreads / prefill_block_n(D);
}

// Copies the K and V rows of gathered keys [tile * kBN, tile * kBN + kBN) into the swizzled
// tiles sk and sv (layout L; cp.async, one commit group, zero-filled past n_keys) and their
// cache tokens into kpos (INT_MAX past n_keys, so the mask drops them). kTPR threads share a
// key row: each finds the row's token and page once (gathered_row) and issues its D / 8 / kTPR pieces of 16 bytes of K
// and of V from that base (pieces sub, sub + kTPR, ..., so kTPR neighbouring lanes read
// 16 kTPR contiguous bytes of a row at a time).
template <typename T, int D, class L = RowSwizzled<D>>
__device__ __forceinline__ void load_kv_rows(T* sk, T* sv, int* kpos, const GatheredKeys& g,
                                             const AttnParams& p, const T* k_base,
                                             const T* v_base, int tile) {
  constexpr int kBN = prefill_block_n(D), kTPR = prefill_row_threads<D>();
  constexpr int kPieces = D / 8 / kTPR;
  static_assert(kPrefillThreads == kBN * kTPR && kPieces * kTPR * 8 == D, "whole rows");
  const int r = threadIdx.x / kTPR, sub = threadIdx.x % kTPR;
  const GatheredRow<T> row = gathered_row(g, p, tile * kBN + r, k_base, v_base);
#pragma unroll
  for (int j = 0; j < kPieces; ++j) {
    const int col = (sub + kTPR * j) * 8;
    cp_async_16(sk + L{}(r, col), row.k + col, row.valid);
    cp_async_16(sv + L{}(r, col), row.v + col, row.valid);
  }
  if (sub == 0) kpos[r] = row.valid ? row.tok : INT_MAX;
  cp_async_commit();
}

// Whether rotate_key_row applies: every rotary unit (16 bytes of a K row: 4 interleaved pairs,
// or 8 first halves of the half style with their 8 second halves) lies in whole 16-byte
// pieces.
__device__ __forceinline__ bool prefill_rope_units(const AttnParams& p) {
  return p.half_rot % (p.interleaved ? 4 : 8) == 0;
}

// Rotates key row r of a K tile (layout L) in place at position pos, the units sub, sub + kTPR,
// ... of the row (kIl: 4 pairs (2i, 2i + 1) per unit, else pairs (i, i + R/2) for 8 i per
// unit): a 16-byte shared load and store per piece, (cos, sin) from the table row of pos
// (kTable: 16-byte loads) or sincosf of fl(pos * inv_freq), the values rope_table_kernel
// stored. Per element the math of the per-pair rotation (fp32, rope_apply, rounded once to T).
template <typename T, int D, bool kIl, bool kTable, class L>
__device__ __forceinline__ void rotate_key_row(T* sk, int r, int sub, int pos,
                                               const float2* __restrict__ table,
                                               const AttnParams& p, const float* s_invf) {
  constexpr int kTPR = prefill_row_threads<D>();
  constexpr int kPairs = kIl ? 4 : 8;  // frequencies per unit
  constexpr int kUnits = (D / 2 / kPairs + kTPR - 1) / kTPR;  // units per thread at most
  const int hr = p.half_rot, n_units = hr / kPairs;
  const float2* trow = kTable ? table + static_cast<int64_t>(pos) * hr : nullptr;
#pragma unroll(kTable ? kUnits : 1)
  for (int s = 0; s < kUnits; ++s) {
    const int u = sub + kTPR * s;
    if (u >= n_units) break;
    const int i0 = u * kPairs;  // first frequency of the unit
    float2 cs[kPairs];
    if constexpr (kTable) {
#pragma unroll
      for (int e = 0; e < kPairs; e += 2) {
        const float4 t = __ldg(reinterpret_cast<const float4*>(trow + i0 + e));
        cs[e] = make_float2(t.x, t.y);
        cs[e + 1] = make_float2(t.z, t.w);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kPairs; ++e) {
        cs[e] = rope_cos_sin(pos, i0 + e, nullptr, 0, hr, s_invf[i0 + e], p.rope_scale);
      }
    }
    // Unit u starts at column 2 * i0 (interleaved) or i0, i.e. in 16-byte piece u.
    uint4* lo = reinterpret_cast<uint4*>(sk + L{}(r, u << 3));
    uint4 a = *lo;
    uint32_t* wa = reinterpret_cast<uint32_t*>(&a);
    if constexpr (kIl) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {  // word w: (x0, x1) of pair i0 + w
        const float2 v = unpack2<T>(wa[w]);
        float x0 = v.x, x1 = v.y;
        rope_apply(x0, x1, cs[w]);
        wa[w] = Dtype<T>::pack2(x0, x1);
      }
    } else {
      // The second halves of the unit's pairs sit R/2 columns on: piece u + R/16.
      uint4* hi = reinterpret_cast<uint4*>(sk + L{}(r, (u + hr / 8) << 3));
      uint4 b = *hi;
      uint32_t* wb = reinterpret_cast<uint32_t*>(&b);
#pragma unroll
      for (int w = 0; w < 4; ++w) {  // word w of a: x0 of pairs i0 + 2w, +1; of b: their x1
        const float2 va = unpack2<T>(wa[w]), vb = unpack2<T>(wb[w]);
        float a0 = va.x, a1 = vb.x, c0 = va.y, c1 = vb.y;
        rope_apply(a0, a1, cs[2 * w]);
        rope_apply(c0, c1, cs[2 * w + 1]);
        wa[w] = Dtype<T>::pack2(a0, c0);
        wb[w] = Dtype<T>::pack2(a1, c1);
      }
      *hi = b;
    }
    *lo = a;
  }
}

// rotate_key_row for row r of a tile at position pos, its variant picked at run time: the RoPE
// style from p, the table when pos lies in [0, n_pos), else sincosf.
template <typename T, int D, class L>
__device__ __forceinline__ void rotate_row_at(T* tile, int r, int sub, int pos,
                                              const float2* __restrict__ table, int n_pos,
                                              const AttnParams& p, const float* s_invf) {
  if (static_cast<unsigned>(pos) < static_cast<unsigned>(n_pos)) {
    if (p.interleaved) {
      rotate_key_row<T, D, true, true, L>(tile, r, sub, pos, table, p, s_invf);
    } else {
      rotate_key_row<T, D, false, true, L>(tile, r, sub, pos, table, p, s_invf);
    }
  } else if (p.interleaved) {
    rotate_key_row<T, D, true, false, L>(tile, r, sub, pos, table, p, s_invf);
  } else {
    rotate_key_row<T, D, false, false, L>(tile, r, sub, pos, table, p, s_invf);
  }
}

// Key row of every tile that thread tid rotates (units tid % kTPR, + kTPR, ... of it). With
// kTPR = 4 the two rows of each 8 lanes are 4 apart, so their 16-byte pieces fall in different
// bank groups (in a 256-byte swz<128> row and in a 128-byte slice row alike).
template <int D>
__device__ __forceinline__ int prefill_rotation_row(int tid) {
  constexpr int kTPR = prefill_row_threads<D>();
  const int rr = tid / kTPR;
  return kTPR == 4 ? (rr & ~7) | ((rr >> 1) & 3) | ((rr & 1) << 2) : rr;
}

// Rotates the K tile sk (layout L, gathered keys tile * kBN ..) in place, all kThreads
// threads together: thread tid owns key row rot_r of the tile, units rot_sub, rot_sub + kTPR,
// ... of it (rotate_key_row) when prefill_rope_units(p) (`units`), else the per-pair loops.
template <typename T, int D, class L>
__device__ __forceinline__ void rotate_k_tile(T* sk, const int* kpos, int tile, int n_keys,
                                              int rot_r, int rot_sub, bool units,
                                              const AttnParams& p,
                                              const float2* __restrict__ table, int n_pos,
                                              const float* s_invf) {
  constexpr int kBN = prefill_block_n(D), kThreads = kPrefillThreads;
  const int tid = threadIdx.x;
  if (units) {
    const int key = tile * kBN + rot_r;
    if (key >= n_keys || p.half_rot == 0) return;
    const int pos = p.compact ? key : kpos[rot_r];
    rotate_row_at<T, D, L>(sk, rot_r, rot_sub, pos, table, n_pos, p, s_invf);
    return;
  }
  // Other R/2 (not a multiple of 8, or of 4 interleaved): per pair or pair of pairs. With
  // R/2 even a step takes two adjacent pairs i, i + 1 (i even): one float4 of the table and
  // two 32-bit shared words, (x0, x1) of each pair in the interleaved style, (x0 of both,
  // x1 of both) in the half style.
  if (p.half_rot % 2 == 0) {
    const bool il = p.interleaved;
    for (int id = tid; id < kBN * (D / 4); id += kThreads) {
      const int r = id / (D / 4), i = 2 * (id % (D / 4));
      const int key = tile * kBN + r;
      if (i >= p.half_rot || key >= n_keys) continue;
      const int pos = p.compact ? key : kpos[r];
      float2 cs0, cs1;
      if (static_cast<unsigned>(pos) < static_cast<unsigned>(n_pos)) {
        const float4 t = __ldg(reinterpret_cast<const float4*>(
            table + static_cast<int64_t>(pos) * p.half_rot + i));
        cs0 = make_float2(t.x, t.y);
        cs1 = make_float2(t.z, t.w);
      } else {
        cs0 = rope_cos_sin(pos, i, table, 0, p.half_rot, s_invf[i], p.rope_scale);
        cs1 = rope_cos_sin(pos, i + 1, table, 0, p.half_rot, s_invf[i + 1], p.rope_scale);
      }
      uint32_t* u0 = reinterpret_cast<uint32_t*>(sk + L{}(r, il ? 2 * i : i));
      uint32_t* u1 = il ? u0 + 1 : reinterpret_cast<uint32_t*>(sk + L{}(r, i + p.half_rot));
      const float2 w0 = unpack2<T>(*u0), w1 = unpack2<T>(*u1);
      float a0 = w0.x, a1 = il ? w0.y : w1.x;  // pair i
      float c0 = il ? w1.x : w0.y, c1 = w1.y;  // pair i + 1
      rope_apply(a0, a1, cs0);
      rope_apply(c0, c1, cs1);
      *u0 = il ? Dtype<T>::pack2(a0, a1) : Dtype<T>::pack2(a0, c0);
      *u1 = il ? Dtype<T>::pack2(c0, c1) : Dtype<T>::pack2(a1, c1);
    }
    return;
  }
  for (int id = tid; id < kBN * (D / 2); id += kThreads) {
    const int r = id / (D / 2), i = id % (D / 2);
    const int key = tile * kBN + r;
    if (i >= p.half_rot || key >= n_keys) continue;
    int d0, d1;
    rope_pair(i, p.half_rot, p.interleaved, d0, d1);
    float x0 = Dtype<T>::to_float(sk[L{}(r, d0)]);
    float x1 = Dtype<T>::to_float(sk[L{}(r, d1)]);
    rope_apply(x0, x1, rope_cos_sin(p.compact ? key : kpos[r], i, table, n_pos, p.half_rot,
                                    s_invf[i], p.rope_scale));
    sk[L{}(r, d0)] = Dtype<T>::from_float(x0);
    sk[L{}(r, d1)] = Dtype<T>::from_float(x1);
  }
}

// The Q tile of the many-rows kernels in two steps, for R/2 that prefill_rope_units accepts
// (stage_rotated_q serves the others). copy_q_tile: rows [row0, row0 + kBM) of the block's
// query rows (row = query * group + head), raw, into s_q (layout L) by 16-byte cp.async, zero
// past `rows`; it commits nothing (the caller's next commit takes the pieces). It needs no
// device data, so a kernel issues it first and its latency hides under gathered_keys'.
template <typename T, int D, int kBM, class L>
__device__ __forceinline__ void copy_q_tile(T* s_q, const AttnParams& p, int b, int h, int group,
                                            int q0, int row0, int rows) {
  constexpr int kPieces = kBM * (D / 8);
  static_assert(kPieces % kPrefillThreads == 0, "whole pieces per thread");
  const T* q_base = static_cast<const T*>(p.q) + b * p.q_sb;
#pragma unroll
  for (int j = 0; j < kPieces / kPrefillThreads; ++j) {
    const int e = threadIdx.x + j * kPrefillThreads, r = e / (D / 8), col = e % (D / 8) * 8;
    const int gr = row0 + r;
    const bool valid = gr < rows;
    const int head = h * group + (valid ? gr % group : 0), query = q0 + (valid ? gr / group : 0);
    cp_async_16(s_q + L{}(r, col), q_base + head * p.q_sh + query * p.q_sl + col, valid);
  }
}

// rotate_q_tile: after copy_q_tile's pieces have landed for every thread (a wait and a CTA
// barrier), rotates each real row in place at its query's position (compact or original, as
// stage_rotated_q), with rotate_key_row's 16-byte units: the same values as stage_rotated_q.
// Thread tid takes rows prefill_rotation_row(tid) + 64 j of the tile, units tid % kTPR, + kTPR,
// ... of each. The caller orders these stores before the tile's readers (the kernels' barriers).
template <typename T, int D, int kBM, class L>
__device__ __forceinline__ void rotate_q_tile(T* s_q, const AttnParams& p,
                                              const GatheredKeys& gk, int group, int q0,
                                              int row0, int rows,
                                              const float2* __restrict__ table, int n_pos,
                                              const float* s_invf) {
  constexpr int kTileN = prefill_block_n(D), kTPR = prefill_row_threads<D>();
  static_assert(kBM % kTileN == 0, "row groups of prefill_rotation_row");
  if (p.half_rot == 0) return;
  const int sub = threadIdx.x % kTPR;
#pragma unroll
  for (int j = 0; j < kBM / kTileN; ++j) {
    const int r = prefill_rotation_row<D>(threadIdx.x) + j * kTileN, gr = row0 + r;
    if (gr >= rows) continue;
    const int pos = gk.p0 + q0 + gr / group, rpos = p.compact ? pos + gk.shift : pos;
    rotate_row_at<T, D, L>(s_q, r, sub, rpos, table, n_pos, p, s_invf);
  }
}

// Writes a thread's two rows ra, ra + 8 of the CTA's tile from the m16n8 accumulator
// fragments (o[dt][2 half + e]: row ra + 8 half, column 8 dt + 2 t4 + e) and the row's (m, l)
// in the exp2 domain: out and lse, or o_part and lse_part of the split when the keys are
// split. Padding rows are not written.
template <typename T, int D>
__device__ __forceinline__ void store_prefill_rows(const AttnParams& p,
                                                   const float (&o)[D / 8][4],
                                                   const float (&m_run)[2],
                                                   const float (&l_run)[2], const AttnTile& at,
                                                   int ra, int t4) {
  constexpr int kDT = D / 8;
  const int row0 = at.row0, rows = at.rows, group = at.group, h = at.h, b = at.b;
  const int64_t row_stride = static_cast<int64_t>(p.lq);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float l = quad_sum(l_run[half]);
    const int gr = row0 + ra + 8 * half;
    if (gr >= rows) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse = l > 0.f ? (m_run[half] + log2f(l)) * 0.69314718055994531f : -INFINITY;
    const int head = h * group + gr % group, query = at.q0 + gr / group;
    const int64_t orow = (static_cast<int64_t>(b) * p.hq + head) * row_stride + query;
    if (p.num_splits == 1) {
      uint32_t* dst = reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + orow * D + 2 * t4);
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        dst[dt * 4] = Dtype<T>::pack2(o[dt][2 * half] * inv, o[dt][2 * half + 1] * inv);
      }
      if (t4 == 0) p.lse[orow] = lse;
    } else {
      const int64_t prow = static_cast<int64_t>(at.split) * p.batch * p.hq * row_stride + orow;
      float2* dst = reinterpret_cast<float2*>(p.o_part + prow * D + 2 * t4);
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        dst[dt * 4] = make_float2(o[dt][2 * half] * inv, o[dt][2 * half + 1] * inv);
      }
      if (t4 == 0) p.lse_part[prow] = lse;
    }
  }
}

// Key tiles [t_begin, t_end) of kBN gathered keys that a CTA's split attends to. Sink and
// chunk keys precede every query; local key r sits at mid_end + r - loc0, so the ones after
// the CTA's last query are masked for all its rows and their tiles are skipped.
template <int kBM, int kBN>
__device__ __forceinline__ void prefill_tile_range(const AttnParams& p, const AttnTile& at,
                                                   const GatheredKeys& gk, int& t_begin,
                                                   int& t_end) {
  const int q_last = gk.p0 + at.q0 + (min(at.rows, at.row0 + kBM) - 1) / at.group;
  const int n_vis = min(gk.n_keys, gk.loc0 + max(0, q_last - gk.mid_end + 1));
  const int n_tiles = (n_vis + kBN - 1) / kBN;
  t_begin = at.split * p.tiles_per_split;
  t_end = min(n_tiles, t_begin + p.tiles_per_split);
}

// Original positions of a thread's rows ra, ra + 8 of the CTA's tile (-1: padding) and of its
// warp's first row, warp_q0; the warp's other rows sit at or after it (padding rows are never
// written, so their scores need no mask), so a tile whose key positions are all at most
// warp_q0 (sink, chunks, most of the local window; INT_MAX past n_keys) needs no mask.
__device__ __forceinline__ void prefill_row_positions(const AttnTile& at, const GatheredKeys& gk,
                                                      int warp, int ra, int (&qpos)[2],
                                                      int& warp_q0) {
  const int first = gk.p0 + at.q0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int gr = at.row0 + ra + 8 * half;
    qpos[half] = gr < at.rows ? first + gr / at.group : -1;
  }
  warp_q0 = first + (at.row0 + warp * 16) / at.group;
}

// One key tile of the online softmax in the many-rows kernels: a tile whose kBN keys all sit at
// or before the warp's first row (one vote over kpos) takes the path without the per-element
// compare, which would hold for every element, when scale_log2 > 0 (that path scales the raw
// max); other tiles (the last local ones, the tail keys at INT_MAX) and every tile of a call
// with a scale <= 0 are masked as usual.
template <int kBN, int kNT, int kDT>
__device__ __forceinline__ void prefill_softmax_tile(float (&s)[kNT][4], float (&o)[kDT][4],
                                                     float (&m_run)[2], float (&l_run)[2],
                                                     const int* kpos, const int (&qpos)[2],
                                                     int warp_q0, float scale_log2, int lane) {
  bool before = true;
#pragma unroll
  for (int c = 0; c < kBN; c += 32) before = before && kpos[c + lane] <= warp_q0;
  const int t4 = lane & 3;
  if (__all_sync(0xffffffffu, before) && scale_log2 > 0.f) {
    online_softmax_tile<kNT, kDT, false>(s, o, m_run, l_run, kpos, qpos, scale_log2, t4);
  } else {
    online_softmax_tile(s, o, m_run, l_run, kpos, qpos, scale_log2, t4);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kPrefillThreads, PrefillShape<D>::kMinBlocks)
    gather_attention_prefill_kernel(AttnParams p, const float2* __restrict__ table, int n_pos) {
  using Shape = PrefillShape<D>;
  constexpr int kBM = Shape::kBM, kBN = Shape::kBN, kStages = Shape::kStages;
  constexpr int kNT = kBN / 8;  // 8-wide key column tiles of S
  constexpr int kDT = D / 8;    // 8-wide output column tiles
  constexpr int kKT = D / 16;   // k16 steps of Q K^T
  static_assert(kBM == 16 * (kPrefillThreads / 32), "one m16 row tile per warp");
  static_assert(kStages >= 3, "the ring holds the tile in use, the one rotated and one in flight");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_k = s_q + kBM * D;
  T* s_v = s_k + kStages * kBN * D;
  int* s_kpos = reinterpret_cast<int*>(s_v + kStages * kBN * D);
  float* s_invf = reinterpret_cast<float*>(s_kpos + kStages * kBN);
  __shared__ int s_nsel;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const AttnTile at = attn_tile(p, kBM);
  if (at.row0 >= at.rows) return;
  const int beta = at.beta, h = at.h, b = at.b, group = at.group;
  const int q0 = at.q0, rows = at.rows, row0 = at.row0;
  // Q raw in 16-byte pieces first (they join the first tile's copy group), rotated in place
  // once that group has landed; stage_rotated_q for the R/2 that rotate_key_row cannot take.
  const bool units = prefill_rope_units(p);
  if (units) copy_q_tile<T, D, kBM, RowSwizzled<D>>(s_q, p, b, h, group, q0, row0, rows);

  const GatheredKeys gk = gathered_keys<D, kPrefillThreads>(p, b, h, beta, s_invf, &s_nsel);
  const int n_keys = gk.n_keys;

  const T *k_base, *v_base;
  kv_bases<T>(p, b, h, k_base, v_base);
  auto load_tile = [&](int stage, int tile) {
    load_kv_rows<T, D>(s_k + stage * kBN * D, s_v + stage * kBN * D, s_kpos + stage * kBN, gk,
                       p, k_base, v_base, tile);
  };
  constexpr int kTPR = prefill_row_threads<D>();
  const int rot_r = prefill_rotation_row<D>(tid), rot_sub = tid % kTPR;
  // Rotates the K tile of `stage` in place, all threads together.
  auto rotate_tile = [&](int stage, int tile) {
    rotate_k_tile<T, D, RowSwizzled<D>>(s_k + stage * kBN * D, s_kpos + stage * kBN, tile,
                                        n_keys, rot_r, rot_sub, units, p, table, n_pos, s_invf);
  };

  int t_begin, t_end;
  prefill_tile_range<kBM, kBN>(p, at, gk, t_begin, t_end);
  // kStages - 1 tiles in flight from the start; every iteration then commits exactly one copy
  // group (empty past the end), so "at most kStages - 3 groups pending" at the top of
  // iteration t means tile t + 1 has landed.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (t_begin + s < t_end) load_tile(s, t_begin + s); else cp_async_commit();
  }

  if (!units) {
    stage_rotated_q<T, D, kBM, kPrefillThreads, false>(s_q, nullptr, p, gk, b, h, group, q0,
                                                        row0, rows, s_invf, table, n_pos);
  }
  cp_async_wait<kStages - 2>();  // tile t_begin (and the raw Q pieces) have landed
  __syncthreads();               // ... for every thread, and a staged Q tile is complete
  if (units) {
    rotate_q_tile<T, D, kBM, RowSwizzled<D>>(s_q, p, gk, group, q0, row0, rows, table, n_pos,
                                             s_invf);
  }
  if (t_begin < t_end) rotate_tile(0, t_begin);
  if (units) __syncthreads();  // Q rotated by other warps' threads: before the ldmatrix below

  const int g = lane >> 2, t4 = lane & 3;
  const int ra = warp * 16 + g;  // this thread's two rows in the tile: ra and ra + 8
  int qpos[2], warp_q0;
  prefill_row_positions(at, gk, warp, ra, qpos, warp_q0);
  // A warp whose 16 rows are all padding only helps with copies and rotations.
  const bool active = row0 + warp * 16 < rows;

  uint32_t qf[Shape::kQInRegs ? kKT : 1][4];
  if constexpr (Shape::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < kKT; ++kk) {
      ldmatrix_x4(qf[kk], s_q + swz<D>(warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
    }
  }

  float o[kDT][4], m_run[2], l_run[2];
  softmax_state_init(o, m_run, l_run);

  for (int tile = t_begin; tile < t_end; ++tile) {
    const int it = tile - t_begin;
    cp_async_wait<kStages - 3>();
    // Tile tile + 1 is visible, tile's rotation is complete and every warp is done with
    // tile - 1, whose stage the next copy refills.
    __syncthreads();
    const int next = tile + kStages - 1;
    if (next < t_end) load_tile((it + kStages - 1) % kStages, next); else cp_async_commit();
    if (tile + 1 < t_end) rotate_tile((it + 1) % kStages, tile + 1);
    if (!active) continue;

    const int stage = it % kStages;
    const T* sk = s_k + stage * kBN * D;
    const T* sv = s_v + stage * kBN * D;
    const int* kpos = s_kpos + stage * kBN;
    float s[kNT][4];
    if constexpr (Shape::kQInRegs) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < kKT; ++kk) {
#pragma unroll
        for (int np = 0; np < kNT / 2; ++np) {
          uint32_t bk[4];
          ldmatrix_x4(bk, sk + swz<D>(np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                      kk * 16 + ((lane >> 3) & 1) * 8));
          mma_16816<T>(s[2 * np], qf[kk], bk[0], bk[1]);
          mma_16816<T>(s[2 * np + 1], qf[kk], bk[2], bk[3]);
        }
      }
    } else {
      warp_gemm_abt<T, D, kNT>(s, s_q, warp * 16, sk, 0, lane);
    }

    prefill_softmax_tile<kBN>(s, o, m_run, l_run, kpos, qpos, warp_q0, p.scale_log2, lane);
    pv_tile<T, D>(o, s, sv, 0, lane);
  }
  cp_async_wait<0>();  // only empty groups can be left

  // Epilogue straight from the fragments: each row lives in one warp, so (m, l, O) are final.
  store_prefill_rows<T, D>(p, o, m_run, l_run, at, ra, t4);
}

}  // namespace reattention::kernels
