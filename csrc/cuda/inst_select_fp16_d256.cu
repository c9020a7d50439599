// select_chunks kernels for fp16, head dim 256 (one file per pair: the build compiles them in parallel).
#include "kernels/select_chunks.cuh"

namespace reattention::kernels {
template cudaError_t launch_select_chunks<__half, 256>(const SelectParams&, RepMode, cudaStream_t);
}  // namespace reattention::kernels
