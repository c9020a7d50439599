// chunk_reps: per-chunk representatives of the raw keys, built incrementally.
//
// One CTA per (chunk j, kv head, sequence). Chunk j covers tokens [S + jC, S + (j+1)C); only
// chunks in [start_chunk, min(n_chunks, (N_b - S) / C)) are written, nothing else is touched.
// A negative start_chunk = -m writes the last m complete chunks of each sequence instead: the
// grid has m CTAs per (b, h) and each finds its chunk from the device length N_b, so the launch
// depends on no host length (a CUDA-graph-captured decode step replays it as the cache grows).
// Thread t owns the 8-element slice (t % (D/8)) of the head dim and walks the chunk's tokens
// with a stride of 128 / (D/8) rows; partial results meet in shared memory. A paged cache
// resolves the chunk's page once when the chunk lies in one page (page_size == chunk with the
// sink a multiple of it, or any page holding the whole chunk), else once per token row; the
// rows are read in the same order either way, so the reps equal the contiguous ones bit for bit.
//   bound: reps[b, h, j, 0, :] = min over tokens, reps[b, h, j, 1, :] = max (exact, cache dtype)
//   mean : reps[b, h, j, :]    = fp32 sum over tokens / C, rounded once to the cache dtype
#pragma once

#include "device_utils.cuh"

namespace reattention::kernels {

struct ChunkRepsParams {
  const void* k;          // [B, Hkv, Nmax, D], or pages [num_pages, Hkv, page_size, D]
  const int* seqlens;     // [B]
  void* reps;             // bound [B, Hkv, n_chunks, 2, D] or mean [B, Hkv, n_chunks, D]
  int64_t k_sb, k_sh, k_sn;       // k strides (elements; dim 0 is a sequence or a page);
                                  // the last dim is contiguous
  PageTable pages;                // the block table (table == nullptr: contiguous)
  int64_t r_sb, r_sh, r_sj;       // reps strides of dims 0..2; inner dims are contiguous
  int batch, heads, n_chunks, sink, chunk, start_chunk;
  bool mean;
};

constexpr int kRepsThreads = 128;

template <typename T, int D>
__global__ void __launch_bounds__(kRepsThreads) chunk_reps_kernel(ChunkRepsParams p) {
  constexpr int kVec = 8;                       // elements per 16-byte load
  constexpr int kSlices = D / kVec;             // threads across the head dim
  constexpr int kRows = kRepsThreads / kSlices;  // tokens read in parallel
  static_assert(kRepsThreads % kSlices == 0, "head dim must divide the CTA");

  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int n = p.seqlens[b];
  const int complete = min(p.n_chunks, n > p.sink ? (n - p.sink) / p.chunk : 0);
  const int j = (p.start_chunk < 0 ? complete - static_cast<int>(gridDim.x) : p.start_chunk) +
                static_cast<int>(blockIdx.x);
  if (j < 0 || j >= complete) return;

  const int slice = threadIdx.x % kSlices;
  const int row = threadIdx.x / kSlices;
  const int64_t first = static_cast<int64_t>(p.sink) + static_cast<int64_t>(j) * p.chunk;
  const T* head = static_cast<const T*>(p.k) + h * p.k_sh + slice * kVec;
  // Row t of the chunk sits at base + t * k_sn (contiguous, or the chunk in one page); when
  // the chunk straddles pages, `pages` is the sequence's table row and each row finds its page.
  const T* base;
  const int* pages = nullptr;
  if (!p.pages.paged()) {
    base = head + b * p.k_sb + first * p.k_sn;
  } else {
    const int f = static_cast<int>(first);
    pages = p.pages.row(b);
    base = head + p.pages.offset(pages, f, p.k_sb, p.k_sn);
    if (p.pages.one_page(f, f + p.chunk - 1)) pages = nullptr;
  }

  float lo[kVec], hi[kVec];  // min / max, or (sum, unused) for mean
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    lo[e] = p.mean ? 0.f : INFINITY;
    hi[e] = -INFINITY;
  }
  for (int t = row; t < p.chunk; t += kRows) {
    const T* src = pages == nullptr
                       ? base + t * p.k_sn
                       : head + p.pages.offset(pages, static_cast<int>(first) + t, p.k_sb, p.k_sn);
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float x = Dtype<T>::to_float(v[e]);
      if (p.mean) {
        lo[e] += x;
      } else {
        lo[e] = fminf(lo[e], x);
        hi[e] = fmaxf(hi[e], x);
      }
    }
  }

  __shared__ float s_lo[kRows][D];
  __shared__ float s_hi[kRows][D];
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    s_lo[row][slice * kVec + e] = lo[e];
    s_hi[row][slice * kVec + e] = hi[e];
  }
  __syncthreads();

  T* out = static_cast<T*>(p.reps) + b * p.r_sb + h * p.r_sh + j * p.r_sj;
  for (int d = threadIdx.x; d < D; d += kRepsThreads) {
    float a = s_lo[0][d], c = s_hi[0][d];
    for (int r = 1; r < kRows; ++r) {
      if (p.mean) {
        a += s_lo[r][d];
      } else {
        a = fminf(a, s_lo[r][d]);
        c = fmaxf(c, s_hi[r][d]);
      }
    }
    if (p.mean) {
      out[d] = Dtype<T>::from_float(a / static_cast<float>(p.chunk));
    } else {
      // min and max of values of type T are values of type T: the rounding is exact.
      out[d] = Dtype<T>::from_float(a);
      out[D + d] = Dtype<T>::from_float(c);
    }
  }
}

template <typename T, int D>
cudaError_t launch_chunk_reps(const ChunkRepsParams& p, cudaStream_t stream) {
  const int todo = p.start_chunk < 0 ? min(-p.start_chunk, p.n_chunks) : p.n_chunks - p.start_chunk;
  if (todo <= 0 || p.batch == 0 || p.heads == 0) return cudaSuccess;
  const dim3 grid(todo, p.heads, p.batch);
  chunk_reps_kernel<T, D><<<grid, kRepsThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace reattention::kernels
