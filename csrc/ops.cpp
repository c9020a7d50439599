// The reattention op schemas (docs/design.md section 3). Kernels register beside their code:
// CPU in csrc/cpu/*.cpp (library _C, with these schemas), CUDA in csrc/cuda/*.cu (_C_cuda),
// Triton in triton_kernels/ (as reattention::<op>_triton), fake kernels in reattention/ops/fake.py.
//
// Every op takes an optional trailing block_table (int32 [B, max_pages]): k_cache and v_cache
// are then pages [num_pages, Hkv, page_size, D] (docs/design.md section 3).
// At this level cache_seqlens is always an int32 [B] tensor on the inputs' device, inv_freq a
// float32 [R/2] tensor on that device and scale a float: the Python wrappers fill defaults.
// The rep-mode argument is named `rep`, not `mode`: torch.compile's auto_functionalize passes
// a mutable op's arguments by name, and one called `mode` collides with the `mode` parameter
// of torch's own HOP dispatch (opcheck fails with "got multiple values for argument 'mode'").
#include "common.h"

STABLE_TORCH_LIBRARY(reattention, m) {
  // Fills reps in place for the complete chunks j in [start_chunk, min(n_chunks, (N_b-sink)/chunk)),
  // or, for start_chunk = -m < 0, the last m of them per sequence (found from N_b on the device).
  m.def(
      "chunk_reps(Tensor k_cache, Tensor cache_seqlens, Tensor(a!) reps, int sink, int chunk, "
      "str rep, int start_chunk, Tensor? block_table=None) -> ()");
  // int32 [B, Hkv, ceil(Lq/query_block), topk], ascending, -1 padded.
  m.def(
      "select_chunks(Tensor q, Tensor k_cache, Tensor? reps, Tensor cache_seqlens, int sink, "
      "int local, int chunk, int topk, str rep, int query_block, Tensor? block_table=None) -> Tensor");
  // (out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] float32).
  m.def(
      "gather_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
      "Tensor idx, Tensor inv_freq, int sink, int local, int chunk, int query_block, "
      "float scale, float rope_scale, str rope_style, str positions, Tensor? block_table=None) "
      "-> (Tensor, Tensor)");
  // select_chunks then gather_attention on its idx, in one call: (out, lse, idx). The CUDA
  // kernel overlaps the two where it can (docs/design.md section 3.5); the CPU kernel
  // (reattention/ops/backends.py) and the other backends (reattention.ops.unchecked.attend)
  // run the two ops in turn.
  m.def(
      "attend(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? reps, Tensor cache_seqlens, "
      "Tensor inv_freq, int sink, int local, int chunk, int topk, str rep, int query_block, "
      "float scale, float rope_scale, str rope_style, str positions, Tensor? block_table=None) "
      "-> (Tensor, Tensor, Tensor)");
  // dst[dst_index[i]] = src[src_index[i]] for every i with mask[i] (all when mask is None):
  // whole pages (dim-0 slices) of two contiguous page tensors. On CUDA one of dst/src may be
  // a pinned CPU tensor (the host tier of a tiered cache), read or written in place.
  m.def(
      "copy_pages(Tensor(a!) dst, Tensor src, Tensor dst_index, Tensor src_index, "
      "Tensor? mask=None) -> ()");
  // The tiered cache's fetch step (csrc/tiered.h): makes the pages idx selects resident
  // in k/v, updating the table, the hot-set state and the copy list; reads host_k/host_v.
  m.def(
      "tiered_fetch(Tensor idx, Tensor(a!) table, Tensor(b!) owner, Tensor(c!) stamp, "
      "Tensor(d!) state, Tensor(e!) jobs, Tensor(f!) k, Tensor(g!) v, Tensor host_k, "
      "Tensor host_v, int sink_pages, int hot_base, int absent, int pages_per_chunk) -> ()");
}
