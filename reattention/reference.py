"""ReAttention in plain PyTorch: the specification every backend is tested against.

This module is DESIGN.md section 2 written as code. It is short and obvious on purpose and
never optimized: loops over (batch, kv head, query block) and dense math inside. All
arithmetic runs in float32 (float64 when the inputs are float64, so invariants can be
checked to 1e-10); outputs are cast back to the query dtype.

Per sequence b with N valid tokens, Lq queries and P0 = N - Lq (the first query's position):

    sink   = [0, min(S, N))
    middle = [S, mid_end),  mid_end = S + C * floor(max(0, P0 - W - S) / C)   (M whole chunks)
    local  = [mid_end, N)

Each query block selects K_eff = min(topk, M) chunks of the middle by a position-agnostic
score, then attends over [sink | selected chunks | local] with RoPE at re-assigned positions.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "segments",
    "rope_angles",
    "apply_rope",
    "chunk_reps_ref",
    "chunk_scores_ref",
    "select_chunks_ref",
    "gather_attention_ref",
    "reattention_attn_ref",
    "reps_shape",
    "new_reps",
]


def segments(n: int, lq: int, sink: int, local: int, chunk: int) -> tuple[int, int, int]:
    """Split a sequence of ``n`` tokens whose last ``lq`` are queries.

    Returns
    -------
    (sink_len, mid_end, n_mid_chunks)
        ``sink_len = min(sink, n)``; the middle is ``[sink, mid_end)`` made of
        ``n_mid_chunks`` whole chunks; the local window is ``[mid_end, n)`` (empty when
        ``n <= mid_end``).
    """
    p0 = n - lq
    m = max(0, p0 - local - sink) // chunk
    return min(sink, n), sink + chunk * m, m


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rope_angles(pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Angles ``float32(pos) * inv_freq`` computed in float32, as Hugging Face does.

    pos: int [L]; inv_freq: [R/2] -> [L, R/2] float32.
    """
    return pos.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor,
               rope_scale: float = 1.0, style: str = "half") -> torch.Tensor:
    """Rotate the first ``R = 2 * len(inv_freq)`` dims of ``x`` at positions ``pos``.

    Parameters
    ----------
    x : [..., L, D] float tensor (float32/float64 for exactness).
    pos : int tensor [L], the position of each row.
    inv_freq : [R/2] float32 inverse frequencies, ``R <= D``.
    rope_scale : cos and sin are multiplied by it (yarn's attention factor).
    style : "half" pairs (i, i + R/2) (Hugging Face), "interleaved" pairs (2i, 2i + 1).

    Returns
    -------
    Tensor of ``x``'s shape and dtype; dims from R on pass through unrotated.
    """
    half = inv_freq.shape[0]
    r = 2 * half
    ang = rope_angles(pos, inv_freq)
    if x.dtype == torch.float64:
        ang = ang.to(torch.float64)
    # cos/sin in (at least) float32, then rounded to x's dtype, as Hugging Face does.
    cos = (ang.cos() * rope_scale).to(x.dtype)
    sin = (ang.sin() * rope_scale).to(x.dtype)
    out = x.clone()
    if style == "half":
        x1, x2 = x[..., :half], x[..., half:r]
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:r] = x2 * cos + x1 * sin
    elif style == "interleaved":
        x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
        out[..., 0:r:2] = x1 * cos - x2 * sin
        out[..., 1:r:2] = x2 * cos + x1 * sin
    else:
        raise ValueError(f"rope_style must be 'half' or 'interleaved', got {style!r}")
    return out


def _seqlens(cache_seqlens: torch.Tensor | None, batch: int, nmax: int) -> list[int]:
    if cache_seqlens is None:
        return [nmax] * batch
    return [int(n) for n in cache_seqlens.tolist()]


def chunk_reps_ref(k_cache: torch.Tensor, cache_seqlens: torch.Tensor | None, reps: torch.Tensor,
                   sink: int, chunk: int, mode: str, start_chunk: int = 0) -> None:
    """Fill chunk representatives in place for the complete chunks ``j >= start_chunk``.

    k_cache : [B, Hkv, Nmax, D] raw keys.
    reps : "bound" -> [B, Hkv, n_chunks, 2, D] (min, max); "mean" -> [B, Hkv, n_chunks, D];
        in the cache dtype. Chunk j covers tokens ``[sink + j*chunk, sink + (j+1)*chunk)``
        and is complete when it ends at or before ``N_b``; ``j < n_chunks = reps.shape[2]``.
    """
    b_, h_, nmax, d = k_cache.shape
    n_chunks = reps.shape[2]
    for b, n in enumerate(_seqlens(cache_seqlens, b_, nmax)):
        end = min(n_chunks, max(0, n - sink) // chunk)
        if end <= start_chunk:
            continue
        toks = k_cache[b, :, sink + start_chunk * chunk: sink + end * chunk]
        toks = toks.reshape(h_, end - start_chunk, chunk, d)
        if mode == "bound":
            reps[b, :, start_chunk:end, 0] = toks.amin(dim=2)
            reps[b, :, start_chunk:end, 1] = toks.amax(dim=2)
        elif mode == "mean":
            acc = toks.to(_acc_dtype(toks)).sum(dim=2) / chunk
            reps[b, :, start_chunk:end] = acc.to(reps.dtype)
        else:
            raise ValueError(f"mode must be 'bound' or 'mean' for chunk_reps, got {mode!r}")


def _block_ranges(lq: int, query_block: int) -> list[tuple[int, int]]:
    return [(s, min(lq, s + query_block)) for s in range(0, lq, query_block)]


def rep_scores(qs: torch.Tensor, cols: torch.Tensor, mode: str, chunk: int) -> torch.Tensor:
    """Score of every (row, chunk) pair before the max over rows.

    Parameters
    ----------
    qs : [..., R, D] query rows, in the accumulation dtype.
    cols : the chunks, in the same dtype: "max" their raw keys [..., M * chunk, D], "bound"
        [..., M, 2, D] (min, max), "mean" [..., M, D].

    Returns
    -------
    [..., R, M]: "max" max_t q.k_t over the chunk's keys, "bound" sum_d max(q_d kmin_d,
    q_d kmax_d), "mean" q.mean.
    """
    if mode == "max":
        return (qs @ cols.transpose(-1, -2)).unflatten(-1, (-1, chunk)).amax(-1)
    if mode == "bound":
        qd = qs[..., :, None, :]
        return torch.maximum(qd * cols[..., None, :, 0, :], qd * cols[..., None, :, 1, :]).sum(-1)
    if mode == "mean":
        return qs @ cols.transpose(-1, -2)
    raise ValueError(f"mode must be 'max', 'bound' or 'mean', got {mode!r}")


def chunk_scores_ref(q: torch.Tensor, k_cache: torch.Tensor, reps: torch.Tensor | None,
                     cache_seqlens: torch.Tensor | None, sink: int, local: int, chunk: int,
                     mode: str, query_block: int) -> torch.Tensor:
    """Position-agnostic chunk scores.

    score[b, h, beta, j] = max over the q heads of kv head h and the queries of block beta of
    ``rep_score(q, j)``: "max" max_t q.k_t over the chunk's raw keys, "bound"
    sum_d max(q_d kmin_jd, q_d kmax_jd), "mean" q.mean_j.

    Returns
    -------
    float32 (float64 for float64 inputs) [B, Hkv, n_blocks, n_cols], n_cols = max M_b over
    the batch; ``-inf`` where chunk j is not a middle chunk of sequence b.
    """
    b_, hq, lq, d = q.shape
    hkv, nmax = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    acc = _acc_dtype(q)
    lens = _seqlens(cache_seqlens, b_, nmax)
    ms = [segments(n, lq, sink, local, chunk)[2] for n in lens]
    blocks = _block_ranges(lq, query_block)
    out = torch.full((b_, hkv, len(blocks), max(ms, default=0)), -math.inf, dtype=acc,
                     device=q.device)
    for b, m in enumerate(ms):
        if m == 0:
            continue
        for h in range(hkv):
            # [M*C, D] raw keys of the middle, or the first M reps
            cols = (k_cache[b, h, sink: sink + m * chunk] if mode == "max" else reps[b, h, :m])
            cols = cols.to(acc)
            for beta, (s, e) in enumerate(blocks):
                qs = q[b, h * g:(h + 1) * g, s:e].reshape(-1, d).to(acc)  # [G*nq, D]
                out[b, h, beta, :m] = rep_scores(qs, cols, mode, chunk).amax(dim=0)
    return out


def select_chunks_ref(q: torch.Tensor, k_cache: torch.Tensor, reps: torch.Tensor | None,
                      cache_seqlens: torch.Tensor | None, sink: int, local: int, chunk: int,
                      topk: int, mode: str, query_block: int) -> torch.Tensor:
    """Top-k middle chunks per (batch, kv head, query block).

    Returns
    -------
    int32 [B, Hkv, n_blocks, topk]: the K_eff = min(topk, M_b) best chunk indices (ties to
    the lower index) sorted ascending, padded with -1.
    """
    scores = chunk_scores_ref(q, k_cache, reps, cache_seqlens, sink, local, chunk, mode,
                              query_block)
    b_, hkv, nb, _ = scores.shape
    lens = _seqlens(cache_seqlens, b_, k_cache.shape[2])
    idx = torch.full((b_, hkv, nb, topk), -1, dtype=torch.int32, device=q.device)
    for b, n in enumerate(lens):
        m = segments(n, q.shape[2], sink, local, chunk)[2]
        k_eff = min(topk, m)
        if k_eff == 0:
            continue
        # A stable descending sort keeps equal scores in index order: ties go low.
        order = torch.sort(scores[b, :, :, :m], dim=-1, descending=True, stable=True).indices
        idx[b, :, :, :k_eff] = order[..., :k_eff].sort(dim=-1).values.to(torch.int32)
    return idx


def gather_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_seqlens: torch.Tensor | None, idx: torch.Tensor,
                         inv_freq: torch.Tensor, sink: int, local: int, chunk: int,
                         query_block: int, scale: float, rope_scale: float = 1.0,
                         rope_style: str = "half", positions: str = "compact",
                         compute_dtype: torch.dtype | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over [sink | selected chunks | local] with RoPE at re-assigned positions.

    Parameters
    ----------
    q : [B, Hq, Lq, D] raw queries of the last Lq tokens.
    k_cache, v_cache : [B, Hkv, Nmax, D] raw keys and values.
    idx : int32 [B, Hkv, n_blocks, topk], ascending, -1 padded (from ``select_chunks``).
    positions : "compact" (key r of the gathered sequence at position r) or "original".
    compute_dtype : arithmetic dtype, default float32 (float64 for float64 inputs). Tests pass
        q's own low-precision dtype to measure PyTorch's rounding error (STYLE.md tolerance).

    Returns
    -------
    out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] float32 (natural log).
    """
    b_, hq, lq, d = q.shape
    hkv, nmax = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    acc = compute_dtype or _acc_dtype(q)
    dev = q.device
    out = torch.empty(b_, hq, lq, d, dtype=acc, device=dev)
    lse = torch.empty(b_, hq, lq, dtype=acc, device=dev)
    for b, n in enumerate(_seqlens(cache_seqlens, b_, nmax)):
        sink_len, mid_end, _ = segments(n, lq, sink, local, chunk)
        p0 = n - lq
        for h in range(hkv):
            for beta, (s, e) in enumerate(_block_ranges(lq, query_block)):
                sel = [int(j) for j in idx[b, h, beta].tolist() if j >= 0]
                key_pos = torch.cat([
                    torch.arange(sink_len),
                    *[torch.arange(sink + j * chunk, sink + (j + 1) * chunk) for j in sel],
                    torch.arange(mid_end, max(mid_end, n)),  # empty when N < sink
                ]).to(dev)
                q_pos = torch.arange(p0 + s, p0 + e, device=dev)
                if positions == "compact":
                    # DESIGN: a query at P sits at (P - mid_end) + S + K_eff*C; with N < S
                    # the sink is cut short and mid_end = S, so this is still P.
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


def reps_shape(k_cache: torch.Tensor, sink: int, chunk: int, mode: str) -> tuple[int, ...]:
    """Shape of the representatives of ``k_cache`` [B, Hkv, Nmax, D].

    "bound" -> [B, Hkv, n_chunks, 2, D], "mean" -> [B, Hkv, n_chunks, D], with
    ``n_chunks = max(0, (Nmax - sink) // chunk)``.
    """
    b_, h_, nmax, d = k_cache.shape
    n_chunks = max(0, nmax - sink) // chunk
    return (b_, h_, n_chunks, 2, d) if mode == "bound" else (b_, h_, n_chunks, d)


def new_reps(k_cache: torch.Tensor, sink: int, chunk: int, mode: str) -> torch.Tensor:
    """Allocate an (uninitialised) reps tensor of :func:`reps_shape` in the cache's dtype and
    device."""
    return k_cache.new_empty(reps_shape(k_cache, sink, chunk, mode))
