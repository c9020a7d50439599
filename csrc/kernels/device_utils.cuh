// Device helpers shared by the reattention CUDA kernels; no torch dependency.
//
// Tensor-core tiles use mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate, sm80+), fed by
// ldmatrix from shared memory that cp.async fills. Shared tiles hold rows of `kRow` 16-bit
// elements with their 16-byte chunks XOR-swizzled by (row % 8), so the eight row addresses
// of one ldmatrix phase fall in eight different bank groups (kRow >= 64 keeps that valid).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "contract.h"

namespace reattention::kernels {

template <typename T>
struct Dtype;

template <>
struct Dtype<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Dtype<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// D += A * B for one m16n8k16 tile. A: 4 regs (row-major 16x16), B: 2 regs (16x8, k-major).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global -> shared copy; when `valid` is false nothing is read and zeros land.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem),
               "r"(src_bytes));
}

// 4 bytes from global to shared memory, cached in L1 (cp.async's smallest copy).
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(addr), "l"(gmem));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Programmatic dependent launch (sm_90; no-ops below). A kernel launched with the
// programmatic-stream-serialization attribute may start once every CTA of the kernel ahead of
// it has called grid_dependents_launch (or exited); grid_dependency_wait then blocks until
// that kernel has completed and its writes are visible. Without the attribute the wait
// returns at once.
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Launches kernel<<<grid, block, smem, stream>>>(args...), with early = true as a programmatic
// dependent of the kernel ahead of it in the stream (grid_dependents_launch above).
template <typename... Params, typename... Args>
cudaError_t launch_maybe_early(void (*kernel)(Params...), dim3 grid, dim3 block, int smem,
                               cudaStream_t stream, bool early, Args... args) {
  if (!early) {
    kernel<<<grid, block, smem, stream>>>(args...);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

// Element offset of (row, col) in a swizzled tile with kRow elements per row.
template <int kRow>
__device__ __forceinline__ int swz(int row, int col) {
  static_assert(kRow % 64 == 0, "swizzle needs at least 8 chunks of 16 bytes per row");
  return row * kRow + ((((col >> 3) ^ (row & 7)) << 3) | (col & 7));
}

// swz<kRow> as a layout object, for staging code that also writes other tile layouts (the
// sm_90a kernels' Sliced64): the Q and K/V tiles of the mma.sync kernels, the A tile of the
// mma.sync scoring GEMM.
template <int kRow>
struct RowSwizzled {
  __device__ __forceinline__ int operator()(int row, int col) const { return swz<kRow>(row, col); }
};

// S[16 x 8*kNT] = A[16 x kK] * B[8*kNT x kK]^T for one warp. A rows a_row0.., B rows (the
// columns of S) b_row0.., both swizzled tiles of kK elements per row. S's fragment layout:
// s[nt][0..1] = row lane/4, cols nt*8 + 2*(lane%4) + {0,1}; s[nt][2..3] = the same at row +8.
// kARows = 8: A has 8 rows (a_row0..+7, one ldmatrix x2 per k16 step); rows 8..15 of the m16
// tile are zero registers, so s[nt][2..3] stay zero and only s[nt][0..1] mean anything.
template <typename T, int kK, int kNT, int kARows = 16>
__device__ __forceinline__ void warp_gemm_abt(float (&s)[kNT][4], const T* sa, int a_row0,
                                              const T* sb, int b_row0, int lane) {
  static_assert(kARows == 16 || kARows == 8, "an m16 tile of 16 or 8 real rows");
  static_assert(kNT % 2 == 0, "B fragments are loaded for pairs of 8-column tiles");
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
  }
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    if constexpr (kARows == 16) {
      ldmatrix_x4(a, sa + swz<kK>(a_row0 + (lane & 15), kk * 16 + (lane >> 4) * 8));
    } else {  // lanes 0..7: row lane, columns kk*16..+7; lanes 8..15: columns +8..+15
      uint32_t a2[2];
      ldmatrix_x2(a2, sa + swz<kK>(a_row0 + (lane & 7), kk * 16 + ((lane >> 3) & 1) * 8));
      a[0] = a2[0], a[1] = 0u, a[2] = a2[1], a[3] = 0u;
    }
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, sb + swz<kK>(b_row0 + np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                  kk * 16 + ((lane >> 3) & 1) * 8));
      mma_16816<T>(s[2 * np], a, b[0], b[1]);
      mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// The block table of a paged K/V cache as the kernels read it (docs/design.md section 3):
// token t of sequence b lives in page table[b, t / page_size], row t % page_size, of a pool
// [num_pages, Hkv, page_size, D]. table == nullptr: a contiguous cache [B, Hkv, Nmax, D],
// which every kernel addresses exactly as before (b * s_0 + h * s_1 + t * s_2). A kernel
// resolves a page once per cache row it copies (or once per chunk when the chunk lies in one
// page), never per element; the launcher never reads the table (no sync, graph capturable).
struct PageTable {
  const int* table = nullptr;  // int32 [B, max_pages], or nullptr (contiguous)
  int64_t sb = 0, sp = 0;      // table strides (elements)
  int page_size = 1;
  int page_shift = -1;         // log2(page_size) for a power of two (a shift, not a division)
  int max_pages = 1;
  int num_pages = 1;

  __host__ __device__ bool paged() const { return table != nullptr; }

  // Sequence b's row of the table.
  __device__ __forceinline__ const int* row(int b) const { return table + b * sb; }

  // Page and row in the page of token t of the sequence whose table row is `pages`. The table
  // column and the page id are clamped (to max_pages and num_pages), so a bad length or table
  // entry reads a wrong row, never outside the table or the pool.
  __device__ __forceinline__ void locate(const int* pages, int t, int& page, int& in) const {
    int col;
    if (page_shift >= 0) {
      col = t >> page_shift;
      in = t & (page_size - 1);
    } else {
      col = t / page_size;
      in = t - col * page_size;
    }
    col = min(max(col, 0), max_pages - 1);
    page = min(max(__ldg(pages + col * sp), 0), num_pages - 1);
  }

  // Element offset of token t's row, from the pool's head-h base (page stride s_page, row
  // stride s_tok).
  __device__ __forceinline__ int64_t offset(const int* pages, int t, int64_t s_page,
                                            int64_t s_tok) const {
    int page, in;
    locate(pages, t, page, in);
    return page * s_page + in * s_tok;
  }

  // Whether tokens first..last (first <= last) lie in one page.
  __device__ __forceinline__ bool one_page(int first, int last) const {
    return page_shift >= 0 ? (first >> page_shift) == (last >> page_shift)
                           : first / page_size == last / page_size;
  }
};

// Order-preserving map float -> uint32 (larger float, larger key; -inf above every NaN).
__device__ __forceinline__ uint32_t float_to_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// 2^x by the MUFU alone, with subnormal results flushed to zero. exp2f is the same MUFU.EX2
// wrapped in a compare and two multiplies that keep results below 2^-126 subnormal; softmax
// weights that small add nothing visible next to the row's largest weight (1), and the wrapper
// was three of the softmax's ~eight instructions per score.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// CTA tile of the few-rows (decode) kernels, 4 warps: a query block with at most 16 rows is
// one m16 tile, with the warps side by side over 64 columns (keys, or chunks' vectors). Query
// blocks with more rows have their own kernels (GemmTile, PrefillShape).
struct TileShape {
  int warps_n;
  int block_m;
  int block_n;
};

constexpr TileShape kFewRowsTile{4, 16, 64};

// Rows of a query block (its queries times the group's q heads) fit one m16 tile.
__host__ __device__ inline bool few_rows(int lq, int query_block, int group) {
  return (lq < query_block ? lq : query_block) * group <= 16;
}

}  // namespace reattention::kernels
