// gather_attention kernels for bf16, head dim 256 (one file per pair: the build compiles them in parallel).
#include "kernels/gather_attention.cuh"

namespace reattention::kernels {
template cudaError_t launch_gather_attention<__nv_bfloat16, 256>(const AttnParams&, cudaStream_t);
}  // namespace reattention::kernels
