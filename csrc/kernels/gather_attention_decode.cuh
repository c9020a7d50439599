// gather_attention, few-rows kernel (decode: a query block of at most 16 rows, one m16 tile).
//
// One CTA of 4 warps owns (sequence b, kv head h, query block beta, a split of the gathered
// keys). The warps sit side by side over a 64-key tile, each with its own online softmax
// state; their (m, l, O) meet through shared memory at the end. K/V tiles go through two
// cp.async stages; each key is rotated in place with sincosf (a RoPE table's L2 loads would
// sit on the critical path of this memory-bound kernel, see gather_attention_prefill.cuh).
#pragma once

#include "gather_attention_common.cuh"

namespace reattention::kernels {

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
  const T *k_base, *v_base;
  kv_bases<T>(p, b, h, k_base, v_base);
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

}  // namespace reattention::kernels
