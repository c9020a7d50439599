"""A KV cache of raw keys and values with incrementally maintained chunk reps.

ReAttention needs the keys *without* RoPE (positions are re-assigned at every step), so the
cache stores exactly what the projections produced, in one of two layouts
(docs/design.md section 3.7):

- contiguous (default): buffers [B, Hkv, capacity, D] written in place; ``capacity`` is
  either fixed up front (``max_length``) or grows geometrically (a growth copies the tokens);
- paged (``page_size=P``): a :class:`PagePool` of pages [num_pages, Hkv, P, D] and a block
  table; an append takes free pages and writes the new tokens only, never moving stored ones;
- tiered (``offload="cpu"``): a :class:`reattention.offload.TieredPool`, every middle page in
  pinned host memory and on the GPU only the reps, the sink, the local window and a bounded
  set of hot pages.

The ops receive the whole storage plus ``cache_seqlens`` (an int32 device tensor kept in step
with the host-side length), so an append costs a copy of the new tokens only.

For ``rep="bound"``/``"mean"`` the chunk representatives live beside the keys, sized for the
capacity, and each append recomputes only the chunks it completed (``start_chunk`` of the
``chunk_reps`` op): rep maintenance is O(new tokens) per step.

Nothing here depends on transformers: :mod:`reattention.hf` wraps these layers, and they are
usable on their own in a hand-written decoder.
"""
from __future__ import annotations

import math

import torch

from . import layout, ops
from .api import ReAttentionConfig, _attend_checked
from .offload import TieredPool, tiered_page

__all__ = ["LayerCache", "KVCache", "PagePool"]

# First allocation when no length is known yet.
_MIN_CAPACITY = 256
# Capacities are rounded up to a multiple of this, so small appends rarely reallocate.
_ALIGN = 256
# Geometric growth keeps appends amortised O(new tokens); 1.5 bounds the slack at 50%.
_GROWTH = 1.5


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _check_new_tokens(k: torch.Tensor, v: torch.Tensor) -> None:
    """k and v of an append: 4-D [B, Hkv, L, D] tensors of one shape."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, Hkv, L, D], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")


class PagePool:
    """Pages of one layer's raw keys and values, and the block table of its sequences
    (docs/design.md section 3.7).

    The pool holds ``num_pages`` pages [num_pages, Hkv, page_size, D] for K and for V. Each
    sequence owns the pages of its tokens through ``block_table`` (int32 [B, max_pages] on
    the device; a host copy drives the bookkeeping). Appending takes free pages and writes
    only the new tokens; a page shared by several sequences (after :meth:`select`) is copied
    once, on the first write to it (copy on write). The pool is sized up front
    (:meth:`reserve`); only an append past every free page enlarges it, which copies the pool
    once (counted in ``regrows``).
    """

    def __init__(self, batch: int, heads: int, head_dim: int, page_size: int,
                 dtype: torch.dtype, device: torch.device, num_pages: int, max_pages: int):
        shape = (num_pages, heads, page_size, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.page_size = page_size
        self.rows: list[list[int]] = [[] for _ in range(batch)]   # host block table
        self.refs = [0] * num_pages
        self.free = list(range(num_pages - 1, -1, -1))            # pop() gives page 0 first
        self.table = torch.full((batch, max(1, max_pages)), -1, dtype=torch.int32,
                                device=device)
        self.regrows = 0

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def max_pages(self) -> int:
        return self.table.shape[1]

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self.free)

    def _upload(self, host: list[int]) -> torch.Tensor:
        # A pinned staging copy: the upload never waits for the device (the caching host
        # allocator keeps the buffer alive until the copy has run).
        t = torch.tensor(host, dtype=torch.int32)
        if self.table.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.table.device, non_blocking=True)

    def _take(self) -> int:
        if not self.free:
            self._enlarge(max(1, self.num_pages // 2))
        page = self.free.pop()
        self.refs[page] = 1
        return page

    def _release(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self.free.append(page)

    def _enlarge(self, extra: int) -> None:
        """Add ``extra`` pages: the one case that copies stored tokens (the pool is one
        tensor); reserve() ahead of time avoids it."""
        n = self.num_pages
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((n + extra, *old.shape[1:]))
            new[:n] = old
            setattr(self, name, new)
        self.refs += [0] * extra
        self.free = list(range(n + extra - 1, n - 1, -1)) + self.free
        self.regrows += 1

    def widen(self, max_pages: int) -> None:
        """Let every sequence hold up to ``max_pages`` pages (a new, wider block table)."""
        if max_pages <= self.max_pages:
            return
        table = self.table.new_full((self.table.shape[0], max_pages), -1)
        table[:, :self.max_pages] = self.table
        self.table = table

    def reserve(self, tokens: int) -> None:
        """Make the pool and the table big enough for every sequence to hold ``tokens``."""
        per = -(-tokens // self.page_size)
        self.widen(per)
        need = sum(max(0, per - len(r)) for r in self.rows)
        if need > len(self.free):
            self._enlarge(need - len(self.free))

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store k, v [B, Hkv, L, D] as tokens [start, start + L) of every sequence."""
        n_new = k.shape[2]
        end = start + n_new
        first, last = start // self.page_size, (end - 1) // self.page_size
        self.widen(last + 1)
        changed = False
        for row in self.rows:
            for i in range(first, last + 1):
                if i == len(row):
                    row.append(self._take())
                    changed = True
                elif self.refs[row[i]] > 1:     # shared since select(): copy on write
                    page = self._take()
                    self.k[page] = self.k[row[i]]
                    self.v[page] = self.v[row[i]]
                    self._release(row[i])
                    row[i] = page
                    changed = True
        if changed:
            cols = self._upload([row[i] for row in self.rows for i in range(first, last + 1)])
            self.table[:, first:last + 1] = cols.view(len(self.rows), last + 1 - first)
        tok = torch.arange(start, end, device=self.k.device)
        pages = self.table[:, tok // self.page_size].long()          # [B, L]
        rows = tok % self.page_size                                   # [L]
        self.k[pages, :, rows] = k.transpose(1, 2)
        self.v[pages, :, rows] = v.transpose(1, 2)

    def truncate(self, tokens: int) -> None:
        """Keep the pages of the first ``tokens`` tokens of every sequence."""
        keep = -(-tokens // self.page_size)
        for row in self.rows:
            for page in row[keep:]:
                self._release(page)
            del row[keep:]
        self.table[:, keep:] = -1

    def select(self, index: list[int]) -> None:
        """Sequence i becomes old sequence index[i]; pages are shared, not copied."""
        rows = [list(self.rows[i]) for i in index]
        for row in rows:
            for page in row:
                self.refs[page] += 1
        for row in self.rows:
            for page in row:
                self._release(page)
        self.rows = rows
        self.table = self.table.index_select(
            0, torch.tensor(index, dtype=torch.long, device=self.table.device))


class LayerCache:
    """One attention layer's raw K/V cache, written in place, with chunk reps kept current.

    Parameters
    ----------
    config : ReAttentionConfig
        Supplies ``sink``, ``chunk`` and ``rep`` for the reps, and everything else for
        :meth:`attend`.
    max_length : int, optional
        Fixed capacity in tokens, allocated at the first append; appending past it raises.
        None (default) grows the buffers geometrically (1.5x, aligned to 256 tokens).
    backend : str
        Backend for the ``chunk_reps`` updates and :meth:`attend` ("auto", "cpu", "cuda",
        "triton", "reference").
    page_size : int, optional
        Store the tokens in pages of this many tokens (a :class:`PagePool`, ``self.pool``)
        instead of contiguous buffers; ``page_size == config.chunk`` with the sink a multiple
        of it is the fast case. ``max_length`` (or :meth:`reserve`) then sizes the pool, so
        appends never copy stored tokens.
    offload : None or "cpu"
        "cpu": the tiered layout (pages of gcd(sink, chunk) tokens; needs rep "bound" or
        "mean"). Outputs equal the all-GPU cache's bit for bit.
    hot_pages : int, optional
        Tiered: GPU pages kept for selected chunks, at least what one call selects
        (B * Hkv * ceil(Lq / query_block) * topk * chunk / page); default that for an append
        of ``max_append`` tokens, grown with the batch by :meth:`select_batch`.
    max_append : int
        Tiered: the most tokens one append (and one attend call) holds; sizes the GPU ring
        of the local window. Default 4096. An attend's queries must be those of the last
        append (or, right after a crop, the newest token's): older ones may need window
        pages already moved to the host (ValueError).

    Attributes
    ----------
    k_buffer, v_buffer : contiguous layout: [B, Hkv, capacity, D] raw keys and values; tokens
        ``[0, length)`` valid. None when paged.
    pool : paged layout: the :class:`PagePool` (``pool.k``, ``pool.v``, ``pool.table``).
    reps : "bound" [B, Hkv, n_chunks, 2, D], "mean" [B, Hkv, n_chunks, D] or None for "max";
        ``n_chunks = max(0, (Nmax - sink) // chunk)`` with Nmax the capacity (contiguous) or
        ``pool.max_pages * page_size`` (paged); complete chunks valid.
    cache_seqlens : int32 [B] on the buffers' device, every entry equal to ``length``.
    length : int, tokens held (the same for every sequence: no padding).

    Example
    -------
    >>> layer = LayerCache(ReAttentionConfig(sink=4, local=16, chunk=8, topk=2))
    >>> layer.append(torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64))
    >>> layer.attend(torch.randn(1, 4, 1, 64)).shape     # the newest token's query
    torch.Size([1, 4, 1, 64])
    """

    def __init__(self, config: ReAttentionConfig, *, max_length: int | None = None,
                 backend: str = "auto", page_size: int | None = None,
                 offload: str | None = None, hot_pages: int | None = None,
                 max_append: int = 4096):
        if not isinstance(config, ReAttentionConfig):
            raise ValueError(f"config must be a ReAttentionConfig, got {type(config).__name__}")
        if max_length is not None and not (isinstance(max_length, int) and max_length >= 1):
            raise ValueError(f"max_length must be an int >= 1 or None, got {max_length!r}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        if page_size is not None and not (isinstance(page_size, int)
                                          and not isinstance(page_size, bool) and page_size >= 1):
            raise ValueError(f"page_size must be an int >= 1 or None, got {page_size!r}")
        if offload not in (None, "cpu"):
            raise ValueError(f"offload must be None or 'cpu', got {offload!r}")
        for name, value in (("hot_pages", hot_pages), ("max_append", max_append)):
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if offload is not None:
            page = tiered_page(config)
            if page_size not in (None, page):
                raise ValueError(f"offload uses pages of gcd(sink, chunk) = {page} "
                                 f"tokens, got page_size={page_size}")
            page_size = page
        self.config = config
        self.page_size = page_size
        self.offload = offload
        self.hot_pages = hot_pages
        self.max_append = max_append
        self.pool: PagePool | TieredPool | None = None
        self._dims: tuple | None = None  # (B, Hkv, D, dtype, device) once allocated
        self.max_length = max_length
        self.backend = backend
        self.k_buffer: torch.Tensor | None = None
        self.v_buffer: torch.Tensor | None = None
        self.reps: torch.Tensor | None = None
        self.cache_seqlens: torch.Tensor | None = None
        self.length = 0
        self._first_capacity = 0  # raised by reserve() before the first append

    # ------------------------------------------------------------------ views and sizes
    @property
    def is_allocated(self) -> bool:
        """True once the first append (or :meth:`allocate`) fixed shape, dtype and device."""
        return self.k_buffer is not None or self.pool is not None

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    @property
    def tiered(self) -> bool:
        return self.offload is not None

    @property
    def capacity(self) -> int:
        """Tokens each sequence can hold without reallocating (0 before allocation); paged:
        its own pages' room plus an equal share of the free pages."""
        p = self.pool
        if isinstance(p, TieredPool):
            return p.max_pages * p.page
        if p is not None:
            held = -(-self.length // p.page_size)
            return (held + len(p.free) // max(1, len(p.rows))) * p.page_size
        return 0 if self.k_buffer is None else self.k_buffer.shape[2]

    @property
    def batch_size(self) -> int:
        return 0 if self._dims is None else self._dims[0]

    @property
    def storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(k, v, block_table) as the ops take them: the contiguous buffers and None, or the
        pool's pages and block table."""
        if self.pool is not None:
            return self.pool.k, self.pool.v, self.pool.table
        return self.k_buffer, self.v_buffer, None

    def _valid(self, which: int) -> torch.Tensor | None:
        if not self.is_allocated:
            return None
        if isinstance(self.pool, TieredPool):
            return self.pool.tokens(which)
        if self.pool is None:
            return (self.k_buffer, self.v_buffer)[which][:, :, :self.length]
        t = (self.pool.k, self.pool.v)[which]
        return layout.unpage(t, self.pool.table[:, :max(1, -(-self.length // self.page_size))],
                             self.cache_seqlens)[:, :, :self.length]

    @property
    def keys(self) -> torch.Tensor | None:
        """The valid raw keys [B, Hkv, length, D] (None before allocation): a view of the
        contiguous buffer, or for a paged cache a gathered copy (O(length): for inspection)."""
        return self._valid(0)

    @property
    def values(self) -> torch.Tensor | None:
        """The valid values [B, Hkv, length, D], like :attr:`keys`."""
        return self._valid(1)

    def _complete_chunks(self, n: int) -> int:
        cfg = self.config
        return max(0, n - cfg.sink) // cfg.chunk

    def _new_reps(self, like: torch.Tensor,
                  block_table: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.config.rep == "max":
            return None
        return layout.new_reps(like, self.config.sink, self.config.chunk, self.config.rep,
                               block_table)

    def _fit_reps(self) -> None:
        """Paged: grow the reps with the block table (they cover max_pages * page_size)."""
        if self.reps is None:
            return
        want = self._new_reps(self.pool.k, self.pool.table)
        if want.shape[2] > self.reps.shape[2]:
            done = min(self._complete_chunks(self.length), self.reps.shape[2])
            want[:, :, :done] = self.reps[:, :, :done]
            self.reps = want

    # ------------------------------------------------------------------ allocation
    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int | None = None) -> None:
        """Allocate empty buffers [batch, heads, capacity, head_dim] (drops any content).

        ``capacity`` defaults to ``max_length`` when set, else a small first size (or what
        :meth:`reserve` asked for).
        """
        if capacity is None:  # reserve() before allocate() used to be ignored here
            capacity = (self.max_length if self.max_length is not None
                        else max(_MIN_CAPACITY, self._first_capacity))
        if self.max_length is not None and capacity > self.max_length:
            raise ValueError(f"capacity {capacity} exceeds max_length={self.max_length}")
        if dtype not in ops.FLOAT_DTYPES + (torch.float64,):
            raise ValueError(f"the cache holds float16, bfloat16 or float32 keys and values "
                             f"(float64 on the reference backend), got {dtype}")
        if not (isinstance(head_dim, int) and head_dim >= 2 and head_dim % 2 == 0):
            raise ValueError(f"head_dim must be an even int >= 2, got {head_dim!r}")
        self._dims = (batch, heads, head_dim, dtype, torch.device(device))
        if self.tiered:
            self.pool = TieredPool(self.config, batch, heads, head_dim, dtype,
                                   torch.device(device), max_tokens=capacity,
                                   hot_pages=self.hot_pages or self._default_hot_pages(
                                       batch, heads),
                                   max_append=self.max_append, backend=self.backend)
            self.reps = None
        elif self.paged:
            per = -(-capacity // self.page_size)
            self.pool = PagePool(batch, heads, head_dim, self.page_size, dtype,
                                 torch.device(device), batch * per, per)
            self.reps = self._new_reps(self.pool.k, self.pool.table)
        else:
            shape = (batch, heads, capacity, head_dim)
            self.k_buffer = torch.empty(shape, dtype=dtype, device=device)
            self.v_buffer = torch.empty(shape, dtype=dtype, device=device)
            self.reps = self._new_reps(self.k_buffer)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.length = 0

    def _default_hot_pages(self, batch: int, heads: int) -> int:
        """Tiered: the most pages one call of ``max_append`` queries selects."""
        cfg = self.config
        per_call = (-(-self.max_append // cfg.query_block) * cfg.topk
                    * (cfg.chunk // tiered_page(cfg)))
        return batch * heads * per_call

    def reserve(self, n: int) -> None:
        """Make room for ``n`` tokens in total, reallocating at most once.

        Use it before a long prefill whose length is known, so the cache is not regrown on
        the way (each regrowth briefly holds the old and the new buffers). Before the first
        append it only sets the size of the first allocation.
        """
        if self.max_length is not None:
            if n > self.max_length:
                raise ValueError(f"cannot hold {n} tokens: max_length={self.max_length}")
            return
        if not self.is_allocated:
            self._first_capacity = max(self._first_capacity, _aligned(n))
        elif isinstance(self.pool, TieredPool):
            self.pool._size(-(-n // self.pool.page))
        elif self.pool is not None:
            self.pool.reserve(n)
            self._fit_reps()
        elif n > self.capacity:
            self._regrow(_aligned(n))

    def _regrow(self, capacity: int) -> None:
        b, h, _, d = self.k_buffer.shape
        n = self.length
        k = self.k_buffer.new_empty((b, h, capacity, d))
        v = self.v_buffer.new_empty((b, h, capacity, d))
        k[:, :, :n] = self.k_buffer[:, :, :n]
        v[:, :, :n] = self.v_buffer[:, :, :n]
        reps = self._new_reps(k)
        if reps is not None:
            done = min(self._complete_chunks(n), self.reps.shape[2])
            reps[:, :, :done] = self.reps[:, :, :done]
        self.k_buffer, self.v_buffer, self.reps = k, v, reps

    def _ensure_room(self, n: int) -> None:
        if self.max_length is not None and n > self.max_length:
            raise ValueError(f"the cache is full: {n} tokens exceed max_length={self.max_length}")
        if self.pool is not None or n <= self.capacity:
            return  # a pool takes pages as it writes
        self._regrow(_aligned(max(n, math.ceil(self.capacity * _GROWTH))))

    # ------------------------------------------------------------------ writes
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append L new tokens' raw keys and values, updating the reps of completed chunks.

        Parameters
        ----------
        k, v : [B, Hkv, L, D] raw keys and values (any strides); allocated on the first call
            with their batch, heads, head dim, dtype and device, which later calls must match.
        """
        _check_new_tokens(k, v)
        b, h, n_new, d = k.shape
        if not self.is_allocated:
            first = self.max_length if self.max_length is not None else max(
                _aligned(max(n_new, _MIN_CAPACITY)), self._first_capacity)
            self.allocate(b, h, d, k.dtype, k.device, first)
        self._check_like_cache(k, v)
        old = self.length
        self._ensure_room(old + n_new)
        if isinstance(self.pool, TieredPool):
            self.pool.append(k, v)  # it keeps its own reps
        elif self.pool is not None:
            self.pool.write(k, v, old)
            self._fit_reps()
        else:
            self.k_buffer[:, :, old:old + n_new] = k
            self.v_buffer[:, :, old:old + n_new] = v
        self.length = old + n_new
        # fill_ with a host int launches a kernel and never syncs.
        self.cache_seqlens.fill_(self.length)
        if self.reps is not None:
            start = min(self._complete_chunks(old), self.reps.shape[2])
            if self._complete_chunks(self.length) > start:
                # Every length is self.length <= capacity: nothing to check or read.
                k_store, _, table = self.storage
                ops.unchecked.chunk_reps(k_store, self.cache_seqlens, self.reps,
                                         sink=self.config.sink, chunk=self.config.chunk,
                                         rep=self.config.rep,
                                         backend=ops.resolve_backend(self.backend, k_store),
                                         start_chunk=start, block_table=table)

    def _check_like_cache(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """New tokens' batch, heads, head dim, dtype and device must be the cache's."""
        want_b, want_h, want_d, dtype, device = self._dims
        b, h, _, d = k.shape
        if (b, h, d) != (want_b, want_h, want_d):
            raise ValueError(f"k must be [B={want_b}, Hkv={want_h}, L, D={want_d}] like the "
                             f"cache, got {tuple(k.shape)}")
        for name, t in (("k", k), ("v", v)):
            if t.dtype != dtype or t.device != device:
                raise ValueError(f"{name} is {t.dtype} on {t.device} but the cache holds "
                                 f"{dtype} on {device}")

    def make_room(self, n_new: int) -> None:
        """Get ready for :meth:`append_on_device` of ``n_new`` tokens: refuse the layouts it
        cannot serve and grow the buffers as :meth:`append` would if they lack the room.

        A graph captured over :meth:`append_on_device` holds the buffers' addresses: a growth
        here replaces them, so its caller must capture again (``hf`` compares the addresses).
        """
        if self.pool is not None:
            kind = "tiered" if self.tiered else "paged"
            raise ValueError(f"append_on_device needs the contiguous layout: a {kind} cache "
                             f"takes its pages on the host at every append, which a CUDA graph "
                             f"cannot replay")
        if not self.is_allocated:
            raise ValueError("append_on_device needs an allocated cache: append the prompt "
                             "first")
        if not (isinstance(n_new, int) and n_new >= 1):
            raise ValueError(f"n_new must be an int >= 1, got {n_new!r}")
        self._ensure_room(self.length + n_new)

    def append_on_device(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append like :meth:`append`, reading the write position from ``cache_seqlens`` on the
        device instead of the host-side ``length``: a CUDA graph captured once replays it at
        every step however long the cache grows.

        The tokens land where :meth:`append` puts them, with the same bytes: the keys and values
        at ``cache_seqlens[0] + arange(L)`` (every sequence has one length), then
        ``cache_seqlens += L``, then the reps of the last ``ceil(L / chunk) + 1`` complete
        chunks of each sequence, which holds every chunk the append completed (recomputing one
        again writes the same bytes). ``length`` is not advanced: whoever runs the step calls
        :meth:`advance` after it. Contiguous layout only; call :meth:`make_room` first.

        Parameters
        ----------
        k, v : [B, Hkv, L, D] raw keys and values of the cache's batch, heads, head dim, dtype
            and device.
        """
        if self.pool is not None or not self.is_allocated:
            self.make_room(1)  # raises why
        _check_new_tokens(k, v)
        self._check_like_cache(k, v)
        n_new = k.shape[2]
        device = self._dims[4]
        if self.length + n_new > self.capacity:
            raise ValueError(f"{self.length} + {n_new} tokens exceed the capacity "
                             f"{self.capacity}: call make_room({n_new}) first")
        pos = self.cache_seqlens[:1].long() + torch.arange(n_new, device=device)
        self.k_buffer.index_copy_(2, pos, k)
        self.v_buffer.index_copy_(2, pos, v)
        self.cache_seqlens.add_(n_new)
        if self.reps is not None:
            cfg = self.config
            last = -(-n_new // cfg.chunk) + 1  # holds every chunk the append completed
            ops.unchecked.chunk_reps(self.k_buffer, self.cache_seqlens, self.reps, sink=cfg.sink,
                                     chunk=cfg.chunk, rep=cfg.rep,
                                     backend=ops.resolve_backend(self.backend, self.k_buffer),
                                     start_chunk=-last)

    def advance(self, n_new: int) -> None:
        """Count ``n_new`` tokens that :meth:`append_on_device` wrote (the host-side length)."""
        if not (isinstance(n_new, int) and 0 <= n_new and self.length + n_new <= self.capacity):
            raise ValueError(f"n_new must be an int in [0, {self.capacity - self.length}], "
                             f"got {n_new!r}")
        self.length += n_new

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (0 <= length <= current length).

        Reps of chunks that become incomplete are stale but unread, and are recomputed when
        the chunk completes again.
        """
        if not (isinstance(length, int) and 0 <= length <= self.length):
            raise ValueError(f"length must be an int in [0, {self.length}], got {length!r}")
        self.length = length
        if isinstance(self.pool, TieredPool):
            self.pool.crop(length)
        elif self.pool is not None:
            self.pool.truncate(length)  # its pages past the new end go back to the pool
        if self.cache_seqlens is not None:
            self.cache_seqlens.fill_(length)

    def reset(self) -> None:
        """Forget every token, keeping the buffers for reuse."""
        self.crop(0)

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder or repeat the sequences: batch entry i becomes old entry ``index[i]``.

        index : int64 [B'] on any device (beam search reorders; sampling repeats). For a
            contiguous cache its values are not read on the host (a sync per beam step on a
            GPU): one out of range fails in ``index_select``. A paged cache reads them (the
            page bookkeeping is on the host) and shares the pages instead of copying them.
        """
        if not (isinstance(index, torch.Tensor) and index.dim() == 1
                and not index.is_floating_point() and not index.is_complex()
                and index.dtype != torch.bool):
            raise ValueError(f"index must be a 1-D integer tensor, got "
                             f"{getattr(index, 'dtype', type(index).__name__)} "
                             f"{tuple(getattr(index, 'shape', ()))}")
        if not self.is_allocated:
            return
        device = self._dims[4]
        if self.pool is not None:
            host = index.tolist()
            if any(not 0 <= i < self.batch_size for i in host):
                raise ValueError(f"index values must lie in [0, {self.batch_size}), got {host}")
            if isinstance(self.pool, TieredPool) and self.hot_pages is None:
                # The default hot set is sized for the batch: a repeat that grows the batch
                # grows it too (else every later attend fails its hot_pages check).
                self.pool.select(host, self._default_hot_pages(len(host), self._dims[1]))
            else:
                self.pool.select(host)
        self._dims = (index.shape[0], *self._dims[1:])
        index = index.to(device=device, dtype=torch.long)
        if self.pool is None:
            self.k_buffer = self.k_buffer.index_select(0, index)
            self.v_buffer = self.v_buffer.index_select(0, index)
        if self.reps is not None:
            self.reps = self.reps.index_select(0, index)
        self.cache_seqlens = torch.full((index.shape[0],), self.length, dtype=torch.int32,
                                        device=device)

    # ------------------------------------------------------------------ reads
    def attend(self, q: torch.Tensor, *, inv_freq: torch.Tensor | None = None,
               rope_theta: float = 10000.0, rope_scale: float = 1.0, rope_style: str = "half",
               scale: float | None = None, return_lse: bool = False,
               backend: str | None = None):
        """ReAttention of the newest ``Lq`` tokens over this cache (append them first).

        Parameters
        ----------
        q : [B, Hq, Lq, D] raw queries of the last Lq tokens held, Hq % Hkv == 0.
        inv_freq, rope_theta, rope_scale, rope_style, scale, return_lse : as in
            :func:`reattention.reattention_attn`.
        backend : the backend of this call, default the cache's.

        Returns
        -------
        out [B, Hq, Lq, D] in q's dtype, or (out, lse [B, Hq, Lq] float32) with ``return_lse``.
        """
        k_store, v_store, table = self.storage
        if isinstance(self.pool, TieredPool):
            # A stand-in of the cache's shape, dtype and device, one broadcast element: a
            # q.new_empty of [B, Hkv, N, D] allocated O(N) device memory at every call (what
            # the tiered layout saves) and took q's dtype and device, so a q of another
            # dtype passed the check.
            b, h, d, dtype, device = self._dims
            stand_in = torch.empty((), dtype=dtype, device=device)
            ops.check_cache(q, stand_in.expand(b, h, max(1, self.length), d))
        elif self.is_allocated:
            ops.check_cache(q, k_store, v_store, block_table=table)
        if not (self.is_allocated and q.shape[2] <= self.length):
            raise ValueError(f"q must be [B, Hq, Lq, D] with Lq <= the {self.length} cached "
                             f"tokens (append the new tokens first), got "
                             f"{tuple(getattr(q, 'shape', ()))}")
        # Every length is self.length, in [Lq, capacity] by the checks above, and the reps are
        # the cache's own: neither needs a check, and the lengths are never read.
        if isinstance(self.pool, TieredPool):
            if q.shape[2] > self.max_append:
                raise ValueError(f"q holds {q.shape[2]} queries, more than max_append="
                                 f"{self.max_append} of this offloaded cache")
            return self.pool.attend(
                q.contiguous(), inv_freq=inv_freq, rope_theta=rope_theta, rope_scale=rope_scale,
                rope_style=rope_style, scale=scale,
                backend=self.backend if backend is None else backend, return_lse=return_lse)
        return _attend_checked(q.contiguous(), k_store, v_store, self.cache_seqlens,
                               self.reps, self.config, inv_freq=inv_freq, rope_theta=rope_theta,
                               rope_scale=rope_scale, rope_style=rope_style, scale=scale,
                               backend=self.backend if backend is None else backend,
                               return_lse=return_lse, block_table=table)


class KVCache:
    """A stack of :class:`LayerCache`, one per attention layer of a decoder.

    Parameters
    ----------
    num_layers : int
    config : ReAttentionConfig
    max_length : int, optional
        Fixed capacity per layer (preallocated at each layer's first append), else growing.
    backend : str
        Backend for rep updates and attention.
    page_size, offload, hot_pages, max_append :
        Paged or tiered layers (see :class:`LayerCache`).

    Example
    -------
    >>> cache = KVCache(2, ReAttentionConfig(sink=4, local=16, chunk=8, topk=2))
    >>> for layer in cache:
    ...     layer.append(torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64))
    >>> cache.seq_length
    10
    """

    def __init__(self, num_layers: int, config: ReAttentionConfig, *,
                 max_length: int | None = None, backend: str = "auto",
                 page_size: int | None = None, offload: str | None = None,
                 hot_pages: int | None = None, max_append: int = 4096):
        if not (isinstance(num_layers, int) and num_layers >= 1):
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        self.config = config
        self.layers = [LayerCache(config, max_length=max_length, backend=backend,
                                  page_size=page_size, offload=offload, hot_pages=hot_pages,
                                  max_append=max_append) for _ in range(num_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    @property
    def seq_length(self) -> int:
        """Tokens held by the first layer (every layer holds the same after a full step)."""
        return self.layers[0].length

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens in every layer."""
        for layer in self.layers:
            layer.crop(min(length, layer.length))

    def reset(self) -> None:
        """Forget every token in every layer, keeping the buffers."""
        for layer in self.layers:
            layer.reset()

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder or repeat the sequences of every layer (see :meth:`LayerCache.select_batch`)."""
        for layer in self.layers:
            layer.select_batch(index)
