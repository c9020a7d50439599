// CUDA launchers of the three reattention ops: the shared input check (common.h), the dtype
// and head-dim dispatch, workspaces sized from static shapes only, the current stream, and
// registration for the CUDA dispatch key. The kernels are torch-free templates in
// csrc/kernels/; the attention and selection ones are instantiated per (dtype, head dim) in
// csrc/cuda/inst_*.cu so the build compiles them in parallel.
//
// Nothing here reads device memory on the host, so a decode step (select_chunks +
// gather_attention) can be captured in a CUDA graph.
#ifndef USE_CUDA
#define USE_CUDA  // exposes the CUDA part of the stable C shim (current stream)
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "kernels/chunk_reps.cuh"
#include "kernels/gather_attention.cuh"
#include "kernels/select_chunks.cuh"

namespace reattention::kernels {
#define REATTENTION_EXTERN(T, D)                                                             \
  extern template cudaError_t launch_select_chunks<T, D>(const SelectParams&, RepMode,       \
                                                         cudaStream_t);                      \
  extern template cudaError_t launch_gather_attention<T, D>(const AttnParams&, cudaStream_t);
REATTENTION_EXTERN(__half, 64)
REATTENTION_EXTERN(__half, 128)
REATTENTION_EXTERN(__half, 256)
REATTENTION_EXTERN(__nv_bfloat16, 64)
REATTENTION_EXTERN(__nv_bfloat16, 128)
REATTENTION_EXTERN(__nv_bfloat16, 256)
#undef REATTENTION_EXTERN
}  // namespace reattention::kernels

namespace reattention {
namespace {

namespace k = reattention::kernels;

// Calls f(TypeTag<T>{}, std::integral_constant<int, D>{}) for the CUDA kernel types.
template <typename F>
void dispatch_kernel(ScalarType dtype, int64_t head_dim, const char* op, F&& f) {
  STD_TORCH_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16, "reattention::", op,
                  " (cuda) takes float16 or bfloat16 tensors, got ",
                  torch::headeronly::toString(dtype),
                  "; run float32 on the triton, cpu or reference backend");
  auto with_dim = [&](auto tag) {
    switch (head_dim) {
      case 64:
        return f(tag, std::integral_constant<int, 64>{});
      case 128:
        return f(tag, std::integral_constant<int, 128>{});
      case 256:
        return f(tag, std::integral_constant<int, 256>{});
      default:
        STD_TORCH_CHECK(false, "reattention::", op, " (cuda) supports head dims 64, 128 and 256, got ",
                        head_dim);
    }
  };
  if (dtype == ScalarType::Half) {
    with_dim(TypeTag<__half>{});
  } else {
    with_dim(TypeTag<__nv_bfloat16>{});
  }
}

cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  // Checked by hand: the STABLE_TORCH_ERROR_CODE_CHECK macro is missing from torch 2.11's headers.
  const AOTITorchError err = aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream);
  STD_TORCH_CHECK(err == AOTI_TORCH_SUCCESS, "reattention: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

int sm_count(int32_t device) {
  int n = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  STD_TORCH_CHECK(err == cudaSuccess, "cudaDeviceGetAttribute: ", cudaGetErrorString(err));
  return n;
}

void check_launch(cudaError_t err, const char* op) {
  STD_TORCH_CHECK(err == cudaSuccess, "reattention::", op, " CUDA kernel failed: ",
                  cudaGetErrorString(err));
}

// The kernels load 16-byte vectors along the last dim: it must be dense and every other
// stride a multiple of 8 elements. Anything else is copied once into a contiguous tensor.
Tensor vector_ready(const Tensor& t) {
  bool ok = t.stride(t.dim() - 1) == 1 ||  t.size(t.dim() - 1) == 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && t.stride(i) % 8 == 0;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(t.data_ptr());
  return ok && addr % 16 == 0 ? t : torch::stable::contiguous(t);
}

// Segment arithmetic runs in int32 on the device.
void check_int32_range(const Dims& d, int64_t sink, int64_t local, int64_t chunk, int64_t topk) {
  constexpr int64_t kLimit = int64_t{1} << 30;
  STD_TORCH_CHECK(d.nmax < kLimit && sink < kLimit && local < kLimit && chunk < kLimit &&
                      topk < kLimit && topk * chunk < kLimit,
                  "reattention (cuda): Nmax, sink, local, chunk and topk * chunk must stay below 2^30");
}

void chunk_reps_cuda(Tensor k_cache, Tensor cache_seqlens, Tensor reps, int64_t sink,
                     int64_t chunk, std::string rep, int64_t start_chunk) {
  const OpArgs a =
      chunk_reps_args(k_cache, cache_seqlens, reps, sink, chunk, rep, start_chunk);
  const Dims d = check_inputs(a);
  check_int32_range(d, sink, 0, chunk, 1);
  STD_TORCH_CHECK(k_cache.is_cuda(), "chunk_reps (cuda) needs CUDA tensors");
  const bool bound = a.rep == RepMode::kBound;
  STD_TORCH_CHECK(reps.stride(reps.dim() - 1) == 1 && (!bound || reps.stride(3) == d.d),
                  "reps must be dense in its last ", bound ? "two dims" : "dim");
  if (start_chunk >= d.n_chunks) return;
  torch::stable::accelerator::DeviceGuard guard(k_cache.get_device_index());
  const Tensor keys = vector_ready(k_cache);
  k::ChunkRepsParams p{};
  p.k = keys.data_ptr();
  // Kernels read lens[b] at offset b; a strided view from a direct torch.ops call is copied.
  const Tensor lens = torch::stable::contiguous(cache_seqlens);
  p.seqlens = static_cast<const int*>(lens.data_ptr());
  p.reps = reps.data_ptr();
  p.k_sb = keys.stride(0);
  p.k_sh = keys.stride(1);
  p.k_sn = keys.stride(2);
  p.r_sb = reps.stride(0);
  p.r_sh = reps.stride(1);
  p.r_sj = reps.stride(2);
  p.batch = static_cast<int>(d.batch);
  p.heads = static_cast<int>(d.hkv);
  p.n_chunks = static_cast<int>(d.n_chunks);
  p.sink = static_cast<int>(sink);
  p.chunk = static_cast<int>(chunk);
  p.start_chunk = static_cast<int>(start_chunk);
  p.mean = !bound;
  const cudaStream_t stream = current_stream(k_cache);
  dispatch_kernel(k_cache.scalar_type(), d.d, "chunk_reps", [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    check_launch(k::launch_chunk_reps<T, decltype(dim)::value>(p, stream), "chunk_reps");
  });
}

Tensor select_chunks_cuda(Tensor q, Tensor k_cache, std::optional<Tensor> reps,
                          Tensor cache_seqlens, int64_t sink, int64_t local, int64_t chunk,
                          int64_t topk, std::string rep, int64_t query_block) {
  const OpArgs a = select_chunks_args(q, k_cache, reps, cache_seqlens, sink, local, chunk, topk,
                                      rep, query_block);
  const Dims d = check_inputs(a);
  check_int32_range(d, sink, local, chunk, topk);
  STD_TORCH_CHECK(q.is_cuda(), "select_chunks (cuda) needs CUDA tensors");
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());

  const Tensor qv = vector_ready(q);
  const Tensor cols = a.rep == RepMode::kMax ? vector_ready(k_cache)
                                             : torch::stable::contiguous(*reps);
  Tensor idx = torch::stable::new_empty(q, {d.batch, d.hkv, d.n_blocks, topk},
                                        ScalarType::Int);
  k::SelectParams p{};
  p.q = qv.data_ptr();
  p.cols = cols.data_ptr();
  // Kernels read lens[b] at offset b; a strided view from a direct torch.ops call is copied.
  const Tensor lens = torch::stable::contiguous(cache_seqlens);
  p.seqlens = static_cast<const int*>(lens.data_ptr());
  p.idx = static_cast<int*>(idx.data_ptr());
  p.q_sb = qv.stride(0);
  p.q_sh = qv.stride(1);
  p.q_sl = qv.stride(2);
  p.c_sb = cols.stride(0);
  p.c_sh = cols.stride(1);
  p.c_sn = cols.stride(2);
  p.batch = static_cast<int>(d.batch);
  p.hq = static_cast<int>(d.hq);
  p.hkv = static_cast<int>(d.hkv);
  p.lq = static_cast<int>(d.lq);
  p.sink = static_cast<int>(sink);
  p.local = static_cast<int>(local);
  p.chunk = static_cast<int>(chunk);
  p.topk = static_cast<int>(topk);
  p.query_block = static_cast<int>(std::min(query_block, d.lq));
  p.n_blocks = static_cast<int>(d.n_blocks);
  // Every length is <= Nmax, so no sequence has more middle chunks than this.
  p.n_cols = static_cast<int>(segments(d.nmax, d.lq, sink, local, chunk).n_mid);
  k::plan_select(p, a.rep, static_cast<int>(d.d));
  const cudaStream_t stream = current_stream(q);
  Tensor scores = torch::stable::new_empty(
      q, {std::max<int64_t>(1, k::select_workspace_words(p, a.rep, static_cast<int>(d.d)))},
      ScalarType::Int);
  p.scores = static_cast<uint32_t*>(scores.data_ptr());
  if (p.atomic) {
    check_launch(cudaMemsetAsync(p.scores, 0, scores.numel() * sizeof(uint32_t), stream),
                 "select_chunks");
  }
  dispatch_kernel(q.scalar_type(), d.d, "select_chunks", [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    check_launch(k::launch_select_chunks<T, decltype(dim)::value>(p, a.rep, stream),
                 "select_chunks");
  });
  return idx;
}

std::tuple<Tensor, Tensor> gather_attention_cuda(Tensor q, Tensor k_cache, Tensor v_cache,
                                                 Tensor cache_seqlens, Tensor idx,
                                                 Tensor inv_freq, int64_t sink, int64_t local,
                                                 int64_t chunk, int64_t query_block,
                                                 double scale, double rope_scale,
                                                 std::string rope_style, std::string positions) {
  const OpArgs a = gather_attention_args(q, k_cache, v_cache, cache_seqlens, idx, inv_freq, sink,
                                        local, chunk, query_block);
  const Dims d = check_inputs(a);
  check_int32_range(d, sink, local, chunk, d.topk);
  STD_TORCH_CHECK(q.is_cuda(), "gather_attention (cuda) needs CUDA tensors");
  const bool interleaved = parse_rope_style(rope_style) == RopeStyle::kInterleaved;
  const bool compact = parse_positions(positions) == PosMode::kCompact;
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());

  const Tensor qv = vector_ready(q), kv = vector_ready(k_cache), vv = vector_ready(v_cache);
  const Tensor freqs = torch::stable::contiguous(inv_freq);
  Tensor out = torch::stable::new_empty(q, {d.batch, d.hq, d.lq, d.d});
  Tensor lse = torch::stable::new_empty(q, {d.batch, d.hq, d.lq}, ScalarType::Float);
  k::AttnParams p{};
  p.q = qv.data_ptr();
  p.k = kv.data_ptr();
  p.v = vv.data_ptr();
  // Kernels read lens[b] at offset b; a strided view from a direct torch.ops call is copied.
  const Tensor lens = torch::stable::contiguous(cache_seqlens);
  p.seqlens = static_cast<const int*>(lens.data_ptr());
  p.idx = static_cast<const int*>(idx.data_ptr());
  p.inv_freq = static_cast<const float*>(freqs.data_ptr());
  p.out = out.data_ptr();
  p.lse = static_cast<float*>(lse.data_ptr());
  p.q_sb = qv.stride(0);
  p.q_sh = qv.stride(1);
  p.q_sl = qv.stride(2);
  p.k_sb = kv.stride(0);
  p.k_sh = kv.stride(1);
  p.k_sn = kv.stride(2);
  p.v_sb = vv.stride(0);
  p.v_sh = vv.stride(1);
  p.v_sn = vv.stride(2);
  p.i_sb = idx.stride(0);
  p.i_sh = idx.stride(1);
  p.i_sblk = idx.stride(2);
  STD_TORCH_CHECK(idx.stride(3) == 1 || d.topk == 1, "idx must be dense in its last dim");
  p.batch = static_cast<int>(d.batch);
  p.hq = static_cast<int>(d.hq);
  p.hkv = static_cast<int>(d.hkv);
  p.lq = static_cast<int>(d.lq);
  p.nmax = static_cast<int>(d.nmax);
  p.topk = static_cast<int>(d.topk);
  p.sink = static_cast<int>(sink);
  p.local = static_cast<int>(local);
  p.chunk = static_cast<int>(chunk);
  p.query_block = static_cast<int>(std::min(query_block, d.lq));
  p.n_blocks = static_cast<int>(d.n_blocks);
  p.half_rot = static_cast<int>(d.half_rot);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.rope_scale = static_cast<float>(rope_scale);
  p.interleaved = interleaved;
  p.compact = compact;
  k::plan_attention(p, static_cast<int>(d.d), sm_count(q.get_device_index()));
  // Split workspace: its size depends on static shapes only (capturable in a CUDA graph).
  Tensor o_part, lse_part;
  if (p.num_splits > 1) {
    o_part = torch::stable::new_empty(q, {p.num_splits, d.batch, d.hq, d.lq, d.d},
                                      ScalarType::Float);
    lse_part = torch::stable::new_empty(q, {p.num_splits, d.batch, d.hq, d.lq},
                                        ScalarType::Float);
    p.o_part = static_cast<float*>(o_part.data_ptr());
    p.lse_part = static_cast<float*>(lse_part.data_ptr());
  }
  // RoPE table of the many-rows kernel, also sized from static shapes only.
  Tensor rope_table;
  if (const int64_t elems = k::rope_table_elems(p); elems > 0) {
    rope_table = torch::stable::new_empty(q, {2 * elems}, ScalarType::Float);
    p.rope_table = static_cast<float2*>(rope_table.data_ptr());
  }
  const cudaStream_t stream = current_stream(q);
  dispatch_kernel(q.scalar_type(), d.d, "gather_attention", [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    check_launch(k::launch_gather_attention<T, decltype(dim)::value>(p, stream),
                 "gather_attention");
  });
  return std::make_tuple(out, lse);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(reattention, CUDA, m) {
  m.impl("chunk_reps", TORCH_BOX(&chunk_reps_cuda));
  m.impl("select_chunks", TORCH_BOX(&select_chunks_cuda));
  m.impl("gather_attention", TORCH_BOX(&gather_attention_cuda));
}

}  // namespace reattention
