"""Triton chunk selection: score the middle chunks, then an exact deterministic top-k.

Each query block beta (queries [s, e) of the call, s = beta * query_block) is handled as a call
of its own (docs/design.md section 2): its first query sits at P0 = N_b - Lq + s, and it scores
only its own middle, the M_beta = max(0, P0 - W - S) // C whole chunks below its mid_end.

Stage 1 (scores): program (b, kv head h, chunk tile, query block beta) computes, for each of
its TILE_C chunks, the max over the block's rows of the rep score, where the rows are the
(query, q head of h's group) pairs of the block, row = i * G + g. Reps:
  max   : q . k_t for every raw key of the chunk (tl.dot over token tiles), then a segmented
          max of the per-token maxima into the tile's chunk slots;
  bound : sum_d max(q_d kmin_d, q_d kmax_d) = max(q, 0) . kmax + min(q, 0) . kmin, two dots
          (exact rewrite: q_d >= 0 picks kmax_d because kmax >= kmin);
  mean  : q . mean.
Scores go to an fp32 buffer [B, Hkv, n_blocks, n_cols], -inf where j >= M_beta (not a middle
chunk of block beta of sequence b). Query blocks vary fastest in the grid so a reps tile is read
from memory once and reused from L2 by every block.

Stage 2 (top-k): each score becomes one int64 key, (order-preserving int of the fp32 score)
* 2^31 + (2^31 - 1 - j), so sorting keys descending sorts by score with ties to the lower
chunk index, and every key is distinct. Level kernels sort segments of SEG keys and keep the
best KP = next_pow2(topk) of each until one segment is left; the final kernel sorts it, keeps
the first K_eff = min(topk, M_beta) (candidates always outrank non-candidates, even at -inf,
because they have lower indices), sorts those indices ascending and pads with -1.

Exact ties: bit-identical chunks get bit-identical scores, so the key order above sends a
tie to the lower index wherever the chunks sit in their tiles (see _score_dot for why).

Paged caches (kv_layout.py): "max" looks each key row of a token tile up in the block table;
the tiles, the grid and every sum are those of a contiguous cache of Nmax = max_pages *
page_size, so the scores and the selection are bit-identical to it.

Invariants: output int32 [B, Hkv, n_blocks, topk], ascending, -1 padded; the launch shapes
depend only on tensor shapes (never on the lengths' values), so it is CUDA-graph safe.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .kv_layout import kv_head_base, kv_layout, kv_rows, kv_table_row

_REPS = {"max": 0, "bound": 1, "mean": 2}
# Padding key: below every real key (a real key is >= -2^31 * 2^31).
_PAD_KEY = -(2 ** 62) - 1
# Top-k: level kernels sort segments of max(_SEG_MIN, 4*KP) keys; the final kernel takes rows
# of up to max(_FINAL_MIN, 2*KP) keys in one sort. One program sorting 2048 keys took 44 us on
# the H200 (128K tokens, chunk 64: 2000 scores) against 6.5 us for a level of 512-key segments
# spread over many programs, so rows longer than 512 keys first go through levels.
_SEG_MIN = 512
_FINAL_MIN = 512
# The interpreter runs tl.sort's bitonic network as thousands of Python-level steps (the xor_sum
# reduce inside it has no numpy path): 65-85% of a Triton selection test's time on the CPU.
# There _sort ranks the keys instead, a few [N, N] numpy ops, and returns the same tensor.
# Rows of more keys keep tl.sort: [N, N] would pass the interpreter's 2^20-element limit.
_RANK_SORT_MAX = 1024


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # fp32 inputs must not silently drop to tf32: the reference is exact fp32. The CPU
    # interpreter multiplies bf16 bit patterns as integers, so there (UPCAST) both operands go
    # to fp32 first: bf16/fp16 products are exact in fp32 either way.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _score_dot(a, b, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    # a [M, D], b [N, D] -> a @ b^T [M, N] fp32, by the same arithmetic for every (m, n): a
    # chunk's score must not depend on where the chunk sits in a tile, or bit-identical chunks
    # could score differently and an exact tie would not go to the lower index.
    # GPU: one tl.dot. Every output element runs the same instruction sequence over D (bf16 and
    # fp16: tensor-core k-steps chained in a fixed order, and a tensor core treats every
    # element of its tile alike; fp32 "ieee": one fma per d, d = 0, 1, ... in order), so
    # element (m, n) is a function of a[m] and b[n] alone, wherever they sit in the tiles.
    # Interpreter: tl.dot is numpy's matmul, i.e. BLAS, and OpenBLAS's Haswell/Zen kernels (any
    # AVX2 CPU) round columns 16 and on differently from the first 16 (seen: 34 identical
    # chunks, chunk 8 picked before chunk 0; OPENBLAS_CORETYPE=Haswell shows it on any x86
    # machine). So there the products (exact for bf16/fp16, rounded once
    # for fp32) go through tl.cumsum, numpy's add.accumulate, which is defined as the
    # sequential loop t = t + p_d: every element is (((p_0 + p_1) + p_2) + ...) in the same
    # order. The last prefix is picked out by a sum with zeros, which is exact.
    if INTERPRET:
        p = a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :]
        last = tl.arange(0, a.shape[1]) == a.shape[1] - 1
        return tl.sum(tl.where(last[None, None, :], tl.cumsum(p, axis=2), 0.0), axis=2)
    else:
        return _dot(a, tl.trans(b), IEEE, False)


@triton.jit
def _load_query_rows(q_ptr, row0, n_rows, group, q_row0, head0, stride_qh, stride_ql, offs_d,
                     head_dim, BLOCK_M: tl.constexpr):
    # Rows row0.. of a (kv head, query block): row = i * G + g -> q[head0 + g, q_row0 + i].
    rows = row0 + tl.arange(0, BLOCK_M)
    i = rows // group
    g = rows - i * group
    ptrs = q_ptr + (head0 + g).to(tl.int64)[:, None] * stride_qh \
        + (q_row0 + i).to(tl.int64)[:, None] * stride_ql + offs_d[None, :]
    valid = rows < n_rows
    x = tl.load(ptrs, mask=valid[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    return x, valid


@triton.jit
def _chunk_scores_kernel(q_ptr, k_ptr, reps_ptr, seqlens_ptr, scores_ptr,
                         stride_qb, stride_qh, stride_ql,
                         stride_kb, stride_kh, stride_kn,
                         stride_rb, stride_rh, stride_rj, stride_rs,
                         n_kv_heads, group, lq, query_block, n_blocks, n_tiles, n_cols,
                         head_dim, sink, local, chunk,
                         table_ptr, stride_tb, page_size, num_pages,
                         REP: tl.constexpr, TILE_C: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                         INTERPRET: tl.constexpr, PAGED: tl.constexpr):
    pid = tl.program_id(0)
    beta = pid % n_blocks
    rest = pid // n_blocks
    tile = rest % n_tiles
    bh = rest // n_tiles
    b = bh // n_kv_heads
    h = bh % n_kv_heads
    n = tl.load(seqlens_ptr + b)
    q_row0 = beta * query_block
    # Block beta's own middle: chunks below mid_end(P0 = n - lq + q_row0).
    m_chunks = tl.maximum(n - lq + q_row0 - local - sink, 0) // chunk
    c0 = tile * TILE_C
    offs_c = c0 + tl.arange(0, TILE_C)
    offs_d = tl.arange(0, BLOCK_D)
    best = tl.full((TILE_C,), float("-inf"), tl.float32)
    if c0 < m_chunks:
        n_rows = group * tl.minimum(query_block, lq - q_row0)
        qb_ptr = q_ptr + b.to(tl.int64) * stride_qb
        head0 = h * group
        if REP == 0:
            kb_ptr = kv_head_base(k_ptr, b, h, stride_kb, stride_kh, PAGED)
            table_row = kv_table_row(table_ptr, b, stride_tb, PAGED)
            t_start = sink + c0 * chunk
            t_end = sink + tl.minimum(c0 + TILE_C, m_chunks) * chunk
            slots = tl.arange(0, TILE_C)
            for t0 in range(t_start, t_end, BLOCK_N):
                offs_t = t0 + tl.arange(0, BLOCK_N)
                t_ok = offs_t < t_end
                k_rows = kb_ptr + kv_rows(offs_t, t_ok, table_row, page_size, num_pages,
                                          stride_kb, stride_kn, PAGED)
                kt = tl.load(k_rows[:, None] + offs_d[None, :],
                             mask=t_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
                tok_best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
                for row0 in range(0, n_rows, BLOCK_M):
                    qr, r_ok = _load_query_rows(qb_ptr, row0, n_rows, group, q_row0, head0,
                                                stride_qh, stride_ql, offs_d, head_dim, BLOCK_M)
                    s = _score_dot(qr, kt, IEEE, INTERPRET)
                    s = tl.where(r_ok[:, None], s, float("-inf"))
                    tok_best = tl.maximum(tok_best, tl.max(s, axis=0))
                # Segmented max of the token maxima into the tile's chunk slots.
                slot = (offs_t - sink) // chunk - c0
                hit = (slot[None, :] == slots[:, None]) & t_ok[None, :]
                best = tl.maximum(best, tl.max(tl.where(hit, tok_best[None, :], float("-inf")),
                                               axis=1))
        else:
            rb_ptr = reps_ptr + b.to(tl.int64) * stride_rb + h * stride_rh \
                + offs_c.to(tl.int64)[:, None] * stride_rj + offs_d[None, :]
            r_mask = (offs_c < m_chunks)[:, None] & (offs_d < head_dim)[None, :]
            if REP == 1:
                kmin = tl.load(rb_ptr, mask=r_mask, other=0.0)
                kmax = tl.load(rb_ptr + stride_rs, mask=r_mask, other=0.0)
            else:
                kmean = tl.load(rb_ptr, mask=r_mask, other=0.0)
            for row0 in range(0, n_rows, BLOCK_M):
                qr, r_ok = _load_query_rows(qb_ptr, row0, n_rows, group, q_row0, head0,
                                            stride_qh, stride_ql, offs_d, head_dim, BLOCK_M)
                if REP == 1:
                    # Split q by sign in fp32 (exact) and back: no bf16 arithmetic needed.
                    qf = qr.to(tl.float32)
                    s = _score_dot(tl.maximum(qf, 0.0).to(qr.dtype), kmax, IEEE, INTERPRET)
                    s += _score_dot(tl.minimum(qf, 0.0).to(qr.dtype), kmin, IEEE, INTERPRET)
                else:
                    s = _score_dot(qr, kmean, IEEE, INTERPRET)
                s = tl.where(r_ok[:, None], s, float("-inf"))
                best = tl.maximum(best, tl.max(s, axis=0))
    best = tl.where(offs_c < m_chunks, best, float("-inf"))
    tl.store(scores_ptr + (bh * n_blocks + beta).to(tl.int64) * n_cols + offs_c, best,
             mask=offs_c < n_cols)


@triton.jit
def _sort(x, N: tl.constexpr, DESCENDING: tl.constexpr, RANK_SORT: tl.constexpr):
    # x: [N]. RANK_SORT (interpreter only): element i goes to slot rank_i, the number of
    # elements that sort before it, ties taken in index order. Equal elements are equal values,
    # so the output equals tl.sort's element for element. The GPU compiles only tl.sort.
    if RANK_SORT:
        i = tl.arange(0, N)
        a = x[:, None]
        b = x[None, :]
        tie_before = (b == a) & (i[None, :] < i[:, None])
        if DESCENDING:
            ahead = (b > a) | tie_before
        else:
            ahead = (b < a) | tie_before
        rank = tl.sum(ahead.to(tl.int32), axis=1)
        out = tl.sum(tl.where(rank[:, None] == i[None, :], a, 0), axis=0)
    else:
        out = tl.sort(x, descending=DESCENDING)
    return out


@triton.jit
def _load_keys(src_ptr, offs, valid, FROM_SCORES: tl.constexpr, PAD: tl.constexpr):
    # int64 sort keys: score order first, then the lower chunk index; padding sorts last.
    if FROM_SCORES:
        s = tl.load(src_ptr + offs, mask=valid, other=float("-inf"))
        bits = s.to(tl.int32, bitcast=True)
        mono = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = (mono.to(tl.int64) << 31) | (0x7FFFFFFF - offs).to(tl.int64)
    else:
        key = tl.load(src_ptr + offs, mask=valid, other=PAD)
    return tl.where(valid, key, PAD)


@triton.jit
def _topk_level_kernel(src_ptr, dst_ptr, src_len, n_segs,
                       FROM_SCORES: tl.constexpr, SEG: tl.constexpr, KP: tl.constexpr,
                       PAD: tl.constexpr, RANK_SORT: tl.constexpr):
    pid = tl.program_id(0)
    seg = pid % n_segs
    row = pid // n_segs
    offs = seg * SEG + tl.arange(0, SEG)
    key = _load_keys(src_ptr + row.to(tl.int64) * src_len, offs, offs < src_len, FROM_SCORES,
                     PAD)
    key = _sort(key, SEG, True, RANK_SORT)
    rank = tl.arange(0, SEG)
    tl.store(dst_ptr + row.to(tl.int64) * (n_segs * KP) + seg * KP + rank, key, mask=rank < KP)


@triton.jit
def _topk_final_kernel(src_ptr, seqlens_ptr, idx_ptr, src_len, rows_per_batch, n_blocks, lq,
                       query_block, sink, local, chunk, topk, FROM_SCORES: tl.constexpr,
                       SEG: tl.constexpr, PAD: tl.constexpr, RANK_SORT: tl.constexpr):
    row = tl.program_id(0)  # (b, h, beta), beta fastest
    n = tl.load(seqlens_ptr + row // rows_per_batch)
    q_row0 = (row % n_blocks) * query_block
    k_eff = tl.minimum(topk, tl.maximum(n - lq + q_row0 - local - sink, 0) // chunk)
    rank = tl.arange(0, SEG)
    key = _load_keys(src_ptr + row.to(tl.int64) * src_len, rank, rank < src_len, FROM_SCORES,
                     PAD)
    key = _sort(key, SEG, True, RANK_SORT)
    j = (0x7FFFFFFF - (key & 0x7FFFFFFF)).to(tl.int32)
    j = tl.where(rank < k_eff, j, 0x7FFFFFFF)
    j = _sort(j, SEG, False, RANK_SORT)
    tl.store(idx_ptr + row.to(tl.int64) * topk + rank, tl.where(rank < k_eff, j, -1),
             mask=rank < topk)


def _score_config(rep: str, n_rows: int, head_dim: int, fp32: bool, on_gpu: bool, n_cols: int):
    """(TILE_C, BLOCK_M, BLOCK_N, num_warps) for the scoring kernel.

    GPU: tiles of 64 reps (32 at D=256 or fp32) or 16 chunks of raw keys in 64-token steps
    (32 for fp32) keep >= 2 programs per SM at batch 1 from ~128K tokens on; the sizes are the
    largest that compile for sm_90 without register spills (fp32 "ieee" dots keep both operands
    in registers, hence its smaller row tiles). Interpreter: one tile per row, since there each
    program costs Python overhead, with reps or token tiles small enough that _score_dot's
    [BLOCK_M, TILE_C or BLOCK_N, BLOCK_D] products stay within Triton's 2^20-element limit.
    """
    rows = max(16, triton.next_power_of_2(n_rows))
    if not on_gpu:
        block_m = min(128, rows)
        fit = (1 << 20) // (block_m * max(16, triton.next_power_of_2(head_dim)))
        return min(1024, triton.next_power_of_2(n_cols), fit), block_m, min(128, fit), 4
    block_m = min(32 if fp32 else 128, rows)
    if rep == "max":
        tile_c, block_n = 16, (32 if fp32 else 64)
    else:
        tile_c, block_n = (32 if fp32 or head_dim > 128 else 64), 16
    return tile_c, block_m, block_n, (8 if block_m >= (32 if fp32 else 128) else 4)


@triton_op("reattention::select_chunks_triton", mutates_args=())
def select_chunks_triton(q: torch.Tensor, k_cache: torch.Tensor, reps: Optional[torch.Tensor],
                         cache_seqlens: torch.Tensor, sink: int, local: int, chunk: int,
                         topk: int, rep: str, query_block: int,
                         block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Top-k middle chunks per (batch, kv head, query block) (Triton).

    Parameters
    ----------
    q : [B, Hq, Lq, D] raw queries; k_cache : [B, Hkv, Nmax, D] raw keys (read for "max"), or
        pages [num_pages, Hkv, page_size, D] with block_table.
    reps : "bound" [B, Hkv, n_chunks, 2, D], "mean" [B, Hkv, n_chunks, D], None for "max".
    cache_seqlens : int32 [B] on q's device.
    sink, local, chunk, topk, query_block : docs/design.md section 2; topk <= 256 is tuned for.
    rep : "max", "bound" or "mean".
    block_table : None (contiguous cache) or int32 [B, max_pages] (paged cache,
        Nmax = max_pages * page_size).

    Returns
    -------
    idx : int32 [B, Hkv, ceil(Lq / query_block), topk], ascending, padded with -1.

    Example
    -------
    >>> idx = torch.ops.reattention.select_chunks_triton(q, k, None, lens, 64, 4096, 64, 32,
    ...                                                  "max", 128)
    """
    if rep not in _REPS:
        raise ValueError(f"rep must be 'max', 'bound' or 'mean', got {rep!r}")
    if rep != "max" and reps is None:
        raise ValueError(f"reps must be given for rep {rep!r}")
    b, hq, lq, d = q.shape
    hkv = k_cache.shape[1]
    _, nmax, lay, paged = kv_layout(k_cache, block_table, cache_seqlens)
    if d > 256:
        raise ValueError(f"the triton backend supports head dim D <= 256, got head dim {d}")
    group = hq // hkv
    n_blocks = triton.cdiv(lq, query_block)
    idx = torch.empty((b, hkv, n_blocks, topk), dtype=torch.int32, device=q.device)
    # Most middle chunks any block can have: the last block of a sequence of Nmax tokens.
    n_cols = max(0, nmax - lq + (n_blocks - 1) * query_block - local - sink) // chunk
    if n_cols == 0 or b * hkv == 0:
        return idx.fill_(-1)
    if q.stride(3) != 1 or k_cache.stride(3) != 1 or (reps is not None and reps.stride(-1) != 1):
        raise ValueError("select_chunks_triton needs q, k_cache, reps contiguous in the head dim")
    if reps is not None and reps.shape[2] < n_cols:
        # The kernel reads reps[:, :, :M_beta] unchecked (shapes only here: no host sync).
        raise ValueError(f"reps holds {reps.shape[2]} chunks but the last query block can "
                         f"select among {n_cols}")
    on_gpu = q.device.type == "cuda"
    n_rows = group * min(query_block, lq)
    tile_c, block_m, block_n, warps = _score_config(rep, n_rows, d, q.dtype == torch.float32,
                                                   on_gpu, n_cols)
    n_tiles = triton.cdiv(n_cols, tile_c)
    scores = torch.empty((b, hkv, n_blocks, n_cols), dtype=torch.float32, device=q.device)
    r = reps if reps is not None else q  # any tensor: the pointer is unused for "max"
    r_strides = (0, 0, 0, 0) if reps is None else (
        reps.stride(0), reps.stride(1), reps.stride(2), reps.stride(3) if rep == "bound" else 0)
    wrap_triton(_chunk_scores_kernel)[(n_blocks * n_tiles * b * hkv,)](
        q, k_cache, r, cache_seqlens, scores,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *r_strides,
        hkv, group, lq, query_block, n_blocks, n_tiles, n_cols, d, sink, local, chunk, *lay,
        REP=_REPS[rep], TILE_C=tile_c, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), IEEE=q.dtype == torch.float32,
        INTERPRET=not on_gpu, PAGED=paged and rep == "max",  # reps are never paged
        num_warps=warps)

    # Top-k: shrink each row by segments until one segment remains, then the final pass.
    rows = b * hkv * n_blocks
    kp = triton.next_power_of_2(topk)
    seg, final_max = max(_SEG_MIN, 4 * kp), max(_FINAL_MIN, 2 * kp)
    src, length, from_scores = scores, n_cols, True
    while length > final_max:
        n_segs = triton.cdiv(length, seg)
        dst = torch.empty((rows, n_segs * kp), dtype=torch.int64, device=q.device)
        wrap_triton(_topk_level_kernel)[(rows * n_segs,)](
            src, dst, length, n_segs, FROM_SCORES=from_scores, SEG=seg, KP=kp, PAD=_PAD_KEY,
            RANK_SORT=not on_gpu and seg <= _RANK_SORT_MAX, num_warps=4)
        src, length, from_scores = dst, n_segs * kp, False
    final_seg = max(triton.next_power_of_2(length), kp)
    wrap_triton(_topk_final_kernel)[(rows,)](
        src, cache_seqlens, idx, length, hkv * n_blocks, n_blocks, lq, query_block, sink, local,
        chunk, topk,
        FROM_SCORES=from_scores, SEG=final_seg, PAD=_PAD_KEY,
        RANK_SORT=not on_gpu and final_seg <= _RANK_SORT_MAX, num_warps=8 if final_seg >= 2048 else 4)
    return idx


@select_chunks_triton.register_fake
def _select_chunks_triton_fake(q, k_cache, reps, cache_seqlens, sink, local, chunk, topk, rep,
                               query_block, block_table=None):
    n_blocks = -(-q.shape[2] // query_block)
    return q.new_empty((q.shape[0], k_cache.shape[1], n_blocks, topk), dtype=torch.int32)
