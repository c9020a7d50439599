"""Contract v2 (docs/design.md section 2): every query block is handled as a call of its own,
so a call's size is a speed knob only."""
import math

import pytest
import torch

import reattention
from reattention import layout, reference
from reattention.rope import apply_rope
from reattention.testing import NOISE, assert_selection_equivalent, max_err

from conftest import PARITY_BACKENDS, device_for, require


def test_block_segments_worked_example():
    # S=4, C=8, W=16, query_block=8, N=100, Lq=20: blocks [0,8), [8,16), [16,20).
    got = [layout.block_segments(100, 20, s, e, 4, 16, 8)
           for s, e in layout.query_blocks(20, 8)]
    assert layout.query_blocks(20, 8) == [(0, 8), (8, 16), (16, 20)]
    assert got == [(4, 60, 7), (4, 68, 8), (4, 76, 9)]
    assert layout.max_middle_chunks(100, 20, 8, 4, 16, 8) == 9
    # A block's local window holds at least W keys before its first query, less than W + C.
    for (s, e), seg in zip(layout.query_blocks(20, 8), got):
        assert 16 <= (100 - 20 + s) - seg.mid_end < 16 + 8


def _inputs(dtype, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, lq, nmax, d = 2, 6, 2, 150, 424, 64
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, nmax, d, generator=g)
    k = k + (torch.randn(b, hkv, nmax // 8, d, generator=g) * 0.7).repeat_interleave(8, 2)
    v = torch.randn(b, hkv, nmax, d, generator=g)
    lens = torch.tensor([424, 263], dtype=torch.int32)
    return [t.to(dev, dtype) for t in (q, k, v)] + [lens.to(dev)]


# Lq = 150 >> local = 24; neither query_block divides Lq (last blocks of 22 and 2 queries).
SETTINGS = dict(sink=4, local=24, chunk=8, topk=3)


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("query_block", [64, 37])
def test_call_equals_per_block_calls(query_block, rep, positions, backend):
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    dev = device_for(backend)
    q, k, v, lens = _inputs(dtype, dev)
    require(backend, q)
    lq = q.shape[2]
    kw = dict(SETTINGS, query_block=query_block, rep=rep, positions=positions, backend=backend)
    skw = dict(SETTINGS, query_block=query_block, rep=rep, backend=backend)
    out = reattention.reattention_attn(q, k, v, lens, **kw)
    idx = reattention.select_chunks(q, k, lens, **skw)
    scores = reference.chunk_scores_ref(
        q.cpu().float(), k.cpu().float(),
        None if rep == "max" else reattention.chunk_reps(k.cpu().float(), lens.cpu(), sink=4,
                                                        chunk=8, rep=rep, backend="reference"),
        lens.cpu(), 4, 24, 8, rep, query_block)
    for beta, (s, e) in enumerate(layout.query_blocks(lq, query_block)):
        blens = lens - lq + e  # the block alone: its last query is the sequence's last token
        qb = q[:, :, s:e].contiguous()
        one = reattention.reattention_attn(qb, k, v, blens, **kw)
        one_idx = reattention.select_chunks(qb, k, blens, **skw)
        assert_selection_equivalent(idx[:, :, beta:beta + 1], one_idx, scores[:, :, beta:beta + 1])
        if torch.equal(idx[:, :, beta:beta + 1], one_idx):
            noise = NOISE[dtype] * max(1.0, one.abs().max().item())
            assert max_err(out[:, :, s:e], one) <= noise, (
                f"block {beta}: call and per-block call differ by {max_err(out[:, :, s:e], one)}")


def test_reference_call_is_bitwise_the_per_block_calls():
    """In the reference, float64: the call and its blocks run the same arithmetic."""
    q, k, v, lens = _inputs(torch.float64, "cpu", seed=1)
    inv = reattention.default_inv_freq(64).double()
    kw = dict(SETTINGS, query_block=50, rep="bound", scale=0.125)
    out, lse, idx = reference.reattention_attn_ref(q, k, v, lens, inv, **kw)
    for beta, (s, e) in enumerate(layout.query_blocks(q.shape[2], 50)):
        o, l, i = reference.reattention_attn_ref(q[:, :, s:e], k, v, lens - q.shape[2] + e, inv,
                                                 **kw)
        assert torch.equal(i, idx[:, :, beta:beta + 1])
        assert torch.equal(o, out[:, :, s:e]) and torch.equal(l, lse[:, :, s:e])


def test_scope_is_bounded_whatever_lq():
    """No block attends to more than sink + topk*chunk + local + chunk + query_block keys and
    no compact position reaches that bound, for a call of any size."""
    sink, local, chunk, topk, qb = 4, 24, 8, 3, 16
    bound = layout.scope(sink, local, chunk, topk, qb)
    for n in (40, 300, 1001):
        for lq in (1, 15, 16, 17, 250, n):
            for s, e in layout.query_blocks(lq, qb):
                seg = layout.block_segments(n, lq, s, e, sink, local, chunk)
                p1 = n - lq + e - 1
                keys = seg.sink_len + min(topk, seg.n_mid) * chunk + max(0, p1 + 1 - seg.mid_end)
                last_pos = p1 - seg.mid_end + sink + min(topk, seg.n_mid) * chunk
                assert keys <= bound and last_pos < bound, (n, lq, s, e)


def test_large_blocks_equal_dense_when_every_chunk_is_selected():
    """M <= topk in every block: the result is dense causal attention at original positions,
    here with one call of many blocks."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 90, 32, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 130, 32, generator=g, dtype=torch.float64) for _ in range(2))
    inv = reattention.default_inv_freq(32).double()
    out, _, idx = reference.reattention_attn_ref(q, k, v, None, inv, sink=4, local=16, chunk=8,
                                                 topk=16, query_block=8, rep="max",
                                                 scale=32 ** -0.5)
    assert int((idx >= 0).sum(-1).max()) <= 13
    pos = torch.arange(130)
    qr = apply_rope(q, pos[40:], inv)
    kr = apply_rope(k, pos, inv).repeat_interleave(2, 1)
    logits = (qr @ kr.transpose(-1, -2)) * 32 ** -0.5
    logits = logits.masked_fill(pos[None, :] > pos[40:, None], -math.inf)
    dense = torch.softmax(logits, -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)
