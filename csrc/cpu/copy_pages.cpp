// copy_pages on the CPU: dst[dst_index[i]] = src[src_index[i]] for every i whose mask is set
// (the tiered cache's page moves, docs/design.md section 3.7, with both tiers in host memory).
#include <cstring>
#include <optional>

#include "common.h"
#include "tiered.h"

namespace reattention {
namespace {

void copy_pages_cpu(Tensor dst, Tensor src, Tensor dst_index, Tensor src_index,
                    std::optional<Tensor> mask) {
  check_copy_pages(dst, src, dst_index, src_index, mask);
  const int64_t l = dst_index.size(0);
  if (l == 0 || dst.numel() == 0) return;
  const int64_t page_bytes = (dst.numel() / dst.size(0)) * static_cast<int64_t>(dst.element_size());
  auto* out = static_cast<char*>(dst.data_ptr());
  const auto* in = static_cast<const char*>(src.data_ptr());
  const auto* di = dst_index.const_data_ptr<int64_t>();
  const auto* si = src_index.const_data_ptr<int64_t>();
  const bool* m = mask ? mask->const_data_ptr<bool>() : nullptr;
  for (int64_t i = 0; i < l; ++i) {
    const int64_t d = di[i], s = si[i];
    if (m != nullptr && !m[i]) continue;
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
