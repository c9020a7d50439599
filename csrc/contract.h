// The arithmetic of docs/design.md section 2 that every compiled backend shares: the rep modes
// and where a sequence's tokens go (sink, middle chunks, local window, compact positions).
//
// Torch-free and host + device, so the CPU library (through common.h) and the torch-free CUDA
// kernel headers include the same definitions. Lengths and positions are int64_t; device code
// calls these a few times per CTA, never per key.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RA_HOST_DEVICE inline
#endif

namespace reattention {

// How a chunk is scored: exact max over its raw keys, the min/max box bound, or its centroid.
enum class RepMode : int { kMax = 0, kBound = 1, kMean = 2 };

// Where sequence b's tokens go, for N valid tokens of which the last Lq are queries:
// sink [0, sink_len), middle [sink, mid_end) = n_mid whole chunks, local [mid_end, N).
struct Segments {
  int64_t sink_len;
  int64_t mid_end;
  int64_t n_mid;
  int64_t q_start;  // P0 = N - Lq, the first query's original position
};

RA_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

RA_HOST_DEVICE Segments segments(int64_t n, int64_t lq, int64_t sink, int64_t local,
                                 int64_t chunk) {
  const int64_t p0 = n - lq;
  const int64_t room = p0 - local - sink;
  const int64_t n_mid = room > 0 ? room / chunk : 0;
  return Segments{n < sink ? n : sink, sink + chunk * n_mid, n_mid, p0};
}

// Chunks whose tokens all lie below N: the ones chunk_reps may fill.
RA_HOST_DEVICE int64_t complete_chunks(int64_t n, int64_t sink, int64_t chunk) {
  return n > sink ? (n - sink) / chunk : 0;
}

// Compact RoPE position of the query at original position p when n_sel chunks are gathered:
// its index in [sink | chunks | local]. With N < sink, mid_end = sink and this is p itself.
RA_HOST_DEVICE int64_t compact_query_pos(int64_t p, const Segments& s, int64_t sink,
                                         int64_t n_sel, int64_t chunk) {
  return p + sink + n_sel * chunk - s.mid_end;
}

}  // namespace reattention
