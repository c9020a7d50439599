// gather_attention, shared by its decode and prefill kernels: the params, what a CTA owns and
// the gathered-key map, the K/V tile copy, RoPE and the rotated Q staging, the online softmax
// and P V steps, and the merge of split-KV partial results. No torch dependency.
//
// Rows of a query block pack its queries with the kv head's group of q heads (row = query *
// group + head), so the GQA heads share every key tile and decode (Lq = 1) still forms an m16
// tensor-core tile. Gathered key r maps to its cache token through the sink, the chunk ids in
// idx (ascending, -1 padded: the valid ones are a prefix) and the local window; cp.async
// copies K and V tiles straight from the [B, Hkv, Nmax, D] cache into swizzled shared memory.
// A paged cache (pages [num_pages, Hkv, page_size, D] and a block table) changes only those
// copies: each copied row finds its page in the table (a shift when page_size is a power of
// two), so the arithmetic after the copy, the splits and their merge equal the contiguous
// layout's bit for bit (the plan depends on Nmax = max_pages * page_size only).
// RoPE uses fp32 angles fl(pos * inv_freq) with accurate sincosf (docs/design.md section 2).
// Masking compares original positions (key visible iff its position <= the query's), so
// padding rows (position -1) and tail keys (position INT_MAX) drop out. When the keys of a
// CTA are split, each split writes its normalised partial output and lse to a workspace and
// merge_splits_kernel combines them.
#pragma once

#include <climits>
#include <cstdint>

#include "device_utils.cuh"

namespace reattention::kernels {

struct AttnParams {
  const void* q;          // [B, Hq, Lq, D]
  const void* k;          // [B, Hkv, Nmax, D], or pages [num_pages, Hkv, page_size, D]
  const void* v;          // k's shape
  const int* seqlens;     // [B]
  const int* idx;         // [B, Hkv, n_blocks, topk]
  const float* inv_freq;  // [R/2]
  void* out;              // [B, Hq, Lq, D] contiguous, q's dtype
  float* lse;             // [B, Hq, Lq] contiguous
  float* o_part;          // [splits, B, Hq, Lq, D] when num_splits > 1
  float* lse_part;        // [splits, B, Hq, Lq]
  float2* rope_table;     // [rope_table_elems(p)] (cos, sin) of the many-rows path, or null
  void* k_rot;            // [prerot_elems(p, D)] rotated gathered K rows (sm_90a many-rows), or null
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sn;  // dim 0: a sequence, or a page
  int64_t v_sb, v_sh, v_sn;
  PageTable pages;           // the block table of k and v (table == nullptr: contiguous)
  int64_t i_sb, i_sh, i_sblk;
  int batch, hq, hkv, lq, nmax, topk;
  int sink, local, chunk, query_block, n_blocks;
  int half_rot;           // R / 2 = len(inv_freq)
  float scale_log2;       // softmax scale * log2(e)
  float rope_scale;
  bool interleaved;       // rope style: pairs (2i, 2i+1) instead of (i, i + R/2)
  bool compact;           // positions: compact (re-assigned) or original
  int row_tiles;          // row tiles per query block
  int num_splits;         // splits of the gathered keys
  int tiles_per_split;    // key tiles of BN per split
  int kv_stages;          // K/V stages of the few-rows kernel (1: transposed only), by the plan
};

// Dims (d0, d1) rotated together by frequency i < R/2. Slots i in [R/2, D/2) name the
// pass-through pairs (2i, 2i + 1), which in the half style start at R = 2 * (R/2) as well.
__device__ __forceinline__ void rope_pair(int i, int half_rot, bool interleaved, int& d0, int& d1) {
  const bool split_halves = !interleaved && i < half_rot;
  d0 = split_halves ? i : 2 * i;
  d1 = split_halves ? i + half_rot : 2 * i + 1;
}

// What one CTA owns. Grid: x = query block * row_tiles + row tile, y = kv head * num_splits +
// split, z = sequence; a launch on a group of blocks numbers them from beta0. Rows of a block:
// its queries times the group's q heads.
struct AttnTile {
  int beta, h, split, b, group;
  int q0;    // the block's first query
  int rows;  // the block's rows
  int row0;  // the CTA's first row (row0 >= rows: nothing to do)
};

__device__ __forceinline__ AttnTile attn_tile(const AttnParams& p, int block_m, int beta0 = 0) {
  AttnTile t;
  t.beta = beta0 + blockIdx.x / p.row_tiles;
  t.h = blockIdx.y / p.num_splits;
  t.split = blockIdx.y % p.num_splits;
  t.b = blockIdx.z;
  t.group = p.hq / p.hkv;
  t.q0 = t.beta * p.query_block;
  t.rows = (min(p.lq, t.q0 + p.query_block) - t.q0) * t.group;
  t.row0 = blockIdx.x % p.row_tiles * block_m;
  return t;
}

// The gathered sequence of one (sequence, kv head, query block): [sink | the chunks of idx |
// local window], with the block's own segments (contract v2: those of a call of its own, so
// the local window ends at the block's last query), and where each gathered key sits in the
// cache.
struct GatheredKeys {
  const int* sel;  // the block's chunk ids (ascending, -1 padded: the valid ones are a prefix)
  int sink_len;    // the block's sink is [0, sink_len)
  int mid_end;     // the block's middle ends here; its local window is [mid_end, P1]
  int p0;          // original position of the call's first query (call row i sits at p0 + i)
  int loc0;        // gathered index of the local window
  int n_keys;      // gathered keys
  int shift;       // compact query position - original query position
  const int* pages;  // paged cache: the sequence's block table row, else nullptr

  // Cache token of gathered key r (r < n_keys); sel_of(c) gives chunk id sel[c] and is called
  // only for a key of the middle. Clamped so a malformed idx cannot read outside the cache; a
  // well-formed one never needs it.
  template <class SelOf>
  __device__ __forceinline__ int token(int r, const AttnParams& p, SelOf sel_of) const {
    int tok;
    if (r < sink_len) {
      tok = r;
    } else if (r < loc0) {
      const int c = (r - sink_len) / p.chunk;
      tok = p.sink + sel_of(c) * p.chunk + (r - sink_len - c * p.chunk);
    } else {
      tok = mid_end + (r - loc0);
    }
    return min(max(tok, 0), p.nmax - 1);
  }

  __device__ __forceinline__ int token(int r, const AttnParams& p) const {
    return token(r, p, [this](int c) { return sel[c]; });
  }
};

// The parts of a block's gathered sequence that need only the sequence length n (sel, the
// segments, p0, pages); *end is the end of its local window. gathered_keys_finish adds the
// count of selected chunks.
__device__ __forceinline__ GatheredKeys gathered_keys_start(const AttnParams& p, int n, int b,
                                                            int h, int beta, int* end) {
  GatheredKeys g;
  const Segments seg =
      block_segments(n, p.lq, p.query_block, beta, p.sink, p.local, p.chunk);
  g.sink_len = static_cast<int>(seg.sink_len);
  g.mid_end = static_cast<int>(seg.mid_end);
  g.p0 = n - p.lq;
  g.sel = p.idx + b * p.i_sb + h * p.i_sh + beta * p.i_sblk;
  g.pages = p.pages.paged() ? p.pages.row(b) : nullptr;
  *end = static_cast<int>(seg.end);
  return g;
}

__device__ __forceinline__ void gathered_keys_finish(GatheredKeys& g, const AttnParams& p,
                                                     int end, int n_sel) {
  g.loc0 = g.sink_len + n_sel * p.chunk;
  g.n_keys = g.loc0 + max(0, end - g.mid_end);
  g.shift = p.sink + n_sel * p.chunk - g.mid_end;
}

// The CTA's gathered sequence: counts the block's selected chunks (in *s_nsel) and stages the
// inverse frequencies, zero past R/2, in s_invf[D / 2]. Every thread calls it (two barriers).
template <int D, int kThreads>
__device__ __forceinline__ GatheredKeys gathered_keys(const AttnParams& p, int b, int h,
                                                      int beta, float* s_invf, int* s_nsel) {
  int end;
  GatheredKeys g = gathered_keys_start(p, p.seqlens[b], b, h, beta, &end);
  if (threadIdx.x == 0) *s_nsel = 0;
  __syncthreads();
  int mine = 0;
  for (int i = threadIdx.x; i < p.topk; i += kThreads) mine += g.sel[i] >= 0;
  if (mine) atomicAdd(s_nsel, mine);
  for (int i = threadIdx.x; i < D / 2; i += kThreads) {
    s_invf[i] = i < p.half_rot ? p.inv_freq[i] : 0.f;
  }
  __syncthreads();
  gathered_keys_finish(g, p, end, *s_nsel);
  return g;
}

// The CTA's K and V bases: sequence b, head h of a contiguous cache, or head h of the page
// pool (gathered_row adds each row's page).
template <typename T>
__device__ __forceinline__ void kv_bases(const AttnParams& p, int b, int h, const T*& k_base,
                                         const T*& v_base) {
  k_base = static_cast<const T*>(p.k) + h * p.k_sh;
  v_base = static_cast<const T*>(p.v) + h * p.v_sh;
  if (!p.pages.paged()) {
    k_base += b * p.k_sb;
    v_base += b * p.v_sb;
  }
}

// Where gathered key `key` of a CTA lives in the cache: valid (key < n_keys), its token (0 past
// n_keys: a used entry, though the zero-filled copy reads nothing there) and its K and V rows,
// from the bases of kv_bases (a paged cache's row adds its page, found in g.pages). The copy
// functions of the decode and many-rows kernels find it once per row and thread.
template <typename T>
struct GatheredRow {
  bool valid;
  int tok;
  const T* k;
  const T* v;
};

// sel_of(c): chunk id sel[c] (GatheredKeys::token).
template <typename T, class SelOf>
__device__ __forceinline__ GatheredRow<T> gathered_row(const GatheredKeys& g, const AttnParams& p,
                                                       int key, const T* k_base,
                                                       const T* v_base, SelOf sel_of) {
  GatheredRow<T> row;
  row.valid = key < g.n_keys;
  row.tok = row.valid ? g.token(key, p, sel_of) : 0;
  if (g.pages == nullptr) {
    row.k = k_base + row.tok * p.k_sn;
    row.v = v_base + row.tok * p.v_sn;
  } else {
    int page, in;
    p.pages.locate(g.pages, row.tok, page, in);
    row.k = k_base + page * p.k_sb + in * p.k_sn;
    row.v = v_base + page * p.v_sb + in * p.v_sn;
  }
  return row;
}

template <typename T>
__device__ __forceinline__ GatheredRow<T> gathered_row(const GatheredKeys& g, const AttnParams& p,
                                                       int key, const T* k_base,
                                                       const T* v_base) {
  return gathered_row(g, p, key, k_base, v_base, [&g](int c) { return g.sel[c]; });
}

// Longest gathered sequence of any block at any length in [Lq, Nmax] (static shapes only): at
// most scope() keys, whatever Lq is, as a block's local window holds fewer than local + chunk
// keys before its first query, then its own query_block queries. Compact positions of keys and
// queries are gathered indices, so they all lie below it.
inline int64_t gathered_keys_max(const AttnParams& p) {
  const int64_t local_max = static_cast<int64_t>(p.query_block) + p.local + p.chunk - 1;
  return (p.sink < p.nmax ? p.sink : p.nmax) + static_cast<int64_t>(p.topk) * p.chunk +
         (local_max < p.nmax ? local_max : p.nmax);
}

// (cos, sin) * rope_scale of angle fl(pos * inv_freq) for frequency i: from the table when pos
// is in it, else computed exactly as the table was.
__device__ __forceinline__ float2 rope_cos_sin(int pos, int i, const float2* __restrict__ table,
                                               int n_pos, int half_rot, float inv_freq,
                                               float rope_scale) {
  if (static_cast<unsigned>(pos) < static_cast<unsigned>(n_pos)) {
    return __ldg(table + static_cast<int64_t>(pos) * half_rot + i);
  }
  float s, c;
  sincosf(static_cast<float>(pos) * inv_freq, &s, &c);
  return make_float2(c * rope_scale, s * rope_scale);
}

__device__ __forceinline__ void rope_apply(float& x0, float& x1, float2 cs) {
  const float y0 = x0 * cs.x - x1 * cs.y;
  const float y1 = x1 * cs.x + x0 * cs.y;
  x0 = y0;
  x1 = y1;
}

// Stages rows [row0, row0 + kBM) of the block's query rows (row = query * group + head; rows
// at or past `rows` are zero) rotated at their compact or original positions, rounded once to
// T, into the swizzled tile s_q (layout L); with kQpos, also each row's original position
// (-1: padding) into s_qpos. table/n_pos: the RoPE table (rope_table_kernel) or null/0.
// s_invf[i]: inverse frequency i (an array, or anything with that operator).
// Each thread takes its (row, frequency) pairs kBatch at a time and issues all their global
// loads (two Q elements and a table entry each) before it uses the first: one load latency
// per batch instead of two dependent ones per pair. The decode kernels use it; the many-rows
// kernels only for the R/2 that rotate_key_row cannot take (otherwise copy_q_tile and
// rotate_q_tile: these batches were still 11% of the sm_90a attention's warp samples under
// ncu, bench/NOTES.md round thirteen).
template <typename T, int D, int kBM, int kThreads, bool kQpos, class L = RowSwizzled<D>,
          class InvF = const float*>
__device__ __forceinline__ void stage_rotated_q(T* s_q, int* s_qpos, const AttnParams& p,
                                                const GatheredKeys& gk, int b, int h, int group,
                                                int q0, int row0, int rows, InvF s_invf,
                                                const float2* table, int n_pos) {
  constexpr int kPairs = kBM * (D / 2);
  constexpr int kPerThread = (kPairs + kThreads - 1) / kThreads;
  constexpr int kBatch = kPerThread < 8 ? kPerThread : 8;
  const T* q_base = static_cast<const T*>(p.q) + b * p.q_sb;
  for (int id0 = threadIdx.x; id0 < kPairs; id0 += kBatch * kThreads) {
    T x0[kBatch], x1[kBatch];
    float2 cs[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {  // loads only
      const int id = id0 + u * kThreads, r = id / (D / 2), i = id % (D / 2), gr = row0 + r;
      int d0, d1;
      rope_pair(i, p.half_rot, p.interleaved, d0, d1);
      x0[u] = x1[u] = Dtype<T>::from_float(0.f);
      cs[u] = make_float2(1.f, 0.f);
      if (id < kPairs && gr < rows) {
        const int head = h * group + gr % group, query = q0 + gr / group;
        const T* qr = q_base + head * p.q_sh + query * p.q_sl;
        x0[u] = qr[d0];
        x1[u] = qr[d1];
        const int pos = gk.p0 + query, rpos = p.compact ? pos + gk.shift : pos;
        if (i < p.half_rot && static_cast<unsigned>(rpos) < static_cast<unsigned>(n_pos)) {
          cs[u] = __ldg(table + static_cast<int64_t>(rpos) * p.half_rot + i);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int id = id0 + u * kThreads, r = id / (D / 2), i = id % (D / 2), gr = row0 + r;
      if (id >= kPairs) break;
      int d0, d1;
      rope_pair(i, p.half_rot, p.interleaved, d0, d1);
      float y0 = Dtype<T>::to_float(x0[u]), y1 = Dtype<T>::to_float(x1[u]);
      if (gr < rows) {
        const int pos = gk.p0 + q0 + gr / group, rpos = p.compact ? pos + gk.shift : pos;
        if (i < p.half_rot) {
          // Past the table (or none): the angle computed exactly as the table was.
          const float2 c = static_cast<unsigned>(rpos) < static_cast<unsigned>(n_pos)
                               ? cs[u]
                               : rope_cos_sin(rpos, i, nullptr, 0, p.half_rot, s_invf[i],
                                              p.rope_scale);
          rope_apply(y0, y1, c);
        }
        if (kQpos && i == 0) s_qpos[r] = pos;
      } else if (kQpos && i == 0) {
        s_qpos[r] = -1;
      }
      s_q[L{}(r, d0)] = Dtype<T>::from_float(y0);
      s_q[L{}(r, d1)] = Dtype<T>::from_float(y1);
    }
  }
}

// The online softmax's starting state for a thread's two rows: O zero, m = -inf, l = 0.
template <int kDT>
__device__ __forceinline__ void softmax_state_init(float (&o)[kDT][4], float (&m_run)[2],
                                                   float (&l_run)[2]) {
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
  }
  m_run[0] = m_run[1] = -INFINITY;
  l_run[0] = l_run[1] = 0.f;
}

// One row of online_softmax_tile: the thread's S values s[nt][2 half + e] (its quad holds the
// rest of the row) are masked, scaled to the exp2 domain and replaced by P; (m_run, l_run) are
// updated. Returns the factor alpha by which the row's O must be rescaled. exp2_ftz: weights
// below 2^-126 of the row's running max become 0.
// kMask = false (no key of the tile follows the row) needs scale_log2 > 0: the row's max is
// then taken over the raw S and scaled once (rounding is monotone, so it equals the max of the
// scaled S), each weight is exp2 of one fma(S, scale_log2, -m), and the max and the sum run as
// four partial chains. The weights may differ from the masked path's (x * scale_log2 rounded,
// then - m) by the rounding of the product.
template <int kNT, bool kMask>
__device__ __forceinline__ float softmax_row_update(float (&s)[kNT][4], int half, float& m_run,
                                                    float& l_run, const int* kpos, int qpos,
                                                    float scale_log2, int t4) {
  // The row's max in the exp2 domain.
  float mx;
  if constexpr (kMask) {
    mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[nt][2 * half + e];
        x = kpos[nt * 8 + 2 * t4 + e] <= qpos ? x * scale_log2 : -INFINITY;
        mx = fmaxf(mx, x);
      }
    }
    mx = quad_max(mx);
  } else {
    float mx4[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& m = mx4[(2 * nt + e) & 3];
        m = fmaxf(m, s[nt][2 * half + e]);
      }
    }
    mx = quad_max(fmaxf(fmaxf(mx4[0], mx4[1]), fmaxf(mx4[2], mx4[3]))) * scale_log2;
  }
  const float m_new = fmaxf(m_run, mx);
  const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: no NaN
  const float alpha = exp2_ftz(m_run - m_use);
  m_run = m_new;
  float sum = 0.f;
  if constexpr (kMask) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[nt][2 * half + e];
        x = exp2_ftz(x - m_use);
        sum += x;
      }
    }
  } else {
    float sum4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[nt][2 * half + e];
        x = exp2_ftz(fmaf(x, scale_log2, -m_use));
        sum4[(2 * nt + e) & 3] += x;
      }
    }
    sum = (sum4[0] + sum4[1]) + (sum4[2] + sum4[3]);
  }
  l_run = l_run * alpha + sum;
  return alpha;
}

// One key tile of the exp2-domain online softmax for a thread's two rows, S in the fragment
// layout of warp_gemm_abt (kpos: the positions of the warp's 8 * kNT key columns; qpos: the
// rows' positions, -1 for padding). Masks keys after the row's position, updates (m, l),
// rescales the O accumulators and leaves P = exp2(S * scale_log2 - m) in s. kMask = false
// (many-rows kernel, a tile whose keys all precede the warp's rows, scale_log2 > 0) skips the
// compare, which then always holds, and fuses the scaling into the exponent's fma (see
// softmax_row_update).
template <int kNT, int kDT, bool kMask = true>
__device__ __forceinline__ void online_softmax_tile(float (&s)[kNT][4], float (&o)[kDT][4],
                                                    float (&m_run)[2], float (&l_run)[2],
                                                    const int* kpos, const int (&qpos)[2],
                                                    float scale_log2, int t4) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float alpha = softmax_row_update<kNT, kMask>(s, half, m_run[half], l_run[half], kpos,
                                                       qpos[half], scale_log2, t4);
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      o[dt][2 * half] *= alpha;
      o[dt][2 * half + 1] *= alpha;
    }
  }
}

// O[16 x D] += P[16 x 8 kNT] V[key0 .., D] for one warp: P from the softmax fragments (rounded
// to T), V rows key0 .. key0 + 8 kNT - 1 of a swizzled tile through ldmatrix.trans.
template <typename T, int D, int kNT>
__device__ __forceinline__ void pv_tile(float (&o)[D / 8][4], const float (&s)[kNT][4],
                                        const T* sv, int key0, int lane) {
  static_assert(kNT % 2 == 0, "P V takes keys in k16 steps");
#pragma unroll
  for (int kk = 0; kk < kNT / 2; ++kk) {
    uint32_t a[4];
    a[0] = Dtype<T>::pack2(s[2 * kk][0], s[2 * kk][1]);
    a[1] = Dtype<T>::pack2(s[2 * kk][2], s[2 * kk][3]);
    a[2] = Dtype<T>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = Dtype<T>::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, sv + swz<D>(key0 + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                        dp * 16 + (lane >> 4) * 8));
      mma_16816<T>(o[2 * dp], a, bv[0], bv[1]);
      mma_16816<T>(o[2 * dp + 1], a, bv[2], bv[3]);
    }
  }
}

// The transposed few-rows step (query blocks of at most 8 rows: GQA <= 8 at Lq 1). S = Q K^T
// stays an m16 tile whose rows 8..15 are zero, but P V is computed as O^T[D x 8] += V^T[D x
// k16] P^T[k16 x 8]: D/16 mma m16n8k16 per k16 step instead of D/8, and D/4 accumulator floats
// per thread instead of D/2. The fragments meet without shuffles: P^T's B fragment (thread
// (g, t4) = (lane/4, lane%4) holds keys 2t4, 2t4+1 and 2t4+8, 2t4+9 of row g) is exactly row g
// of S's accumulator fragment. The O^T accumulator o[mt] of a thread holds O^T[16 mt + g][row
// 2t4], [16 mt + g][2t4 + 1], [16 mt + g + 8][2t4], [16 mt + g + 8][2t4 + 1].
__host__ __device__ inline bool transposed_rows(int lq, int query_block, int group) {
  return (lq < query_block ? lq : query_block) * group <= 8;
}

// online_softmax_tile for the transposed step: one row per thread (row lane/4, the S values
// s[nt][0..1]: softmax_row_update's first half); the O^T columns of a thread are rows 2t4 and
// 2t4 + 1, whose rescale factors come from lanes 8 t4 and 8 t4 + 4.
template <int kNT, int kMT>
__device__ __forceinline__ void online_softmax_tile_t(float (&s)[kNT][4], float (&ot)[kMT][4],
                                                      float& m_run, float& l_run, const int* kpos,
                                                      int qpos, float scale_log2, int lane) {
  const int t4 = lane & 3;
  const float alpha =
      softmax_row_update<kNT, true>(s, 0, m_run, l_run, kpos, qpos, scale_log2, t4);
  const float alpha0 = __shfl_sync(0xffffffffu, alpha, 8 * t4);      // row 2 t4
  const float alpha1 = __shfl_sync(0xffffffffu, alpha, 8 * t4 + 4);  // row 2 t4 + 1
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    ot[mt][0] *= alpha0;
    ot[mt][1] *= alpha1;
    ot[mt][2] *= alpha0;
    ot[mt][3] *= alpha1;
  }
}

// O^T[D x 8] += V^T[D x 8 kNT] P^T for one warp: P^T's B fragments are row lane/4 of the softmax
// fragments (rounded to T), V^T's A fragments come from V rows key0 .. key0 + 8 kNT - 1 of a
// swizzled [key][D] tile through ldmatrix.trans: matrix j of the x4 (addresses of lanes 8j..8j+7)
// is keys 8 (j >> 1) + 0..7 at dims 16 mt + 8 (j & 1) + 0..7, transposed into a[j].
template <typename T, int D, int kNT>
__device__ __forceinline__ void pv_tile_t(float (&ot)[D / 16][4], const float (&s)[kNT][4],
                                          const T* sv, int key0, int lane) {
  static_assert(kNT % 2 == 0, "P V takes keys in k16 steps");
#pragma unroll
  for (int kk = 0; kk < kNT / 2; ++kk) {
    const uint32_t b0 = Dtype<T>::pack2(s[2 * kk][0], s[2 * kk][1]);
    const uint32_t b1 = Dtype<T>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, sv + swz<D>(key0 + kk * 16 + (lane & 7) + ((lane >> 4) << 3),
                                       mt * 16 + ((lane >> 3) & 1) * 8));
      mma_16816<T>(ot[mt], a, b0, b1);
    }
  }
}

// One CTA per output row: lse-weighted sum of the splits' normalised partial outputs.
// Warp w takes splits w, w + kWarps, ... kBatch at a time (a lane owns D/32 contiguous dims):
// a batch's lse values and output rows are all loaded before any of them is used, so a row of
// up to kWarps * kBatch splits costs one round trip to memory, not one for the maxima and then
// one per few splits. Each warp keeps its own running maximum (rescaling its sum when a batch
// raises it); the warps then meet through shared memory. Splits left without keys carry lse
// -inf and weigh zero; a row whose splits all do gets zeros and lse -inf.
// launch_merge_splits picks 4 warps up to 16 splits, 16 warps of 4 up to 64 (the two-tile
// decode plans' ~50), else 16 warps of 8 (the O^T decode plan's ~100 one-tile splits: one
// round trip for up to 128).

template <int kPer>
__device__ __forceinline__ void load_part_row(const float* src, float (&v)[kPer]) {
  if constexpr (kPer % 4 == 0) {
#pragma unroll
    for (int e = 0; e < kPer; e += 4) {
      const float4 x = *reinterpret_cast<const float4*>(src + e);
      v[e] = x.x, v[e + 1] = x.y, v[e + 2] = x.z, v[e + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < kPer; e += 2) {
      const float2 x = *reinterpret_cast<const float2*>(src + e);
      v[e] = x.x, v[e + 1] = x.y;
    }
  }
}

template <typename T, int D, int kWarps, int kBatch>
__global__ void __launch_bounds__(kWarps * 32) merge_splits_kernel(AttnParams p) {
  static_assert(D % 64 == 0, "a lane owns an even number of dims");
  constexpr int kPer = D / 32;
  __shared__ float s_max[kWarps];
  __shared__ float s_sum[kWarps];
  __shared__ float s_acc[kWarps][D];
  const int64_t n_rows = static_cast<int64_t>(p.batch) * p.hq * p.lq;
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  grid_dependency_wait();  // launched early (attend): the partials are read past the wait

  float m = -INFINITY, sum = 0.f, acc[kPer];
#pragma unroll
  for (int e = 0; e < kPer; ++e) acc[e] = 0.f;
  for (int s0 = warp; s0 < p.num_splits; s0 += kWarps * kBatch) {
    float l[kBatch], v[kBatch][kPer];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int64_t s = s0 + j * kWarps;
      l[j] = -INFINITY;
#pragma unroll
      for (int e = 0; e < kPer; ++e) v[j][e] = 0.f;
      if (s < p.num_splits) {
        l[j] = p.lse_part[s * n_rows + row];
        load_part_row<kPer>(p.o_part + (s * n_rows + row) * D + lane * kPer, v[j]);
      }
    }
    float mb = m;
#pragma unroll
    for (int j = 0; j < kBatch; ++j) mb = fmaxf(mb, l[j]);
    if (mb == -INFINITY) continue;  // nothing with keys yet
    const float c = expf(m - mb);   // 0 while m is -inf (sum and acc are 0 then)
    sum *= c;
#pragma unroll
    for (int e = 0; e < kPer; ++e) acc[e] *= c;
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const float w = expf(l[j] - mb);  // 0 for a split without keys or past the last
      sum += w;
#pragma unroll
      for (int e = 0; e < kPer; ++e) acc[e] += w * v[j][e];
    }
    m = mb;
  }
#pragma unroll
  for (int e = 0; e < kPer; ++e) s_acc[warp][lane * kPer + e] = acc[e];
  if (lane == 0) {
    s_max[warp] = m;
    s_sum[warp] = sum;
  }
  __syncthreads();

  float m_all = s_max[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m_all = fmaxf(m_all, s_max[w]);
  float scale[kWarps], total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    scale[w] = s_max[w] == -INFINITY ? 0.f : expf(s_max[w] - m_all);
    total += scale[w] * s_sum[w];
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* dst = static_cast<T*>(p.out) + row * D;
  for (int d = threadIdx.x; d < D; d += kWarps * 32) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += scale[w] * s_acc[w][d];
    dst[d] = Dtype<T>::from_float(o * inv);
  }
  if (threadIdx.x == 0) p.lse[row] = total > 0.f ? m_all + logf(total) : -INFINITY;
}

template <typename T, int D>
cudaError_t launch_merge_splits(const AttnParams& p, cudaStream_t stream, bool early = false) {
  const unsigned rows = static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.hq * p.lq);
  if (p.num_splits > 64) {
    return launch_maybe_early(merge_splits_kernel<T, D, 16, 8>, dim3(rows), dim3(16 * 32), 0,
                              stream, early, p);
  } else if (p.num_splits > 16) {
    return launch_maybe_early(merge_splits_kernel<T, D, 16, 4>, dim3(rows), dim3(16 * 32), 0,
                              stream, early, p);
  }
  return launch_maybe_early(merge_splits_kernel<T, D, 4, 4>, dim3(rows), dim3(4 * 32), 0,
                            stream, early, p);
}

}  // namespace reattention::kernels
