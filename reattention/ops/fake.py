"""Fake (meta) kernels of the compiled ops, so torch.compile and torch.library.opcheck can
trace them: output shapes and dtypes only. Parameter names follow the op schemas in
csrc/ops.cpp."""
from __future__ import annotations

import torch

from .backends import _status

if _status["cpu"] is None:
    @torch.library.register_fake("reattention::chunk_reps")
    def _chunk_reps_fake(k_cache, cache_seqlens, reps, sink, chunk, rep, start_chunk,
                         block_table=None):
        return None

    @torch.library.register_fake("reattention::select_chunks")
    def _select_chunks_fake(q, k_cache, reps, cache_seqlens, sink, local, chunk, topk, rep,
                            query_block, block_table=None):
        b, _, lq, _ = q.shape
        n_blocks = -(-lq // query_block)
        return q.new_empty((b, k_cache.shape[1], n_blocks, topk), dtype=torch.int32)

    @torch.library.register_fake("reattention::gather_attention")
    def _gather_attention_fake(q, k_cache, v_cache, cache_seqlens, idx, inv_freq, sink, local,
                               chunk, query_block, scale, rope_scale, rope_style, positions,
                               block_table=None):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("reattention::attend")
    def _attend_fake(q, k_cache, v_cache, reps, cache_seqlens, inv_freq, sink, local, chunk,
                     topk, rep, query_block, scale, rope_scale, rope_style, positions,
                     block_table=None):
        b, _, lq, _ = q.shape
        n_blocks = -(-lq // query_block)
        return (torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32),
                q.new_empty((b, k_cache.shape[1], n_blocks, topk), dtype=torch.int32))

    @torch.library.register_fake("reattention::copy_pages")
    def _copy_pages_fake(dst, src, dst_index, src_index, mask=None):
        return None

    @torch.library.register_fake("reattention::tiered_fetch")
    def _tiered_fetch_fake(idx, table, owner, stamp, state, jobs, k, v, host_k, host_v,
                           sink_pages, hot_base, absent, pages_per_chunk):
        return None
