"""Segment arithmetic of contract v2 (docs/design.md section 2), shared by the reference and
the production code (ops, caches, integrations).

A call of Lq queries on a sequence of N tokens (the queries are its last Lq tokens) is cut into
query blocks of ``query_block`` queries. Block beta covers the call's queries [s, e) and is
handled as a call of its own on a sequence of ``N - Lq + e`` tokens whose last ``e - s`` are its
queries: its first query sits at P0 = N - Lq + s, its last at P1 = N - Lq + e - 1, and

    sink   = [0, min(S, P1 + 1))
    middle = [S, mid_end),  mid_end = S + C * floor(max(0, P0 - W - S) / C)   (M whole chunks)
    local  = [mid_end, P1]

Example: S=4, C=8, W=16, query_block=8, N=100, Lq=20 gives blocks [0, 8), [8, 16), [16, 20) at
P0 = 80, 88, 96, with M = 7, 8, 9 and mid_end = 60, 68, 76.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "Segments",
    "segments",
    "query_blocks",
    "block_segments",
    "max_middle_chunks",
    "scope",
    "reps_shape",
    "new_reps",
    "cache_shape",
    "unpage",
]


class Segments(NamedTuple):
    """The segments of one query block (or of a call of one block)."""

    sink_len: int  # min(S, N): the sink is [0, sink_len)
    mid_end: int   # the middle is [S, mid_end), the local window [mid_end, N)
    n_mid: int     # M, whole chunks in the middle


def segments(n: int, lq: int, sink: int, local: int, chunk: int) -> Segments:
    """Segments of ONE query block: ``n`` tokens whose last ``lq`` are the block's queries.

    The local window is ``[mid_end, n)`` (empty when ``n <= mid_end``).
    """
    p0 = n - lq
    m = max(0, p0 - local - sink) // chunk
    return Segments(min(sink, n), sink + chunk * m, m)


def query_blocks(lq: int, query_block: int) -> list[tuple[int, int]]:
    """The blocks [s, e) of a call's Lq queries, in order."""
    return [(s, min(lq, s + query_block)) for s in range(0, lq, query_block)]


def block_segments(n: int, lq: int, s: int, e: int, sink: int, local: int,
                   chunk: int) -> Segments:
    """Segments of the block of queries [s, e) of a call of ``lq`` queries on ``n`` tokens:
    those of a call of ``e - s`` queries on ``n - lq + e`` tokens."""
    return segments(n - lq + e, e - s, sink, local, chunk)


def max_middle_chunks(n: int, lq: int, query_block: int, sink: int, local: int,
                      chunk: int) -> int:
    """M of the call's last block, the largest of its blocks (M grows with the block)."""
    s = (lq - 1) // query_block * query_block
    return block_segments(n, lq, s, lq, sink, local, chunk).n_mid


def scope(sink: int, local: int, chunk: int, topk: int, query_block: int) -> int:
    """Keys a query block attends to at most, its own queries included, whatever Lq is:
    the sink, topk chunks, at least ``local`` keys before the block (up to a chunk more, as the
    middle ends on a chunk boundary) and the block."""
    return sink + topk * chunk + local + chunk + query_block


def cache_shape(k_cache: torch.Tensor,
                block_table: torch.Tensor | None = None) -> tuple[int, int, int, int]:
    """(B, Hkv, Nmax, D) of a cache: its shape when contiguous [B, Hkv, Nmax, D]; for pages
    [num_pages, Hkv, page_size, D] with ``block_table`` [B, max_pages], Nmax = max_pages *
    page_size (docs/design.md section 3)."""
    if block_table is None:
        return tuple(k_cache.shape)
    _, hkv, page_size, d = k_cache.shape
    return block_table.shape[0], hkv, block_table.shape[1] * page_size, d


def reps_shape(k_cache: torch.Tensor, sink: int, chunk: int, rep: str,
               block_table: torch.Tensor | None = None) -> tuple[int, ...]:
    """Shape of the representatives of ``k_cache`` (of logical shape [B, Hkv, Nmax, D], see
    :func:`cache_shape`): "bound" [B, Hkv, n_chunks, 2, D], "mean" [B, Hkv, n_chunks, D],
    ``n_chunks = (Nmax - sink) // chunk`` (0 when Nmax < sink)."""
    b_, h_, nmax, d = cache_shape(k_cache, block_table)
    n_chunks = max(0, nmax - sink) // chunk
    return (b_, h_, n_chunks, 2, d) if rep == "bound" else (b_, h_, n_chunks, d)


def new_reps(k_cache: torch.Tensor, sink: int, chunk: int, rep: str,
             block_table: torch.Tensor | None = None) -> torch.Tensor:
    """An uninitialised reps tensor of :func:`reps_shape` in the cache's dtype and device."""
    return k_cache.new_empty(reps_shape(k_cache, sink, chunk, rep, block_table))


def unpage(cache: torch.Tensor, block_table: torch.Tensor,
           cache_seqlens: torch.Tensor) -> torch.Tensor:
    """The contiguous [B, Hkv, Nmax, D] copy of a paged cache: tokens [0, N_b) of each sequence
    from its pages, zeros past them (only the table entries of those tokens are read)."""
    b_, hkv, nmax, d = cache_shape(cache, block_table)
    page_size = cache.shape[2]
    out = cache.new_zeros((b_, hkv, nmax, d))
    for b, n in enumerate(cache_seqlens.tolist()):
        used = -(-n // page_size)
        pages = cache[block_table[b, :used].long()]            # [used, Hkv, page_size, D]
        out[b, :, :n] = pages.transpose(0, 1).reshape(hkv, used * page_size, d)[:, :n]
    return out
