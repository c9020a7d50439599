// gather_attention on the CPU: attention over [sink | selected chunks | local] with RoPE at
// re-assigned positions (docs/design.md section 2).
//
// A work item is (b, kv head h, query block, slice of h's q heads). The block has the segments
// of a call of its own (contract v2): it sees the keys [0, P1] of its last query P1, with its
// own mid_end. The item lists the original positions of its gathered keys (sink, then the
// chunks of idx[b, h, block] in the order given, -1 skipped, then local [mid_end, P1]),
// rotates the block's queries once, then streams the keys in
// tiles of kKeyTile: widen to float32, rotate, and fold into a per-row online softmax
// (running max m, sum l, float32 accumulator). A key is visible iff its ORIGINAL position is
// <= the query's. RoPE position of gathered key r is r ("compact") or its original position
// ("original"); cos/sin of compact positions come from one table shared by all items.
// Each q head's result is computed the same way whatever the slicing, so the output does not
// depend on the thread count. out is q's dtype, lse float32 natural log of the scaled scores.
#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"
#include "cpu/cpu_math.h"

namespace reattention {
namespace {

constexpr int64_t kKeyTile = 64;

struct GatherArgs {
  Dims d;
  int64_t sink, local, chunk, query_block;
  float scale, rope_scale;
  RopeStyle style;
  PosMode positions;
  std::vector<int64_t> lens;
  std::vector<float> inv_freq;
  // cos/sin of compact positions [0, table_rows), half_rot each; empty for "original".
  std::vector<float> table_cos, table_sin;
  int64_t heads_per_item;
};

// cos/sin for one RoPE position: a table row for compact positions, computed otherwise.
struct RopeRow {
  const GatherArgs& g;
  std::vector<float> c, s;

  explicit RopeRow(const GatherArgs& args) : g(args), c(args.d.half_rot), s(args.d.half_rot) {}

  void rotate(const float* x, int64_t pos, float* out) {
    const int64_t half = g.d.half_rot;
    if (!g.table_cos.empty()) {
      rope_from(x, g.table_cos.data() + pos * half, g.table_sin.data() + pos * half, out);
    } else {
      cpu::rope_cos_sin(pos, g.inv_freq.data(), half, g.rope_scale, c.data(), s.data());
      rope_from(x, c.data(), s.data(), out);
    }
  }

  void rope_from(const float* x, const float* cs, const float* sn, float* out) const {
    cpu::rope_apply(x, cs, sn, g.d.half_rot, g.d.d, g.style, out);
  }
};

template <typename T>
void gather_attention_kernel(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                             const Tensor& idx, const OpArgs& a, const GatherArgs& g, Tensor& out,
                             Tensor& lse) {
  const Dims& d = g.d;
  const auto qs = cpu::strided4<const T>(q);
  const auto ks = cpu::kv_rows<T>(k_cache, d, a);
  const auto vs = cpu::kv_rows<T>(v_cache, d, a);
  const auto ids = cpu::strided4<const int32_t>(idx);
  T* out_p = static_cast<T*>(out.data_ptr());  // contiguous [B, Hq, Lq, D]
  float* lse_p = static_cast<float*>(lse.data_ptr());  // contiguous [B, Hq, Lq]
  const int64_t dim = d.d;
  const int64_t slices = ceil_div(d.group, g.heads_per_item);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  torch::stable::parallel_for(
      0, d.batch * d.hkv * d.n_blocks * slices, 1, [&](int64_t begin, int64_t end) {
        RopeRow rope(g);
        std::vector<int64_t> key_pos;
        std::vector<float> x(dim), qrot, acc, m, l, kt(kKeyTile * dim), vt(kKeyTile * dim),
            sc(kKeyTile);
        std::vector<int64_t> q_pos;
        for (int64_t item = begin; item < end; ++item) {
          const int64_t slice = item % slices;
          const int64_t blk = (item / slices) % d.n_blocks;
          const int64_t h = (item / (slices * d.n_blocks)) % d.hkv;
          const int64_t b = item / (slices * d.n_blocks * d.hkv);
          const int64_t n = g.lens[b];
          const Segments seg =
              block_segments(n, d.lq, g.query_block, blk, g.sink, g.local, g.chunk);

          key_pos.clear();
          for (int64_t t = 0; t < seg.sink_len; ++t) key_pos.push_back(t);
          int64_t n_sel = 0;
          for (int64_t r = 0; r < d.topk; ++r) {
            const int64_t j = ids.row(b, h, blk)[r * ids.s[3]];
            if (j < 0) continue;
            ++n_sel;
            for (int64_t t = g.sink + j * g.chunk; t < g.sink + (j + 1) * g.chunk; ++t)
              key_pos.push_back(t);
          }
          for (int64_t t = seg.mid_end; t < seg.end; ++t) key_pos.push_back(t);
          const int64_t n_keys = static_cast<int64_t>(key_pos.size());

          const int64_t g0 = slice * g.heads_per_item;
          const int64_t g1 = std::min(d.group, g0 + g.heads_per_item);
          const int64_t i0 = block_first(blk, g.query_block);
          const int64_t i1 = block_last(blk, d.lq, g.query_block);
          const int64_t rows = (g1 - g0) * (i1 - i0);
          qrot.resize(rows * dim);
          acc.assign(rows * dim, 0.f);
          m.assign(rows, neg_inf);
          l.assign(rows, 0.f);
          q_pos.resize(rows);
          for (int64_t hg = g0, r = 0; hg < g1; ++hg) {
            for (int64_t i = i0; i < i1; ++i, ++r) {
              const int64_t p = seg.q_start + (i - i0);
              q_pos[r] = p;
              cpu::load_f32(qs.row(b, h * d.group + hg, i), qs.s[3], dim, x.data());
              const int64_t rope_pos = g.positions == PosMode::kCompact
                                           ? compact_query_pos(p, seg, g.sink, n_sel, g.chunk)
                                           : p;
              rope.rotate(x.data(), rope_pos, qrot.data() + r * dim);
            }
          }

          for (int64_t t0 = 0; t0 < n_keys; t0 += kKeyTile) {
            const int64_t tn = std::min(kKeyTile, n_keys - t0);
            for (int64_t t = 0; t < tn; ++t) {
              const int64_t p = key_pos[t0 + t];
              cpu::load_f32(ks.row(b, h, p), ks.step, dim, x.data());
              rope.rotate(x.data(), g.positions == PosMode::kCompact ? t0 + t : p,
                          kt.data() + t * dim);
              cpu::load_f32(vs.row(b, h, p), vs.step, dim, vt.data() + t * dim);
            }
            for (int64_t r = 0; r < rows; ++r) {
              float tile_max = neg_inf;
              for (int64_t t = 0; t < tn; ++t) {
                sc[t] = key_pos[t0 + t] <= q_pos[r]
                            ? g.scale * cpu::dot(qrot.data() + r * dim, kt.data() + t * dim, dim)
                            : neg_inf;
                tile_max = cpu::max2(sc[t], tile_max);
              }
              if (tile_max == neg_inf) continue;  // every key of the tile is in the future
              const float m_new = cpu::max2(m[r], tile_max);
              const float alpha = std::exp(m[r] - m_new);  // 0 on the first visible tile
              float* a = acc.data() + r * dim;
              if (alpha != 1.f)
                for (int64_t i = 0; i < dim; ++i) a[i] *= alpha;
              l[r] *= alpha;
              for (int64_t t = 0; t < tn; ++t) {
                if (sc[t] == neg_inf) continue;
                const float pt = std::exp(sc[t] - m_new);
                l[r] += pt;
                cpu::axpy(pt, vt.data() + t * dim, a, dim);
              }
              m[r] = m_new;
            }
          }

          // Every query sees at least itself, so l > 0.
          for (int64_t hg = g0, r = 0; hg < g1; ++hg) {
            for (int64_t i = i0; i < i1; ++i, ++r) {
              const int64_t o = ((b * d.hq + h * d.group + hg) * d.lq + i);
              float* a = acc.data() + r * dim;
              const float inv_l = 1.f / l[r];
              for (int64_t e = 0; e < dim; ++e) a[e] *= inv_l;
              cpu::store_from_f32(a, dim, out_p + o * dim, 1);
              lse_p[o] = m[r] + std::log(l[r]);
            }
          }
        }
      });
}

std::tuple<Tensor, Tensor> gather_attention_cpu(Tensor q, Tensor k_cache, Tensor v_cache,
                                                Tensor cache_seqlens, Tensor idx,
                                                Tensor inv_freq, int64_t sink, int64_t local,
                                                int64_t chunk, int64_t query_block, double scale,
                                                double rope_scale, std::string rope_style,
                                                std::string positions,
                                                std::optional<Tensor> block_table) {
  const OpArgs a = gather_attention_args(q, k_cache, v_cache, cache_seqlens, idx, inv_freq,
                                         sink, local, chunk, query_block, block_table);
  GatherArgs g{check_inputs(a), sink, local, chunk, query_block,
               static_cast<float>(scale), static_cast<float>(rope_scale),
               parse_rope_style(rope_style), parse_positions(positions), {}, {}, {}, {}, 1};
  const Dims& d = g.d;
  const int32_t* lens = cache_seqlens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < d.batch; ++b) g.lens.push_back(lens[b * cache_seqlens.stride(0)]);
  const float* f = inv_freq.const_data_ptr<float>();
  for (int64_t i = 0; i < d.half_rot; ++i) g.inv_freq.push_back(f[i * inv_freq.stride(0)]);

  if (g.positions == PosMode::kCompact && d.half_rot > 0) {
    // Compact positions never exceed the longest gathered sequence of any block: sink +
    // topk chunks + local (queries included), at most scope() keys.
    int64_t rows = 0;
    for (int64_t n : g.lens) {
      for (int64_t blk = 0; blk < d.n_blocks; ++blk) {
        const Segments seg = block_segments(n, d.lq, query_block, blk, sink, local, chunk);
        rows = std::max(rows, seg.sink_len + d.topk * chunk +
                                  (seg.end - std::min(seg.end, seg.mid_end)));
      }
    }
    g.table_cos.resize(rows * d.half_rot);
    g.table_sin.resize(rows * d.half_rot);
    torch::stable::parallel_for(0, rows, cpu::grain_for(d.half_rot, 1 << 12),
                                [&](int64_t begin, int64_t end) {
                                  for (int64_t p = begin; p < end; ++p)
                                    cpu::rope_cos_sin(p, g.inv_freq.data(), d.half_rot,
                                                      g.rope_scale,
                                                      g.table_cos.data() + p * d.half_rot,
                                                      g.table_sin.data() + p * d.half_rot);
                                });
  }

  // Split a kv head's q heads over items only when (b, h, block) alone leaves threads idle:
  // each extra slice re-rotates the same keys. base is 0 for an empty batch (B = 0).
  const int64_t base = std::max<int64_t>(1, d.batch * d.hkv * d.n_blocks);
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t slices = std::min(d.group, std::max<int64_t>(1, ceil_div(threads, base)));
  g.heads_per_item = ceil_div(d.group, slices);

  Tensor out = torch::stable::new_empty(q, std::vector<int64_t>{d.batch, d.hq, d.lq, d.d});
  Tensor lse = torch::stable::new_empty(q, std::vector<int64_t>{d.batch, d.hq, d.lq},
                                        ScalarType::Float);
  dispatch_float(q.scalar_type(), "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gather_attention_kernel<T>(q, k_cache, v_cache, idx, a, g, out, lse);
  });
  return std::make_tuple(out, lse);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(reattention, CPU, m) {
  m.impl("gather_attention", TORCH_BOX(&gather_attention_cpu));
}

}  // namespace reattention
