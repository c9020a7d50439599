// Hopper (sm_90a) warpgroup MMA building blocks shared by the sm_90a kernels: the shared-memory
// matrix descriptor of a K-major tile in the 128-byte swizzle, the wgmma fences and group
// waits, the async-proxy fence after generic shared-memory writes, and wgmma.mma_async
// m64nNk16 with fp32 accumulators, both operands in shared memory (K-major) or A in registers
// and B an MN-major tile; named barrier sync / arrive (the warpgroups' turns of the many-rows
// kernel); for the warp-specialized kernels, mbarrier init / arrive / parity wait and
// setmaxnreg; bulk copies (global to shared, counted on an mbarrier).
//
// The 128-byte swizzle atom is 8 rows x 128 bytes (64 16-bit elements), row r at byte 128 r,
// its 16-byte chunk c stored at chunk c ^ (r % 8): swz<64> of device_utils.cuh. Atoms must be
// 1024-byte aligned, since the hardware applies the XOR to the final address. Sliced64 addresses
// tiles of such slices. The PTX wrappers are compiled for sm_90a only (__CUDA_ARCH_FEAT_SM90_ALL;
// callers guard their use the same way); sm90a_code_usable is the launchers' host-side rule.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "device_utils.cuh"

namespace reattention::kernels {

// Element offset of (row, col) in a tile of kRows rows of 16-bit elements stored as 64-element
// column slices, each in the 128-byte swizzle: slice j holds columns 64 j .. 64 j + 63 of every
// row (kRows * 128 bytes), row r of a slice at byte 128 r with its 16-byte chunk c at chunk
// c ^ (r % 8), i.e. swz<64>. The K-major operand layout of the sm_90a kernels.
template <int kRows>
struct Sliced64 {
  __device__ __forceinline__ int operator()(int row, int col) const {
    return (col >> 6) * (kRows * 64) + swz<64>(row, col & 63);
  }
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// wgmma shared-memory matrix descriptor of a K-major 128-byte-swizzled tile at shared address
// `addr` (1024-byte aligned atoms; see the header comment for the fields).
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) |
         (1ull << 62);
}

// Descriptor of an MN-major 128-byte-swizzled tile (the B of A B with N contiguous: rows
// of 64 N-elements, 128 bytes, one per k; 1024-byte atoms of 8 k rows, the next 8 k rows 1024
// bytes on (stride byte offset); the next 64 N-elements `lbo` bytes on (leading byte offset).
// wgmma reads it with the B-transpose immediate set (wgmma_m64k16_rs).
__device__ __forceinline__ uint64_t wgmma_desc_sw128_mn(uint32_t addr, uint32_t lbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) | (64ull << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Orders this thread's generic-proxy shared memory writes before later async-proxy reads.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// The same for every state space: this thread's generic-proxy accesses to shared and global
// memory, and those it has acquired from other threads, before its later async-proxy ones (a
// bulk copy of words that other CTAs stored, into shared memory that generic code used).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async;\n" ::: "memory");
}

// Named barrier kId (1 .. 15; 0 is __syncthreads') of kCount threads (a multiple of 32), each
// warp of a caller uniform: named_bar_sync waits for the barrier to complete, named_bar_arrive
// adds this thread's arrival without waiting (a producer's signal). Either orders this thread's
// earlier memory accesses before the accesses of the threads that pass the barrier after it.
// The id is an immediate, so ptxas counts only the barriers a kernel names.
template <int kId, int kCount>
__device__ __forceinline__ void named_bar_sync() {
  static_assert(kId > 0 && kId < 16 && kCount % 32 == 0, "named barrier");
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "n"(kCount) : "memory");
}
template <int kId, int kCount>
__device__ __forceinline__ void named_bar_arrive() {
  static_assert(kId > 0 && kId < 16 && kCount % 32 == 0, "named barrier");
  asm volatile("bar.arrive %0, %1;\n" ::"n"(kId), "n"(kCount) : "memory");
}

// Keeps the compiler from moving accesses of the accumulators across the asynchronous MMA.
template <int kRegs>
__device__ __forceinline__ void fence_accumulators(float* d) {
#pragma unroll
  for (int i = 0; i < kRegs; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define REATTENTION_F8(i)                                                                 \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])

// Operand lists of the accumulators: "%0, ..., %63" / "%0, ..., %127" in the instruction string
// and the matching "+f" outputs (d[0 .. 63] / d[0 .. 127]).
#define REATTENTION_ACC64                                                               \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "              \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "    \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "    \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define REATTENTION_ACC128                                                              \
  REATTENTION_ACC64 ", "                                                                \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "    \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "    \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, "    \
  "%110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, " \
  "%124, %125, %126, %127"
#define REATTENTION_OUT64                                                               \
  REATTENTION_F8(0), REATTENTION_F8(8), REATTENTION_F8(16), REATTENTION_F8(24),         \
      REATTENTION_F8(32), REATTENTION_F8(40), REATTENTION_F8(48), REATTENTION_F8(56)
#define REATTENTION_OUT128                                                              \
  REATTENTION_OUT64, REATTENTION_F8(64), REATTENTION_F8(72), REATTENTION_F8(80),        \
      REATTENTION_F8(88), REATTENTION_F8(96), REATTENTION_F8(104), REATTENTION_F8(112), \
      REATTENTION_F8(120)

#define REATTENTION_WGMMA_M64N128K16(type)                                           \
  asm volatile(                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                  \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." type "." type " {"                \
      REATTENTION_ACC64                                                              \
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                             \
      : REATTENTION_OUT64                                                            \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))

#define REATTENTION_WGMMA_M64N256K16(type)                                           \
  asm volatile(                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                  \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." type "." type " {"                \
      REATTENTION_ACC128                                                             \
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"                                             \
      : REATTENTION_OUT128                                                           \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))

#define REATTENTION_WGMMA_M64N64K16(type)                                            \
  asm volatile(                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                   \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." type "." type " {"                 \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"  \
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                             \
      : REATTENTION_F8(0), REATTENTION_F8(8), REATTENTION_F8(16), REATTENTION_F8(24) \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))

#define REATTENTION_WGMMA_M64N64K16_RS(type)                                        \
  asm volatile(                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                   \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." type "." type " {"                 \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"  \
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                        \
      : REATTENTION_F8(0), REATTENTION_F8(8), REATTENTION_F8(16), REATTENTION_F8(24) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))

#define REATTENTION_WGMMA_M64N128K16_RS(type)                                        \
  asm volatile(                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                   \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." type "." type " {"                 \
      REATTENTION_ACC64                                                              \
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                        \
      : REATTENTION_OUT64                                                            \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))

// m64n256k16 with A from registers and B K-major in shared memory (no transpose).
#define REATTENTION_WGMMA_M64N256K16_RS_KMAJOR(type)                                    \
  asm volatile(                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                                  \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." type "." type " {"                \
      REATTENTION_ACC128                                                             \
      "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"                             \
      : REATTENTION_OUT128                                                           \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))

// d (kN / 2 fp32 per thread) = A B^T (+ d when scale_d != 0) for one k16 step.
template <typename T, int kN>
__device__ __forceinline__ void wgmma_m64k16(float* d, uint64_t desc_a, uint64_t desc_b,
                                             int scale_d) {
  static_assert(kN == 64 || kN == 128 || kN == 256, "wgmma shapes used here");
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (kN == 64) {
    if constexpr (kHalf) {
      REATTENTION_WGMMA_M64N64K16("f16");
    } else {
      REATTENTION_WGMMA_M64N64K16("bf16");
    }
  } else if constexpr (kN == 256) {
    if constexpr (kHalf) {
      REATTENTION_WGMMA_M64N256K16("f16");
    } else {
      REATTENTION_WGMMA_M64N256K16("bf16");
    }
  } else {
    if constexpr (kHalf) {
      REATTENTION_WGMMA_M64N128K16("f16");
    } else {
      REATTENTION_WGMMA_M64N128K16("bf16");
    }
  }
}

// d (kN / 2 fp32 per thread) = A B (+ d when scale_d != 0) for one k16 step, A (64 x 16) from
// registers, B (16 x kN) an MN-major tile in shared memory (desc_b: wgmma_desc_sw128_mn). The A
// fragment of a warp is that of mma.m16n8k16 for its 16 rows (warp i of the warpgroup: rows
// 16 i ..): a[0] (row g, k 2 t4, +1), a[1] (row g + 8, same k), a[2], a[3] the same at k + 8,
// g = lane / 4, t4 = lane % 4; the m64nNk16 accumulator of a warp packs the same way.
template <typename T, int kN>
__device__ __forceinline__ void wgmma_m64k16_rs(float* d, const uint32_t (&a)[4],
                                                uint64_t desc_b, int scale_d) {
  static_assert(kN == 64 || kN == 128, "wgmma shapes used here");
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (kN == 64) {
    if constexpr (kHalf) {
      REATTENTION_WGMMA_M64N64K16_RS("f16");
    } else {
      REATTENTION_WGMMA_M64N64K16_RS("bf16");
    }
  } else {
    if constexpr (kHalf) {
      REATTENTION_WGMMA_M64N128K16_RS("f16");
    } else {
      REATTENTION_WGMMA_M64N128K16_RS("bf16");
    }
  }
}

// d (128 fp32 per thread) = A B^T (+ d when scale_d != 0) for one k16 step of m64n256k16, A
// (64 x 16) from registers in the fragment layout of wgmma_m64k16_rs, B (256 x 16) K-major in
// shared memory (desc_b: wgmma_desc_sw128), as wgmma_m64k16 reads it.
template <typename T>
__device__ __forceinline__ void wgmma_m64n256k16_rs(float* d, const uint32_t (&a)[4],
                                                    uint64_t desc_b, int scale_d) {
  if constexpr (std::is_same_v<T, __half>) {
    REATTENTION_WGMMA_M64N256K16_RS_KMAJOR("f16");
  } else {
    REATTENTION_WGMMA_M64N256K16_RS_KMAJOR("bf16");
  }
}

#undef REATTENTION_WGMMA_M64N256K16_RS_KMAJOR
#undef REATTENTION_WGMMA_M64N64K16
#undef REATTENTION_WGMMA_M64N64K16_RS
#undef REATTENTION_WGMMA_M64N128K16_RS
#undef REATTENTION_WGMMA_M64N128K16
#undef REATTENTION_WGMMA_M64N256K16
#undef REATTENTION_OUT128
#undef REATTENTION_OUT64
#undef REATTENTION_ACC128
#undef REATTENTION_ACC64
#undef REATTENTION_F8

// mbarrier (shared::cta) building blocks of the warp-specialized kernels and the bulk copies of
// the many-rows attention: the barrier at shared
// address `addr` completes a phase when `count` arrivals have been made; a waiter names the
// parity of the phase it waits for (0 for the first).
__device__ __forceinline__ void mbar_init(uint32_t addr, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(addr), "r"(count) : "memory");
}
// Arrival with release semantics: this thread's earlier writes are visible to the waiters.
__device__ __forceinline__ void mbar_arrive(uint32_t addr) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(addr) : "memory");
}
// Arrival made by the hardware once every cp.async this thread issued before it has landed
// (.noinc: it counts as one of the `count` arrivals). The thread goes on at once; a waiter on
// the phase sees the copied bytes (generic proxy; fence them before an async-proxy read).
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t addr) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(addr) : "memory");
}
// Waits (acquire) until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t addr, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}

// Makes this thread's mbarrier.init visible to the async proxy (the bulk copies' complete_tx);
// a CTA barrier then publishes it to the other threads.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Arrival (one of `count`) that also raises the phase's expected transaction bytes by `bytes`:
// the phase completes once the arrivals are made and that many bytes of bulk copies landed.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t addr, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(addr), "r"(bytes)
               : "memory");
}
// Bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from global memory to
// shared address `dst` by the copy engine, counted on the mbarrier at `bar` as transaction bytes.
// The bytes land in order: a source laid out as the destination's swizzled image arrives as
// that image. A waiter on the phase sees them, wgmma's async-proxy reads included.
__device__ __forceinline__ void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes,
                                              uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// Hands registers between the warpgroups of a warp-specialized CTA (every warp of the
// warpgroup executes it; kRegs a multiple of 8 in [24, 256]).
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

#endif  // sm_90a

// Whether `kernel` (a __global__ function) runs sm_90a code on the current device: a compute
// capability 9.0 device and a build whose binary for it was compiled for sm_90a (the kernel's
// binary version is 90). The launchers of the sm_90a kernels pick them by this rule.
inline cudaError_t sm90a_code_usable(const void* kernel, bool* usable) {
  *usable = false;
  int device = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device)) !=
          cudaSuccess ||
      (err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device)) !=
          cudaSuccess)
    return err;
  if (major != 9 || minor != 0) return cudaSuccess;
  cudaFuncAttributes attr;
  if ((err = cudaFuncGetAttributes(&attr, kernel)) != cudaSuccess) return err;
  *usable = attr.binaryVersion == 90;
  return cudaSuccess;
}

}  // namespace reattention::kernels
