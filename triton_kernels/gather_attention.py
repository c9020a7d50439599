"""Triton gather-attention: [sink | selected chunks | local] with RoPE applied in the kernel.

Each query block beta (queries [s, e) of the call, s = beta * query_block) is handled as a call
of its own (docs/design.md section 2): its queries sit at P0 = N_b - Lq + s .. P1 = N_b - Lq +
e - 1, it sees the keys [0, P1] and has its own mid_end = S + C * (max(0, P0 - W - S) // C).
Per (b, kv head h, beta) the gathered sequence is r = 0 .. L-1 with
    r <  n_sink                 -> token t = r                         (sink, n_sink = min(S, P1+1))
    r <  n_sink + K*C           -> token t = S + idx[slot]*C + offset  (selected chunks)
    otherwise                   -> token t = mid_end + (r - n_sink - K*C)  (local window, to P1)
where K is the number of valid (>= 0) entries of idx. Key r sits at position r ("compact") or
t ("original"); a query at original P sits at P - mid_end + S + K*C or P. A key is visible iff
t <= P (original positions), so the local window is causal and everything before it is not.
L <= S + topk*C + W + C - 1 + query_block, whatever Lq is.

Tiling: one program per (b, h, beta, row tile, key split). The rows of a tile are the
(query i, q head g of h's group) pairs, row = i * G + g, so the GQA group shares every K/V
tile (decode packs the G heads of one token into one tile). Keys stream in BLOCK_N tiles
gathered straight from the [B, Hkv, Nmax, D] cache by the index map above. RoPE is applied
per column group: with x1/x2 the rotated pair halves ("half": dims i, i+R/2; "interleaved": 2i,
2i+1) and x3 the pass-through dims R..D, q.k = q1'.k1' + q2'.k2' + q3.k3, three dots over
separately loaded column groups. Angles are fp32(pos) * inv_freq in fp32 with libdevice
cos/sin (accurate, with full range reduction; the interpreter uses numpy's). Online softmax
in base 2; lse out in natural log.

Decode (few rows per (b, h)): the gathered keys are split across programs (flash-decoding);
each writes a normalised partial output and its base-2 lse, and a merge kernel combines them.
Prefill (a block's rows span >= 2 row tiles): every row tile of a block would compute the same
sin/cos for the same gathered keys, so _rotate_keys_kernel rotates each block's gathered
sequence once, by the same token map, into a workspace [B*Hkv*n_blocks, L_max, R] that the
attention loop reads instead. (Blocks cannot share rotated keys: a local token sits at another
compact position in every block, since each block has its own mid_end.)
Paged caches (kv_layout.py): each gathered key's token t is looked up in the block table (k, v
and the pre-rotation alike); the grid, tiles, splits and sums are those of a contiguous cache of
Nmax = max_pages * page_size, so the output is bit-identical to it. Launch shapes depend only
on tensor shapes (the table is read only on the device), so a decode step is CUDA-graph
capturable.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.language.extra import libdevice

from .kv_layout import kv_head_base, kv_layout, kv_rows, kv_table_row
from .select_chunks import _dot

_LOG2E = 1.4426950408889634
# Pre-rotate a block's keys when at least this many row-tile programs would rotate them.
_PREROTATE_MIN_PROGRAMS = 2


@triton.jit
def _rotate(x1, x2, pos, inv_freq, rope_scale, ACCURATE: tl.constexpr):
    # x1, x2 [rows, BLOCK_R] fp32 pair halves; pos [rows] int32; inv_freq [BLOCK_R] fp32.
    ang = pos.to(tl.float32)[:, None] * inv_freq[None, :]
    if ACCURATE:
        c = libdevice.cos(ang)
        s = libdevice.sin(ang)
    else:
        c = tl.cos(ang)
        s = tl.sin(ang)
    c = c * rope_scale
    s = s * rope_scale
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _segments(seqlens_ptr, b, beta, lq, query_block, sink, local, chunk):
    # Query block beta of sequence b as a call of its own (docs/design.md section 2): (n, p0,
    # mid_end, n_sink) with n = P1 + 1 the keys it sees and p0 its first query's position.
    q_row0 = beta * query_block
    p0 = tl.load(seqlens_ptr + b) - lq + q_row0
    n = p0 + tl.minimum(query_block, lq - q_row0)
    m = tl.maximum(p0 - local - sink, 0) // chunk
    return n, p0, sink + m * chunk, tl.minimum(sink, n)


@triton.jit
def _selection(idx_row, topk, n_sink, chunk, BLOCK_K: tl.constexpr):
    # End of the selected chunks in the gathered sequence, from idx's valid (>= 0) entries.
    offs_k = tl.arange(0, BLOCK_K)
    sel = tl.load(idx_row + offs_k, mask=offs_k < topk, other=-1)
    n_sel = tl.sum((sel >= 0).to(tl.int32), axis=0)
    return n_sel, n_sink + n_sel * chunk


@triton.jit
def _key_tokens(r, r_ok, idx_row, n, mid_end, n_sink, sel_end, sink, chunk):
    # Token t of each gathered key r (the map in the header), clamped into [0, n): a malformed
    # idx (-1 before a chunk id, an id past the middle) gives a wrong result, never a read
    # outside the keys the block sees; a valid one never needs the clamp.
    in_sel = (r >= n_sink) & (r < sel_end)
    rel = r - n_sink
    slot = tl.where(in_sel, rel // chunk, 0)
    j = tl.load(idx_row + slot, mask=in_sel & r_ok, other=0)
    t = tl.where(r < n_sink, r,
                 tl.where(in_sel, sink + j * chunk + (rel - slot * chunk), mid_end + (r - sel_end)))
    return tl.where(r_ok, tl.minimum(tl.maximum(t, 0), n - 1), 0)


@triton.jit
def _pair_columns(half_rot, BLOCK_R: tl.constexpr, INTERLEAVED: tl.constexpr):
    # Columns of the rotated pair halves: "half" (i, i + R/2) or "interleaved" (2i, 2i + 1).
    offs_r = tl.arange(0, BLOCK_R)
    if INTERLEAVED:
        c1 = 2 * offs_r
        c2 = c1 + 1
    else:
        c1 = offs_r
        c2 = offs_r + half_rot
    return offs_r, offs_r < half_rot, c1, c2


@triton.jit
def _rotate_keys_kernel(k_ptr, seqlens_ptr, idx_ptr, inv_freq_ptr, kr_ptr,
                        stride_kb, stride_kh, stride_kn, stride_ib, stride_ih, stride_iblk,
                        n_kv_heads, lq, query_block, n_blocks, topk, sink, local, chunk,
                        half_rot, l_max, n_tiles, rope_scale,
                        table_ptr, stride_tb, page_size, num_pages,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        INTERLEAVED: tl.constexpr, ORIGINAL: tl.constexpr,
                        ACCURATE: tl.constexpr, PAGED: tl.constexpr):
    # Workspace rows of (b, h, beta): the block's gathered keys r = 0 .. L-1, rotated at
    # position r ("compact") or t ("original"), the two pair halves side by side.
    pid = tl.program_id(0)
    tile = pid % n_tiles
    rest = pid // n_tiles
    beta = rest % n_blocks
    bh = rest // n_blocks
    b = bh // n_kv_heads
    h = bh % n_kv_heads
    n, p0, mid_end, n_sink = _segments(seqlens_ptr, b, beta, lq, query_block, sink, local, chunk)
    idx_row = idx_ptr + b.to(tl.int64) * stride_ib + h * stride_ih + beta * stride_iblk
    n_sel, sel_end = _selection(idx_row, topk, n_sink, chunk, BLOCK_K)
    length = tl.minimum(sel_end + tl.maximum(n - mid_end, 0), l_max)
    if tile * BLOCK_N < length:
        r = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        r_ok = r < length
        t = _key_tokens(r, r_ok, idx_row, n, mid_end, n_sink, sel_end, sink, chunk)
        offs_r, r_cols, c1, c2 = _pair_columns(half_rot, BLOCK_R, INTERLEAVED)
        k_rows = kv_head_base(k_ptr, b, h, stride_kb, stride_kh, PAGED) \
            + kv_rows(t, r_ok, kv_table_row(table_ptr, b, stride_tb, PAGED), page_size,
                      num_pages, stride_kb, stride_kn, PAGED)[:, None]
        m = r_ok[:, None] & r_cols[None, :]
        x1 = tl.load(k_rows + c1[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(k_rows + c2[None, :], mask=m, other=0.0).to(tl.float32)
        inv_freq = tl.load(inv_freq_ptr + offs_r, mask=r_cols, other=0.0)
        if ORIGINAL:
            x1, x2 = _rotate(x1, x2, t, inv_freq, rope_scale, ACCURATE)
        else:
            x1, x2 = _rotate(x1, x2, r, inv_freq, rope_scale, ACCURATE)
        dst = kr_ptr + ((bh * n_blocks + beta).to(tl.int64) * l_max + r)[:, None] * (2 * half_rot) \
            + offs_r[None, :]
        dtype = kr_ptr.dtype.element_ty
        tl.store(dst, x1.to(dtype), mask=m)
        tl.store(dst + half_rot, x2.to(dtype), mask=m)


@triton.jit
def _gather_attn_kernel(
        q_ptr, k_ptr, v_ptr, seqlens_ptr, idx_ptr, inv_freq_ptr, out_ptr, lse_ptr, kr_ptr,
        stride_qb, stride_qh, stride_ql,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ib, stride_ih, stride_iblk,
        stride_ob, stride_oh, stride_ol,
        n_kv_heads, group, lq, query_block, n_blocks, n_row_tiles, n_splits, split_len,
        head_dim, half_rot, sink, local, chunk, topk, qk_scale, rope_scale, l_max,
        table_ptr, stride_tb, page_size, num_pages,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, ORIGINAL: tl.constexpr,
        SPLIT: tl.constexpr, PREROT: tl.constexpr, ACCURATE: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr, PAGED: tl.constexpr):
    pid = tl.program_id(0)
    split = pid % n_splits
    rest = pid // n_splits
    tile = rest % n_row_tiles
    rest = rest // n_row_tiles
    beta = rest % n_blocks
    bh = rest // n_blocks
    b = bh // n_kv_heads
    h = bh % n_kv_heads
    q_row0 = beta * query_block
    nq = tl.minimum(query_block, lq - q_row0)
    n_rows = group * nq
    row0 = tile * BLOCK_M
    if row0 < n_rows:
        dtype = q_ptr.dtype.element_ty
        # This block's segments (docs/design.md section 2) and selection.
        n, p0, mid_end, n_sink = _segments(seqlens_ptr, b, beta, lq, query_block, sink, local,
                                           chunk)
        idx_row = idx_ptr + b.to(tl.int64) * stride_ib + h * stride_ih + beta * stride_iblk
        n_sel, sel_end = _selection(idx_row, topk, n_sink, chunk, BLOCK_K)
        # l_max bounds a valid idx's sequence; it cuts a malformed one (duplicate chunks) short
        # so that the workspace rows of the next block are never read.
        length = tl.minimum(sel_end + tl.maximum(n - mid_end, 0), l_max)
        kr_rows = kr_ptr + (bh * n_blocks + beta).to(tl.int64) * l_max * (2 * half_rot)

        rows = row0 + tl.arange(0, BLOCK_M)
        qi = rows // group
        head = h * group + (rows - qi * group)
        row_ok = rows < n_rows
        p_q = p0 + qi
        if ORIGINAL:
            pos_q = p_q
        else:
            pos_q = p_q - mid_end + sink + n_sel * chunk
        # Keys past the tile's last query are invisible to all its rows: stop there.
        p_last = p0 + tl.minimum((row0 + BLOCK_M - 1) // group, nq - 1)
        r_hi = tl.where(p_last >= mid_end, sel_end + p_last - mid_end + 1,
                        tl.minimum(n_sink, p_last + 1))
        r_hi = tl.minimum(r_hi, length)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, r_hi)

        # Column groups: rotated pair halves (c1, c2) and the pass-through dims (c3).
        offs_r, r_cols, c1, c2 = _pair_columns(half_rot, BLOCK_R, INTERLEAVED)
        c3 = 2 * half_rot + tl.arange(0, BLOCK_P)
        p_cols = c3 < head_dim
        offs_d = tl.arange(0, BLOCK_D)
        d_cols = offs_d < head_dim
        inv_freq = tl.load(inv_freq_ptr + offs_r, mask=r_cols, other=0.0)

        q_rows = q_ptr + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh \
            + (q_row0 + qi).to(tl.int64) * stride_ql
        qm = row_ok[:, None] & r_cols[None, :]
        q1 = tl.load(q_rows[:, None] + c1[None, :], mask=qm, other=0.0).to(tl.float32)
        q2 = tl.load(q_rows[:, None] + c2[None, :], mask=qm, other=0.0).to(tl.float32)
        q1, q2 = _rotate(q1, q2, pos_q, inv_freq, rope_scale, ACCURATE)
        q1 = q1.to(dtype)
        q2 = q2.to(dtype)
        if HAS_PASS:
            q3 = tl.load(q_rows[:, None] + c3[None, :], mask=row_ok[:, None] & p_cols[None, :],
                         other=0.0)

        kb = kv_head_base(k_ptr, b, h, stride_kb, stride_kh, PAGED)
        vb = kv_head_base(v_ptr, b, h, stride_vb, stride_vh, PAGED)
        table_row = kv_table_row(table_ptr, b, stride_tb, PAGED)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start in range(lo, hi, BLOCK_N):
            r = start + tl.arange(0, BLOCK_N)
            r_ok = r < hi
            t = _key_tokens(r, r_ok, idx_row, n, mid_end, n_sink, sel_end, sink, chunk)
            k_rows = kb + kv_rows(t, r_ok, table_row, page_size, num_pages, stride_kb, stride_kn,
                                  PAGED)[:, None]
            km = r_ok[:, None] & r_cols[None, :]
            if PREROT:
                w_rows = kr_rows + r.to(tl.int64)[:, None] * (2 * half_rot)
                k1 = tl.load(w_rows + offs_r[None, :], mask=km, other=0.0)
                k2 = tl.load(w_rows + half_rot + offs_r[None, :], mask=km, other=0.0)
            else:
                k1 = tl.load(k_rows + c1[None, :], mask=km, other=0.0).to(tl.float32)
                k2 = tl.load(k_rows + c2[None, :], mask=km, other=0.0).to(tl.float32)
                if ORIGINAL:
                    k1, k2 = _rotate(k1, k2, t, inv_freq, rope_scale, ACCURATE)
                else:
                    k1, k2 = _rotate(k1, k2, r, inv_freq, rope_scale, ACCURATE)
                k1 = k1.to(dtype)
                k2 = k2.to(dtype)
            s = _dot(q1, tl.trans(k1), IEEE, UPCAST)
            s += _dot(q2, tl.trans(k2), IEEE, UPCAST)
            if HAS_PASS:
                k3 = tl.load(k_rows + c3[None, :], mask=r_ok[:, None] & p_cols[None, :],
                             other=0.0)
                s += _dot(q3, tl.trans(k3), IEEE, UPCAST)
            visible = r_ok[None, :] & (t[None, :] <= p_q[:, None])
            s = tl.where(visible, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with nothing visible yet keeps m = -inf; shift by 0 to avoid inf - inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # Paged, v's table read repeats k's (a cache hit) rather than keeping k's pages
            # live across the dots.
            v_rows = vb + kv_rows(t, r_ok, table_row, page_size, num_pages, stride_vb, stride_vn,
                                  PAGED)[:, None]
            v = tl.load(v_rows + offs_d[None, :],
                        mask=r_ok[:, None] & d_cols[None, :], other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(dtype), v, IEEE, UPCAST)
            m_i = m_new

        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        om = row_ok[:, None] & d_cols[None, :]
        if SPLIT:
            # Partials [B, Hq, Lq, n_splits, (D)] fp32, base-2 lse, merged by _merge_kernel.
            prow = ((b * n_kv_heads * group + head).to(tl.int64) * lq + q_row0 + qi) * n_splits \
                + split
            tl.store(out_ptr + prow[:, None] * head_dim + offs_d[None, :], o, mask=om)
            tl.store(lse_ptr + prow, lse2, mask=row_ok)
        else:
            o_rows = out_ptr + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh \
                + (q_row0 + qi).to(tl.int64) * stride_ol
            tl.store(o_rows[:, None] + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=om)
            lrow = (b * n_kv_heads * group + head).to(tl.int64) * lq + q_row0 + qi
            tl.store(lse_ptr + lrow, lse2 * 0.6931471805599453, mask=row_ok)


@triton.jit
def _merge_kernel(opart_ptr, lpart_ptr, out_ptr, lse_ptr, n_splits, n_heads, lq, head_dim,
                  stride_ob, stride_oh, stride_ol,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # One (b, q head, query) row: out = sum_s 2^(lse_s - lse) o_s over the key splits.
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    lse_s = tl.load(lpart_ptr + row.to(tl.int64) * n_splits + offs_s, mask=s_ok,
                    other=float("-inf"))
    top = tl.max(lse_s, axis=0)
    w = tl.exp2(lse_s - top)
    o = tl.load(opart_ptr + (row.to(tl.int64) * n_splits + offs_s)[:, None] * head_dim
                + offs_d[None, :], mask=s_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / total
    b = row // (n_heads * lq)
    hd = (row // lq) % n_heads
    i = row % lq
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + hd.to(tl.int64) * stride_oh
             + i.to(tl.int64) * stride_ol + offs_d, res.to(out_ptr.dtype.element_ty),
             mask=offs_d < head_dim)
    tl.store(lse_ptr + row, (top + tl.log2(total)) * 0.6931471805599453)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# (fp32, head-dim bucket) -> (decode BLOCK_N, decode warps, prefill BLOCK_M cap, prefill
# BLOCK_N, prefill warps): the largest tiles that compile for sm_90 without register spills
# beyond libdevice's own stack frame (checked with ptxas; fp32 "ieee" dots hold both operands
# in registers, so fp32 gets small tiles). Decode is a tile of 16 packed rows.
_TILES = {
    (False, 64): (32, 4, 128, 64, 8),
    (False, 128): (32, 4, 128, 64, 8),
    (False, 256): (32, 8, 32, 32, 8),
    (True, 64): (16, 4, 64, 32, 8),
    (True, 128): (16, 8, 32, 16, 8),
    (True, 256): (16, 8, 16, 16, 8),
}


def _attn_config(head_dim: int, rows_per_block: int, fp32: bool, on_gpu: bool):
    """(BLOCK_M, BLOCK_N, num_warps, target programs or None = 2 per SM) for the attention.

    The interpreter gets big key tiles (fewer Python-level steps) and a small program target
    so the split/merge path still runs in the CPU tests.
    """
    rows = max(16, triton.next_power_of_2(rows_per_block))
    if not on_gpu:
        return min(128, rows), 128, 4, 8
    bucket = 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)
    dec_n, dec_w, cap_m, pre_n, pre_w = _TILES[(fp32, bucket)]
    block_m = min(cap_m, rows)
    if block_m == 16:
        return 16, dec_n, dec_w, None
    return block_m, pre_n, pre_w, None


@triton_op("reattention::gather_attention_triton", mutates_args=())
def gather_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_seqlens: torch.Tensor, idx: torch.Tensor,
                            inv_freq: torch.Tensor, sink: int, local: int, chunk: int,
                            query_block: int, scale: float, rope_scale: float, rope_style: str,
                            positions: str, block_table: Optional[torch.Tensor] = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over [sink | chunks in idx | local] with in-kernel RoPE (Triton).

    Parameters
    ----------
    q : [B, Hq, Lq, D] raw queries; k_cache, v_cache : [B, Hkv, Nmax, D] raw keys and values,
        or pages [num_pages, Hkv, page_size, D] with block_table (last dim contiguous; D even,
        <= 256).
    cache_seqlens : int32 [B]; idx : int32 [B, Hkv, ceil(Lq/query_block), topk], ascending,
        -1 padded; inv_freq : fp32 [R/2], R <= D.
    scale, rope_scale : softmax scale; cos/sin multiplier.
    rope_style : "half" or "interleaved"; positions : "compact" or "original".
    block_table : None (contiguous caches) or int32 [B, max_pages] (paged caches,
        Nmax = max_pages * page_size).

    Returns
    -------
    out : [B, Hq, Lq, D] in q's dtype; lse : [B, Hq, Lq] fp32 (natural log).

    Example
    -------
    >>> out, lse = torch.ops.reattention.gather_attention_triton(
    ...     q, k, v, lens, idx, inv_freq, 64, 4096, 64, 128, 128 ** -0.5, 1.0, "half", "compact")
    """
    if rope_style not in ("half", "interleaved"):
        raise ValueError(f"rope_style must be 'half' or 'interleaved', got {rope_style!r}")
    if positions not in ("compact", "original"):
        raise ValueError(f"positions must be 'compact' or 'original', got {positions!r}")
    b, hq, lq, d = q.shape
    hkv = k_cache.shape[1]
    _, nmax, lay, paged = kv_layout(k_cache, block_table, cache_seqlens)
    if d > 256 or d % 2:
        raise ValueError(f"the triton backend supports even head dim D <= 256, got head dim {d}")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache, idx)):
        raise ValueError("gather_attention_triton needs q, k/v caches and idx contiguous "
                         "in the last dim")
    group = hq // hkv
    topk = idx.shape[3]
    half_rot = inv_freq.shape[0]
    n_blocks = triton.cdiv(lq, query_block)
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    on_gpu = q.device.type == "cuda"
    rows_per_block = group * min(query_block, lq)
    block_m, block_n, warps, target = _attn_config(d, rows_per_block, q.dtype == torch.float32,
                                                    on_gpu)
    if target is None:
        target = 2 * _num_sms(q.device)
    n_row_tiles = triton.cdiv(rows_per_block, block_m)
    # Prefill: every row tile of a block would rotate the same gathered keys again; rotate
    # them once per block into a workspace instead.
    prerot = n_row_tiles >= _PREROTATE_MIN_PROGRAMS
    if not prerot and block_m > 16 and on_gpu:
        # Rotating keys in the loop of a prefill tile needs registers for the angles too.
        block_n = min(block_n, 32)
    # Longest gathered sequence any (b, h, beta) can have: sink + topk chunks + local window
    # (at most local + chunk - 1 before the block's queries) + the block's queries; never more
    # than Nmax (its keys are distinct tokens of the cache).
    l_max = min(nmax, sink + topk * chunk + local + chunk - 1 + min(query_block, lq))
    n_base = b * hkv * n_blocks * n_row_tiles
    n_tiles = triton.cdiv(l_max, block_n)
    n_splits = max(1, min(target // n_base, n_tiles))
    split_len = triton.cdiv(n_tiles, n_splits) * block_n
    n_splits = triton.cdiv(l_max, split_len)
    if n_splits > 1:
        o_dst = torch.empty((b, hq, lq, n_splits, d), dtype=torch.float32, device=q.device)
        l_dst = torch.empty((b, hq, lq, n_splits), dtype=torch.float32, device=q.device)
    else:
        o_dst, l_dst = out, lse
    rot_block = max(16, triton.next_power_of_2(half_rot))
    pass_dims = d - 2 * half_rot
    if prerot:
        kr = torch.empty((b * hkv * n_blocks, l_max, 2 * half_rot), dtype=q.dtype,
                         device=q.device)
        # ~2K pairs per program: no spills at any rotary width.
        kr_rows = 32 if rot_block <= 64 else 16
        kr_tiles = triton.cdiv(l_max, kr_rows)
        wrap_triton(_rotate_keys_kernel)[(b * hkv * n_blocks * kr_tiles,)](
            k_cache, cache_seqlens, idx, inv_freq, kr,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            idx.stride(0), idx.stride(1), idx.stride(2),
            hkv, lq, query_block, n_blocks, topk, sink, local, chunk, half_rot, l_max, kr_tiles,
            float(rope_scale), *lay, BLOCK_N=kr_rows, BLOCK_R=rot_block,
            BLOCK_K=triton.next_power_of_2(topk), INTERLEAVED=rope_style == "interleaved",
            ORIGINAL=positions == "original", ACCURATE=on_gpu, PAGED=paged, num_warps=4)
    else:
        kr = q  # unused pointer
    wrap_triton(_gather_attn_kernel)[(n_base * n_splits,)](
        q, k_cache, v_cache, cache_seqlens, idx, inv_freq, o_dst, l_dst, kr,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        idx.stride(0), idx.stride(1), idx.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        hkv, group, lq, query_block, n_blocks, n_row_tiles, n_splits, split_len,
        d, half_rot, sink, local, chunk, topk, float(scale) * _LOG2E, float(rope_scale),
        l_max, *lay, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=rot_block,
        BLOCK_P=max(16, triton.next_power_of_2(max(pass_dims, 1))),
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_K=triton.next_power_of_2(topk),
        HAS_PASS=pass_dims > 0, INTERLEAVED=rope_style == "interleaved",
        ORIGINAL=positions == "original", SPLIT=n_splits > 1, PREROT=prerot, ACCURATE=on_gpu,
        IEEE=q.dtype == torch.float32, UPCAST=not on_gpu, PAGED=paged, num_warps=warps)
    if n_splits > 1:
        wrap_triton(_merge_kernel)[(b * hq * lq,)](
            o_dst, l_dst, out, lse, n_splits, hq, lq, d,
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_D=triton.next_power_of_2(d),
            num_warps=4)
    return out, lse


@gather_attention_triton.register_fake
def _gather_attention_triton_fake(q, k_cache, v_cache, cache_seqlens, idx, inv_freq, sink,
                                  local, chunk, query_block, scale, rope_scale, rope_style,
                                  positions, block_table=None):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
