"""Invariants of the specification itself (reattention/reference.py), in float64."""
import math

import pytest
import torch

from reattention import reference as R
from reattention.layout import segments
from reattention.rope import apply_rope
from reattention.testing import Case, make_inputs


def dense_rope_attention(q, k, v, n, inv_freq, scale, rope_style="half", key_mask=None):
    """Causal attention with RoPE at original positions over the first n tokens."""
    lq = q.shape[2]
    hq, hkv = q.shape[1], k.shape[1]
    k, v = k[:, :, :n], v[:, :, :n]
    kpos, qpos = torch.arange(n), torch.arange(n - lq, n)
    qr = apply_rope(q, qpos, inv_freq, 1.0, rope_style)
    kr = apply_rope(k, kpos, inv_freq, 1.0, rope_style)
    kr = kr.repeat_interleave(hq // hkv, dim=1)
    vv = v.repeat_interleave(hq // hkv, dim=1)
    logits = scale * qr @ kr.transpose(-1, -2)
    visible = kpos[None, :] <= qpos[:, None]
    if key_mask is not None:
        visible = visible & key_mask
    logits = logits.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(logits, -1)
    return torch.exp(logits - lse[..., None]) @ vv, lse


def f64(case, seed=0):
    q, k, v, lens, inv_freq = make_inputs(case, torch.float64, seed=seed)
    return q, k, v, lens, inv_freq


@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
def test_few_chunks_equals_dense(rep, style):
    # M = (200 - 9 - 64 - 8) // 16 = 7 <= topk: every chunk selected -> dense attention.
    case = Case(1, 4, 2, 9, 200, 32, 8, 64, 16, 8, 4)
    q, k, v, _, inv_freq = f64(case)
    scale = 0.3
    out, lse, idx = R.reattention_attn_ref(q, k, v, None, inv_freq, sink=8, local=64, chunk=16,
                                           topk=8, query_block=4, rep=rep, scale=scale,
                                           rope_style=style)
    assert (idx[..., :7] == torch.arange(7, dtype=torch.int32)).all()
    assert (idx[..., 7:] == -1).all()
    ref, ref_lse = dense_rope_attention(q, k, v, 200, inv_freq, scale, style)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)  # lse is float32


def test_original_positions_equal_masked_dense():
    case = Case(1, 4, 1, 3, 700, 32, 16, 64, 32, 4, 8)
    q, k, v, _, inv_freq = f64(case, seed=1)
    scale = 1 / math.sqrt(32)
    out, _, idx = R.reattention_attn_ref(q, k, v, None, inv_freq, sink=16, local=64, chunk=32,
                                         topk=4, query_block=8, rep="max", scale=scale,
                                         positions="original")
    sink_len, mid_end, m = segments(700, 3, 16, 64, 32)
    assert m > 4
    keep = torch.zeros(700, dtype=torch.bool)
    keep[:sink_len] = True
    keep[mid_end:] = True
    for j in idx[0, 0, 0].tolist():
        keep[16 + 32 * j: 16 + 32 * (j + 1)] = True
    ref, _ = dense_rope_attention(q, k, v, 700, inv_freq, scale, key_mask=keep[None, :])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_compact_positions_ignore_distance():
    """Pushing the middle further away (more unselected chunks) leaves the result unchanged."""
    sink, local, chunk, topk, lq = 8, 48, 16, 3, 5
    g = torch.Generator().manual_seed(3)
    d, hq, hkv = 32, 2, 1
    q = torch.randn(1, hq, lq, d, generator=g, dtype=torch.float64).abs()
    n_a = sink + 10 * chunk + local + lq + 7
    k_a = torch.randn(1, hkv, n_a, d, generator=g, dtype=torch.float64).abs()
    v_a = torch.randn(1, hkv, n_a, d, generator=g, dtype=torch.float64)
    extra = 6 * chunk  # zero keys score 0 < every positive chunk of A
    k_b = torch.cat([k_a[:, :, :sink], torch.zeros(1, hkv, extra, d, dtype=torch.float64),
                     k_a[:, :, sink:]], dim=2)
    v_b = torch.cat([v_a[:, :, :sink], torch.randn(1, hkv, extra, d, generator=g,
                                                    dtype=torch.float64), v_a[:, :, sink:]], 2)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    kw = dict(sink=sink, local=local, chunk=chunk, topk=topk, query_block=8, rep="max",
              scale=0.2)
    out_a, lse_a, idx_a = R.reattention_attn_ref(q, k_a, v_a, None, inv_freq, **kw)
    out_b, lse_b, idx_b = R.reattention_attn_ref(q, k_b, v_b, None, inv_freq, **kw)
    assert torch.equal(idx_b, idx_a + extra // chunk)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse_b, lse_a, rtol=0, atol=0)


def test_lse_is_logsumexp_of_scores():
    case = Case(1, 2, 1, 1, 500, 16, 4, 32, 8, 5, 1)
    q, k, v, _, inv_freq = f64(case, seed=2)
    scale = 0.25
    out, lse, idx = R.reattention_attn_ref(q, k, v, None, inv_freq, sink=4, local=32, chunk=8,
                                           topk=5, query_block=1, rep="max", scale=scale)
    sink_len, mid_end, _ = segments(500, 1, 4, 32, 8)
    sel = idx[0, 0, 0].tolist()
    keys = torch.cat([torch.arange(4)] + [torch.arange(4 + 8 * j, 12 + 8 * j) for j in sel]
                     + [torch.arange(mid_end, 500)])
    rpos = torch.arange(keys.numel())
    qr = apply_rope(q[0, :, 0:1], torch.tensor([rpos[-1].item()]), inv_freq)
    kr = apply_rope(k[0, 0, keys], rpos, inv_freq)
    logits = scale * (qr @ kr.T)[:, 0]
    torch.testing.assert_close(lse[0, :, 0].double(), torch.logsumexp(logits, -1), rtol=0,
                               atol=1e-5)
    torch.testing.assert_close(out[0, :, 0], torch.softmax(logits, -1) @ v[0, 0, keys], rtol=0,
                               atol=1e-10)


def test_segments_edges():
    assert segments(10, 1, 64, 4096, 64) == (10, 64, 0)       # shorter than the sink
    assert segments(64 + 4096 + 64 + 1, 1, 64, 4096, 64) == (64, 128, 1)
    assert segments(64 + 4096 + 63 + 1, 1, 64, 4096, 64) == (64, 64, 0)
    # Chunks are aligned to the sink, never to N.
    assert segments(1000, 10, 0, 100, 64) == (0, 832, 13)


def test_ties_go_to_lower_index():
    q = torch.ones(1, 1, 1, 4)
    k = torch.zeros(1, 1, 8 * 4 + 1, 4)
    k[0, 0, 8:12] = 1.0   # chunk 2
    k[0, 0, 20:24] = 1.0  # chunk 5, same score as chunk 2
    idx = R.select_chunks_ref(q, k, None, None, 0, 0, 4, 1, "max", 1)
    assert idx.tolist() == [[[[2]]]]
    idx = R.select_chunks_ref(q, k, None, None, 0, 0, 4, 3, "max", 1)
    assert idx.tolist() == [[[[0, 2, 5]]]]  # then the lowest index among the zero scores


def test_default_inv_freq_is_the_callers_own_tensor():
    """Scaling default_inv_freq's result in place (linear RoPE scaling) used to rewrite the
    cached tensor that every later call with inv_freq=None (rope_theta) rotates with."""
    import reattention
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 100, 16)
    v = torch.randn_like(k)
    kw = dict(sink=4, local=16, chunk=8, topk=2, backend="reference")
    before = reattention.reattention_attn(q, k, v, **kw)
    mine = reattention.default_inv_freq(16)
    mine /= 4
    assert not torch.equal(reattention.default_inv_freq(16), mine)
    assert torch.equal(reattention.reattention_attn(q, k, v, **kw), before)
