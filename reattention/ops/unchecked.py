"""The three op cores, for callers that have validated their inputs (docs/design.md
section 3.4).

They trust what they get and check nothing:

- ``q``, ``k_cache``, ``v_cache``, ``idx`` and ``reps`` are contiguous, of the shapes of
  docs/design.md section 3.1, on one device and (but for idx) of one dtype;
- ``cache_seqlens`` is a contiguous int32 [B] tensor on that device, every value in
  [Lq, Nmax] (chunk_reps: [0, Nmax]);
- ``block_table`` is None (a contiguous cache) or a contiguous int32 [B, max_pages] tensor on
  that device whose entries for the pages of each sequence's tokens are pages of the cache;
- ``inv_freq`` is a contiguous float32 [R/2] tensor on that device, ``scale`` a float;
- ``backend`` is a resolved name ("reference", "cpu", "cuda" or "triton"), never "auto".

They never read device data on the host (the reference backend excepted: it is the spec in
loops and reads the lengths). The public op functions of :mod:`reattention.ops`,
:func:`reattention.reattention_attn`, the caches and the integrations each check once, then
call these.
"""
from __future__ import annotations

import torch

from .. import layout, reference
from .backends import _op


def chunk_reps(k_cache: torch.Tensor, cache_seqlens: torch.Tensor,
               reps: torch.Tensor | None = None, *, sink: int, chunk: int, rep: str,
               backend: str, start_chunk: int = 0,
               block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Fill ``reps`` ("bound"/"mean", allocated when None) for the complete chunks
    j >= ``start_chunk``; returns it."""
    if reps is None:
        reps = layout.new_reps(k_cache, sink, chunk, rep, block_table)
    if backend == "reference":
        reference.chunk_reps_ref(k_cache, cache_seqlens, reps, sink, chunk, rep, start_chunk,
                                 block_table=block_table)
    else:
        _op("chunk_reps", backend)(k_cache, cache_seqlens, reps, sink, chunk, rep, start_chunk,
                                   block_table)
    return reps


def _reps_or_computed(k_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                      reps: torch.Tensor | None, *, sink: int, chunk: int, rep: str,
                      backend: str, block_table: torch.Tensor | None) -> torch.Tensor | None:
    """``reps`` as given, or, when None for "bound"/"mean", computed (:func:`chunk_reps`);
    "max" needs none."""
    if reps is None and rep != "max":
        reps = chunk_reps(k_cache, cache_seqlens, sink=sink, chunk=chunk, rep=rep,
                          backend=backend, block_table=block_table)
    return reps


def select_chunks(q: torch.Tensor, k_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                  reps: torch.Tensor | None, *, sink: int, local: int, chunk: int, topk: int,
                  query_block: int, rep: str, backend: str,
                  block_table: torch.Tensor | None = None) -> torch.Tensor:
    """idx int32 [B, Hkv, n_blocks, topk]; "bound"/"mean" reps are computed when None."""
    reps = _reps_or_computed(k_cache, cache_seqlens, reps, sink=sink, chunk=chunk, rep=rep,
                             backend=backend, block_table=block_table)
    if backend == "reference":
        return reference.select_chunks_ref(q, k_cache, reps, cache_seqlens, sink, local, chunk,
                                           topk, rep, query_block, block_table=block_table)
    return _op("select_chunks", backend)(q, k_cache, reps, cache_seqlens, sink, local, chunk,
                                         topk, rep, query_block, block_table)


def gather_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     idx: torch.Tensor, cache_seqlens: torch.Tensor, *, inv_freq: torch.Tensor,
                     sink: int, local: int, chunk: int, query_block: int, scale: float,
                     rope_scale: float, rope_style: str, positions: str,
                     backend: str, block_table: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] float32)."""
    if backend == "reference":
        return reference.gather_attention_ref(q, k_cache, v_cache, cache_seqlens, idx, inv_freq,
                                              sink, local, chunk, query_block, scale,
                                              rope_scale, rope_style, positions,
                                              block_table=block_table)
    return _op("gather_attention", backend)(q, k_cache, v_cache, cache_seqlens, idx, inv_freq,
                                            sink, local, chunk, query_block, scale, rope_scale,
                                            rope_style, positions, block_table)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           cache_seqlens: torch.Tensor, reps: torch.Tensor | None, *, inv_freq: torch.Tensor,
           sink: int, local: int, chunk: int, topk: int, query_block: int, rep: str,
           scale: float, rope_scale: float, rope_style: str, positions: str, backend: str,
           block_table: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, idx): :func:`select_chunks`, then :func:`gather_attention` on its idx.

    On "cuda" this is one op, ``torch.ops.reattention.attend``, whose decode attention starts
    beside the selection (docs/design.md section 3.5); the other backends run the two cores in
    turn. Same results either way."""
    if backend != "cuda":
        idx = select_chunks(q, k_cache, cache_seqlens, reps, sink=sink, local=local, chunk=chunk,
                            topk=topk, query_block=query_block, rep=rep, backend=backend,
                            block_table=block_table)
        out, lse = gather_attention(q, k_cache, v_cache, idx, cache_seqlens, inv_freq=inv_freq,
                                    sink=sink, local=local, chunk=chunk,
                                    query_block=query_block, scale=scale,
                                    rope_scale=rope_scale, rope_style=rope_style,
                                    positions=positions, backend=backend,
                                    block_table=block_table)
        return out, lse, idx
    reps = _reps_or_computed(k_cache, cache_seqlens, reps, sink=sink, chunk=chunk, rep=rep,
                             backend=backend, block_table=block_table)
    return torch.ops.reattention.attend(q, k_cache, v_cache, reps, cache_seqlens, inv_freq, sink,
                                        local, chunk, topk, rep, query_block, scale, rope_scale,
                                        rope_style, positions, block_table)
