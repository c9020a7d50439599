"""ReAttention in plain PyTorch: the specification every backend is tested against.

This module is docs/design.md section 2 (contract v2) written as code. It is short and obvious
on purpose and never optimized: loops over (batch, kv head, query block) and dense math inside.
All arithmetic runs in float32 (float64 when the inputs are float64, so invariants can be
checked to 1e-10); outputs are cast back to the query dtype.

Every query block is handled as a call of its own (:func:`reattention.layout.block_segments`):
block beta, with queries at P0..P1, sees the keys [0, P1] split into

    sink   = [0, min(S, P1 + 1))
    middle = [S, mid_end),  mid_end = S + C * floor(max(0, P0 - W - S) / C)   (M whole chunks)
    local  = [mid_end, P1]

selects K_eff = min(topk, M) chunks of its middle by a position-agnostic score, then attends
over [sink | selected chunks | local] with RoPE at re-assigned positions.
"""
from __future__ import annotations

import math

import torch

from . import layout
from .layout import block_segments, new_reps, query_blocks
from .rope import apply_rope

__all__ = [
    "chunk_reps_ref",
    "chunk_scores_ref",
    "select_chunks_ref",
    "gather_attention_ref",
    "reattention_attn_ref",
]


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _seqlens(cache_seqlens: torch.Tensor | None, batch: int, nmax: int) -> list[int]:
    if cache_seqlens is None:
        return [nmax] * batch
    return [int(n) for n in cache_seqlens.tolist()]


def chunk_reps_ref(k_cache: torch.Tensor, cache_seqlens: torch.Tensor | None, reps: torch.Tensor,
                   sink: int, chunk: int, rep: str, start_chunk: int = 0, *,
                   block_table: torch.Tensor | None = None) -> None:
    """Fill chunk representatives in place for the complete chunks ``j >= start_chunk``.

    A negative ``start_chunk = -m`` instead refreshes the last m complete chunks of each
    sequence, ``[max(0, c_b - m), c_b)`` with ``c_b`` its complete chunks (the host-free
    update of a graph-captured decode step: docs/design.md section 3).

    k_cache : [B, Hkv, Nmax, D] raw keys (or pages with ``block_table``: every function here
        reads a paged cache as its contiguous copy, :func:`layout.unpage`).
    reps : "bound" -> [B, Hkv, n_chunks, 2, D] (min, max); "mean" -> [B, Hkv, n_chunks, D];
        in the cache dtype. Chunk j covers tokens ``[sink + j*chunk, sink + (j+1)*chunk)``
        and is complete when it ends at or before ``N_b``; ``j < n_chunks = reps.shape[2]``.
    """
    if block_table is not None:
        k_cache = layout.unpage(k_cache, block_table, cache_seqlens)
    b_, h_, nmax, d = k_cache.shape
    n_chunks = reps.shape[2]
    for b, n in enumerate(_seqlens(cache_seqlens, b_, nmax)):
        end = min(n_chunks, max(0, n - sink) // chunk)
        first = start_chunk if start_chunk >= 0 else max(0, end + start_chunk)
        if end <= first:
            continue
        toks = k_cache[b, :, sink + first * chunk: sink + end * chunk]
        toks = toks.reshape(h_, end - first, chunk, d)
        if rep == "bound":
            reps[b, :, first:end, 0] = toks.amin(dim=2)
            reps[b, :, first:end, 1] = toks.amax(dim=2)
        elif rep == "mean":
            acc = toks.to(_acc_dtype(toks)).sum(dim=2) / chunk
            reps[b, :, first:end] = acc.to(reps.dtype)
        else:
            raise ValueError(f"rep must be 'bound' or 'mean' for chunk_reps, got {rep!r}")


def _dot(qs: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``qs @ cols^T`` as a plain sum over d in index order: [..., R, D] x [..., K, D] ->
    [..., R, K].

    Not a GEMM on purpose: a GEMM library rounds its edge tiles differently, so bit-identical
    columns (the raw keys of a repeated token) could score differently and break the tie rule
    (docs/design.md section 2). Here every (row, column) pair runs the same float ops in the
    same order.
    """
    out = qs.new_zeros(qs.shape[:-1] + cols.shape[-2:-1])
    qt, ct = qs.movedim(-1, 0).contiguous(), cols.movedim(-1, 0).contiguous()  # d first
    for d in range(qs.shape[-1]):
        out += qt[d][..., :, None] * ct[d][..., None, :]
    return out


def rep_scores(qs: torch.Tensor, cols: torch.Tensor, rep: str, chunk: int) -> torch.Tensor:
    """Score of every (row, chunk) pair before the max over rows.

    Parameters
    ----------
    qs : [..., R, D] query rows, in the accumulation dtype.
    cols : the chunks, in the same dtype: "max" their raw keys [..., M * chunk, D], "bound"
        [..., M, 2, D] (min, max), "mean" [..., M, D].

    Returns
    -------
    [..., R, M]: "max" max_t q.k_t over the chunk's keys, "bound" sum_d max(q_d kmin_d,
    q_d kmax_d), "mean" q.mean. A chunk's score depends only on its own data.
    """
    if rep == "max":
        return _dot(qs, cols).unflatten(-1, (-1, chunk)).amax(-1)
    if rep == "bound":
        out = qs.new_zeros(qs.shape[:-1] + cols.shape[-3:-2])
        qt, ct = qs.movedim(-1, 0).contiguous(), cols.movedim(-1, 0).contiguous()  # d first
        for d in range(qs.shape[-1]):
            qd = qt[d][..., :, None]
            out += torch.maximum(qd * ct[d][..., None, :, 0], qd * ct[d][..., None, :, 1])
        return out
    if rep == "mean":
        return _dot(qs, cols)
    raise ValueError(f"rep must be 'max', 'bound' or 'mean', got {rep!r}")


def chunk_scores_ref(q: torch.Tensor, k_cache: torch.Tensor, reps: torch.Tensor | None,
                     cache_seqlens: torch.Tensor | None, sink: int, local: int, chunk: int,
                     rep: str, query_block: int) -> torch.Tensor:
    """Position-agnostic chunk scores.

    score[b, h, beta, j] = max over the q heads of kv head h and the queries of block beta of
    ``rep_score(q, j)``: "max" max_t q.k_t over the chunk's raw keys, "bound"
    sum_d max(q_d kmin_jd, q_d kmax_jd), "mean" q.mean_j.

    Returns
    -------
    float32 (float64 for float64 inputs) [B, Hkv, n_blocks, n_cols], n_cols = the largest M of
    any block of any sequence; ``-inf`` where chunk j is not in the middle of block beta.
    """
    b_, hq, lq, d = q.shape
    hkv, nmax = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    acc = _acc_dtype(q)
    lens = _seqlens(cache_seqlens, b_, nmax)
    blocks = query_blocks(lq, query_block)
    ms = [[block_segments(n, lq, s, e, sink, local, chunk).n_mid for s, e in blocks]
          for n in lens]
    out = torch.full((b_, hkv, len(blocks), max((max(m) for m in ms), default=0)), -math.inf,
                     dtype=acc, device=q.device)
    for b, m_of_block in enumerate(ms):
        for h in range(hkv):
            for beta, ((s, e), m) in enumerate(zip(blocks, m_of_block)):
                if m == 0:
                    continue
                # [M*C, D] raw keys of the block's middle, or its first M reps
                cols = k_cache[b, h, sink: sink + m * chunk] if rep == "max" else reps[b, h, :m]
                qs = q[b, h * g:(h + 1) * g, s:e].reshape(-1, d).to(acc)  # [G*nq, D]
                out[b, h, beta, :m] = rep_scores(qs, cols.to(acc), rep, chunk).amax(dim=0)
    return out


def select_chunks_ref(q: torch.Tensor, k_cache: torch.Tensor, reps: torch.Tensor | None,
                      cache_seqlens: torch.Tensor | None, sink: int, local: int, chunk: int,
                      topk: int, rep: str, query_block: int, *,
                      block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k middle chunks per (batch, kv head, query block).

    Returns
    -------
    int32 [B, Hkv, n_blocks, topk]: the K_eff = min(topk, M) best chunk indices of each block's
    own middle (ties to the lower index) sorted ascending, padded with -1.
    """
    if block_table is not None:
        k_cache = layout.unpage(k_cache, block_table, cache_seqlens)
    scores = chunk_scores_ref(q, k_cache, reps, cache_seqlens, sink, local, chunk, rep,
                              query_block)
    b_, hkv, nb, _ = scores.shape
    lq = q.shape[2]
    lens = _seqlens(cache_seqlens, b_, k_cache.shape[2])
    idx = torch.full((b_, hkv, nb, topk), -1, dtype=torch.int32, device=q.device)
    for b, n in enumerate(lens):
        for beta, (s, e) in enumerate(query_blocks(lq, query_block)):
            m = block_segments(n, lq, s, e, sink, local, chunk).n_mid
            k_eff = min(topk, m)
            if k_eff == 0:
                continue
            # A stable descending sort keeps equal scores in index order: ties go low.
            order = torch.sort(scores[b, :, beta, :m], dim=-1, descending=True,
                               stable=True).indices
            idx[b, :, beta, :k_eff] = order[..., :k_eff].sort(dim=-1).values.to(torch.int32)
    return idx


def gather_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_seqlens: torch.Tensor | None, idx: torch.Tensor,
                         inv_freq: torch.Tensor, sink: int, local: int, chunk: int,
                         query_block: int, scale: float, rope_scale: float = 1.0,
                         rope_style: str = "half", positions: str = "compact",
                         compute_dtype: torch.dtype | None = None, *,
                         block_table: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over [sink | selected chunks | local] with RoPE at re-assigned positions.

    Parameters
    ----------
    q : [B, Hq, Lq, D] raw queries of the last Lq tokens.
    k_cache, v_cache : [B, Hkv, Nmax, D] raw keys and values.
    idx : int32 [B, Hkv, n_blocks, topk], ascending, -1 padded (from ``select_chunks``).
    positions : "compact" (key r of the gathered sequence at position r) or "original".
    compute_dtype : arithmetic dtype, default float32 (float64 for float64 inputs). Tests pass
        q's own low-precision dtype to measure PyTorch's rounding error (the tolerance rule of
        docs/design.md section 2.10).

    Returns
    -------
    out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] float32 (natural log).
    """
    if block_table is not None:
        k_cache = layout.unpage(k_cache, block_table, cache_seqlens)
        v_cache = layout.unpage(v_cache, block_table, cache_seqlens)
    b_, hq, lq, d = q.shape
    hkv, nmax = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    acc = compute_dtype or _acc_dtype(q)
    dev = q.device
    out = torch.empty(b_, hq, lq, d, dtype=acc, device=dev)
    lse = torch.empty(b_, hq, lq, dtype=acc, device=dev)
    for b, n in enumerate(_seqlens(cache_seqlens, b_, nmax)):
        p0 = n - lq
        for beta, (s, e) in enumerate(query_blocks(lq, query_block)):
            # The block sees the keys [0, P1], P1 = p0 + e - 1, with segments of its own.
            sink_len, mid_end, _ = block_segments(n, lq, s, e, sink, local, chunk)
            end = p0 + e
            q_pos = torch.arange(p0 + s, end, device=dev)
            for h in range(hkv):
                sel = [int(j) for j in idx[b, h, beta].tolist() if j >= 0]
                key_pos = torch.cat([
                    torch.arange(sink_len),
                    *[torch.arange(sink + j * chunk, sink + (j + 1) * chunk) for j in sel],
                    torch.arange(mid_end, max(mid_end, end)),  # empty when P1 < S
                ]).to(dev)
                if positions == "compact":
                    # A query at P sits at (P - mid_end) + S + K_eff*C; when P1 < S the sink
                    # is cut short and mid_end = S, so this is still P.
                    shift = sink + len(sel) * chunk - mid_end
                    k_rpos = torch.arange(key_pos.numel(), device=dev)
                    q_rpos = q_pos + shift
                elif positions == "original":
                    k_rpos, q_rpos = key_pos, q_pos
                else:
                    raise ValueError(f"positions must be 'compact' or 'original', got {positions!r}")
                k = apply_rope(k_cache[b, h, key_pos].to(acc), k_rpos, inv_freq, rope_scale,
                               rope_style)
                v = v_cache[b, h, key_pos].to(acc)
                qh = apply_rope(q[b, h * g:(h + 1) * g, s:e].to(acc), q_rpos, inv_freq,
                                rope_scale, rope_style)  # [G, nq, D]
                logits = scale * (qh @ k.T)
                visible = key_pos[None, :] <= q_pos[:, None]
                logits = logits.masked_fill(~visible, -math.inf)
                lse_blk = torch.logsumexp(logits, dim=-1)
                out[b, h * g:(h + 1) * g, s:e] = torch.exp(logits - lse_blk[..., None]) @ v
                lse[b, h * g:(h + 1) * g, s:e] = lse_blk
    return out.to(q.dtype), lse.to(torch.float32)


def reattention_attn_ref(q, k_cache, v_cache, cache_seqlens, inv_freq, *, sink, local, chunk,
                         topk, query_block, rep, scale, rope_scale=1.0, rope_style="half",
                         positions="compact", reps=None):
    """Selection then attention, all in the reference. Returns (out, lse, idx)."""
    if rep != "max" and reps is None:
        reps = new_reps(k_cache, sink, chunk, rep)
        chunk_reps_ref(k_cache, cache_seqlens, reps, sink, chunk, rep, 0)
    idx = select_chunks_ref(q, k_cache, reps, cache_seqlens, sink, local, chunk, topk, rep,
                            query_block)
    out, lse = gather_attention_ref(q, k_cache, v_cache, cache_seqlens, idx, inv_freq, sink,
                                    local, chunk, query_block, scale, rope_scale, rope_style,
                                    positions)
    return out, lse, idx
