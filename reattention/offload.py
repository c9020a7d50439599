"""The tiered cache: every page in pinned host memory, on the GPU only what a step reads
(docs/design.md section 3.7).

A :class:`TieredPool` holds one layer's raw keys and values for B sequences of Hkv kv heads.
ReAttention reads, per query block, the sink, the local window and ``topk`` selected chunks,
and selects them from the chunk reps alone, so the rest of the cache can live off the GPU:

- the GPU keeps the reps, the sink pages, the pages of the local window (a ring of pages
  per kv head) and a bounded set of ``hot_pages`` pages;
- pinned host memory keeps every middle page, written there (by a kernel, through unified
  addressing) as the local window slides past it.

Pages hold one kv head's ``gcd(sink, chunk)`` tokens (one chunk when the sink is a multiple of
the chunk), so each (sequence, kv head) is its own paged sequence of one head: the ops run on q viewed as [B * Hkv, G, Lq, D] with a block table
of B * Hkv rows, which computes exactly what the [B, Hq, Lq, D] call computes. After each
selection :meth:`TieredPool.fetch` makes the selected pages resident on the GPU with the
``tiered_fetch`` op: a page already hot stays (its stamp is renewed); a missing one takes the
next hot page, from a rotating cursor, that this call does not use, and is copied from pinned
memory by a kernel that reads host memory in place. All of it runs on the device, with shapes
fixed by the call's shape: no host sync, so a decode step stays capturable in a CUDA graph. The attention then reads the same bytes
as an all-GPU cache would, so the outputs are equal bit for bit.

Nothing here needs a GPU: with ``device="cpu"`` both tiers are CPU tensors and the same
bookkeeping runs (how CI tests it).
"""
from __future__ import annotations

import math

import torch

from . import layout, ops

__all__ = ["TieredPool", "tiered_page"]


def tiered_page(config) -> int:
    """Tokens per page of a tiered cache of ``config``: gcd(sink, chunk), as chunks start at
    sink + j * chunk and pages must tile both. ValueError for rep "max", whose selection reads
    every raw key (the host tier) at every step."""
    if config.rep == "max":
        raise ValueError("offload needs rep 'bound' or 'mean': rep 'max' scores every raw key "
                         "at every step, which would read the host tier")
    return math.gcd(config.sink, config.chunk)


def _pinned_empty(shape, dtype, pin: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


class TieredPool:
    """One layer's tiered K/V pages (see the module docstring).

    Parameters
    ----------
    config : ReAttentionConfig with rep "bound" or "mean" (selection must not read the keys).
    batch, heads, head_dim, dtype, device : the cache's B, Hkv, D, dtype and GPU (or "cpu").
    max_tokens : tokens per sequence the host tier is sized for (it grows, with a copy, past
        that).
    hot_pages : GPU pages kept for selected middle chunks; at least the pages one call
        selects (B * Hkv * ceil(Lq / query_block) * topk * chunk / page), checked at every
        call.
    max_append : the most tokens one append (one call) adds; sizes the local-window ring.

    Attributes
    ----------
    k, v : GPU pages [slots, 1, page, D]: sink pages, then the ring, then the hot pages, then
        one page of NaN (``absent``).
    host_k, host_v : pinned host pages [B * Hkv * max_pages, 1, page, D].
    table : int32 [B * Hkv, max_pages], the GPU page of each resident page, else ``absent``
        (a page of NaN: every entry is a valid page, and a read of an absent page shows).
    reps : the chunk reps, [B * Hkv, 1, n_chunks, ...].
    """

    def __init__(self, config, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, *, max_tokens: int, hot_pages: int, max_append: int,
                 backend: str = "auto"):
        self.config = config
        self.backend = backend
        self.batch, self.heads = batch, heads
        self.seqs = batch * heads
        self.page = tiered_page(config)
        self.ppc = config.chunk // self.page  # pages per chunk
        self.sink_pages = config.sink // self.page
        self.max_append = max_append
        # The window of a call spans fewer than local + chunk + appended tokens, plus a page.
        self.ring = (config.local + max_append) // self.page + 2 * self.ppc + 3
        self.ring_base = self.seqs * self.sink_pages
        self.hot_base = self.ring_base + self.seqs * self.ring
        self.n_hot = hot_pages
        self.absent = self.hot_base + hot_pages
        self.device = torch.device(device)
        shape = (self.absent + 1, 1, self.page, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=self.device)
        self.v = torch.empty(shape, dtype=dtype, device=self.device)
        self.k[self.absent] = float("nan")
        self.v[self.absent] = float("nan")
        self.owner = torch.full((hot_pages,), -1, dtype=torch.int64, device=self.device)
        self.stamp = torch.full((hot_pages,), -1, dtype=torch.int64, device=self.device)
        # step, eviction cursor, lookups, hits (csrc/tiered.h)
        self.state = torch.zeros(4, dtype=torch.int64, device=self.device)
        self.length = 0
        self.host_upto = self.sink_pages  # pages [sink_pages, host_upto) live on the host only
        self.seqlens = torch.zeros(self.seqs, dtype=torch.int32, device=self.device)
        self.max_pages = 0
        self.host_k = self.host_v = self.reps = self.table = None
        self._size(max(1, -(-max_tokens // self.page)))

    # ------------------------------------------------------------------ storage
    @property
    def lookups(self) -> torch.Tensor:
        """Selected middle pages looked up in the hot set so far (a device counter)."""
        return self.state[2]

    @property
    def hits(self) -> torch.Tensor:
        """Of those, the ones found on the GPU (a device counter)."""
        return self.state[3]

    def attend(self, q: torch.Tensor, **kw):
        """ReAttention of q [B, Hq, Lq, D] (the newest Lq tokens) over this layer: selection
        from the reps, :meth:`fetch`, attention (keywords of ``api._attend_checked``)."""
        from .api import _attend_checked
        b, hq, lq, d = q.shape
        # The first query block reads its local window from page _window_start(first query)
        # on; pages below host_upto are only on the host (absent: NaN). The ring keeps the
        # window of the last append's queries (and, after a crop, of the newest token's).
        if self._window_start(self.length - lq) < self.host_upto:
            raise ValueError(f"q holds {lq} queries, but this offloaded cache keeps the local "
                             f"window of the last append's queries only (append them first)")
        qh = q.reshape(self.seqs, hq // self.heads, lq, d)
        res = _attend_checked(qh, self.k, self.v, self.seqlens, self.reps, self.config,
                              block_table=self.table, on_selection=self.fetch, **kw)
        if isinstance(res, tuple):
            return res[0].view(b, hq, lq, d), res[1].view(b, hq, lq)
        return res.view(b, hq, lq, d)

    def tokens(self, which: int) -> torch.Tensor:
        """Keys (0) or values (1) [B, Hkv, length, D], gathered from both tiers (a copy, with
        a sync: for inspection)."""
        gpu, host = ((self.k, self.host_k), (self.v, self.host_v))[which]
        n = -(-self.length // self.page)
        table = self.table[:, :n].cpu().long()
        out = gpu.new_empty((self.seqs, n, self.page, gpu.shape[-1]))
        for s in range(self.seqs):
            for p in range(n):
                slot = int(table[s, p])
                out[s, p] = (gpu[slot, 0] if slot != self.absent
                             else host[s * self.max_pages + p, 0].to(gpu.device))
        # D spelled out: with no tokens (after a reset) -1 would be ambiguous.
        return out.view(self.batch, self.heads, n * self.page, gpu.shape[-1])[:, :, :self.length]

    @property
    def gpu_bytes(self) -> int:
        """Bytes this layer holds on its device: pages, reps, table and hot-set state."""
        ts = [self.k, self.v, self.table, self.owner, self.stamp, self.reps]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    @property
    def host_bytes(self) -> int:
        return 2 * self.host_k.numel() * self.host_k.element_size()

    def hit_rate(self) -> float:
        """Of the selected middle pages outside the local window, the fraction already on the
        GPU (reads two device counters: a sync)."""
        n = int(self.lookups)
        return float(int(self.hits) / n) if n else float("nan")

    def _size(self, max_pages: int) -> None:
        """(Re)size the host tier, the table and the reps for max_pages pages per sequence."""
        old = self.max_pages
        if max_pages <= old:
            return
        pin = self.device.type == "cuda"
        d, dtype = self.k.shape[-1], self.k.dtype
        if old:
            self._host_idle()  # the CPU copies the old host tier below, then drops it
        host = []
        for prev in (self.host_k, self.host_v):
            t = _pinned_empty((self.seqs * max_pages, 1, self.page, d), dtype, pin)
            if prev is not None:
                t.view(self.seqs, max_pages, -1)[:, :old] = prev.view(self.seqs, old, -1)
            host.append(t)
        table = torch.full((self.seqs, max_pages), self.absent, dtype=torch.int32,
                           device=self.device)
        if old:
            table[:, :old] = self.table
            # hot owners are s * max_pages + p: renumber them
            own = self.owner
            self.owner.copy_(torch.where(own >= 0, own // old * max_pages + own % old, own))
        reps = layout.new_reps(self.k, self.config.sink, self.config.chunk, self.config.rep,
                               table)
        if self.reps is not None:
            n = self.reps.shape[2]
            reps[:, :, :n] = self.reps
        self.host_k, self.host_v = host
        self.table, self.reps, self.max_pages = table, reps, max_pages

    def _host_idle(self) -> None:
        """Wait for the device before the CPU reads or frees the host tier: copy_pages and
        tiered_fetch kernels read and write it in place, outside any order the CPU ops see."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _ids(self, host: list[int]) -> torch.Tensor:
        t = torch.tensor(host, dtype=torch.int64)
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _window_start(self, first_query: int) -> int:
        """First page of the local window of a call whose first query is at ``first_query``
        (the mid_end of its first block, a chunk boundary); later calls start no earlier."""
        cfg = self.config
        return (cfg.sink + cfg.chunk * (max(0, first_query - cfg.local - cfg.sink)
                                        // cfg.chunk)) // self.page

    def _slots(self, pages: torch.Tensor) -> torch.Tensor:
        """[S, n] GPU page of sink or window pages ``pages`` [n] of every sequence."""
        s = torch.arange(self.seqs, device=self.device)[:, None]
        sink = s * self.sink_pages + pages[None, :]
        ring = self.ring_base + s * self.ring + (pages % self.ring)[None, :]
        return torch.where(pages[None, :] < self.sink_pages, sink, ring)

    # ------------------------------------------------------------------ writes
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, Hkv, L, D] as the next L tokens: pages the window leaves go to the
        host tier, the new tokens into the ring, and the chunks they complete get reps."""
        n_new = k.shape[2]
        if n_new > self.max_append:
            raise ValueError(f"an append of {n_new} tokens exceeds max_append="
                             f"{self.max_append} of this offloaded cache (its local-window "
                             f"ring is sized for it)")
        old, new = self.length, self.length + n_new
        need = -(-new // self.page)
        if need > self.max_pages:
            # 1.5x, like the other layouts: growing to exactly the pages needed re-copied the
            # whole host tier (and table and reps) at every new page, O(N^2) over a decode.
            self._size(max(need, -(-3 * self.max_pages // 2)))
        start = max(self.host_upto, self._window_start(old))
        if start > self.host_upto:
            pages = list(range(self.host_upto, start))
            src = self._slots(self._ids(pages)).reshape(-1)
            dst = self._ids([s * self.max_pages + p for s in range(self.seqs) for p in pages])
            ops.copy_pages(self.host_k, self.k, dst, src)
            ops.copy_pages(self.host_v, self.v, dst, src)
            self.table[:, self.host_upto:start] = self.absent
            self.host_upto = start
        tok = torch.arange(old, new, device=self.device)
        pages = tok // self.page
        slots = self._slots(pages)                                     # [S, L]
        rows = tok % self.page
        d = k.shape[-1]
        self.k[slots, 0, rows] = k.reshape(self.seqs, n_new, d)
        self.v[slots, 0, rows] = v.reshape(self.seqs, n_new, d)
        first, last = old // self.page, (new - 1) // self.page
        touched = torch.arange(first, last + 1, device=self.device)
        self.table[:, first:last + 1] = self._slots(touched).to(torch.int32)
        self.length = new
        self.seqlens.fill_(new)
        cfg = self.config
        done = max(0, old - cfg.sink) // cfg.chunk
        if max(0, new - cfg.sink) // cfg.chunk > done:
            ops.unchecked.chunk_reps(self.k, self.seqlens, self.reps, sink=cfg.sink,
                                     chunk=cfg.chunk, rep=cfg.rep,
                                     backend=ops.resolve_backend(self.backend, self.k),
                                     start_chunk=done, block_table=self.table)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens: later pages are dropped from the hot set and the
        table, and window pages that had gone to the host come back into the ring."""
        keep = -(-length // self.page)
        self.table[:, keep:] = self.absent
        own = self.owner
        drop = (own >= 0) & (own % self.max_pages >= keep)
        self.owner.copy_(torch.where(drop, -1, own))
        self.stamp.copy_(torch.where(drop, -1, self.stamp))
        # The window of the newest token's query (an attend of Lq = 1 right after the crop),
        # which starts no later than the next append's.
        start = self._window_start(max(0, length - 1))
        if start < self.host_upto:
            pages = list(range(start, min(self.host_upto, keep)))
            if pages:
                flat = [s * self.max_pages + p for s in range(self.seqs) for p in pages]
                ids = self._ids(flat)
                hot = torch.isin(own, ids)      # a page back in the window leaves the hot set
                self.owner.copy_(torch.where(hot, -1, self.owner))
                self.stamp.copy_(torch.where(hot, -1, self.stamp))
                dst = self._slots(self._ids(pages))
                ops.copy_pages(self.k, self.host_k, dst.reshape(-1), ids)
                ops.copy_pages(self.v, self.host_v, dst.reshape(-1), ids)
                self.table.view(-1)[ids] = dst.reshape(-1).to(torch.int32)
            self.host_upto = start
        self.length = length
        self.seqlens.fill_(length)

    def select(self, index: list[int], hot_pages: int | None = None) -> None:
        """Sequence i becomes old sequence index[i] (beam reorder, repeats). Copies the
        host tier's rows and the window pages; the hot set starts empty, grown to
        ``hot_pages`` pages when that is more (a hot set sized for the batch)."""
        if hot_pages is not None and hot_pages > self.n_hot:
            self.n_hot = hot_pages
            self.owner = self.owner.new_full((hot_pages,), -1)
            self.stamp = self.stamp.new_full((hot_pages,), -1)
        sidx = [b * self.heads + h for b in index for h in range(self.heads)]
        idx = torch.tensor(sidx, dtype=torch.long)
        pin = self.device.type == "cuda"
        old_seqs, self.batch, self.seqs = self.seqs, len(index), len(sidx)
        dev_idx = idx.to(self.device)
        self._host_idle()  # the CPU gathers the host tier below, then drops it
        host = []
        for t in (self.host_k, self.host_v):
            new = _pinned_empty((self.seqs * self.max_pages, *t.shape[1:]), t.dtype, pin)
            new.view(self.seqs, self.max_pages, -1).copy_(
                t.view(old_seqs, self.max_pages, -1).index_select(0, idx))
            host.append(new)
        self.host_k, self.host_v = host
        regions = []
        for t in (self.k, self.v):
            sink = t[:self.ring_base].view(old_seqs, self.sink_pages, *t.shape[1:])
            ring = t[self.ring_base:self.hot_base].view(old_seqs, self.ring, *t.shape[1:])
            regions.append((sink.index_select(0, dev_idx), ring.index_select(0, dev_idx)))
        self.ring_base = self.seqs * self.sink_pages
        self.hot_base = self.ring_base + self.seqs * self.ring
        for name, (sink, ring) in zip(("k", "v"), regions):
            t = getattr(self, name)
            new = t.new_empty((self.hot_base + self.n_hot + 1, *t.shape[1:]))
            new[:self.ring_base] = sink.reshape(-1, *t.shape[1:])
            new[self.ring_base:self.hot_base] = ring.reshape(-1, *t.shape[1:])
            new[self.hot_base + self.n_hot] = float("nan")  # absent; the hot pages are unused
            setattr(self, name, new)
        self.absent = self.hot_base + self.n_hot
        self.owner.fill_(-1)
        self.stamp.fill_(-1)
        self.table = torch.full((self.seqs, self.max_pages), self.absent, dtype=torch.int32,
                                 device=self.device)
        resident = list(range(self.sink_pages)) + list(
            range(self.host_upto, -(-self.length // self.page)))
        if resident:
            pages = torch.tensor(resident, device=self.device)
            self.table[:, pages] = self._slots(pages).to(torch.int32)
        self.reps = self.reps.index_select(0, dev_idx)
        self.seqlens = torch.full((self.seqs,), self.length, dtype=torch.int32,
                                  device=self.device)

    # ------------------------------------------------------------------ reads
    def fetch(self, idx: torch.Tensor) -> None:
        """Make every page selected in ``idx`` [B * Hkv, 1, n_blocks, topk] resident on the
        GPU (the ``tiered_fetch`` op: device-only, fixed shapes, no host sync)."""
        s_, k_ = self.seqs, idx.shape[2] * idx.shape[3]
        if s_ * k_ * self.ppc > self.n_hot:
            raise ValueError(f"hot_pages={self.n_hot} is below the {s_ * k_ * self.ppc} pages "
                             f"one call of this shape may select (B * Hkv * n_blocks * topk * "
                             f"pages per chunk)")
        jobs = torch.empty(1 + 2 * s_ * k_ * self.ppc, dtype=torch.int64, device=self.device)
        ops.tiered_fetch(idx.reshape(s_, k_), self.table, self.owner, self.stamp, self.state,
                         jobs, self.k, self.v, self.host_k, self.host_v,
                         sink_pages=self.sink_pages, hot_base=self.hot_base,
                         absent=self.absent, pages_per_chunk=self.ppc)
