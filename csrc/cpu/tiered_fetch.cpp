// tiered_fetch on the CPU: the page-residency step of the tiered cache (docs/design.md
// section 3.7) with both tiers in host memory, in the order the CUDA kernel follows, so CI
// runs the same bookkeeping (csrc/cuda/tiered_fetch.cu has the device version and the shared
// description of the phases).
#include <cstring>
#include <vector>

#include "common.h"
#include "tiered.h"

namespace reattention {
namespace {

void tiered_fetch_cpu(Tensor idx, Tensor table, Tensor owner, Tensor stamp, Tensor state,
                      Tensor jobs, Tensor k, Tensor v, Tensor host_k, Tensor host_v,
                      int64_t sink_pages, int64_t hot_base, int64_t absent,
                      int64_t pages_per_chunk) {
  const TieredFetchDims f = check_tiered_fetch(idx, table, owner, stamp, state, jobs, k, v,
                                               host_k, host_v, sink_pages, hot_base, absent,
                                               pages_per_chunk);
  const int32_t* sel = idx.const_data_ptr<int32_t>();
  auto* tab = static_cast<int32_t*>(table.data_ptr());
  auto* own = static_cast<int64_t*>(owner.data_ptr());
  auto* stm = static_cast<int64_t*>(stamp.data_ptr());
  auto* st = static_cast<int64_t*>(state.data_ptr());
  auto* job = static_cast<int64_t*>(jobs.data_ptr());
  const int64_t step = ++st[kStateStep];

  // Phase 1: classify every entry against the table as the call found it; touch the hits.
  std::vector<int64_t> flat(f.entries, -1);
  int64_t lookups = 0, hits = 0;
  for (int64_t e = 0; e < f.entries; ++e) {
    const int64_t page = entry_page(sel, e, f.pages_per_chunk, sink_pages, f.max_pages);
    if (page < 0) continue;
    const int64_t fp = (e / f.per_seq) * f.max_pages + page;
    const int64_t slot = tab[fp];
    if (slot != absent && slot < hot_base) continue;  // sink or window page
    ++lookups;
    if (slot != absent) {
      ++hits;
      stm[slot - hot_base] = step;
    } else {
      flat[e] = fp;
    }
  }
  // Phase 2: one winner per missing page (its first entry here), claimed in the table.
  int64_t misses = 0;
  for (int64_t e = 0; e < f.entries; ++e) {
    if (flat[e] < 0 || tab[flat[e]] != absent) continue;
    tab[flat[e]] = static_cast<int32_t>(claim_of(e));
    ++misses;
  }
  // Phase 3: victims, the first `misses` hot pages from the cursor not touched this step.
  int64_t found = 0, pos = st[kStateCursor];
  for (int64_t i = 0; i < f.n_hot && found < misses; ++i) {
    const int64_t slot = (st[kStateCursor] + i) % f.n_hot;
    if (stm[slot] == step) continue;
    job[2 + 2 * found] = slot;
    ++found;
    pos = slot + 1;
  }
  STD_TORCH_CHECK(found == misses, "tiered_fetch: ", misses, " pages missing but only ", found,
                  " hot pages free (hot_pages must cover a call's selection)");
  st[kStateCursor] = pos % f.n_hot;
  // Phase 4: install the winners in rank (entry) order; queue their copies.
  int64_t rank = 0;
  for (int64_t e = 0; e < f.entries; ++e) {
    if (flat[e] < 0 || tab[flat[e]] != claim_of(e)) continue;
    const int64_t slot = job[2 + 2 * rank];
    if (own[slot] >= 0) tab[own[slot]] = static_cast<int32_t>(absent);
    own[slot] = flat[e];
    stm[slot] = step;
    tab[flat[e]] = static_cast<int32_t>(hot_base + slot);
    job[1 + 2 * rank] = flat[e];
    job[2 + 2 * rank] = hot_base + slot;
    ++rank;
  }
  job[0] = misses;
  st[kStateLookups] += lookups;
  st[kStateHits] += hits;
  // The copies.
  for (const auto& [dst, src] : {std::pair<Tensor*, Tensor*>{&k, &host_k}, {&v, &host_v}}) {
    auto* out = static_cast<char*>(dst->data_ptr());
    const auto* in = static_cast<const char*>(src->data_ptr());
    for (int64_t r = 0; r < misses; ++r)
      std::memcpy(out + job[2 + 2 * r] * f.page_bytes, in + job[1 + 2 * r] * f.page_bytes,
                  static_cast<size_t>(f.page_bytes));
  }
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(reattention, CPU, m) {
  m.impl("tiered_fetch", TORCH_BOX(&tiered_fetch_cpu));
}

}  // namespace reattention
