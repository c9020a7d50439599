"""Triton chunk representatives: per-chunk min/max ("bound") or mean ("mean") of raw keys.

Algorithm: program (b, h, tile of BLOCK_J chunks) walks the C tokens of its chunks in
lockstep: step u loads token u of every chunk of the tile ([BLOCK_J, D], one 2-byte-wide row
per chunk, coalesced along D) and folds it into running min/max or an fp32 sum. Any chunk
length works this way with no token mask. The mean is the fp32 sum divided by C and rounded
once to the cache dtype, as the reference does.

Paged caches (kv_layout.py): the same tiles and steps. Step u looks the page of token u of
each chunk up in the block table; when every chunk lies inside one page (page_size and sink
multiples of chunk, e.g. the fast case page_size == chunk) a chunk's page is looked up once.

Invariants: only chunks j in [start_chunk, min(n_chunks, max(0, (N_b - sink) // chunk))) are
written (the incremental contract); the bound is computed in fp32 and is exact. A negative
start_chunk = -m writes the last m complete chunks of each sequence instead, [max(0, c_b - m),
c_b) with c_b = min(n_chunks, (N_b - sink) // chunk): the grid covers m chunks per (b, h) and
each program finds its chunks from the device length. Nothing depends on the lengths' values
on the host, so the op is CUDA-graph safe, and with a negative start_chunk its grid does not
depend on the length either.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .kv_layout import kv_head_base, kv_layout, kv_rows, kv_table_row


@triton.jit
def _chunk_rows(base, t0, u, ok, table_row, page_size, num_pages, stride_kb, stride_kn,
                offs_d, PAGED: tl.constexpr, CHUNK_IN_PAGE: tl.constexpr):
    # Pointers [BLOCK_J, BLOCK_D] to token u of the chunks starting at tokens t0.
    if CHUNK_IN_PAGE:
        # base already points at row t0 of every chunk, whose page holds the whole chunk.
        return base + u * stride_kn
    else:
        return base + kv_rows(t0 + u, ok, table_row, page_size, num_pages, stride_kb,
                              stride_kn, PAGED)[:, None] + offs_d[None, :]


@triton.jit
def _chunk_reps_kernel(k_ptr, seqlens_ptr, reps_ptr,
                       stride_kb, stride_kh, stride_kn,
                       stride_rb, stride_rh, stride_rj, stride_rs,
                       n_heads, n_tiles, n_chunks, head_dim, sink, chunk, start_chunk,
                       table_ptr, stride_tb, page_size, num_pages,
                       BOUND: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                       PAGED: tl.constexpr, CHUNK_IN_PAGE: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid % n_tiles
    bh = pid // n_tiles
    b = bh // n_heads
    h = bh % n_heads
    n = tl.load(seqlens_ptr + b)
    end = tl.minimum(n_chunks, tl.maximum(n - sink, 0) // chunk)
    if start_chunk < 0:  # the last -start_chunk complete chunks of this sequence
        first = end + start_chunk
    else:
        first = start_chunk
    j = first + tile * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, BLOCK_D)
    j_ok = (j >= 0) & (j < end)
    mask = j_ok[:, None] & (offs_d < head_dim)[None, :]
    base = kv_head_base(k_ptr, b, h, stride_kb, stride_kh, PAGED)
    table_row = kv_table_row(table_ptr, b, stride_tb, PAGED)
    if PAGED:
        t0 = sink + j * chunk  # int32: the table's divisions stay 32-bit
    else:
        t0 = sink + j.to(tl.int64) * chunk
    if CHUNK_IN_PAGE:
        base = base + kv_rows(t0, j_ok, table_row, page_size, num_pages, stride_kb, stride_kn,
                              PAGED)[:, None] + offs_d[None, :]
    if BOUND:
        lo = tl.full((BLOCK_J, BLOCK_D), float("inf"), tl.float32)
        hi = tl.full((BLOCK_J, BLOCK_D), float("-inf"), tl.float32)
        for u in range(0, chunk):
            rows = _chunk_rows(base, t0, u, j_ok, table_row, page_size, num_pages, stride_kb,
                               stride_kn, offs_d, PAGED, CHUNK_IN_PAGE)
            x = tl.load(rows, mask=mask, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, x)
            hi = tl.maximum(hi, x)
    else:
        acc = tl.zeros((BLOCK_J, BLOCK_D), tl.float32)
        for u in range(0, chunk):
            rows = _chunk_rows(base, t0, u, j_ok, table_row, page_size, num_pages, stride_kb,
                               stride_kn, offs_d, PAGED, CHUNK_IN_PAGE)
            acc += tl.load(rows, mask=mask, other=0.0).to(tl.float32)
    out = reps_ptr + b.to(tl.int64) * stride_rb + h * stride_rh \
        + j.to(tl.int64)[:, None] * stride_rj + offs_d[None, :]
    dtype = reps_ptr.dtype.element_ty
    if BOUND:
        tl.store(out, lo.to(dtype), mask=mask)
        tl.store(out + stride_rs, hi.to(dtype), mask=mask)
    else:
        tl.store(out, (acc / chunk).to(dtype), mask=mask)


@triton_op("reattention::chunk_reps_triton", mutates_args={"reps"})
def chunk_reps_triton(k_cache: torch.Tensor, cache_seqlens: torch.Tensor, reps: torch.Tensor,
                      sink: int, chunk: int, rep: str, start_chunk: int,
                      block_table: Optional[torch.Tensor] = None) -> None:
    """Fill ``reps`` in place for the complete chunks ``j >= start_chunk`` (Triton).

    Parameters
    ----------
    k_cache : [B, Hkv, Nmax, D] raw keys, or pages [num_pages, Hkv, page_size, D] with
        block_table; last dim contiguous.
    cache_seqlens : int32 [B] valid tokens per sequence, on k_cache's device.
    reps : "bound" [B, Hkv, n_chunks, 2, D] (min, max) or "mean" [B, Hkv, n_chunks, D], in the
        cache dtype, last dim contiguous; chunk j covers tokens [sink + j*chunk, ... + chunk).
    sink, chunk : segment sizes (chunk >= 1).
    rep : "bound" or "mean".
    start_chunk : first chunk index to (re)compute; negative -m: the last m complete chunks
        of each sequence.
    block_table : None (contiguous cache) or int32 [B, max_pages] (paged cache,
        Nmax = max_pages * page_size).

    Example
    -------
    >>> reps = k.new_empty(1, 8, (k.shape[2] - 64) // 64, 2, 128)
    >>> torch.ops.reattention.chunk_reps_triton(k, lens, reps, 64, 64, "bound", 0)
    """
    if rep not in ("bound", "mean"):
        raise ValueError(f"rep must be 'bound' or 'mean' for chunk_reps, got {rep!r}")
    b, _, lay, paged = kv_layout(k_cache, block_table, cache_seqlens)
    h, d = k_cache.shape[1], k_cache.shape[3]
    n_chunks = reps.shape[2]
    # The last m > n_chunks chunks are all n_chunks of them.
    start_chunk = max(start_chunk, -n_chunks)
    todo = -start_chunk if start_chunk < 0 else n_chunks - start_chunk
    if todo <= 0 or b * h == 0:
        return
    if k_cache.stride(3) != 1 or reps.stride(-1) != 1:
        raise ValueError("chunk_reps_triton needs k_cache and reps contiguous in the head dim")
    # A tile of chunks per program; the interpreter runs programs one by one in Python, so
    # there a tile covers every chunk and the grid is one program per (b, h).
    on_gpu = k_cache.device.type == "cuda"
    block_j = min(16 if on_gpu else 256, triton.next_power_of_2(todo))
    block_d = triton.next_power_of_2(d)
    n_tiles = triton.cdiv(todo, block_j)
    bound = rep == "bound"
    stride_rs = reps.stride(3) if bound else 0
    page_size = lay[2]
    chunk_in_page = not paged or (page_size % chunk == 0 and sink % chunk == 0)
    wrap_triton(_chunk_reps_kernel)[(n_tiles * b * h,)](
        k_cache, cache_seqlens, reps,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        reps.stride(0), reps.stride(1), reps.stride(2), stride_rs,
        h, n_tiles, n_chunks, d, sink, chunk, start_chunk, *lay,
        BOUND=bound, BLOCK_J=block_j, BLOCK_D=block_d, PAGED=paged,
        CHUNK_IN_PAGE=chunk_in_page, num_warps=4)


@chunk_reps_triton.register_fake
def _chunk_reps_triton_fake(k_cache, cache_seqlens, reps, sink, chunk, rep, start_chunk,
                            block_table=None):
    return None
