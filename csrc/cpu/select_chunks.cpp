// select_chunks on the CPU: the top-k middle chunks per (batch, kv head, query block).
//
// Pass 1 scores every (b, h, block, chunk) in float32: the max over the group's q heads and
// the block's queries of rep_score(q, j), where "max" is max_t q.k_t over the chunk's raw
// keys, "bound" sum_d max(q_d kmin_d, q_d kmax_d) and "mean" q.mean_j. Work items are
// (b, h, block, tile of kTile chunks), so a decode step over a long cache still spreads over
// every core. Each query block has the middle of a call of its own (docs/design.md section 2):
// M grows from block to block, and block beta scores only its chunks j < M_beta. Pass 2 picks,
// per (b, h, block), the K_eff = min(topk, M_beta) highest scores, ties to the lower chunk
// index (NaN counts as highest, as in torch.sort), and writes them ascending, padded with -1:
// int32 [B, Hkv, n_blocks, topk]. A chunk's score is computed by the same code whatever tile
// it falls in, so bit-identical chunks score bit-identically and the tie rule decides.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include "common.h"
#include "cpu/cpu_math.h"

namespace reattention {
namespace {

constexpr int64_t kTile = 32;  // chunks per work item of the scoring pass

struct SelectArgs {
  Dims d;
  int64_t sink, local, chunk, query_block, max_mid;
  RepMode rep;
  std::vector<int64_t> n_mid;  // M of each (sequence, block), [B * n_blocks]
};

template <typename T>
void score_chunks(const Tensor& q, const Tensor& k_cache, const std::optional<Tensor>& reps,
                  const OpArgs& a, const SelectArgs& s, float* scores) {
  const Dims& d = s.d;
  const auto qs = cpu::strided4<const T>(q);
  const auto keys = cpu::kv_rows<T>(k_cache, d, a);
  const T* rp = reps ? static_cast<const T*>(reps->data_ptr()) : nullptr;
  const int64_t rs0 = reps ? reps->stride(0) : 0, rs1 = reps ? reps->stride(1) : 0;
  const int64_t rs2 = reps ? reps->stride(2) : 0;
  const int64_t rs_pair = s.rep == RepMode::kBound ? reps->stride(3) : 0;
  const int64_t rs_d = reps ? reps->stride(reps->dim() - 1) : 0;
  const int64_t dim = d.d;
  const int64_t tiles = ceil_div(s.max_mid, kTile);
  const int64_t rows_max = d.group * std::min(d.lq, s.query_block);
  const int64_t tile_work = kTile * rows_max * dim * (s.rep == RepMode::kMax ? s.chunk : 1);

  torch::stable::parallel_for(
      0, d.batch * d.hkv * d.n_blocks * tiles, cpu::grain_for(tile_work),
      [&](int64_t begin, int64_t end) {
        std::vector<float> qf(rows_max * dim), kf(dim), kf2(dim);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t tile = item % tiles;
          const int64_t blk = (item / tiles) % d.n_blocks;
          const int64_t h = (item / (tiles * d.n_blocks)) % d.hkv;
          const int64_t b = item / (tiles * d.n_blocks * d.hkv);
          const int64_t j0 = tile * kTile;
          const int64_t j1 = std::min(j0 + kTile, s.n_mid[b * d.n_blocks + blk]);
          if (j0 >= j1) continue;
          const int64_t i0 = block_first(blk, s.query_block);
          const int64_t i1 = block_last(blk, d.lq, s.query_block);
          int64_t rows = 0;
          for (int64_t g = 0; g < d.group; ++g)
            for (int64_t i = i0; i < i1; ++i, ++rows)
              cpu::load_f32(qs.row(b, h * d.group + g, i), qs.s[3], dim, qf.data() + rows * dim);
          float* out = scores + ((b * d.hkv + h) * d.n_blocks + blk) * s.max_mid;
          for (int64_t j = j0; j < j1; ++j) {
            float best = -std::numeric_limits<float>::infinity();
            if (s.rep == RepMode::kMax) {
              const int64_t t0 = s.sink + j * s.chunk;
              for (int64_t t = t0; t < t0 + s.chunk; ++t) {
                cpu::load_f32(keys.row(b, h, t), keys.step, dim, kf.data());
                for (int64_t r = 0; r < rows; ++r)
                  best = cpu::max2(cpu::dot(qf.data() + r * dim, kf.data(), dim), best);
              }
            } else {
              const T* rep = rp + b * rs0 + h * rs1 + j * rs2;
              cpu::load_f32(rep, rs_d, dim, kf.data());
              if (s.rep == RepMode::kBound) {
                cpu::load_f32(rep + rs_pair, rs_d, dim, kf2.data());
                for (int64_t r = 0; r < rows; ++r)
                  best = cpu::max2(cpu::bound_dot(qf.data() + r * dim, kf.data(), kf2.data(), dim),
                                   best);
              } else {
                for (int64_t r = 0; r < rows; ++r)
                  best = cpu::max2(cpu::dot(qf.data() + r * dim, kf.data(), dim), best);
              }
            }
            out[j] = best;
          }
        }
      });
}

// Writes the ascending top-K_eff chunk indices of each (b, h, block) row of `scores`.
void pick_top(const float* scores, const SelectArgs& s, int64_t topk, int32_t* idx) {
  const Dims& d = s.d;
  torch::stable::parallel_for(
      0, d.batch * d.hkv * d.n_blocks, cpu::grain_for(s.max_mid + 1, 1 << 12),
      [&](int64_t begin, int64_t end) {
        std::vector<int32_t> order;
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / (d.hkv * d.n_blocks), blk = row % d.n_blocks;
          const int64_t m = s.n_mid[b * d.n_blocks + blk];
          const int64_t k_eff = std::min(topk, m);
          const float* sc = scores + row * s.max_mid;
          int32_t* dst = idx + row * topk;
          order.resize(m);
          std::iota(order.begin(), order.end(), 0);
          auto key = [&](int32_t j) {
            return std::isnan(sc[j]) ? std::numeric_limits<float>::infinity() : sc[j];
          };
          std::partial_sort(order.begin(), order.begin() + k_eff, order.end(),
                            [&](int32_t x, int32_t y) {
                              const float kx = key(x), ky = key(y);
                              return kx > ky || (kx == ky && x < y);
                            });
          std::sort(order.begin(), order.begin() + k_eff);
          std::copy(order.begin(), order.begin() + k_eff, dst);
          std::fill(dst + k_eff, dst + topk, -1);
        }
      });
}

Tensor select_chunks_cpu(Tensor q, Tensor k_cache, std::optional<Tensor> reps,
                         Tensor cache_seqlens, int64_t sink, int64_t local, int64_t chunk,
                         int64_t topk, std::string rep, int64_t query_block,
                         std::optional<Tensor> block_table) {
  const OpArgs a = select_chunks_args(q, k_cache, reps, cache_seqlens, sink, local, chunk,
                                      topk, rep, query_block, block_table);
  SelectArgs s{check_inputs(a), sink, local, chunk, query_block, 0, a.rep, {}};
  const Dims& d = s.d;
  const int32_t* lens = cache_seqlens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < d.batch; ++b) {
    const int64_t n = lens[b * cache_seqlens.stride(0)];
    for (int64_t blk = 0; blk < d.n_blocks; ++blk) {
      s.n_mid.push_back(block_segments(n, d.lq, query_block, blk, sink, local, chunk).n_mid);
      s.max_mid = std::max(s.max_mid, s.n_mid.back());
    }
  }

  Tensor idx = torch::stable::new_empty(q, std::vector<int64_t>{d.batch, d.hkv, d.n_blocks, topk},
                                        ScalarType::Int);
  std::vector<float> scores(d.batch * d.hkv * d.n_blocks * s.max_mid);
  dispatch_float(q.scalar_type(), "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    score_chunks<T>(q, k_cache, reps, a, s, scores.data());
  });
  pick_top(scores.data(), s, topk, static_cast<int32_t*>(idx.data_ptr()));
  return idx;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(reattention, CPU, m) {
  m.impl("select_chunks", TORCH_BOX(&select_chunks_cpu));
}

}  // namespace reattention
