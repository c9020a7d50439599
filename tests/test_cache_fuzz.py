"""Randomized differential test of the cache layouts (docs/design.md section 3.7).

A contiguous LayerCache, paged ones (page sizes 1, sizes not dividing the chunk, the chunk)
and a tiered one (offload="cpu", a hot set small enough to evict) go through the same random
operations: append, attend (Lq = the last append and Lq = 1), crop (mid-page, and back past
pages that went to the host tier), reset, select_batch (reorder, repeat, shrink) and reserve.
After every step the attention outputs and lse must be equal bit for bit, the stored keys and
values must equal the tokens appended, and the page bookkeeping must be exact (no page leaked
or shared by mistake, every table entry where it should point).
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import reattention
from reattention.cache import LayerCache
from reattention.offload import TieredPool

D = 16
MAX_B = 3

# (sink, local, chunk, topk, query_block): sink a multiple of the chunk, half a chunk (tiered
# pages of two per chunk), a sink sharing only 2 with the chunk, no sink, no local window.
SHAPES = [
    dict(sink=8, local=12, chunk=8, topk=2, query_block=4),
    dict(sink=4, local=9, chunk=8, topk=2, query_block=5),
    dict(sink=6, local=7, chunk=4, topk=3, query_block=3),
    dict(sink=0, local=10, chunk=6, topk=2, query_block=4),
    dict(sink=5, local=0, chunk=5, topk=1, query_block=2),
]


def _config(shape: dict, rep: str) -> reattention.ReAttentionConfig:
    return reattention.ReAttentionConfig(rep=rep, **shape)


def _hot_pages(cfg, heads: int, max_append: int) -> int:
    """The least hot set every call of this test may need (MAX_B sequences, max_append
    queries): small, so pages are evicted."""
    per_call = -(-max_append // cfg.query_block) * cfg.topk * (
        cfg.chunk // math.gcd(cfg.sink, cfg.chunk))
    return MAX_B * heads * per_call


def _check_paged(layer: LayerCache) -> None:
    """Every sequence holds exactly the pages of its tokens; each page is counted once per
    holder; free and used pages partition the pool; the device table mirrors the host one."""
    pool = layer.pool
    want = -(-layer.length // pool.page_size)
    assert all(len(row) == want for row in pool.rows), [len(r) for r in pool.rows]
    holders: dict[int, int] = {}
    for row in pool.rows:
        for page in row:
            holders[page] = holders.get(page, 0) + 1
    assert len(set(pool.free)) == len(pool.free), "a page is free twice"
    assert not set(pool.free) & set(holders), "a held page is free"
    assert len(pool.free) + len(holders) == pool.num_pages, "a page leaked"
    assert pool.pages_in_use == len(holders) <= len(pool.rows) * want
    assert all(pool.refs[p] == n for p, n in holders.items())
    assert all(pool.refs[p] == 0 for p in pool.free)
    table = pool.table.tolist()
    for row, trow in zip(pool.rows, table):
        assert trow[:len(row)] == row and all(x == -1 for x in trow[len(row):])
    assert layer.reps is None or layer.reps.shape[2] == max(
        0, (pool.max_pages * pool.page_size - layer.config.sink) // layer.config.chunk)


def _check_tiered(layer: LayerCache) -> None:
    """Sink pages point at the sink, window pages at the ring, host pages are absent or in
    the hot set (whose owners agree with the table), pages past the end are absent."""
    p = layer.pool
    table = p.table.tolist()
    owner = p.owner.tolist()
    n = -(-layer.length // p.page)
    assert p.sink_pages <= p.host_upto or layer.length < p.config.sink
    for s, row in enumerate(table):
        for page, slot in enumerate(row):
            if page >= n:  # never read; select() keeps the sink's entries
                assert slot == p.absent or (page < p.sink_pages
                                            and slot == s * p.sink_pages + page), (s, page)
            elif page < p.sink_pages:
                assert slot == s * p.sink_pages + page
            elif page >= p.host_upto:
                assert slot == p.ring_base + s * p.ring + page % p.ring, (s, page, slot)
            elif slot != p.absent:
                assert p.hot_base <= slot < p.absent
                assert owner[slot - p.hot_base] == s * p.max_pages + page
    for h, own in enumerate(owner):
        if own >= 0:
            assert table[own // p.max_pages][own % p.max_pages] == p.hot_base + h


class _Driver:
    """Runs one random scenario over every cache layout and checks them after each step."""

    def __init__(self, seed: int, backend: str, steps: int):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        rng = self.rng
        self.shape = SHAPES[seed % len(SHAPES)]
        self.cfg = _config(self.shape, rng.choice(["bound", "mean"]))
        self.heads = rng.choice([1, 2])
        self.group = rng.choice([1, 2])
        self.batch = rng.randint(1, MAX_B)
        self.max_append = rng.choice([7, 13, 24])
        self.dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
        self.backend = backend
        self.steps = steps
        cfg = self.cfg
        page_sizes = sorted({1, 3, cfg.chunk, cfg.chunk + 1, max(1, cfg.chunk // 2)})
        self.caches = {"contiguous": LayerCache(cfg, backend=backend)}
        for ps in page_sizes:
            self.caches[f"paged{ps}"] = LayerCache(cfg, backend=backend, page_size=ps)
        self.caches["tiered"] = LayerCache(
            cfg, backend=backend, offload="cpu", max_append=self.max_append,
            hot_pages=_hot_pages(cfg, self.heads, self.max_append))
        # The default hot set, sized for the batch of the moment.
        self.caches["tiered-default"] = LayerCache(
            cfg, backend=backend, offload="cpu", max_append=self.max_append)
        self.k = torch.empty(self.batch, self.heads, 0, D, dtype=self.dtype)
        self.v = torch.empty(self.batch, self.heads, 0, D, dtype=self.dtype)
        if rng.random() < 0.3:  # sizes the first allocation
            self.reserve(rng.randint(1, 300))
        self.last = 0  # size of the last append (0 after crop, reset or select)
        self.log: list[str] = []

    # ---------------------------------------------------------------- operations
    def append(self, n: int) -> None:
        k = torch.randn(self.batch, self.heads, n, D, generator=self.gen).to(self.dtype)
        v = torch.randn(self.batch, self.heads, n, D, generator=self.gen).to(self.dtype)
        for c in self.caches.values():
            c.append(k, v)
        self.k = torch.cat([self.k, k], 2)
        self.v = torch.cat([self.v, v], 2)
        self.last = n

    def attend(self, lq: int, backend: str | None = None) -> None:
        q = torch.randn(self.batch, self.heads * self.group, lq, D, generator=self.gen)
        q = q.to(self.dtype)
        outs = {name: c.attend(q, return_lse=True, backend=backend)
                for name, c in self.caches.items()}
        out0, lse0 = outs["contiguous"]
        assert not torch.isnan(out0).any()
        for name, (out, lse) in outs.items():
            assert torch.equal(out, out0), (name, lq, self.log)
            assert torch.equal(lse, lse0), (name, lq, self.log)

    def crop(self, n: int) -> None:
        for c in self.caches.values():
            c.crop(n)
        self.k, self.v = self.k[:, :, :n], self.v[:, :, :n]
        self.last = 0

    def reset(self) -> None:
        for c in self.caches.values():
            c.reset()
        self.k, self.v = self.k[:, :, :0], self.v[:, :, :0]
        self.last = 0

    def select(self, index: list[int]) -> None:
        t = torch.tensor(index)
        for c in self.caches.values():
            c.select_batch(t)
        self.k, self.v = self.k[t], self.v[t]
        self.batch = len(index)

    def reserve(self, n: int) -> None:
        for c in self.caches.values():
            c.reserve(n)

    # ---------------------------------------------------------------- checks
    def check(self) -> None:
        n = self.k.shape[2]
        for name, c in self.caches.items():
            assert c.length == n, (name, self.log)
            if not c.is_allocated:
                continue
            assert c.batch_size == self.batch
            assert torch.equal(c.keys, self.k), (name, self.log)
            assert torch.equal(c.values, self.v), (name, self.log)
            if isinstance(c.pool, TieredPool):
                _check_tiered(c)
            elif c.pool is not None:
                _check_paged(c)

    # ---------------------------------------------------------------- the scenario
    def step(self) -> None:
        rng = self.rng
        n = self.k.shape[2]
        allocated = self.caches["contiguous"].is_allocated
        op = rng.choices(["append", "crop", "reset", "select", "reserve"],
                         weights=[12, 3, 0.3, 1.5, 0.7])[0]
        if op == "append" or not allocated:
            size = rng.choice([1, 1, 1, rng.randint(1, self.max_append), self.max_append])
            self.log.append(f"append {size}")
            self.append(size)
            self.attend(size)
            if size > 1:
                self.attend(1)
                self.attend(rng.randint(2, size))
        elif op == "crop":
            cut = rng.choice([rng.randint(0, n), max(0, n - rng.randint(1, 3)),
                              rng.randint(max(0, n - 40), n)])
            self.log.append(f"crop {cut}")
            self.crop(cut)
        elif op == "reset":
            self.log.append("reset")
            self.reset()
        elif op == "select":
            size = rng.randint(1, MAX_B)
            index = [rng.randrange(self.batch) for _ in range(size)]
            self.log.append(f"select {index}")
            self.select(index)
            if n:
                self.attend(1)
        else:
            self.log.append("reserve")
            self.reserve(n + rng.randint(0, 60))
        self.check()

    def run(self) -> None:
        for _ in range(self.steps):
            self.step()


@pytest.mark.parametrize("seed", range(10))
def test_layouts_agree_cpu(seed):
    _Driver(seed, "cpu", steps=60).run()


@pytest.mark.parametrize("seed", [100, 101, 103])
def test_layouts_agree_reference(seed):
    _Driver(seed, "reference", steps=25).run()


# --------------------------------------------------------------------------- regressions
def _tiered_pair(**kw):
    cfg = _config(SHAPES[0], "bound")  # sink 8, local 12, chunk 8: tiered pages of 8
    return (LayerCache(cfg, backend="cpu", offload="cpu", max_append=16, **kw),
            LayerCache(cfg, backend="cpu"))


def _decode(caches, n, b=1, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        k, v = torch.randn(b, heads, 1, D, generator=g), torch.randn(b, heads, 1, D, generator=g)
        for c in caches:
            c.append(k, v)


def test_tiered_keys_after_reset_are_empty():
    """.keys of an empty tiered cache used to fail to reshape (-1 over zero elements)."""
    tiered, flat = _tiered_pair()
    _decode([tiered, flat], 20)
    for c in (tiered, flat):
        c.reset()
    assert tiered.keys.shape == flat.keys.shape == (1, 2, 0, D)
    assert tiered.values.shape == (1, 2, 0, D)


def test_tiered_attend_of_the_newest_token_after_a_crop():
    """A crop used to bring back the window of the next append's first query only: the
    newest token's query (one position earlier) could start its window a chunk before it, on
    a page still on the host, and read the NaN page. Here, at length 44, mid_end of query 43
    is 24 (page 3) while the next append's window starts at page 4."""
    tiered, flat = _tiered_pair()
    _decode([tiered, flat], 60)
    assert tiered.pool.host_upto == 5
    q = torch.randn(1, 4, 1, D)
    for c in (tiered, flat):
        c.crop(44)
    out, ref = tiered.attend(q, return_lse=True), flat.attend(q, return_lse=True)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    _decode([tiered, flat], 3, seed=1)
    assert torch.equal(tiered.attend(q), flat.attend(q))


def test_tiered_refuses_queries_whose_window_went_to_the_host():
    """Queries older than the last append's (Lq > its size) may need window pages that went
    to the host tier: a ValueError, not NaN."""
    tiered, flat = _tiered_pair()
    _decode([tiered, flat], 60)
    q = torch.randn(1, 4, 16, D)
    assert not torch.isnan(flat.attend(q)).any()
    with pytest.raises(ValueError, match="keeps the local window of the last append"):
        tiered.attend(q)
    assert torch.equal(tiered.attend(q[:, :, -1:]), flat.attend(q[:, :, -1:]))


def test_tiered_default_hot_set_follows_a_growing_batch():
    """The default hot set was sized for the batch at allocation: after select_batch repeated
    the sequences, every attend failed its hot_pages check."""
    tiered, flat = _tiered_pair()
    _decode([tiered, flat], 40)
    index = torch.tensor([0, 0, 0])
    for c in (tiered, flat):
        c.select_batch(index)
    _decode([tiered, flat], 16, b=3, seed=2)
    q = torch.randn(3, 4, 1, D)
    assert torch.equal(tiered.attend(q), flat.attend(q))
    assert tiered.pool.n_hot == tiered._default_hot_pages(3, 2)
    # An explicit hot_pages is the caller's: it is kept (and checked at every call).
    fixed, _ = _tiered_pair(hot_pages=tiered._default_hot_pages(1, 2))
    _decode([fixed], 40)
    fixed.select_batch(index)
    assert fixed.pool.n_hot == fixed._default_hot_pages(1, 2)


def test_tiered_host_tier_grows_geometrically():
    """The host tier grew to exactly the pages an append needed, so past its first size every
    new page re-copied all of it (quadratic over a long decode)."""
    tiered, flat = _tiered_pair()
    sizes = set()
    for _ in range(60):
        _decode([tiered, flat], 20)
        sizes.add(tiered.pool.max_pages)
    assert tiered.length == 1200 and len(sizes) <= 6, sorted(sizes)
    assert torch.equal(tiered.keys, flat.keys)
    q = torch.randn(1, 4, 1, D)
    assert torch.equal(tiered.attend(q), flat.attend(q))


def test_tiered_attend_checks_q_against_the_cache_dtype():
    """The tiered attend checked q against a stand-in made from q itself, so a q of another
    dtype than the cache reached the op (a RuntimeError from C++ instead of a ValueError)."""
    cfg = _config(SHAPES[0], "bound")
    c = LayerCache(cfg, backend="cpu", offload="cpu", max_append=64)
    k = torch.randn(1, 2, 40, D, dtype=torch.bfloat16)
    c.append(k, k)
    with pytest.raises(ValueError, match="dtype torch.bfloat16 does not match q dtype"):
        c.attend(torch.randn(1, 4, 1, D))


@pytest.mark.gpu
def test_tiered_attend_allocates_no_full_length_tensor():
    """The same stand-in was a q.new_empty of [B, Hkv, N, D]: every call allocated O(N)
    device memory, what the tiered layout exists to save. Needs a CUDA device."""
    cfg = reattention.ReAttentionConfig(sink=64, local=256, chunk=64, topk=4, query_block=64,
                                        rep="bound")
    n, heads, d = 65536, 4, 128
    c = LayerCache(cfg, backend="cuda", offload="cpu", max_append=4096)
    c.reserve(n)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(n // 4096):
        k = torch.randn(1, heads, 4096, d, device="cuda", dtype=torch.bfloat16, generator=g)
        c.append(k, k)
    q = torch.randn(1, 8, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
    c.attend(q)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    c.attend(q)
    torch.cuda.synchronize()
    full = heads * n * d * 2  # one [1, Hkv, N, D] bf16 tensor: 64 MiB
    assert torch.cuda.max_memory_allocated() - base < full // 8


@pytest.mark.parametrize("layout", [{}, {"page_size": 5}, {"offload": "cpu"}],
                         ids=["contiguous", "paged", "tiered"])
def test_allocate_honours_an_earlier_reserve(layout):
    """allocate() (what hf's lazy_initialization calls) sized the first allocation at 256
    tokens even after reserve() asked for more, so the reserved prefill regrew."""
    c = LayerCache(_config(SHAPES[0], "bound"), backend="cpu", **layout)
    c.reserve(1000)
    c.allocate(1, 2, D, torch.float32, "cpu")
    assert c.capacity >= 1000
