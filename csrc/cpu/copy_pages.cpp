// copy_pages on the CPU: dst[dst_index[i]] = src[src_index[i]] for every i whose mask is set
// (the tiered cache's page moves, docs/design.md section 3.7, with both tiers in host memory).
#include <cstring>
#include <optional>

#include "common.h"

namespace reattention {
namespace {

void copy_pages_cpu(Tensor dst, Tensor src, Tensor dst_index, Tensor src_index,
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
                      src_index.scalar_type() == ScalarType::Long,
                  "copy_pages: dst_index and src_index must be int64 [L]");
  if (mask) {
    STD_TORCH_CHECK(mask->dim() == 1 && mask->size(0) == dst_index.size(0) &&
                        mask->scalar_type() == ScalarType::Bool,
                    "copy_pages: mask must be bool [L]");
  }
  const int64_t l = dst_index.size(0);
  if (l == 0 || dst.numel() == 0) return;
  const int64_t page_bytes = (dst.numel() / dst.size(0)) * static_cast<int64_t>(dst.element_size());
  auto* out = static_cast<char*>(dst.data_ptr());
  const auto* in = static_cast<const char*>(src.data_ptr());
  const auto* di = dst_index.const_data_ptr<int64_t>();
  const auto* si = src_index.const_data_ptr<int64_t>();
  const bool* m = mask ? mask->const_data_ptr<bool>() : nullptr;
  for (int64_t i = 0; i < l; ++i) {
    const int64_t d = di[i * dst_index.stride(0)], s = si[i * src_index.stride(0)];
    if (m != nullptr && !m[i * mask->stride(0)]) continue;
    STD_TORCH_CHECK(d >= 0 && d < dst.size(0) && s >= 0 && s < src.size(0), "copy_pages: entry ",
                    i, " copies page ", s, " of ", src.size(0), " to page ", d, " of ",
                    dst.size(0));
    std::memcpy(out + d * page_bytes, in + s * page_bytes, static_cast<size_t>(page_bytes));
  }
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(reattention, CPU, m) {
  m.impl("copy_pages", TORCH_BOX(&copy_pages_cpu));
}

}  // namespace reattention
