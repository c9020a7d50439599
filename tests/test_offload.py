"""The tiered cache (docs/design.md section 3.7): pages in host memory, on the device only the
reps, the sink, the local window and the hot set, fetched per call without a host sync.
On the CPU both tiers are CPU tensors and the same bookkeeping runs; every output must equal
the all-in-one-place contiguous cache's bit for bit."""
from __future__ import annotations

import pytest
import torch

import reattention
from reattention.cache import LayerCache
from reattention.offload import TieredPool

from conftest import needs_cpp_error_path

B, HKV, HQ, D = 2, 2, 4, 16


def _cfg(rep="bound", **kw):
    base = dict(sink=8, local=16, chunk=8, topk=3, query_block=4, rep=rep)
    base.update(kw)
    return reattention.ReAttentionConfig(**base)


def _kv(n, b=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, HKV, n, D, generator=g), torch.randn(b, HKV, n, D, generator=g)


def _run(caches, k, v, sizes, seed=1):
    """Append ``sizes`` tokens at a time to every cache, attending with the new tokens'
    queries after each append (as a model does); the outputs of every cache must agree."""
    g = torch.Generator().manual_seed(seed)
    s = 0
    for n in sizes:
        q = torch.randn(k.shape[0], HQ, n, D, generator=g)
        outs = []
        for c in caches:
            c.append(k[:, :, s:s + n], v[:, :, s:s + n])
            outs.append(c.attend(q, return_lse=True))
        for out, lse in outs[1:]:
            assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1]), s
        s += n
    return s


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("rep", ["bound", "mean"])
@pytest.mark.parametrize("sizes", [[1] * 300, [60, 1, 37, 1, 1, 64, 5, 1, 64, 1]],
                         ids=["decode", "mixed"])
@pytest.mark.parametrize("sink", [8, 4, 0], ids=["sink-chunk", "sink-half-chunk", "no-sink"])
def test_tiered_equals_contiguous(backend, rep, sizes, sink):
    """sink 4 with chunk 8: pages of gcd(4, 8) = 4 tokens, two per chunk."""
    cfg = _cfg(rep, sink=sink)
    k, v = _kv(sum(sizes))
    flat = LayerCache(cfg, backend=backend)
    tiered = LayerCache(cfg, backend=backend, offload="cpu", max_append=64)
    _run([flat, tiered], k, v, sizes)
    pool = tiered.pool
    assert isinstance(pool, TieredPool)
    assert torch.equal(tiered.keys, k) and torch.equal(tiered.values, v)
    # The device tier does not grow with N: sink + ring + hot pages + the absent page.
    assert pool.k.shape[0] == pool.hot_base + pool.n_hot + 1
    # Middle pages left the window: they live in the host tier, and were fetched from it.
    assert pool.host_upto > pool.sink_pages
    s_pages = pool.host_k.view(B * HKV, pool.max_pages, pool.page, D)
    n_host = pool.host_upto * pool.page
    assert torch.equal(s_pages[:, :pool.host_upto].reshape(B, HKV, n_host, D)[:, :, cfg.sink:],
                       k[:, :, cfg.sink:n_host])
    assert int(pool.lookups) > 0 and 0.0 <= pool.hit_rate() <= 1.0


def test_small_hot_set_evicts_and_stays_exact():
    """A hot set of exactly one call's pages: every call evicts, outputs stay exact."""
    cfg = _cfg("bound", topk=4)
    k, v = _kv(400)
    flat = LayerCache(cfg, backend="cpu")
    tiered = LayerCache(cfg, backend="cpu", offload="cpu", hot_pages=B * HKV * 4, max_append=1)
    _run([flat, tiered], k, v, [1] * 400, seed=4)
    pool = tiered.pool
    assert (pool.owner >= 0).all()               # every hot page in use
    assert int(pool.hits) < int(pool.lookups)    # and misses happened
    with pytest.raises(ValueError, match="max_append=1"):
        tiered.append(*_kv(2))


def test_repeated_queries_hit_the_hot_set():
    cfg = _cfg("bound")
    k, v = _kv(300)
    tiered = LayerCache(cfg, backend="cpu", offload="cpu", max_append=299)
    tiered.append(k[:, :, :299], v[:, :, :299])
    tiered.append(k[:, :, 299:], v[:, :, 299:])  # the window moves: the middle goes to the host
    q = torch.randn(B, HQ, 1, D)
    pool = tiered.pool
    pool.lookups.zero_()
    pool.hits.zero_()
    for _ in range(5):
        tiered.attend(q)  # the same selection five times: misses once, then hits
    assert pool.hit_rate() == pytest.approx(4 / 5)


@pytest.mark.parametrize("rep", ["bound", "mean"])
def test_tiered_crop_and_select_batch(rep):
    cfg = _cfg(rep)
    k, v = _kv(260)
    flat = LayerCache(cfg, backend="cpu")
    tiered = LayerCache(cfg, backend="cpu", offload="cpu", max_append=64)
    _run([flat, tiered], k, v, [64, 64, 64, 64, 4])
    for c in (flat, tiered):
        c.crop(101)          # the window moves back over pages that went to the host
    k2, v2 = _kv(70, seed=7)
    _run([flat, tiered], k2, v2, [1] * 10 + [60], seed=8)
    assert torch.equal(tiered.keys, flat.keys)
    for c in (flat, tiered):
        c.select_batch(torch.tensor([1, 0, 1]))
    k3, v3 = _kv(30, b=3, seed=9)
    _run([flat, tiered], k3, v3, [1] * 30, seed=10)
    assert torch.equal(tiered.keys, flat.keys) and torch.equal(tiered.values, flat.values)


def test_offload_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="rep 'bound' or 'mean'"):
        LayerCache(_cfg("max"), offload="cpu")
    with pytest.raises(ValueError, match=r"pages of gcd\(sink, chunk\) = 8 tokens"):
        LayerCache(_cfg(), offload="cpu", page_size=16)
    with pytest.raises(ValueError, match="offload must be None or 'cpu'"):
        LayerCache(_cfg(), offload="disk")
    tiered = LayerCache(_cfg(), offload="cpu", hot_pages=2, max_append=8)
    tiered.append(*_kv(8))
    with pytest.raises(ValueError, match="hot_pages=2"):
        tiered.attend(torch.randn(B, HQ, 1, D))


def test_copy_pages_op():
    src = torch.randn(5, 2, 3)
    dst = torch.zeros(4, 2, 3)
    reattention.ops.copy_pages(dst, src, torch.tensor([3, 0, 1]), torch.tensor([4, 2, 0]),
                               torch.tensor([True, True, False]))
    assert torch.equal(dst[3], src[4]) and torch.equal(dst[0], src[2])
    assert not dst[1].any() and not dst[2].any()
    with pytest.raises(ValueError, match=r"src_index\[0\] = 9 is not one of its tensor's 5 pages"):
        reattention.ops.copy_pages(dst, src, torch.tensor([0]), torch.tensor([9]))
    with pytest.raises(ValueError, match=r"dst_index\[1\] = -1 is not one of its tensor's 4"):
        reattention.ops.copy_pages(dst, src, torch.tensor([0, -1]), torch.tensor([0, 1]))
    # A masked-off entry is not copied, so its indices are not checked.
    reattention.ops.copy_pages(dst, src, torch.tensor([7]), torch.tensor([9]),
                               torch.tensor([False]))
    with pytest.raises(ValueError, match="dst_index must be an int64"):
        reattention.ops.copy_pages(dst, src, torch.tensor([0], dtype=torch.int32),
                                   torch.tensor([0]))


@needs_cpp_error_path
def test_copy_pages_kernel_refuses_bad_pages():
    """The C++ kernel's own check, behind the Python one (it raises through torch >= 2.13)."""
    src = torch.randn(5, 2, 3)
    dst = torch.zeros(4, 2, 3)
    with pytest.raises(RuntimeError, match="copies page 9"):
        torch.ops.reattention.copy_pages(dst, src, torch.tensor([0]), torch.tensor([9]), None)


# --------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("rep,sink", [("bound", 64), ("mean", 64), ("bound", 32)])
def test_tiered_on_gpu_equals_all_gpu_and_captures(backend, rep, sink):
    """Pinned host tier, CUDA device tier: outputs equal the all-GPU contiguous cache bit for
    bit (decode and prefill calls, evictions included), and a decode step (selection, fetch,
    attention) replays from a CUDA graph with the eager result. Sink 32: two pages a chunk."""
    from conftest import require
    cfg = reattention.ReAttentionConfig(sink=sink, local=256, chunk=64, topk=8, query_block=64,
                                        rep=rep)
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 8192
    k = torch.randn(2, 4, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    require(backend, k)
    flat = LayerCache(cfg, backend=backend)
    tiered = LayerCache(cfg, backend=backend, offload="cpu", max_append=512,
                        hot_pages=2 * 4 * 8 * 8 * (64 // sink))
    sizes = [512] * 14 + [1] * 64 + [448, 512]
    s = 0
    for m in sizes:
        q = torch.randn(2, 16, m, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        outs = []
        for c in (flat, tiered):
            c.append(k[:, :, s:s + m], v[:, :, s:s + m])
            outs.append(c.attend(q))
        assert torch.equal(outs[0], outs[1]), (s, m)
        s += m
    assert tiered.pool.host_k.is_pinned() and int(tiered.pool.hits) > 0
    assert int(tiered.pool.hits) < int(tiered.pool.lookups)
    q = torch.randn(2, 16, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    want = flat.attend(q)
    tiered.attend(q)  # warm-up (Triton compiles)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = tiered.attend(q)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        q.normal_(generator=g)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, flat.attend(q))
