"""The op layer: the public op functions check their inputs once, then call a core of
:mod:`reattention.ops.unchecked` on the backend chosen by :mod:`reattention.ops.backends`.
"""
from __future__ import annotations

import torch

from . import fake  # noqa: F401  (registers the fake kernels)
from . import unchecked
from .backends import (BACKENDS, KERNEL_HEAD_DIMS, TRITON_MAX_HEAD_DIM, _find_library,
                       _kernel_refusal, _status, available_backends, resolve_backend)
from .checks import (FLOAT_DTYPES, POSITION_MODES, REP_MODES, ROPE_STYLES, _check_choice,
                     _check_tensor, _need, check_attention_args, check_block_table,
                     check_cache, check_idx, check_table_shape,
                     check_idx_values, check_inv_freq, check_params, check_reps, check_seqlens,
                     reps_shape, set_device_checks)

__all__ = [
    # the public op functions
    "chunk_reps", "select_chunks", "gather_attention", "copy_pages", "tiered_fetch",
    # backends
    "BACKENDS", "KERNEL_HEAD_DIMS", "TRITON_MAX_HEAD_DIM", "available_backends",
    "resolve_backend", "_kernel_refusal", "_find_library", "_status",
    # validation
    "REP_MODES", "ROPE_STYLES", "POSITION_MODES", "FLOAT_DTYPES", "set_device_checks",
    "check_cache", "check_seqlens", "check_params", "check_reps", "check_inv_freq",
    "check_attention_args", "check_idx", "check_idx_values", "reps_shape", "check_block_table",
    # the cores, for callers that checked their inputs
    "unchecked",
]


def chunk_reps(k_cache: torch.Tensor, cache_seqlens: torch.Tensor | None = None, *, sink: int,
               chunk: int, rep: str, backend: str = "auto", reps: torch.Tensor | None = None,
               start_chunk: int = 0, block_table: torch.Tensor | None = None,
               last_chunks: int | None = None) -> torch.Tensor:
    """Chunk representatives of the complete middle chunks of a raw-key cache.

    Parameters
    ----------
    k_cache : [B, Hkv, Nmax, D] raw keys (fp16, bf16 or fp32).
    cache_seqlens : int32 [B] valid tokens per sequence, or None for Nmax.
    sink, chunk : chunk j covers tokens [sink + j*chunk, sink + (j+1)*chunk).
    rep : "bound" (min/max per dim) or "mean" (centroid).
    reps : an existing reps tensor to update in place (incremental), or None to allocate.
    start_chunk : only chunks j >= start_chunk are (re)computed.
    last_chunks : int >= 1, optional
        Instead of ``start_chunk``: (re)compute only the last ``last_chunks`` complete chunks
        of each sequence, j in ``[max(0, c_b - last_chunks), c_b)`` with ``c_b`` the complete
        chunks of sequence b, found from its device length: nothing depends on a host length,
        so a CUDA graph captured once stays valid as the cache grows (docs/design.md
        section 3). Recomputing a chunk writes the same bytes as computing it the first time.
    block_table : int32 [B, max_pages] for a paged cache: ``k_cache`` (and ``v_cache``) are
        then pages [num_pages, Hkv, page_size, D], token t of sequence b in page
        ``block_table[b, t // page_size]`` at row ``t % page_size``; Nmax = max_pages *
        page_size and ``cache_seqlens`` is required (docs/design.md section 3). Results equal
        the contiguous layout's bit for bit on the same backend.

    Returns
    -------
    reps : "bound" [B, Hkv, n_chunks, 2, D] or "mean" [B, Hkv, n_chunks, D] in the cache
        dtype, ``n_chunks = (Nmax - sink) // chunk``; chunks not yet complete are left as they
        were (uninitialised in a new tensor).

    Example
    -------
    >>> k = torch.randn(1, 8, 4096, 128)
    >>> reps = chunk_reps(k, sink=64, chunk=64, rep="bound")
    >>> reps.shape
    torch.Size([1, 8, 63, 2, 128])
    """
    _check_tensor("k_cache", k_cache, 4)
    # float64 is the reference's exact mode (as q in check_cache); resolve_backend keeps it
    # off the kernel backends.
    _need(k_cache.dtype in FLOAT_DTYPES or k_cache.dtype == torch.float64,
          f"k_cache must be fp16, bf16, fp32 (or fp64 on the reference backend), "
          f"got {k_cache.dtype}")
    _need(k_cache.shape[-1] % 2 == 0, f"head dim D must be even, got {k_cache.shape[-1]}")
    check_params(sink=sink, chunk=chunk)
    _check_choice("rep", rep, ("bound", "mean"))
    _need(isinstance(start_chunk, int) and start_chunk >= 0,
          f"start_chunk must be an int >= 0 (last_chunks=m refreshes the last m chunks), got "
          f"{start_chunk!r}")
    if last_chunks is not None:
        _need(isinstance(last_chunks, int) and not isinstance(last_chunks, bool)
              and last_chunks >= 1 and start_chunk == 0,
              f"last_chunks must be None or an int >= 1 with start_chunk left at 0, got "
              f"last_chunks={last_chunks!r}, start_chunk={start_chunk!r}")
        # The ops take the last m chunks as a negative start_chunk (csrc/ops.cpp).
        start_chunk = -last_chunks
    if block_table is not None:
        check_table_shape(block_table, k_cache.device)
    seqlens = check_seqlens(cache_seqlens, k_cache, 0, block_table)
    if block_table is not None:
        block_table = check_block_table(block_table, k_cache, seqlens)
    if reps is not None:
        check_reps(reps, k_cache, lq=1, sink=sink, local=0, chunk=chunk, rep=rep,
                   block_table=block_table)
    be = resolve_backend(backend, k_cache)
    # reps is written in place: a copy would lose the update.
    _need(reps is None or be == "reference" or reps.is_contiguous(),
          "reps must be contiguous for the kernel backends")
    return unchecked.chunk_reps(k_cache.contiguous(), seqlens, reps, sink=sink, chunk=chunk,
                                rep=rep, backend=be, start_chunk=start_chunk,
                                block_table=block_table)


def select_chunks(q: torch.Tensor, k_cache: torch.Tensor,
                  cache_seqlens: torch.Tensor | None = None, *, reps: torch.Tensor | None = None,
                  sink: int, local: int, chunk: int, topk: int, query_block: int, rep: str,
                  backend: str = "auto", block_table: torch.Tensor | None = None,
                  ) -> torch.Tensor:
    """Select the top-k middle chunks per (batch, kv head, query block).

    Parameters
    ----------
    q : [B, Hq, Lq, D] raw (un-rotated) queries of the last Lq tokens.
    k_cache : [B, Hkv, Nmax, D] raw keys, Hq % Hkv == 0.
    cache_seqlens : int32 [B] or None (Nmax); each in [Lq, Nmax].
    reps : chunk representatives for rep "bound"/"mean" (computed on the fly when None);
        must be None for "max".
    rep : "max" (exact, reads raw keys), "bound" or "mean".
    block_table : int32 [B, max_pages] for a paged cache, as in :func:`chunk_reps`.

    Returns
    -------
    idx : int32 [B, Hkv, ceil(Lq / query_block), topk], ascending, padded with -1.

    Example
    -------
    >>> q, k = torch.randn(1, 32, 1, 128), torch.randn(1, 8, 16384, 128)
    >>> idx = select_chunks(q, k, sink=64, local=4096, chunk=64, topk=32, query_block=128, rep="max")
    >>> idx.shape
    torch.Size([1, 8, 1, 32])
    """
    check_cache(q, k_cache, block_table=block_table)
    check_params(sink=sink, local=local, chunk=chunk, topk=topk, query_block=query_block)
    _check_choice("rep", rep, REP_MODES)
    seqlens = check_seqlens(cache_seqlens, k_cache, q.shape[2], block_table)
    if block_table is not None:
        block_table = check_block_table(block_table, k_cache, seqlens)
    if reps is not None or rep == "max":
        check_reps(reps, k_cache, lq=q.shape[2], sink=sink, local=local, chunk=chunk, rep=rep,
                   query_block=query_block, block_table=block_table)
    be = resolve_backend(backend, q)
    return unchecked.select_chunks(q.contiguous(), k_cache.contiguous(), seqlens,
                                   None if reps is None else reps.contiguous(), sink=sink,
                                   local=local, chunk=chunk, topk=topk,
                                   query_block=query_block, rep=rep, backend=be,
                                   block_table=block_table)


def gather_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     idx: torch.Tensor, cache_seqlens: torch.Tensor | None = None, *,
                     inv_freq: torch.Tensor, sink: int, local: int, chunk: int,
                     query_block: int, scale: float | None = None, rope_scale: float = 1.0,
                     rope_style: str = "half", positions: str = "compact",
                     backend: str = "auto", block_table: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over [sink | chunks in ``idx`` | local] with RoPE at re-assigned positions.

    Parameters
    ----------
    q : [B, Hq, Lq, D] raw queries; k_cache, v_cache : [B, Hkv, Nmax, D] raw keys and values.
    idx : int32 [B, Hkv, n_blocks, topk] from :func:`select_chunks`, or built the same way:
        middle chunk ids j < M_b of each sequence, the -1 padding after them. Checked (ValueError)
        when idx is on the CPU; on a GPU it is not read on the host (no sync), and an entry out
        of that contract gives a wrong result (never an out-of-bounds read).
    inv_freq : [R/2] RoPE inverse frequencies, R <= D.
    block_table : int32 [B, max_pages] for a paged cache, as in :func:`chunk_reps`.

    Returns
    -------
    out : [B, Hq, Lq, D] in q's dtype; lse : [B, Hq, Lq] float32.

    Example
    -------
    >>> idx = select_chunks(q, k, sink=64, local=4096, chunk=64, topk=32, query_block=128, rep="max")
    >>> out, lse = gather_attention(q, k, v, idx, inv_freq=default_inv_freq(128), sink=64,
    ...                             local=4096, chunk=64, query_block=128)
    """
    check_cache(q, k_cache, v_cache, block_table=block_table)
    check_params(sink=sink, local=local, chunk=chunk, query_block=query_block)
    inv_freq, scale = check_attention_args(q, inv_freq, scale, rope_scale, rope_style, positions)
    check_idx(idx, q, k_cache, query_block)
    seqlens = check_seqlens(cache_seqlens, k_cache, q.shape[2], block_table)
    if block_table is not None:
        block_table = check_block_table(block_table, k_cache, seqlens)
    check_idx_values(idx, seqlens, q.shape[2], sink=sink, local=local, chunk=chunk,
                     query_block=query_block)
    be = resolve_backend(backend, q)
    return unchecked.gather_attention(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(),
                                      idx.contiguous(), seqlens, inv_freq=inv_freq, sink=sink,
                                      local=local, chunk=chunk, query_block=query_block,
                                      scale=scale, rope_scale=float(rope_scale),
                                      rope_style=rope_style, positions=positions, backend=be,
                                      block_table=block_table)


def copy_pages(dst: torch.Tensor, src: torch.Tensor, dst_index: torch.Tensor,
               src_index: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """``dst[dst_index[i]] = src[src_index[i]]`` for every i with ``mask[i]`` (all i when
    mask is None): whole pages (dim-0 slices) of two contiguous tensors of one page shape.

    The tiered cache's page moves (docs/design.md section 3.7). With a CUDA tensor among them
    it runs as a kernel on that GPU without a host sync; one of ``dst``/``src`` may then be a
    pinned CPU tensor, read or written in place, and the indices and mask (int64 and bool
    [L]) must be on the GPU. On the CPU every tensor is a CPU tensor. An index out of its
    tensor's pages raises ValueError on the CPU (checked here, before the C++ kernel, whose
    own check raises RuntimeError; an exception thrown by a stable-ABI kernel crashes
    torch < 2.13) and skips the entry on a GPU (a check there would cost a host sync).
    """
    for name, t in (("dst", dst), ("src", src)):
        _need(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.is_contiguous(),
              f"{name} must be a contiguous page tensor [num_pages, ...]")
    _need(dst.shape[1:] == src.shape[1:] and dst.dtype == src.dtype,
          f"dst pages {tuple(dst.shape[1:])} {dst.dtype} and src pages {tuple(src.shape[1:])} "
          f"{src.dtype} must match")
    for name, t in (("dst_index", dst_index), ("src_index", src_index)):
        _need(isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype == torch.int64,
              f"{name} must be an int64 [L] tensor")
    _need(dst_index.shape == src_index.shape, "dst_index and src_index must have one length")
    _need(mask is None or (mask.dtype == torch.bool and mask.shape == dst_index.shape),
          "mask must be None or a bool [L] tensor")
    gpu = dst.is_cuda or src.is_cuda
    if gpu:
        _need(_status["cuda"] is None, f"copy_pages on a GPU needs the cuda library: "
                                       f"{_status['cuda']}")
        for name, t in (("dst", dst), ("src", src)):
            _need(t.is_cuda or t.is_pinned(),
                  f"{name} is a CPU tensor beside a CUDA one: it must be in pinned memory")
    else:
        _need(_status["cpu"] is None, f"copy_pages needs the cpu library: {_status['cpu']}")
        for name, t, pages in (("dst_index", dst_index, dst.shape[0]),
                               ("src_index", src_index, src.shape[0])):
            bad = (t < 0) | (t >= pages)
            if mask is not None:
                bad &= mask  # a masked-off entry is not copied
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"{name}[{i}] = {int(t[i])} is not one of its tensor's {pages} "
                                 f"pages")
    torch.ops.reattention.copy_pages(dst, src, dst_index.contiguous(), src_index.contiguous(),
                                     None if mask is None else mask.contiguous())


def tiered_fetch(idx: torch.Tensor, table: torch.Tensor, owner: torch.Tensor,
                 stamp: torch.Tensor, state: torch.Tensor, jobs: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, host_k: torch.Tensor, host_v: torch.Tensor, *,
                 sink_pages: int, hot_base: int, absent: int, pages_per_chunk: int = 1) -> None:
    """The tiered cache's fetch step (:class:`reattention.offload.TieredPool` owns every
    argument; csrc/tiered.h describes them): pages selected in ``idx`` [S, K] become
    resident in ``k``/``v``, copied from pinned ``host_k``/``host_v`` when missing."""
    lib = "cuda" if k.is_cuda else "cpu"
    _need(_status[lib] is None, f"tiered_fetch needs the {lib} library: {_status[lib]}")
    torch.ops.reattention.tiered_fetch(idx.contiguous(), table, owner, stamp, state, jobs, k, v,
                                       host_k, host_v, sink_pages, hot_base, absent,
                                       pages_per_chunk)
