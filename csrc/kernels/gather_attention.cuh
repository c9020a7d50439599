// gather_attention: fused gather + RoPE + attention over [sink | selected chunks | local].
//
// A CTA owns (sequence b, kv head h, query block beta, a tile of rows, a split of the gathered
// keys). Two kernels share gather_attention_common.cuh: the few-rows one for decode
// (gather_attention_decode.cuh) and the many-rows one for prefill blocks
// (gather_attention_prefill.cuh; its sm_90a version and key pre-pass, in
// gather_attention_prefill_sm90.cuh, build on it). Each query block has its own segments
// (contract v2), so a block gathers at most scope() keys whatever Lq is. This header plans the
// row tiles and key splits from static shapes only (that bound), so workspaces never depend on
// device data and the decode step never syncs with the host, and launches the kernel (for many
// rows, the sm_90a one where it is usable), then merge_splits_kernel when the keys are split.
#pragma once

#include "gather_attention_decode.cuh"
#include "gather_attention_prefill.cuh"
#include "gather_attention_prefill_sm90.cuh"

namespace reattention::kernels {

// Host-side plan: row_tiles, num_splits and tiles_per_split of the decode (<= 16 rows) or the
// prefill kernel, from static shapes only (the longest gathered sequence of any block at any
// length in [Lq, Nmax]), so the workspace size never depends on device data.
// The kernels aim for about three CTAs per SM, except the transposed decode kernel (<= 8 rows)
// where the CTAs per SM that its one-stage shared memory and register bound allow
// (attn_t_ctas_per_sm: 6 at D 128 on an H200) need no more splits than key tiles: then every
// split is one key tile (the kernel keeps one K/V stage), about that many CTAs per SM (the
// decode step at batch 1). Otherwise it runs two stages on the three-per-SM plan.
// pair_tiles: that one-stage plan gives every split two key tiles instead (half the CTAs, each
// refilling its one stage after P V); the op layer asks for it where the decode top-k is never
// fused (ops_cuda.cu, prepare_attention).
// num_sms, smem_per_sm: the device's SMs and shared memory per SM (bytes).
inline void plan_attention(AttnParams& p, int head_dim, int num_sms, int smem_per_sm,
                           bool pair_tiles = false) {
  const int group = p.hq / p.hkv;
  const bool decode = few_rows(p.lq, p.query_block, group);
  const bool transposed = decode && transposed_rows(p.lq, p.query_block, group);
  const int block_m = transposed ? kRowsT : decode ? kFewRowsTile.block_m : kPrefillBlockM;
  const int block_n = decode ? kFewRowsTile.block_n : prefill_block_n(head_dim);
  const int rows = (p.lq < p.query_block ? p.lq : p.query_block) * group;
  p.row_tiles = (rows + block_m - 1) / block_m;
  const int64_t tiles_max = (gathered_keys_max(p) + block_n - 1) / block_n;
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.hkv * p.n_blocks * p.row_tiles;
  // Never more splits than key tiles, nor than 1024.
  auto splits_for = [&](int per_sm) {
    int64_t splits = (per_sm * static_cast<int64_t>(num_sms) + ctas - 1) / ctas;
    splits = splits < 1 ? 1 : (splits > tiles_max ? tiles_max : splits);
    return splits > 1024 ? int64_t{1024} : splits;
  };
  if (transposed) {
    if (splits_for(attn_t_ctas_per_sm(head_dim, 1, smem_per_sm)) >= tiles_max) {
      p.tiles_per_split = pair_tiles ? 2 : 1;
      p.num_splits = static_cast<int>(
          tiles_max < 1 ? 1 : (tiles_max + p.tiles_per_split - 1) / p.tiles_per_split);
      p.kv_stages = 1;
      return;
    }
  }
  const int64_t splits = splits_for(3);
  const int64_t per = (tiles_max + splits - 1) / splits;
  p.tiles_per_split = static_cast<int>(per < 1 ? 1 : per);
  p.num_splits = static_cast<int>(per < 1 ? 1 : (tiles_max + per - 1) / per);
  p.kv_stages = attn_stages(transposed, p.tiles_per_split);
}

// Launches the many-rows kernel on plan_attention's row tiles (kBM rows) and splits (the
// o_part/lse_part workspace is sized by them; splits left without tiles write lse -inf, which
// merge_splits_kernel weighs as zero): the sm_90a pre-pass and kernel where prefill_sm90_usable
// says so and the op layer gave the rotated-K workspace (prerot_elems), else
// gather_attention_prefill_kernel.
template <typename T, int D>
cudaError_t launch_prefill_attention(const AttnParams& p, cudaStream_t stream) {
  int n_pos = 0;
  cudaError_t err = launch_rope_table(p, &n_pos, stream);
  if (err != cudaSuccess) return err;
  bool sm90 = false;
  if ((err = prefill_sm90_usable<T, D>(&sm90)) != cudaSuccess) return err;
  if (sm90 && p.k_rot != nullptr) return launch_prefill_sm90<T, D>(p, n_pos, stream);
  constexpr int smem = prefill_smem_bytes<D>();
  auto kernel = gather_attention_prefill_kernel<T, D>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.n_blocks * p.row_tiles, p.hkv * p.num_splits, p.batch);
  kernel<<<grid, kPrefillThreads, smem, stream>>>(p, p.rope_table, n_pos);
  return cudaGetLastError();
}

// overlap (decode calls only, see launch_decode_attention): the attention runs beside the
// selection launched just before it, and the merge is launched as its programmatic dependent.
template <typename T, int D>
cudaError_t launch_gather_attention(const AttnParams& p, cudaStream_t stream,
                                    bool overlap = false) {
  if (p.batch == 0 || p.hq == 0 || p.lq == 0) return cudaSuccess;
  const bool decode = few_rows(p.lq, p.query_block, p.hq / p.hkv);
  cudaError_t err = decode ? launch_decode_attention<T, D>(p, stream, overlap)
                           : launch_prefill_attention<T, D>(p, stream);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  // An overlapped decode attention lets its merge start as its last CTAs write their partials.
  return launch_merge_splits<T, D>(p, stream, overlap && decode);
}

}  // namespace reattention::kernels
