"""reattention.cache: in-place appends, geometric growth, incremental reps, crop, attend.

Every check compares against the same data held in one tensor and processed at once by the
reference (reps via chunk_reps_ref from chunk 0, attention via reattention_attn).
"""
import pytest
import torch

import reattention
from reattention import layout, reference
from reattention.cache import KVCache, LayerCache

B, HKV, D = 2, 2, 16
SPLITS = {                      # how a 700-token sequence arrives
    "one-shot": [700],
    "decode": [1] * 700,
    "odd": [63, 1, 200, 5, 1, 430],
}


def _cfg(rep="bound", **kw):
    base = dict(sink=4, local=16, chunk=8, topk=3, query_block=4, rep=rep)
    base.update(kw)
    return reattention.ReAttentionConfig(**base)


def _kv(n, b=B, h=HKV, d=D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g).to(dtype),
            torch.randn(b, h, n, d, generator=g).to(dtype))


def _feed(layer, k, v, sizes):
    s = 0
    for n in sizes:
        layer.append(k[:, :, s:s + n], v[:, :, s:s + n])
        s += n
    return s


def _full_reps(k, cfg):
    reps = layout.new_reps(k, cfg.sink, cfg.chunk, cfg.rep)
    reference.chunk_reps_ref(k, None, reps, cfg.sink, cfg.chunk, cfg.rep, 0)
    return reps


@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("split", list(SPLITS), ids=list(SPLITS))
def test_append_matches_one_tensor(rep, split):
    cfg = _cfg(rep)
    k, v = _kv(700)
    layer = LayerCache(cfg, backend="reference")
    buffers = set()
    s = 0
    for n in SPLITS[split]:
        layer.append(k[:, :, s:s + n], v[:, :, s:s + n])
        s += n
        buffers.add(layer.k_buffer.data_ptr())
    assert layer.length == 700 and layer.keys.shape == (B, HKV, 700, D)
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    assert layer.cache_seqlens.tolist() == [700] * B
    assert layer.cache_seqlens.dtype == torch.int32
    # Geometric growth: 700 tokens one at a time reallocate a handful of times, not 700.
    assert len(buffers) <= 5
    assert layer.capacity < 2 * 700
    if rep == "max":
        assert layer.reps is None
    else:
        full = _full_reps(k, cfg)
        assert torch.equal(layer.reps[:, :, :full.shape[2]], full)


@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("hq,lq", [(4, 1), (2, 63), (14, 5)], ids=["Hq4-Lq1", "Hq2-Lq63", "Hq14-Lq5"])
def test_attend_matches_reattention_attn(rep, hq, lq):
    cfg = _cfg(rep)
    n = 437  # not a multiple of the chunk
    k, v = _kv(n)
    layer = LayerCache(cfg, backend="reference")
    _feed(layer, k, v, [n - lq, lq])
    q = torch.randn(B, hq, lq, D, generator=torch.Generator().manual_seed(1))
    inv_freq = reattention.default_inv_freq(D, 500.0)
    out, lse = layer.attend(q, inv_freq=inv_freq, rope_scale=1.25, scale=0.3, return_lse=True)
    want, want_lse = reattention.reattention_attn(q, k, v, config=cfg, inv_freq=inv_freq,
                                                  rope_scale=1.25, scale=0.3,
                                                  backend="reference", return_lse=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


@pytest.mark.parametrize("rep", ["bound", "mean"])
def test_crop_then_append_recomputes_stale_reps(rep):
    cfg = _cfg(rep)
    k, v = _kv(300, seed=2)
    k2, v2 = _kv(300, seed=3)
    layer = LayerCache(cfg, backend="reference")
    _feed(layer, k, v, [300])
    layer.crop(101)  # cuts chunk 12 ([100, 108)) in the middle
    _feed(layer, k2[:, :, 101:], v2[:, :, 101:], [7, 192])
    kk = torch.cat([k[:, :, :101], k2[:, :, 101:]], dim=2)
    assert torch.equal(layer.keys, kk)
    full = _full_reps(kk, cfg)
    assert torch.equal(layer.reps[:, :, :full.shape[2]], full)


def test_max_length_preallocates_and_refuses_overflow():
    layer = LayerCache(_cfg(), max_length=100, backend="reference")
    k, v = _kv(101)
    layer.append(k[:, :, :10], v[:, :, :10])
    ptr = layer.k_buffer.data_ptr()
    assert layer.capacity == 100
    layer.append(k[:, :, 10:100], v[:, :, 10:100])
    assert layer.k_buffer.data_ptr() == ptr and layer.length == 100
    with pytest.raises(ValueError, match="max_length"):
        layer.append(k[:, :, 100:], v[:, :, 100:])
    with pytest.raises(ValueError, match="max_length"):
        layer.reserve(101)


def test_reserve_sizes_the_first_allocation_and_regrows_once():
    layer = LayerCache(_cfg(), backend="reference")
    layer.reserve(5000)
    k, v = _kv(3)
    layer.append(k, v)
    assert layer.capacity >= 5000
    ptr = layer.k_buffer.data_ptr()
    layer.reserve(4000)
    assert layer.k_buffer.data_ptr() == ptr
    layer.reserve(9000)
    assert layer.capacity >= 9000 and torch.equal(layer.keys, k)


def test_reset_keeps_buffers():
    layer = LayerCache(_cfg(), backend="reference")
    k, v = _kv(50)
    layer.append(k, v)
    ptr = layer.k_buffer.data_ptr()
    layer.reset()
    assert layer.length == 0 and layer.cache_seqlens.tolist() == [0] * B
    layer.append(k[:, :, :5], v[:, :, :5])
    assert layer.k_buffer.data_ptr() == ptr and torch.equal(layer.keys, k[:, :, :5])


def test_select_batch_reorders_and_repeats():
    cfg = _cfg("mean")
    k, v = _kv(90, b=3)
    layer = LayerCache(cfg, backend="reference")
    layer.append(k, v)
    index = torch.tensor([2, 0, 0, 1])
    layer.select_batch(index)
    assert torch.equal(layer.keys, k[index]) and torch.equal(layer.values, v[index])
    assert layer.cache_seqlens.tolist() == [90] * 4
    full = _full_reps(k[index], cfg)
    assert torch.equal(layer.reps[:, :, :full.shape[2]], full)


def test_bad_appends_name_the_argument():
    layer = LayerCache(_cfg(), backend="reference")
    k, v = _kv(10)
    with pytest.raises(ValueError, match="v shape"):
        layer.append(k, v[:, :, :5])
    with pytest.raises(ValueError, match="4-D"):
        layer.append(k[0], v[0])
    layer.append(k, v)
    with pytest.raises(ValueError, match="Hkv"):
        layer.append(k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="float64"):
        layer.append(k.double(), v.double())
    with pytest.raises(ValueError, match="length"):
        layer.crop(11)
    with pytest.raises(ValueError, match="Lq"):
        layer.attend(torch.randn(B, 2, 11, D))
    with pytest.raises(ValueError, match="config"):
        LayerCache({"sink": 4})


def test_kvcache_stack():
    cfg = _cfg("bound")
    cache = KVCache(3, cfg, backend="reference")
    k, v = _kv(40)
    for layer in cache:
        layer.append(k, v)
    assert len(cache) == 3 and cache.seq_length == 40
    cache.crop(25)
    assert all(layer.length == 25 for layer in cache)
    assert torch.equal(cache[2].keys, k[:, :, :25])
    cache.reset()
    assert cache.seq_length == 0


def _count_length_reads(monkeypatch):
    """Count the value checks of cache_seqlens (torch.aminmax: a host sync on a GPU)."""
    calls = []
    real = torch.aminmax

    def counting(t, *a, **k):
        calls.append(t.numel())
        return real(t, *a, **k)
    monkeypatch.setattr(torch, "aminmax", counting)
    return calls


@pytest.mark.parametrize("rep", ["max", "bound"])
def test_lengths_are_read_once_per_call_and_never_by_the_cache(rep, monkeypatch):
    """Each read of device-resident lengths is a host sync: reattention_attn reads them once
    for both of its ops (it read them in select_chunks, chunk_reps and gather_attention), and
    the cache, whose lengths are valid by construction, not at all. Results are unchanged."""
    cfg = reattention.ReAttentionConfig(sink=4, local=16, chunk=8, topk=2, rep=rep)
    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 90, 16), torch.randn(2, 2, 90, 16)
    q = torch.randn(2, 4, 3, 16)
    lens = torch.tensor([90, 61], dtype=torch.int32)
    want = reattention.reattention_attn(q, k, v, lens, config=cfg, backend="reference")
    layer = LayerCache(cfg, backend="reference")
    layer.append(k[:1], v[:1])
    calls = _count_length_reads(monkeypatch)
    out = reattention.reattention_attn(q, k, v, lens, config=cfg, backend="reference")
    assert len(calls) == 1
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    calls.clear()
    layer.append(torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16))  # completes a chunk
    out = layer.attend(q[:1])
    assert calls == []
    full = torch.cat([k[:1], layer.k_buffer[:, :, 90:99]], 2)
    torch.testing.assert_close(out, reattention.reattention_attn(
        q[:1], full, layer.v_buffer[:, :, :99], config=cfg, backend="reference"))
    # Bad lengths are still refused by the public call.
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        reattention.reattention_attn(q, k, v, torch.tensor([90, 2], dtype=torch.int32),
                                     config=cfg, backend="reference")


def test_layer_cache_refuses_keys_the_ops_cannot_take():
    """Appends feed the unchecked chunk_reps core directly: dtype and head dim are checked
    once, when the buffers are allocated."""
    layer = LayerCache(reattention.ReAttentionConfig(sink=4, local=16, chunk=8, topk=2,
                                                     rep="bound"))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        layer.append(torch.ones(1, 2, 9, 16, dtype=torch.int32),
                     torch.ones(1, 2, 9, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="head_dim must be an even int"):
        layer.append(torch.randn(1, 2, 9, 15), torch.randn(1, 2, 9, 15))


# --------------------------------------------------------------------------- paged layers
PAGE_SIZES = [8, 5, 64]


def _paged_pair(rep, page_size, backend="cpu", **kw):
    cfg = _cfg(rep)
    return (LayerCache(cfg, backend=backend, page_size=page_size, **kw),
            LayerCache(cfg, backend=backend, **kw))


@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("split", list(SPLITS), ids=list(SPLITS))
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_paged_append_stores_and_never_moves_tokens(rep, split, page_size):
    """Appends write the new tokens only, into pages taken from the pool: the pool tensor is
    the same one throughout once reserved, and exactly the pages the tokens need are used."""
    k, v = _kv(700)
    layer, flat = _paged_pair(rep, page_size)
    layer.reserve(700)
    _feed(flat, k, v, SPLITS[split])
    pools = set()
    s = 0
    for n in SPLITS[split]:
        layer.append(k[:, :, s:s + n], v[:, :, s:s + n])
        s += n
        pools.add(layer.pool.k.data_ptr())
        assert layer.pool.pages_in_use == B * -(-s // page_size)
    assert len(pools) == 1 and layer.pool.regrows == 0
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    if rep != "max":  # as the contiguous cache's, on the same backend
        n_full = layer._complete_chunks(700)
        assert torch.equal(layer.reps[:, :, :n_full], flat.reps[:, :, :n_full])
    q = torch.randn(B, 4, 3, D)
    assert torch.equal(layer.attend(q), flat.attend(q))


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_paged_growth_without_reserve(page_size):
    """Unreserved, the pool enlarges by half its size when it runs out (the one copy)."""
    k, v = _kv(700)
    layer, _ = _paged_pair("bound", page_size)
    _feed(layer, k, v, SPLITS["decode"])
    assert torch.equal(layer.keys, k)
    assert layer.pool.regrows <= 6
    assert layer.pool.pages_in_use == B * -(-700 // page_size)


@pytest.mark.parametrize("rep", ["max", "bound"])
@pytest.mark.parametrize("page_size", [8, 5])
def test_paged_crop_frees_pages_and_matches_contiguous(rep, page_size):
    k, v = _kv(500)
    layer, flat = _paged_pair(rep, page_size)
    for c in (layer, flat):
        _feed(c, k, v, [300, 1, 99])
        c.crop(123)
    assert layer.pool.pages_in_use == B * -(-123 // page_size)
    k2, v2 = _kv(77, seed=3)
    q = torch.randn(B, 2, 5, D)
    for c in (layer, flat):
        c.append(k2, v2)
    assert torch.equal(layer.keys, flat.keys)
    assert torch.equal(layer.attend(q), flat.attend(q))
    if rep != "max":
        n_full = layer._complete_chunks(layer.length)
        assert torch.equal(layer.reps[:, :, :n_full], flat.reps[:, :, :n_full])
    layer.reset()
    assert layer.pool.pages_in_use == 0 and layer.length == 0


@pytest.mark.parametrize("page_size", [8, 5])
def test_paged_select_batch_shares_pages_and_copies_on_write(page_size):
    """Beam reorder and repeat share pages; the first write to a shared page copies it."""
    k, v = _kv(203)
    layer, flat = _paged_pair("bound", page_size)
    for c in (layer, flat):
        c.append(k, v)
    used = layer.pool.pages_in_use
    index = torch.tensor([1, 1, 0])
    for c in (layer, flat):
        c.select_batch(index)
    assert layer.pool.pages_in_use == used  # shared, nothing copied
    assert torch.equal(layer.keys, flat.keys)
    k2, v2 = _kv(9, b=3, seed=5)
    for c in (layer, flat):
        c.append(k2, v2)
    assert torch.equal(layer.keys, flat.keys) and torch.equal(layer.values, flat.values)
    q = torch.randn(3, 2, 1, D)
    assert torch.equal(layer.attend(q), flat.attend(q))
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 3\)"):
        layer.select_batch(torch.tensor([3]))


def test_paged_layer_refuses_bad_page_size():
    with pytest.raises(ValueError, match="page_size must be an int >= 1"):
        LayerCache(_cfg(), page_size=0)
