// gather_attention: fused gather + RoPE + attention over [sink | selected chunks | local].
//
// A CTA owns (sequence b, kv head h, query block beta, a tile of rows, a split of the gathered
// keys). Rows pack the block's queries with the group's q heads (row = query * group + head),
// so the GQA heads share every key tile and decode (Lq = 1) still forms an m16 tensor-core
// tile. Gathered key r maps to its cache token through the sink, the chunk ids in idx
// (ascending, -1 padded: the valid ones are a prefix) and the local window; cp.async copies K
// and V tiles straight from the [B, Hkv, Nmax, D] cache into swizzled shared memory, the CTA
// rotates the K tile in place (fp32 angles fl(pos * inv_freq), accurate sincosf, or in the
// prefill kernel for compact positions the same values from a table filled once per call) and
// the warps run QK^T and PV with mma.sync m16n8k16 and an online softmax in the exp2 domain.
// Masking compares original positions (key visible iff its position <= the query's), so
// padding rows (position -1) and tail keys (position INT_MAX) drop out.
//
// Two kernels: gather_attention_kernel here for decode (<= 16 rows per block: 4 warps side by
// side over a 64-key tile, each with its own softmax state, merged through shared memory at
// the end) and gather_attention_prefill_kernel (gather_attention_prefill.cuh) for more rows.
// When the grid is too small for the GPU the gathered keys are cut into splits whose
// normalised partial outputs and lse go to a workspace sized from static shapes, and
// merge_splits_kernel combines them; the decode step never syncs with the host.
#pragma once

#include <climits>

#include "device_utils.cuh"

namespace reattention::kernels {

struct AttnParams {
  const void* q;          // [B, Hq, Lq, D]
  const void* k;          // [B, Hkv, Nmax, D]
  const void* v;          // [B, Hkv, Nmax, D]
  const int* seqlens;     // [B]
  const int* idx;         // [B, Hkv, n_blocks, topk]
  const float* inv_freq;  // [R/2]
  void* out;              // [B, Hq, Lq, D] contiguous, q's dtype
  float* lse;             // [B, Hq, Lq] contiguous
  float* o_part;          // [splits, B, Hq, Lq, D] when num_splits > 1
  float* lse_part;        // [splits, B, Hq, Lq]
  float2* rope_table;     // [rope_table_elems(p)] (cos, sin) of the many-rows path, or null
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
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
};

constexpr int kAttnThreads = 128;

// Shared memory: Q tile, two K and V stages (reused by the epilogue's per-warp outputs), key
// positions, inverse frequencies, query positions, per-warp softmax state.
template <int D, int kWarpsN, int kBM, int kBN>
__host__ __device__ constexpr int attn_smem_bytes() {
  constexpr int stages = 2 * 2 * kBN * D * 2;
  constexpr int epilogue = kWarpsN * kBM * (D + 8) * 4;
  return kBM * D * 2 + (stages > epilogue ? stages : epilogue) + 2 * kBN * 4 + (D / 2) * 4 +
         kBM * 4 + 2 * kWarpsN * kBM * 4;
}

// Dims (d0, d1) rotated together by frequency i < R/2. Slots i in [R/2, D/2) name the
// pass-through pairs (2i, 2i + 1), which in the half style start at R = 2 * (R/2) as well.
__device__ __forceinline__ void rope_pair(int i, int half_rot, bool interleaved, int& d0, int& d1) {
  const bool split_halves = !interleaved && i < half_rot;
  d0 = split_halves ? i : 2 * i;
  d1 = split_halves ? i + half_rot : 2 * i + 1;
}

// What one CTA owns. Grid: x = query block * row_tiles + row tile, y = kv head * num_splits +
// split, z = sequence. Rows of a block: its queries times the group's q heads.
struct AttnTile {
  int beta, h, split, b, group;
  int q0;    // the block's first query
  int rows;  // the block's rows
  int row0;  // the CTA's first row (row0 >= rows: nothing to do)
};

__device__ __forceinline__ AttnTile attn_tile(const AttnParams& p, int block_m) {
  AttnTile t;
  t.beta = blockIdx.x / p.row_tiles;
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
// local window], and where each gathered key sits in the cache.
struct GatheredKeys {
  Segments seg;
  const int* sel;  // the block's chunk ids (ascending, -1 padded: the valid ones are a prefix)
  int p0;          // original position of the sequence's first query
  int loc0;        // gathered index of the local window
  int n_keys;      // gathered keys
  int shift;       // compact query position - original query position

  // Cache token of gathered key r (r < n_keys). Clamped so a malformed idx cannot read outside
  // the cache; a well-formed one never needs it.
  __device__ __forceinline__ int token(int r, const AttnParams& p) const {
    int tok;
    if (r < seg.sink_len) {
      tok = r;
    } else if (r < loc0) {
      const int c = (r - seg.sink_len) / p.chunk;
      tok = p.sink + sel[c] * p.chunk + (r - seg.sink_len - c * p.chunk);
    } else {
      tok = seg.mid_end + (r - loc0);
    }
    return min(max(tok, 0), p.nmax - 1);
  }
};

// The CTA's gathered sequence: counts the block's selected chunks (in *s_nsel) and stages the
// inverse frequencies, zero past R/2, in s_invf[D / 2]. Every thread calls it (two barriers).
template <int D, int kThreads>
__device__ __forceinline__ GatheredKeys gathered_keys(const AttnParams& p, int b, int h,
                                                      int beta, float* s_invf, int* s_nsel) {
  GatheredKeys g;
  const int n = p.seqlens[b];
  g.seg = segments(n, p.lq, p.sink, p.local, p.chunk);
  g.p0 = n - p.lq;
  g.sel = p.idx + b * p.i_sb + h * p.i_sh + beta * p.i_sblk;
  if (threadIdx.x == 0) *s_nsel = 0;
  __syncthreads();
  int mine = 0;
  for (int i = threadIdx.x; i < p.topk; i += kThreads) mine += g.sel[i] >= 0;
  if (mine) atomicAdd(s_nsel, mine);
  for (int i = threadIdx.x; i < D / 2; i += kThreads) {
    s_invf[i] = i < p.half_rot ? p.inv_freq[i] : 0.f;
  }
  __syncthreads();
  const int n_sel = *s_nsel;
  g.loc0 = g.seg.sink_len + n_sel * p.chunk;
  g.n_keys = g.loc0 + max(0, n - g.seg.mid_end);
  g.shift = p.sink + n_sel * p.chunk - g.seg.mid_end;
  return g;
}

// Copies the K and V rows of gathered keys [tile * kBN, tile * kBN + kBN) from the cache into
// the swizzled tiles sk and sv (cp.async, one commit group; zero-filled past n_keys) and their
// cache tokens into kpos (INT_MAX past n_keys, so the mask drops them).
template <typename T, int D, int kBN, int kThreads>
__device__ __forceinline__ void load_kv_tile(T* sk, T* sv, int* kpos, const GatheredKeys& g,
                                             const AttnParams& p, const T* k_base,
                                             const T* v_base, int tile) {
  for (int id = threadIdx.x; id < kBN * (D / 8); id += kThreads) {
    const int r = id / (D / 8), ch = id % (D / 8);
    const int key = tile * kBN + r;
    const bool valid = key < g.n_keys;
    const int tok = valid ? g.token(key, p) : 0;
    cp_async_16(sk + swz<D>(r, ch * 8), k_base + tok * p.k_sn + ch * 8, valid);
    cp_async_16(sv + swz<D>(r, ch * 8), v_base + tok * p.v_sn + ch * 8, valid);
    if (ch == 0) kpos[r] = valid ? tok : INT_MAX;
  }
  cp_async_commit();
}

}  // namespace reattention::kernels

// The many-rows (prefill) kernel; it needs AttnParams and rope_pair above.
#include "gather_attention_prefill.cuh"

namespace reattention::kernels {

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads) gather_attention_kernel(AttnParams p) {
  constexpr TileShape kTile = kFewRowsTile;
  constexpr int kWarpsN = kTile.warps_n;
  constexpr int kBM = kTile.block_m, kBN = kTile.block_n;
  constexpr int kNW = kBN / kWarpsN;  // keys per warp per tile
  constexpr int kNT = kNW / 8;
  constexpr int kDT = D / 8;          // 8-wide output column tiles
  constexpr int kOStride = D + 8;     // epilogue row stride (floats), off the bank period
  static_assert(kNW % 16 == 0, "each warp needs whole k16 steps of keys for PV");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_kv = s_q + kBM * D;  // K stage 0, K stage 1, V stage 0, V stage 1
  constexpr int kStageBytes = 2 * 2 * kBN * D * 2;
  constexpr int kEpiBytes = kWarpsN * kBM * kOStride * 4;
  float* s_o = reinterpret_cast<float*>(s_kv);
  int* s_kpos = reinterpret_cast<int*>(reinterpret_cast<unsigned char*>(s_kv) +
                                       (kStageBytes > kEpiBytes ? kStageBytes : kEpiBytes));
  float* s_invf = reinterpret_cast<float*>(s_kpos + 2 * kBN);
  int* s_qpos = reinterpret_cast<int*>(s_invf + D / 2);
  float* s_m = reinterpret_cast<float*>(s_qpos + kBM);
  float* s_l = s_m + kWarpsN * kBM;
  __shared__ int s_nsel;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const AttnTile at = attn_tile(p, kBM);
  if (at.row0 >= at.rows) return;
  const int beta = at.beta, h = at.h, split = at.split, b = at.b, group = at.group;
  const int q0 = at.q0, rows = at.rows, row0 = at.row0;

  const GatheredKeys gk = gathered_keys<D, kAttnThreads>(p, b, h, beta, s_invf, &s_nsel);
  const int n_keys = gk.n_keys;
  const T* k_base = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  auto load_tile = [&](int stage, int tile) {
    load_kv_tile<T, D, kBN, kAttnThreads>(s_kv + stage * kBN * D, s_kv + (2 + stage) * kBN * D,
                                          s_kpos + stage * kBN, gk, p, k_base, v_base, tile);
  };

  const int n_tiles = (n_keys + kBN - 1) / kBN;
  const int t_begin = split * p.tiles_per_split;
  const int t_end = min(n_tiles, t_begin + p.tiles_per_split);
  // The first two tiles are in flight while the Q rows are loaded and rotated. Every loop
  // iteration then commits exactly one copy group (empty past the end), so "at most one
  // group pending" always means the current tile has landed.
  if (t_begin < t_end) load_tile(0, t_begin); else cp_async_commit();
  if (t_begin + 1 < t_end) load_tile(1, t_begin + 1); else cp_async_commit();

  stage_rotated_q<T, D, kBM, kAttnThreads, true>(s_q, s_qpos, p, gk, b, h, group, q0, row0,
                                                  rows, s_invf, nullptr, 0);

  float o[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
  }
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const int g = lane >> 2, t4 = lane & 3;
  const int ra = wm * 16 + g;  // this thread's two rows in the tile: ra and ra + 8

  for (int tile = t_begin; tile < t_end; ++tile) {
    const int stage = (tile - t_begin) & 1;
    cp_async_wait<1>();
    __syncthreads();

    T* sk = s_kv + stage * kBN * D;
    const T* sv = s_kv + (2 + stage) * kBN * D;
    const int* kpos = s_kpos + stage * kBN;
    for (int r = warp; r < kBN; r += kAttnThreads / 32) {
      const int key = tile * kBN + r;
      if (key >= n_keys) break;
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
    __syncthreads();

    float s[kNT][4];
    warp_gemm_abt<T, D, kNT>(s, s_q, wm * 16, sk, wn * kNW, lane);

    const int qpos[2] = {s_qpos[ra], s_qpos[ra + 8]};
    online_softmax_tile(s, o, m_run, l_run, kpos + wn * kNW, qpos, p.scale_log2, t4);
    pv_tile<T, D>(o, s, sv, wn * kNW, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
    if (tile + 2 < t_end) load_tile(stage, tile + 2); else cp_async_commit();
  }

  // Epilogue: per-warp (m, l, unnormalised O) through shared memory, merged over the warps
  // that split the key tile, normalised, written as the output or as this split's partial.
  cp_async_wait<0>();  // only empty groups can be left; s_o overlays the K/V stages
  __syncthreads();
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

// One CTA per output row: lse-weighted sum of the splits' normalised partial outputs. The
// splits are spread over the CTA (warp w takes splits w, w + 4, ...; a lane owns D/32 dims)
// so their loads are in flight together instead of one dependent load per split.
constexpr int kMergeWarps = 4;

template <typename T, int D>
__global__ void __launch_bounds__(kMergeWarps * 32) merge_splits_kernel(AttnParams p) {
  constexpr int kPer = D / 32;  // contiguous dims per lane
  __shared__ float s_part_max[kMergeWarps];
  __shared__ float s_sum[kMergeWarps];
  __shared__ float s_acc[kMergeWarps][D];
  const int64_t n_rows = static_cast<int64_t>(p.batch) * p.hq * p.lq;
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  float m = -INFINITY;
  for (int s = threadIdx.x; s < p.num_splits; s += kMergeWarps * 32) {
    m = fmaxf(m, p.lse_part[s * n_rows + row]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) s_part_max[warp] = m;
  __syncthreads();
  float m_all = s_part_max[0];
#pragma unroll
  for (int w = 1; w < kMergeWarps; ++w) m_all = fmaxf(m_all, s_part_max[w]);

  float acc[kPer], sum = 0.f;
#pragma unroll
  for (int e = 0; e < kPer; ++e) acc[e] = 0.f;
  if (m_all != -INFINITY) {
#pragma unroll 4
    for (int s = warp; s < p.num_splits; s += kMergeWarps) {
      const float w = expf(p.lse_part[s * n_rows + row] - m_all);
      const float* src = p.o_part + (s * n_rows + row) * D + lane * kPer;
      sum += w;
#pragma unroll
      for (int e = 0; e < kPer; ++e) acc[e] += w * src[e];
    }
  }
#pragma unroll
  for (int e = 0; e < kPer; ++e) s_acc[warp][lane * kPer + e] = acc[e];
  if (lane == 0) s_sum[warp] = sum;
  __syncthreads();

  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kMergeWarps; ++w) total += s_sum[w];
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* dst = static_cast<T*>(p.out) + row * D;
  for (int d = threadIdx.x; d < D; d += kMergeWarps * 32) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kMergeWarps; ++w) o += s_acc[w][d];
    dst[d] = Dtype<T>::from_float(o * inv);
  }
  if (threadIdx.x == 0) p.lse[row] = total > 0.f ? m_all + logf(total) : -INFINITY;
}

template <typename T, int D>
cudaError_t launch_decode_attention(const AttnParams& p, cudaStream_t stream) {
  constexpr TileShape kTile = kFewRowsTile;
  constexpr int smem = attn_smem_bytes<D, kTile.warps_n, kTile.block_m, kTile.block_n>();
  auto kernel = gather_attention_kernel<T, D>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.n_blocks * p.row_tiles, p.hkv * p.num_splits, p.batch);
  kernel<<<grid, kAttnThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Host-side plan: row_tiles, num_splits and tiles_per_split of the decode (<= 16 rows) or the
// prefill kernel, from static shapes only (the longest gathered sequence any length in
// [Lq, Nmax] can produce), so the workspace size never depends on device data.
inline void plan_attention(AttnParams& p, int head_dim, int num_sms) {
  const int group = p.hq / p.hkv;
  const bool decode = few_rows(p.lq, p.query_block, group);
  const int block_m = decode ? kFewRowsTile.block_m : kPrefillBlockM;
  const int block_n = decode ? kFewRowsTile.block_n : prefill_block_n(head_dim);
  const int rows = (p.lq < p.query_block ? p.lq : p.query_block) * group;
  p.row_tiles = (rows + block_m - 1) / block_m;
  const int64_t tiles_max = (gathered_keys_max(p) + block_n - 1) / block_n;
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.hkv * p.n_blocks * p.row_tiles;
  // Aim for about three CTAs per SM; never more splits than key tiles.
  int64_t splits = (3 * static_cast<int64_t>(num_sms) + ctas - 1) / ctas;
  splits = splits < 1 ? 1 : (splits > tiles_max ? tiles_max : splits);
  splits = splits > 1024 ? 1024 : splits;
  const int64_t per = (tiles_max + splits - 1) / splits;
  p.tiles_per_split = static_cast<int>(per < 1 ? 1 : per);
  p.num_splits = static_cast<int>(per < 1 ? 1 : (tiles_max + per - 1) / per);
}

template <typename T, int D>
cudaError_t launch_gather_attention(const AttnParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.hq == 0 || p.lq == 0) return cudaSuccess;
  const bool decode = few_rows(p.lq, p.query_block, p.hq / p.hkv);
  cudaError_t err = decode ? launch_decode_attention<T, D>(p, stream)
                           : launch_prefill_attention<T, D>(p, stream);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t n_rows = static_cast<int64_t>(p.batch) * p.hq * p.lq;
  merge_splits_kernel<T, D><<<static_cast<unsigned>(n_rows), kMergeWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace reattention::kernels
