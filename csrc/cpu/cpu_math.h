// fp32 building blocks of the CPU kernels: strided loads, dot products, RoPE.
//
// The reductions keep 8 independent partial sums so GCC vectorizes them at -O3 without
// -ffast-math (which would also loosen sin/cos, and RoPE angles reach thousands of radians).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace reattention {
namespace cpu {

// Reads n elements spaced `stride` apart and widens them to float32.
template <typename T>
inline void load_f32(const T* p, int64_t stride, int64_t n, float* out) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i * stride]);
  }
}

// Narrows float32 to T (round to nearest even) and writes n elements spaced `stride` apart.
template <typename T>
inline void store_from_f32(const float* x, int64_t n, T* p, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) p[i * stride] = static_cast<T>(x[i]);
}

constexpr int kLanes = 8;

inline float sum_lanes(const float* acc) {
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return sum_lanes(acc) + tail;
}

inline float max2(float a, float b) {
  return a > b ? a : b;  // a plain compare-select, which vectorizes (std::fmax does not)
}

// sum_d max(q_d * lo_d, q_d * hi_d): the largest q.k over any k in the box [lo, hi].
inline float bound_dot(const float* q, const float* lo, const float* hi, int64_t n) {
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += max2(q[i + l] * lo[i + l], q[i + l] * hi[i + l]);
  float tail = 0.f;
  for (; i < n; ++i) tail += max2(q[i] * lo[i], q[i] * hi[i]);
  return sum_lanes(acc) + tail;
}

// y += w * x
inline void axpy(float w, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// cos/sin of angle float32(pos) * inv_freq[i], i < half, times rope_scale, all in float32
// with the accurate libm functions (as Hugging Face computes them).
inline void rope_cos_sin(int64_t pos, const float* inv_freq, int64_t half, float rope_scale,
                         float* cos_out, float* sin_out) {
  const float p = static_cast<float>(pos);
  for (int64_t i = 0; i < half; ++i) {
    const float angle = p * inv_freq[i];
    cos_out[i] = std::cos(angle) * rope_scale;
    sin_out[i] = std::sin(angle) * rope_scale;
  }
}

// out = RoPE(x) over the first 2*half dims; dims from 2*half to d pass through.
// "half" pairs (i, i + half) (Hugging Face), "interleaved" pairs (2i, 2i + 1).
inline void rope_apply(const float* x, const float* c, const float* s, int64_t half, int64_t d,
                       RopeStyle style, float* out) {
  if (style == RopeStyle::kHalf) {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      out[i] = x1 * c[i] - x2 * s[i];
      out[i + half] = x2 * c[i] + x1 * s[i];
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[2 * i], x2 = x[2 * i + 1];
      out[2 * i] = x1 * c[i] - x2 * s[i];
      out[2 * i + 1] = x2 * c[i] + x1 * s[i];
    }
  }
  for (int64_t i = 2 * half; i < d; ++i) out[i] = x[i];
}

// Element (b, h, n, 0) of a 4-D strided tensor; rows are read with stride s[3].
template <typename T>
struct Strided4 {
  T* data;
  int64_t s[4];

  T* row(int64_t b, int64_t h, int64_t n) const {
    return data + b * s[0] + h * s[1] + n * s[2];
  }
};

template <typename T>
inline Strided4<T> strided4(const Tensor& t) {
  return Strided4<T>{static_cast<T*>(t.data_ptr()),
                     {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

// Token rows of a contiguous or paged cache (KvLayout, docs/design.md section 3); a row's
// elements are `step` apart.
template <typename T>
struct KvRows {
  const T* data;
  KvLayout layout;
  int64_t step;

  const T* row(int64_t b, int64_t h, int64_t t) const {
    return data + layout.offset(b, h, t);
  }
};

template <typename T>
inline KvRows<T> kv_rows(const Tensor& cache, const Dims& d, const OpArgs& a) {
  return KvRows<T>{static_cast<const T*>(cache.data_ptr()), kv_layout(cache, d, a),
                   cache.stride(3)};
}

// A grain for parallel_for such that each thread gets at least ~`min_work` units of work
// when one item costs `item_work`: small enough to keep 100 cores busy on big calls, large
// enough that a tiny call is not split across threads for nothing.
inline int64_t grain_for(int64_t item_work, int64_t min_work = 1 << 15) {
  return item_work >= min_work ? 1 : (min_work + item_work - 1) / item_work;
}

}  // namespace cpu
}  // namespace reattention
