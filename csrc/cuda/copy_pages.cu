// copy_pages on CUDA: dst[dst_index[i]] = src[src_index[i]] for every i whose mask is set, one
// CTA per i. It moves pages of a tiered cache (docs/design.md section 3.7) between the GPU and
// pinned host memory without a host sync: the indices and the mask live on the GPU (a decode
// step decides them there), and one of dst/src may be a pinned CPU tensor, which the kernel
// reads or writes in place through unified virtual addressing (a pinned allocation's host
// pointer is valid on the device). Entries whose indices fall outside their tensor are skipped,
// so a bad index never reads or writes out of bounds.
#ifndef USE_CUDA
#define USE_CUDA  // exposes the CUDA part of the stable C shim (current stream)
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

#include "common.h"

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
  STD_TORCH_CHECK(dst.dim() >= 1 && src.dim() == dst.dim(), "copy_pages: dst and src must be "
                  "page tensors [num_pages, ...] of the same rank");
  for (int64_t i = 1; i < dst.dim(); ++i)
    STD_TORCH_CHECK(dst.size(i) == src.size(i), "copy_pages: dst and src pages differ in shape");
  STD_TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "copy_pages: dst and src dtypes differ");
  STD_TORCH_CHECK(dst.is_contiguous() && src.is_contiguous(),
                  "copy_pages: dst and src must be contiguous");
  STD_TORCH_CHECK(dst_index.dim() == 1 && src_index.dim() == 1 &&
                      dst_index.size(0) == src_index.size(0) &&
                      dst_index.scalar_type() == ScalarType::Long &&
                      src_index.scalar_type() == ScalarType::Long &&
                      dst_index.is_cuda() && src_index.is_cuda() &&
                      dst_index.is_contiguous() && src_index.is_contiguous(),
                  "copy_pages: dst_index and src_index must be contiguous int64 [L] CUDA tensors");
  if (mask) {
    STD_TORCH_CHECK(mask->dim() == 1 && mask->size(0) == dst_index.size(0) &&
                        mask->scalar_type() == ScalarType::Bool && mask->is_cuda() &&
                        mask->is_contiguous(),
                    "copy_pages: mask must be a contiguous bool [L] CUDA tensor");
  }
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

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(reattention, CUDA, m) {
  m.impl("copy_pages", TORCH_BOX(&copy_pages_cuda));
}

}  // namespace reattention
