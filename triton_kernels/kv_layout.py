"""Where token t of sequence b lives in a k/v cache, for the Triton kernels (the twin of
``KvLayout`` in csrc/contract.h; docs/design.md section 3, paged caches).

Contiguous: the cache is [B, Hkv, Nmax, D] and token t of b is row t of (b, h).
Paged: the cache is [num_pages, Hkv, page_size, D] with an int32 block_table [B, max_pages];
token t of b is row t % page_size of page block_table[b, t // page_size], that page clamped
into [0, num_pages) so a bad entry reads a wrong page, never memory outside the pool.

A kernel takes the layout as (table_ptr, stride_tb, page_size, num_pages) plus a constexpr
PAGED: with PAGED False every table read compiles away and the addresses are the contiguous
ones, so the contiguous path is the code it was. A paged launch uses the same grid, tiles and
reduction order as a contiguous one of Nmax = max_pages * page_size; only addresses differ.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def kv_head_base(ptr, b, h, stride_b, stride_h, PAGED: tl.constexpr):
    # Base of head h for sequence b; paged, the page (per token) is added by kv_rows.
    if PAGED:
        return ptr + h * stride_h
    else:
        return ptr + b.to(tl.int64) * stride_b + h * stride_h


@triton.jit
def kv_page_row(t, ok, table_row, page_size, num_pages):
    # (page, row in the page) of tokens t (any shape) of a paged cache, both int64; table_row
    # points at block_table[b]. Lanes with ok False read no table entry and get page 0, row
    # t % page_size: the caller masks their loads, as it does for a contiguous cache.
    slot = t // page_size
    page = tl.load(table_row + slot, mask=ok, other=0)
    page = tl.minimum(tl.maximum(page, 0), num_pages - 1)
    return page.to(tl.int64), (t - slot * page_size).to(tl.int64)


@triton.jit
def kv_rows(t, ok, table_row, page_size, num_pages, stride_page, stride_tok,
            PAGED: tl.constexpr):
    # int64 element offsets of tokens t (any shape) from kv_head_base.
    if PAGED:
        page, row = kv_page_row(t, ok, table_row, page_size, num_pages)
        return page * stride_page + row * stride_tok
    else:
        return t.to(tl.int64) * stride_tok


@triton.jit
def kv_table_row(table_ptr, b, stride_tb, PAGED: tl.constexpr):
    # block_table[b] (paged); any pointer for a contiguous cache (never read).
    if PAGED:
        return table_ptr + b.to(tl.int64) * stride_tb
    else:
        return table_ptr


def kv_layout(k_cache: torch.Tensor, block_table: Optional[torch.Tensor],
              cache_seqlens: torch.Tensor):
    """The launch view of a k/v cache.

    Parameters
    ----------
    k_cache : [B, Hkv, Nmax, D] contiguous or [num_pages, Hkv, page_size, D] paged.
    block_table : None (contiguous) or int32 [B, max_pages], last dim contiguous.
    cache_seqlens : int32 [B]; stands in for the table pointer of a contiguous launch.

    Returns
    -------
    (batch, nmax, args, paged) with args = (table, stride_tb, page_size, num_pages), the
    kernel arguments after which PAGED=paged goes. A contiguous launch passes constants, so it
    compiles to the same specialisation whatever the cache size.

    Example
    -------
    >>> batch, nmax, lay, paged = kv_layout(k_cache, block_table, cache_seqlens)
    >>> kernel[grid](k_cache, ..., *lay, PAGED=paged)
    """
    if block_table is None:
        return k_cache.shape[0], k_cache.shape[2], (cache_seqlens, 0, 1, 1), False
    if block_table.dim() != 2 or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32 [B, max_pages], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if block_table.stride(1) != 1 and block_table.shape[1] > 1:
        raise ValueError("block_table must be contiguous in its last dim")
    page_size = k_cache.shape[2]
    return (block_table.shape[0], block_table.shape[1] * page_size,
            (block_table, block_table.stride(0), page_size, k_cache.shape[0]), True)
