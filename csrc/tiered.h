// The shared part of the tiered cache's ops, copy_pages and tiered_fetch (docs/design.md
// section 3.7): argument checks, the state layout and the entry -> page arithmetic, for the CPU
// and CUDA versions.
//
// Inputs, for S paged sequences (one per (sequence, kv head)) of max_pages pages, a chunk being
// pages_per_chunk pages (page = gcd(sink, chunk) tokens):
//   idx    int32 [S, K]: the chunks a call selected (K = n_blocks * topk), -1 padded; each
//          entry stands for pages_per_chunk page entries, e' = e * pages_per_chunk + q;
//   table  int32 [S, max_pages]: the device page of each resident page, else `absent`;
//   owner  int64 [n_hot]: the page (s * max_pages + p) in each hot page, or -1;
//   stamp  int64 [n_hot]: the step that last used each hot page;
//   state  int64 [4]: step, eviction cursor, lookups, hits;
//   jobs   int64 [1 + 2 S K pages_per_chunk]: the count and the (host page, device page) copies;
//   k, v   device pages [hot_base + n_hot + 1, 1, chunk, D]; host_k, host_v [S * max_pages, ...].
#pragma once

#include <optional>

#include "common.h"

namespace reattention {

// copy_pages: dst and src contiguous page tensors [num_pages, ...] of one page shape and dtype,
// dst_index and src_index contiguous int64 [L], mask None or contiguous bool [L].
inline void check_copy_pages(const Tensor& dst, const Tensor& src, const Tensor& dst_index,
                             const Tensor& src_index, const std::optional<Tensor>& mask) {
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
                      dst_index.is_contiguous() && src_index.is_contiguous(),
                  "copy_pages: dst_index and src_index must be contiguous int64 [L]");
  if (mask) {
    STD_TORCH_CHECK(mask->dim() == 1 && mask->size(0) == dst_index.size(0) &&
                        mask->scalar_type() == ScalarType::Bool && mask->is_contiguous(),
                    "copy_pages: mask must be a contiguous bool [L]");
  }
}

constexpr int kStateStep = 0, kStateCursor = 1, kStateLookups = 2, kStateHits = 3;

struct TieredFetchDims {
  int64_t seqs, per_seq, entries, max_pages, n_hot, page_bytes, pages_per_chunk;
};

// The page of page entry e (see above) of a sequence, or -1 for padding or a bad entry.
RA_HOST_DEVICE int64_t entry_page(const int32_t* idx, int64_t e, int64_t pages_per_chunk,
                                  int64_t sink_pages, int64_t max_pages) {
  const int64_t j = idx[e / pages_per_chunk];
  const int64_t p = sink_pages + j * pages_per_chunk + e % pages_per_chunk;
  return j < 0 || p >= max_pages ? -1 : p;
}

// The table value that marks a missing page claimed by entry e during a call.
RA_HOST_DEVICE int64_t claim_of(int64_t e) {
  return -2 - e;
}

inline TieredFetchDims check_tiered_fetch(const Tensor& idx, const Tensor& table,
                                          const Tensor& owner, const Tensor& stamp,
                                          const Tensor& state, const Tensor& jobs,
                                          const Tensor& k, const Tensor& v,
                                          const Tensor& host_k, const Tensor& host_v,
                                          int64_t sink_pages, int64_t hot_base, int64_t absent,
                                          int64_t pages_per_chunk) {
  STD_TORCH_CHECK(pages_per_chunk >= 1, "tiered_fetch: pages_per_chunk must be >= 1");
  STD_TORCH_CHECK(idx.dim() == 2 && idx.scalar_type() == ScalarType::Int && idx.is_contiguous(),
                  "tiered_fetch: idx must be contiguous int32 [S, K]");
  STD_TORCH_CHECK(table.dim() == 2 && table.size(0) == idx.size(0) &&
                      table.scalar_type() == ScalarType::Int && table.is_contiguous(),
                  "tiered_fetch: table must be contiguous int32 [S, max_pages]");
  STD_TORCH_CHECK(owner.dim() == 1 && owner.scalar_type() == ScalarType::Long &&
                      stamp.dim() == 1 && stamp.scalar_type() == ScalarType::Long &&
                      owner.size(0) == stamp.size(0) && owner.is_contiguous() &&
                      stamp.is_contiguous(),
                  "tiered_fetch: owner and stamp must be contiguous int64 [n_hot]");
  STD_TORCH_CHECK(state.dim() == 1 && state.size(0) == 4 && state.scalar_type() == ScalarType::Long,
                  "tiered_fetch: state must be int64 [4]");
  TieredFetchDims f{};
  f.pages_per_chunk = pages_per_chunk;
  f.seqs = idx.size(0);
  f.per_seq = idx.size(1) * pages_per_chunk;
  f.entries = f.seqs * f.per_seq;
  f.max_pages = table.size(1);
  f.n_hot = owner.size(0);
  STD_TORCH_CHECK(jobs.dim() == 1 && jobs.size(0) >= 1 + 2 * f.entries &&
                      jobs.scalar_type() == ScalarType::Long,
                  "tiered_fetch: jobs must be int64 [>= 1 + 2 S K pages_per_chunk]");
  STD_TORCH_CHECK(f.n_hot >= f.entries, "tiered_fetch: n_hot=", f.n_hot,
                  " hot pages cannot hold a call's ", f.entries, " selected pages");
  for (const Tensor* t : {&k, &v, &host_k, &host_v})
    STD_TORCH_CHECK(t->dim() == 4 && t->is_contiguous() && t->scalar_type() == k.scalar_type() &&
                        t->size(1) == k.size(1) && t->size(2) == k.size(2) &&
                        t->size(3) == k.size(3),
                    "tiered_fetch: k, v, host_k, host_v must be contiguous pages of one shape");
  STD_TORCH_CHECK(k.size(0) == v.size(0) && k.size(0) >= hot_base + f.n_hot + 1 &&
                      host_k.size(0) == host_v.size(0) &&
                      host_k.size(0) >= f.seqs * f.max_pages,
                  "tiered_fetch: the device or host tier has too few pages");
  STD_TORCH_CHECK(sink_pages >= 0 && hot_base >= 0 && absent == hot_base + f.n_hot,
                  "tiered_fetch: need absent == hot_base + n_hot");
  f.page_bytes = k.size(1) * k.size(2) * k.size(3) * static_cast<int64_t>(k.element_size());
  return f;
}

}  // namespace reattention
