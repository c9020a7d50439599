"""Paged caches (docs/design.md section 3): every op on every backend gives, bit for bit, what
it gives on the contiguous cache of the same Nmax. Pages are shuffled among spare ones, and
every element a sequence does not own (spare pages, the tail of its last page) is NaN, so a
kernel that reads past a sequence's tokens fails here."""
from __future__ import annotations

import pytest
import torch

import reattention
from reattention import layout
from reattention.testing import Case, make_inputs, pad_tokens, to_paged

from conftest import PARITY_BACKENDS, device_for, require

#        b  hq hkv  lq  nmax   d  sink local chunk topk qb
PAGED_CASES = [
    Case(1, 8, 2, 1, 700, 64, 16, 64, 16, 4, 1),                        # decode, GQA
    Case(3, 4, 1, 1, 500, 64, 16, 32, 16, 3, 1, lens=(500, 77, 301)),   # decode, varlen
    Case(2, 4, 2, 40, 640, 128, 16, 48, 16, 5, 16, lens=(640, 333)),    # prefill, 3 blocks
    Case(1, 6, 2, 7, 400, 64, 5, 24, 8, 6, 3),                          # sink not a page multiple
]


def _dtype(backend):
    return torch.float32 if backend in ("reference", "cpu") else torch.bfloat16


def _inputs(case, backend, page_size):
    dev = device_for(backend)
    q, k, v, lens, inv_freq = make_inputs(case, _dtype(backend), dev)
    if lens is None:
        lens = torch.full((case.b,), case.nmax, dtype=torch.int32, device=dev)
    require(backend, q)
    kp, table = to_paged(k, lens, page_size, seed=1)
    vp, table_v = to_paged(v, lens, page_size, seed=1)
    assert torch.equal(table, table_v)
    nmax = table.shape[1] * page_size
    return q, pad_tokens(k, nmax), pad_tokens(v, nmax), kp, vp, table, lens, inv_freq


def _page_sizes(case):
    return sorted({case.chunk, 16, 7, 1, 3 * case.chunk})


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("case", PAGED_CASES, ids=[c.id for c in PAGED_CASES])
def test_paged_equals_contiguous(case, rep, backend):
    for page_size in _page_sizes(case):
        q, k, v, kp, vp, table, lens, inv_freq = _inputs(case, backend, page_size)
        seg = dict(sink=case.sink, local=case.local, chunk=case.chunk)
        reps = reps_p = None
        if rep != "max":
            reps = reattention.chunk_reps(k, lens, rep=rep, backend=backend, sink=case.sink,
                                          chunk=case.chunk)
            reps_p = reattention.chunk_reps(kp, lens, rep=rep, backend=backend, sink=case.sink,
                                            chunk=case.chunk, block_table=table)
            complete = layout.reps_shape(k, case.sink, case.chunk, rep)[2]
            for b, n in enumerate(lens.tolist()):
                c = min(complete, max(0, n - case.sink) // case.chunk)
                assert torch.equal(reps_p[b, :, :c], reps[b, :, :c]), (page_size, b)
        kw = dict(topk=case.topk, query_block=case.query_block, rep=rep, backend=backend, **seg)
        idx = reattention.select_chunks(q, k, lens, reps=reps, **kw)
        idx_p = reattention.select_chunks(q, kp, lens, reps=reps_p, block_table=table, **kw)
        assert torch.equal(idx_p, idx), page_size
        akw = dict(inv_freq=inv_freq, query_block=case.query_block, backend=backend, **seg)
        out, lse = reattention.gather_attention(q, k, v, idx, lens, **akw)
        out_p, lse_p = reattention.gather_attention(q, kp, vp, idx, lens, block_table=table,
                                                    **akw)
        assert not out_p.isnan().any()
        assert torch.equal(out_p, out) and torch.equal(lse_p, lse), page_size
        full = reattention.reattention_attn(q, kp, vp, lens, block_table=table, reps=reps_p,
                                            topk=case.topk, query_block=case.query_block,
                                            rep=rep, inv_freq=inv_freq, backend=backend, **seg)
        assert torch.equal(full, out), page_size


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
def test_paged_original_positions_interleaved(backend):
    case = PAGED_CASES[2]
    q, k, v, kp, vp, table, lens, inv_freq = _inputs(case, backend, 16)
    kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, topk=case.topk,
              query_block=case.query_block, rep="bound", inv_freq=inv_freq, backend=backend,
              positions="original", rope_style="interleaved", return_lse=True)
    out, lse = reattention.reattention_attn(q, k, v, lens, **kw)
    out_p, lse_p = reattention.reattention_attn(q, kp, vp, lens, block_table=table, **kw)
    assert torch.equal(out_p, out) and torch.equal(lse_p, lse)


def _small():
    q = torch.randn(2, 4, 1, 64)
    pages = torch.randn(6, 2, 16, 64)
    table = torch.tensor([[0, 1, 2], [3, 4, -1]], dtype=torch.int32)
    lens = torch.tensor([40, 20], dtype=torch.int32)
    return q, pages, table, lens


def test_paged_bad_input():
    q, pages, table, lens = _small()
    kw = dict(sink=4, local=8, chunk=4, topk=2, backend="reference")
    with pytest.raises(ValueError, match="cache_seqlens is required"):
        reattention.reattention_attn(q, pages, pages, block_table=table, **kw)
    with pytest.raises(ValueError, match="block_table must be int32"):
        reattention.reattention_attn(q, pages, pages, lens, block_table=table.long(), **kw)
    with pytest.raises(ValueError, match="block_table must have B=2 rows"):
        reattention.reattention_attn(q, pages, pages, lens, block_table=table[:1], **kw)
    bad = table.clone()
    bad[1, 1] = 6
    with pytest.raises(ValueError, match=r"block_table\[1, 1\]=6 must be a page"):
        reattention.reattention_attn(q, pages, pages, lens, block_table=bad, **kw)
    with pytest.raises(ValueError, match="must lie in"):
        reattention.reattention_attn(q, pages, pages, torch.tensor([49, 20], dtype=torch.int32),
                                     block_table=table, **kw)
    with pytest.raises(ValueError, match="v_cache shape"):
        reattention.reattention_attn(q, pages, pages[:, :1], lens, block_table=table, **kw)
    # Entries past a sequence's pages are not read: -1 there is fine.
    out = reattention.reattention_attn(q, pages, pages, lens, block_table=table, **kw)
    assert out.shape == q.shape
