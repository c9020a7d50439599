// chunk_reps on the CPU: one representative per complete middle chunk, written in place.
//
//   bound: per-dim min and max of the chunk's raw keys (exact, stored in the cache dtype)
//   mean : per-dim float32 sum of the chunk's keys, divided by C, rounded once to the dtype
//
// Work items are (b, h, j). Only chunks j in [start_chunk, min(n_chunks, (N_b - S) / C)) are
// written, so after appending tokens a caller recomputes just the chunks that became complete.
// A negative start_chunk = -m writes the last m complete chunks of each sequence instead,
// [max(0, c_b - m), c_b) with c_b = min(n_chunks, (N_b - S) / C): m work items per (b, h), found
// from the device lengths, so a graph-captured decode step needs no host length.
#include <algorithm>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu/cpu_math.h"

namespace reattention {
namespace {

template <typename T>
void chunk_reps_kernel(const Tensor& k_cache, const Tensor& cache_seqlens, const Tensor& reps,
                       const OpArgs& a, const Dims& d, int64_t sink, int64_t chunk, RepMode rep,
                       int64_t start) {
  const bool last = start < 0;  // the last -start complete chunks of each sequence
  const int64_t per_head = last ? std::min(-start, d.n_chunks) : d.n_chunks - start;
  if (per_head <= 0) return;
  const auto keys = cpu::kv_rows<T>(k_cache, d, a);
  const int32_t* lens = cache_seqlens.const_data_ptr<int32_t>();
  const int64_t lens_stride = cache_seqlens.stride(0);
  T* out = static_cast<T*>(reps.data_ptr());
  const bool bound = rep == RepMode::kBound;
  const int64_t rs0 = reps.stride(0), rs1 = reps.stride(1), rs2 = reps.stride(2);
  const int64_t rs_pair = bound ? reps.stride(3) : 0;  // min at [..., 0, :], max at [..., 1, :]
  const int64_t rs_d = reps.stride(reps.dim() - 1);
  const int64_t dim = d.d;

  torch::stable::parallel_for(
      0, d.batch * d.hkv * per_head, cpu::grain_for(chunk * dim), [&](int64_t begin, int64_t end) {
        std::vector<float> row(dim), lo(dim), hi(dim);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / (d.hkv * per_head);
          const int64_t h = (item / per_head) % d.hkv;
          const int64_t n = lens[b * lens_stride];
          const int64_t complete = std::min(d.n_chunks, complete_chunks(n, sink, chunk));
          const int64_t j = (last ? complete - per_head : start) + item % per_head;
          if (j < 0 || j >= complete) continue;
          const int64_t t0 = sink + j * chunk;
          T* dst = out + b * rs0 + h * rs1 + j * rs2;
          if (bound) {
            std::fill(lo.begin(), lo.end(), std::numeric_limits<float>::infinity());
            std::fill(hi.begin(), hi.end(), -std::numeric_limits<float>::infinity());
            for (int64_t t = t0; t < t0 + chunk; ++t) {
              cpu::load_f32(keys.row(b, h, t), keys.step, dim, row.data());
              for (int64_t i = 0; i < dim; ++i) {
                lo[i] = row[i] < lo[i] ? row[i] : lo[i];
                hi[i] = row[i] > hi[i] ? row[i] : hi[i];
              }
            }
            // Exact: every value came from T.
            cpu::store_from_f32(lo.data(), dim, dst, rs_d);
            cpu::store_from_f32(hi.data(), dim, dst + rs_pair, rs_d);
          } else {
            std::fill(lo.begin(), lo.end(), 0.f);
            for (int64_t t = t0; t < t0 + chunk; ++t) {
              cpu::load_f32(keys.row(b, h, t), keys.step, dim, row.data());
              for (int64_t i = 0; i < dim; ++i) lo[i] += row[i];
            }
            const float c = static_cast<float>(chunk);
            for (int64_t i = 0; i < dim; ++i) lo[i] = lo[i] / c;
            cpu::store_from_f32(lo.data(), dim, dst, rs_d);
          }
        }
      });
}

void chunk_reps_cpu(Tensor k_cache, Tensor cache_seqlens, Tensor reps, int64_t sink,
                    int64_t chunk, std::string rep, int64_t start_chunk,
                    std::optional<Tensor> block_table) {
  const OpArgs a = chunk_reps_args(k_cache, cache_seqlens, reps, sink, chunk, rep, start_chunk,
                                   block_table);
  const Dims d = check_inputs(a);
  dispatch_float(k_cache.scalar_type(), "k_cache", [&](auto tag) {
    using T = typename decltype(tag)::type;
    chunk_reps_kernel<T>(k_cache, cache_seqlens, reps, a, d, sink, chunk, a.rep, start_chunk);
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(reattention, CPU, m) {
  m.impl("chunk_reps", TORCH_BOX(&chunk_reps_cpu));
}

}  // namespace reattention
