// The tiered cache's device ops (docs/design.md section 3.7), both free of host syncs so a decode
// step stays capturable in a CUDA graph. Pinned host memory is read or written in place: a
// pinned allocation's host pointer is valid on the device (unified virtual addressing).
//
// copy_pages: dst[dst_index[i]] = src[src_index[i]] for every i whose mask is set, one CTA per
// i; one of dst/src may be a pinned CPU tensor. Entries whose indices fall outside their tensor
// are skipped, so a bad index never reads or writes out of bounds.
//
// tiered_fetch: makes the pages a call selected resident on the GPU, in four phases run by one
// CTA (the bookkeeping: a few thousand entries), then a copy kernel of one CTA per missing page:
//   1. classify each selected (sequence, chunk) entry against the table: window or sink page
//      (not counted), hot page (a hit: its stamp becomes this step) or absent (a miss);
//   2. claim each absent page for one of its entries (atomicCAS of the table entry to -2 - e),
//      so a page selected by several query blocks is fetched once; winners are ranked in
//      entry order;
//   3. victims: the first M hot pages, from a rotating cursor, not used this step (a hot set of
//      at least one call's selection always has them);
//   4. winner r takes victim r: the victim's old page becomes absent, the winner's page points
//      at the victim, and (host page, device page) goes to the copy list.
// csrc/cpu/tiered_fetch.cpp runs the same phases in order on the CPU.
#ifndef USE_CUDA
#define USE_CUDA  // exposes the CUDA part of the stable C shim (current stream)
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

#include "common.h"
#include "tiered.h"

namespace reattention {
namespace {

constexpr int kCopyThreads = 256;

template <typename Vec>
__global__ void __launch_bounds__(kCopyThreads)
    copy_pages_kernel(Vec* dst, const Vec* src, const int64_t* dst_index,
                      const int64_t* src_index, const bool* mask, int64_t n_dst, int64_t n_src,
                      int64_t page_vecs) {
  const int64_t i = blockIdx.x;
  if (mask != nullptr && !mask[i]) return;
  const int64_t d = dst_index[i], s = src_index[i];
  if (d < 0 || d >= n_dst || s < 0 || s >= n_src) return;
  Vec* out = dst + d * page_vecs;
  const Vec* in = src + s * page_vecs;
  for (int64_t e = threadIdx.x; e < page_vecs; e += kCopyThreads) out[e] = in[e];
}

bool is_pinned_host(const void* p) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();  // a pageable pointer may set an error: clear it
    return false;
  }
  return attr.type == cudaMemoryTypeHost;
}

void copy_pages_cuda(Tensor dst, Tensor src, Tensor dst_index, Tensor src_index,
                     std::optional<Tensor> mask) {
  check_copy_pages(dst, src, dst_index, src_index, mask);
  STD_TORCH_CHECK(dst_index.is_cuda() && src_index.is_cuda() && (!mask || mask->is_cuda()),
                  "copy_pages (cuda): dst_index, src_index and mask must be CUDA tensors");
  const Tensor& on_gpu = dst.is_cuda() ? dst : src;
  STD_TORCH_CHECK(on_gpu.is_cuda(), "copy_pages (cuda): dst or src must be a CUDA tensor");
  for (const Tensor* t : {&dst, &src}) {
    if (!t->is_cuda() && t->numel() > 0)
      STD_TORCH_CHECK(is_pinned_host(t->data_ptr()),
                      "copy_pages (cuda): a CPU dst or src must be in pinned memory");
  }
  const int64_t l = dst_index.size(0);
  if (l == 0 || dst.numel() == 0 || src.numel() == 0) return;
  const int64_t page_bytes = (dst.numel() / dst.size(0)) * static_cast<int64_t>(dst.element_size());
  torch::stable::accelerator::DeviceGuard guard(on_gpu.get_device_index());
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(on_gpu.get_device_index(), &stream) ==
                      AOTI_TORCH_SUCCESS,
                  "copy_pages: could not get the current CUDA stream");
  const bool* m = mask ? static_cast<const bool*>(mask->data_ptr()) : nullptr;
  const auto* di = static_cast<const int64_t*>(dst_index.data_ptr());
  const auto* si = static_cast<const int64_t*>(src_index.data_ptr());
  const uintptr_t align = reinterpret_cast<uintptr_t>(dst.data_ptr()) |
                          reinterpret_cast<uintptr_t>(src.data_ptr()) |
                          static_cast<uintptr_t>(page_bytes);
  auto launch = [&](auto vec) {
    using Vec = decltype(vec);
    copy_pages_kernel<Vec><<<static_cast<unsigned>(l), kCopyThreads, 0,
                             static_cast<cudaStream_t>(stream)>>>(
        static_cast<Vec*>(dst.data_ptr()), static_cast<const Vec*>(src.data_ptr()), di, si, m,
        dst.size(0), src.size(0), page_bytes / static_cast<int64_t>(sizeof(Vec)));
  };
  if (align % sizeof(uint4) == 0) {
    launch(uint4{});
  } else {
    launch(static_cast<unsigned char>(0));
  }
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "copy_pages CUDA kernel failed: ", cudaGetErrorString(err));
}

constexpr int kPlanThreads = 1024;

// Exclusive prefix sum of one int per thread over the CTA; *total gets the sum.
__device__ int64_t block_exclusive_scan(int64_t x, int64_t* total) {
  __shared__ int64_t warp_sums[kPlanThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t incl = x;
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < kPlanThreads / 32 ? warp_sums[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const int64_t before = (warp > 0 ? warp_sums[warp - 1] : 0) + incl - x;
  *total = warp_sums[kPlanThreads / 32 - 1];
  __syncthreads();  // warp_sums is reused by the next scan
  return before;
}

struct FetchArgs {
  const int32_t* idx;
  int32_t* table;
  int64_t* owner;
  int64_t* stamp;
  int64_t* state;
  int64_t* jobs;
  int64_t per_seq, entries, max_pages, n_hot, sink_pages, hot_base, absent, pages_per_chunk;
};

__device__ int64_t fetch_flat(const FetchArgs& a, int64_t e) {
  const int64_t page = entry_page(a.idx, e, a.pages_per_chunk, a.sink_pages, a.max_pages);
  return page < 0 ? -1 : (e / a.per_seq) * a.max_pages + page;
}

__global__ void __launch_bounds__(kPlanThreads) tiered_plan_kernel(FetchArgs a) {
  __shared__ int64_t s_step, s_cursor;
  const int tid = threadIdx.x;
  if (tid == 0) {
    s_step = a.state[kStateStep] + 1;
    s_cursor = a.state[kStateCursor];
  }
  __syncthreads();
  const int64_t step = s_step;
  // Phase 1.
  int64_t lookups = 0, hits = 0;
  for (int64_t e = tid; e < a.entries; e += kPlanThreads) {
    const int64_t fp = fetch_flat(a, e);
    if (fp < 0) continue;
    const int64_t slot = a.table[fp];
    if (slot != a.absent && slot < a.hot_base) continue;
    ++lookups;
    if (slot != a.absent) {
      ++hits;
      a.stamp[slot - a.hot_base] = step;
    }
  }
  __syncthreads();
  // Phase 2: each thread claims a contiguous run of entries, so ranks follow entry order.
  const int64_t per = (a.entries + kPlanThreads - 1) / kPlanThreads;
  const int64_t e0 = tid * per, e1 = min(a.entries, e0 + per);
  int64_t mine = 0;
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t fp = fetch_flat(a, e);
    if (fp < 0) continue;
    const int32_t want = static_cast<int32_t>(a.absent);
    if (atomicCAS(reinterpret_cast<int*>(a.table + fp), want,
                  static_cast<int>(claim_of(e))) == want)
      ++mine;
  }
  int64_t misses = 0;
  const int64_t rank0 = block_exclusive_scan(mine, &misses);
  // Phase 3: victims in rotated order from the cursor.
  const int64_t per_h = (a.n_hot + kPlanThreads - 1) / kPlanThreads;
  const int64_t h0 = tid * per_h, h1 = min(a.n_hot, h0 + per_h);
  int64_t free_here = 0;
  for (int64_t i = h0; i < h1; ++i)
    free_here += a.stamp[(s_cursor + i) % a.n_hot] != step;
  int64_t free_total = 0;
  int64_t r = block_exclusive_scan(free_here, &free_total);
  for (int64_t i = h0; i < h1 && r < misses; ++i) {
    const int64_t slot = (s_cursor + i) % a.n_hot;
    if (a.stamp[slot] == step) continue;
    a.jobs[2 + 2 * r] = slot;
    if (r == misses - 1) a.state[kStateCursor] = (slot + 1) % a.n_hot;
    ++r;
  }
  __syncthreads();
  // Phase 4.
  int64_t rank = rank0;
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t fp = fetch_flat(a, e);
    if (fp < 0 || a.table[fp] != claim_of(e)) continue;
    const int64_t slot = a.jobs[2 + 2 * rank];
    const int64_t old = a.owner[slot];
    if (old >= 0) a.table[old] = static_cast<int32_t>(a.absent);
    a.owner[slot] = fp;
    a.stamp[slot] = step;
    a.table[fp] = static_cast<int32_t>(a.hot_base + slot);
    a.jobs[1 + 2 * rank] = fp;
    a.jobs[2 + 2 * rank] = a.hot_base + slot;
    ++rank;
  }
  // Totals of phase 1 (the scans double as reductions).
  int64_t all_lookups = 0, all_hits = 0;
  block_exclusive_scan(lookups, &all_lookups);
  block_exclusive_scan(hits, &all_hits);
  if (tid == 0) {
    a.state[kStateStep] = step;
    a.state[kStateLookups] += all_lookups;
    a.state[kStateHits] += all_hits;
    a.jobs[0] = min(misses, free_total);
  }
}

// One CTA per queued copy (blockIdx.x) and tensor (blockIdx.y: k, v); CTAs past the count exit.
__global__ void __launch_bounds__(kCopyThreads)
    tiered_copy_kernel(uint4* k, uint4* v, const uint4* host_k, const uint4* host_v,
                       const int64_t* jobs, int64_t page_vecs) {
  const int64_t i = blockIdx.x;
  if (i >= jobs[0]) return;
  const int64_t src = jobs[1 + 2 * i], dst = jobs[2 + 2 * i];
  uint4* out = (blockIdx.y == 0 ? k : v) + dst * page_vecs;
  const uint4* in = (blockIdx.y == 0 ? host_k : host_v) + src * page_vecs;
  for (int64_t e = threadIdx.x; e < page_vecs; e += kCopyThreads) out[e] = in[e];
}

void tiered_fetch_cuda(Tensor idx, Tensor table, Tensor owner, Tensor stamp, Tensor state,
                       Tensor jobs, Tensor k, Tensor v, Tensor host_k, Tensor host_v,
                       int64_t sink_pages, int64_t hot_base, int64_t absent,
                       int64_t pages_per_chunk) {
  const TieredFetchDims f = check_tiered_fetch(idx, table, owner, stamp, state, jobs, k, v,
                                               host_k, host_v, sink_pages, hot_base, absent,
                                               pages_per_chunk);
  for (const Tensor* t : {&idx, &table, &owner, &stamp, &state, &jobs, &k, &v})
    STD_TORCH_CHECK(t->is_cuda() && t->get_device_index() == k.get_device_index(),
                    "tiered_fetch (cuda): every tensor but host_k/host_v must be on k's GPU");
  for (const Tensor* t : {&host_k, &host_v})
    STD_TORCH_CHECK(t->is_cuda() || is_pinned_host(t->data_ptr()),
                    "tiered_fetch (cuda): host_k and host_v must be pinned (or on the GPU)");
  STD_TORCH_CHECK(f.page_bytes % sizeof(uint4) == 0, "tiered_fetch (cuda): pages must be a "
                  "multiple of 16 bytes");
  if (f.entries == 0) return;
  torch::stable::accelerator::DeviceGuard guard(k.get_device_index());
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(k.get_device_index(), &stream) ==
                      AOTI_TORCH_SUCCESS,
                  "tiered_fetch: could not get the current CUDA stream");
  const auto s = static_cast<cudaStream_t>(stream);
  FetchArgs a{idx.const_data_ptr<int32_t>(), static_cast<int32_t*>(table.data_ptr()),
              static_cast<int64_t*>(owner.data_ptr()), static_cast<int64_t*>(stamp.data_ptr()),
              static_cast<int64_t*>(state.data_ptr()), static_cast<int64_t*>(jobs.data_ptr()),
              f.per_seq, f.entries, f.max_pages, f.n_hot, sink_pages, hot_base, absent,
              f.pages_per_chunk};
  tiered_plan_kernel<<<1, kPlanThreads, 0, s>>>(a);
  tiered_copy_kernel<<<dim3(static_cast<unsigned>(f.entries), 2), kCopyThreads, 0, s>>>(
      static_cast<uint4*>(k.data_ptr()), static_cast<uint4*>(v.data_ptr()),
      static_cast<const uint4*>(host_k.data_ptr()), static_cast<const uint4*>(host_v.data_ptr()),
      static_cast<const int64_t*>(jobs.data_ptr()),
      f.page_bytes / static_cast<int64_t>(sizeof(uint4)));
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "tiered_fetch CUDA kernel failed: ", cudaGetErrorString(err));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(reattention, CUDA, m) {
  m.impl("copy_pages", TORCH_BOX(&copy_pages_cuda));
  m.impl("tiered_fetch", TORCH_BOX(&tiered_fetch_cuda));
}

}  // namespace reattention
