// Shared by the CPU and CUDA launchers: option parsing, dtype dispatch and the one input check.
// The segment arithmetic (docs/design.md section 2) lives in the torch-free contract.h.
//
// The input check guards memory safety only (shapes, dtypes, devices and, for CPU tensors,
// the values of cache_seqlens and idx that would index out of bounds). User-facing
// ValueErrors come from the Python wrappers (reattention/ops/checks.py) before any kernel runs.
// Stable ABI only: torch/csrc/stable and torch/headeronly, built with
// TORCH_TARGET_VERSION=2.10.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <optional>
#include <string>

#include "contract.h"

namespace reattention {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// ---------------------------------------------------------------- options

enum class RopeStyle { kHalf, kInterleaved };
enum class PosMode { kCompact, kOriginal };

inline RepMode parse_rep(const std::string& s) {
  if (s == "max") return RepMode::kMax;
  if (s == "bound") return RepMode::kBound;
  STD_TORCH_CHECK(s == "mean", "rep must be 'max', 'bound' or 'mean', got '", s, "'");
  return RepMode::kMean;
}

inline RopeStyle parse_rope_style(const std::string& s) {
  if (s == "half") return RopeStyle::kHalf;
  STD_TORCH_CHECK(s == "interleaved", "rope_style must be 'half' or 'interleaved', got '", s,
                  "'");
  return RopeStyle::kInterleaved;
}

inline PosMode parse_positions(const std::string& s) {
  if (s == "compact") return PosMode::kCompact;
  STD_TORCH_CHECK(s == "original", "positions must be 'compact' or 'original', got '", s, "'");
  return PosMode::kOriginal;
}

// ---------------------------------------------------------------- dtype dispatch

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the C++ type of a float16/bfloat16/float32 tensor.
template <typename F>
decltype(auto) dispatch_float(ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case ScalarType::Float:
      return f(TypeTag<float>{});
    case ScalarType::Half:
      return f(TypeTag<torch::headeronly::Half>{});
    case ScalarType::BFloat16:
      return f(TypeTag<torch::headeronly::BFloat16>{});
    default:
      STD_TORCH_CHECK(false, what, " must be float16, bfloat16 or float32, got ",
                      torch::headeronly::toString(dtype));
  }
}

// ---------------------------------------------------------------- input check

// The tensors and integers of one op call; absent tensors are nullptr.
struct OpArgs {
  const Tensor* q = nullptr;              // [B, Hq, Lq, D]
  const Tensor* k_cache = nullptr;        // [B, Hkv, Nmax, D] or pages [P, Hkv, page_size, D]
  const Tensor* v_cache = nullptr;        // k_cache's shape
  const Tensor* block_table = nullptr;    // int32 [B, max_pages] for a paged cache
  const Tensor* cache_seqlens = nullptr;  // int32 [B]
  const Tensor* reps = nullptr;           // bound [B, Hkv, n, 2, D] | mean [B, Hkv, n, D]
  const Tensor* idx = nullptr;            // int32 [B, Hkv, n_blocks, topk]
  const Tensor* inv_freq = nullptr;       // float32 [R/2]
  RepMode rep = RepMode::kMax;
  int64_t sink = 0;
  int64_t local = 0;
  int64_t chunk = 1;
  int64_t topk = 1;
  int64_t query_block = 1;
  int64_t start_chunk = 0;
};

// OpArgs of each op's arguments, shared by its CPU and CUDA entry points. The result points at
// the given tensors, so it lives no longer than they do (the op's own parameters).
inline OpArgs chunk_reps_args(const Tensor& k_cache, const Tensor& cache_seqlens,
                              const Tensor& reps, int64_t sink, int64_t chunk,
                              const std::string& rep, int64_t start_chunk,
                              const std::optional<Tensor>& block_table) {
  OpArgs a;
  a.block_table = block_table ? &*block_table : nullptr;
  a.k_cache = &k_cache;
  a.cache_seqlens = &cache_seqlens;
  a.reps = &reps;
  a.rep = parse_rep(rep);
  STD_TORCH_CHECK(a.rep != RepMode::kMax, "chunk_reps takes rep 'bound' or 'mean'");
  a.sink = sink;
  a.chunk = chunk;
  a.start_chunk = start_chunk;
  return a;
}

inline OpArgs select_chunks_args(const Tensor& q, const Tensor& k_cache,
                                 const std::optional<Tensor>& reps, const Tensor& cache_seqlens,
                                 int64_t sink, int64_t local, int64_t chunk, int64_t topk,
                                 const std::string& rep, int64_t query_block,
                                 const std::optional<Tensor>& block_table) {
  OpArgs a;
  a.block_table = block_table ? &*block_table : nullptr;
  a.q = &q;
  a.k_cache = &k_cache;
  a.cache_seqlens = &cache_seqlens;
  a.reps = reps ? &*reps : nullptr;
  a.rep = parse_rep(rep);
  STD_TORCH_CHECK(a.rep == RepMode::kMax || reps.has_value(), "select_chunks with rep '", rep,
                  "' needs reps (chunk_reps)");
  a.sink = sink;
  a.local = local;
  a.chunk = chunk;
  a.topk = topk;
  a.query_block = query_block;
  return a;
}

inline OpArgs gather_attention_args(const Tensor& q, const Tensor& k_cache,
                                    const Tensor& v_cache, const Tensor& cache_seqlens,
                                    const Tensor& idx, const Tensor& inv_freq, int64_t sink,
                                    int64_t local, int64_t chunk, int64_t query_block,
                                    const std::optional<Tensor>& block_table) {
  OpArgs a;
  a.block_table = block_table ? &*block_table : nullptr;
  a.q = &q;
  a.k_cache = &k_cache;
  a.v_cache = &v_cache;
  a.cache_seqlens = &cache_seqlens;
  a.idx = &idx;
  a.inv_freq = &inv_freq;
  a.sink = sink;
  a.local = local;
  a.chunk = chunk;
  a.query_block = query_block;
  return a;
}

struct Dims {
  int64_t batch, hq, hkv, group, lq, nmax, d;
  // A paged cache: nmax = max_pages * page_size tokens per sequence, batch = block_table rows.
  bool paged;
  int64_t num_pages, page_size, max_pages;
  int64_t n_blocks;  // ceil(Lq / query_block), 0 without q
  int64_t n_chunks;  // reps.size(2), 0 without reps
  int64_t topk;      // idx.size(3), 0 without idx
  int64_t half_rot;  // R / 2 = inv_freq.size(0), 0 without inv_freq
};

inline bool is_float_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// Checks everything a kernel relies on to stay in bounds; throws (STD_TORCH_CHECK) otherwise.
// Tensors may have any strides. Values are read only for CPU tensors: a CUDA launcher must
// not sync, so its kernels clamp lengths and skip out-of-range chunk indices instead.
inline Dims check_inputs(const OpArgs& a) {
  STD_TORCH_CHECK(a.k_cache != nullptr && a.cache_seqlens != nullptr,
                  "k_cache and cache_seqlens are required");
  const Tensor& k = *a.k_cache;
  STD_TORCH_CHECK(k.dim() == 4, "k_cache must be [B, Hkv, Nmax, D] or pages [num_pages, Hkv, ",
                  "page_size, D], got ", k.dim(), " dims");
  STD_TORCH_CHECK(is_float_dtype(k.scalar_type()), "k_cache must be float16, bfloat16 or float32");
  Dims d{};
  d.paged = a.block_table != nullptr;
  d.hkv = k.size(1);
  d.d = k.size(3);
  if (d.paged) {
    const Tensor& t = *a.block_table;
    STD_TORCH_CHECK(t.dim() == 2 && t.scalar_type() == ScalarType::Int,
                    "block_table must be int32 [B, max_pages]");
    STD_TORCH_CHECK(t.device() == k.device(), "block_table must be on k_cache's device");
    d.num_pages = k.size(0);
    d.page_size = k.size(2);
    d.max_pages = t.size(1);
    d.batch = t.size(0);
    d.nmax = d.max_pages * d.page_size;
    STD_TORCH_CHECK(d.num_pages >= 1 && d.page_size >= 1 && d.max_pages >= 1,
                    "a paged cache needs num_pages, page_size and max_pages >= 1");
  } else {
    d.batch = k.size(0);
    d.nmax = k.size(2);
    d.num_pages = d.batch;
    d.page_size = d.nmax;
    d.max_pages = 1;
  }
  STD_TORCH_CHECK(d.hkv >= 1 && d.d >= 2 && d.d % 2 == 0,
                  "k_cache needs Hkv >= 1 and an even head dim D, got Hkv=", d.hkv, " D=", d.d);
  // start_chunk takes any value: j >= start_chunk, or for start_chunk = -m the last m complete
  // chunks of each sequence (chunk_reps).
  STD_TORCH_CHECK(a.sink >= 0 && a.local >= 0 && a.chunk >= 1 && a.topk >= 1 &&
                      a.query_block >= 1,
                  "need sink >= 0, local >= 0, chunk >= 1, topk >= 1, query_block >= 1");
  const auto device = k.device();
  auto same_device = [&](const Tensor& t, const char* name) {
    STD_TORCH_CHECK(t.device() == device, name, " must be on k_cache's device");
  };
  auto like_cache = [&](const Tensor& t, const char* name) {
    STD_TORCH_CHECK(t.scalar_type() == k.scalar_type(), name, " must have k_cache's dtype");
    same_device(t, name);
  };

  d.hq = d.hkv;
  if (a.q != nullptr) {
    const Tensor& q = *a.q;
    STD_TORCH_CHECK(q.dim() == 4, "q must be [B, Hq, Lq, D], got ", q.dim(), " dims");
    like_cache(q, "q");
    d.hq = q.size(1);
    d.lq = q.size(2);
    STD_TORCH_CHECK(q.size(0) == d.batch && q.size(3) == d.d, "q must be [B=", d.batch,
                    ", Hq, Lq, D=", d.d, "]");
    STD_TORCH_CHECK(d.hq >= 1 && d.hq % d.hkv == 0, "Hq=", d.hq,
                    " must be a multiple of Hkv=", d.hkv);
    STD_TORCH_CHECK(d.lq >= 1 && d.lq <= d.nmax, "need 1 <= Lq <= Nmax, got Lq=", d.lq,
                    " Nmax=", d.nmax);
    d.n_blocks = ceil_div(d.lq, a.query_block);
  }
  d.group = d.hq / d.hkv;

  if (a.v_cache != nullptr) {
    const Tensor& v = *a.v_cache;
    STD_TORCH_CHECK(v.dim() == 4 && v.size(0) == k.size(0) && v.size(1) == d.hkv &&
                        v.size(2) == k.size(2) && v.size(3) == d.d,
                    "v_cache must have k_cache's shape");
    like_cache(v, "v_cache");
  }

  const Tensor& lens = *a.cache_seqlens;
  STD_TORCH_CHECK(lens.dim() == 1 && lens.size(0) == d.batch &&
                      lens.scalar_type() == ScalarType::Int,
                  "cache_seqlens must be int32 [B=", d.batch, "]");
  same_device(lens, "cache_seqlens");

  if (a.reps != nullptr) {
    const Tensor& r = *a.reps;
    STD_TORCH_CHECK(a.rep != RepMode::kMax, "rep 'max' takes no reps");
    const bool bound = a.rep == RepMode::kBound;
    STD_TORCH_CHECK(r.dim() == (bound ? 5 : 4) && r.size(0) == d.batch && r.size(1) == d.hkv &&
                        r.size(r.dim() - 1) == d.d && (!bound || r.size(3) == 2),
                    "reps must be ", bound ? "[B, Hkv, n_chunks, 2, D]" : "[B, Hkv, n_chunks, D]");
    like_cache(r, "reps");
    d.n_chunks = r.size(2);
    if (a.q != nullptr) {
      // No block of any valid length has more middle chunks than the last block at N = Nmax.
      const int64_t most =
          max_middle_chunks(d.nmax, d.lq, a.query_block, a.sink, a.local, a.chunk);
      STD_TORCH_CHECK(d.n_chunks >= most, "reps holds ", d.n_chunks,
                      " chunks but the cache can have ", most, " middle chunks");
    }
  }

  if (a.idx != nullptr) {
    const Tensor& idx = *a.idx;
    STD_TORCH_CHECK(idx.dim() == 4 && idx.size(0) == d.batch && idx.size(1) == d.hkv &&
                        idx.size(2) == d.n_blocks && idx.size(3) >= 1 &&
                        idx.scalar_type() == ScalarType::Int,
                    "idx must be int32 [B, Hkv, n_blocks=", d.n_blocks, ", topk]");
    same_device(idx, "idx");
    d.topk = idx.size(3);
  }

  if (a.inv_freq != nullptr) {
    const Tensor& f = *a.inv_freq;
    STD_TORCH_CHECK(f.dim() == 1 && f.scalar_type() == ScalarType::Float &&
                        2 * f.size(0) <= d.d,
                    "inv_freq must be float32 [R/2] with R <= D=", d.d);
    same_device(f, "inv_freq");
    d.half_rot = f.size(0);
  }

  if (device.type() == torch::headeronly::DeviceType::CPU) {
    const int32_t* n = lens.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < d.batch; ++b) {
      const int64_t nb = n[b * lens.stride(0)];
      STD_TORCH_CHECK(nb >= d.lq && nb <= d.nmax, "cache_seqlens[", b, "]=", nb,
                      " must lie in [Lq=", d.lq, ", Nmax=", d.nmax, "]");
      if (d.paged) {
        const Tensor& t = *a.block_table;
        const int32_t* tp = t.const_data_ptr<int32_t>();
        for (int64_t i = 0; i < ceil_div(nb, d.page_size); ++i) {
          const int64_t page = tp[b * t.stride(0) + i * t.stride(1)];
          STD_TORCH_CHECK(page >= 0 && page < d.num_pages, "block_table[", b, ", ", i, "]=",
                          page, " is not a page of k_cache (it has ", d.num_pages, ")");
        }
      }
      if (a.idx == nullptr) continue;
      const Tensor& idx = *a.idx;
      const int32_t* ip = idx.const_data_ptr<int32_t>();
      for (int64_t blk = 0; blk < d.n_blocks; ++blk) {
        const int64_t n_mid =
            block_segments(nb, d.lq, a.query_block, blk, a.sink, a.local, a.chunk).n_mid;
        for (int64_t h = 0; h < d.hkv; ++h)
          for (int64_t t = 0; t < d.topk; ++t) {
            const int64_t j = ip[b * idx.stride(0) + h * idx.stride(1) + blk * idx.stride(2) +
                                 t * idx.stride(3)];
            STD_TORCH_CHECK(j >= -1 && j < n_mid, "idx[", b, ", ", h, ", ", blk, ", ", t, "]=", j,
                            " is not -1 or a middle chunk of sequence ", b, " and query block ",
                            blk, " (it has ", n_mid, ")");
          }
      }
    }
  }
  return d;
}

// The KvLayout of k_cache or v_cache (docs/design.md section 3) for the checked call `a`.
inline KvLayout kv_layout(const Tensor& cache, const Dims& d, const OpArgs& a) {
  KvLayout l;
  l.s_page = cache.stride(0);
  l.s_head = cache.stride(1);
  l.s_tok = cache.stride(2);
  l.page_size = d.page_size;
  l.num_pages = d.num_pages;
  if (d.paged) {
    const Tensor& t = *a.block_table;
    l.table = t.const_data_ptr<int32_t>();
    l.t_sb = t.stride(0);
    l.t_sp = t.stride(1);
  }
  return l;
}

}  // namespace reattention
