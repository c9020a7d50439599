"""A preallocated KV cache of raw keys and values with incrementally maintained chunk reps.

ReAttention needs the keys *without* RoPE (positions are re-assigned at every step), so the
cache stores exactly what the projections produced. Each layer keeps contiguous buffers
[B, Hkv, capacity, D] written in place; ``capacity`` is either fixed up front
(``max_length``) or grows geometrically, so appending a token never concatenates the whole
cache. The ops receive the full buffers plus ``cache_seqlens`` (an int32 device tensor kept in
step with the host-side length), so an append costs a copy of the new tokens only.

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

__all__ = ["LayerCache", "KVCache"]

# First allocation when no length is known yet.
_MIN_CAPACITY = 256
# Capacities are rounded up to a multiple of this, so small appends rarely reallocate.
_ALIGN = 256
# Geometric growth keeps appends amortised O(new tokens); 1.5 bounds the slack at 50%.
_GROWTH = 1.5


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


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

    Attributes
    ----------
    k_buffer, v_buffer : [B, Hkv, capacity, D] raw keys and values; tokens ``[0, length)`` valid.
    reps : "bound" [B, Hkv, n_chunks, 2, D], "mean" [B, Hkv, n_chunks, D] or None for "max";
        ``n_chunks = max(0, (capacity - sink) // chunk)``, complete chunks valid.
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
                 backend: str = "auto"):
        if not isinstance(config, ReAttentionConfig):
            raise ValueError(f"config must be a ReAttentionConfig, got {type(config).__name__}")
        if max_length is not None and not (isinstance(max_length, int) and max_length >= 1):
            raise ValueError(f"max_length must be an int >= 1 or None, got {max_length!r}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.config = config
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
        return self.k_buffer is not None

    @property
    def capacity(self) -> int:
        """Tokens the current buffers can hold without reallocating (0 before allocation)."""
        return 0 if self.k_buffer is None else self.k_buffer.shape[2]

    @property
    def keys(self) -> torch.Tensor | None:
        """The valid raw keys, a view [B, Hkv, length, D] (None before allocation)."""
        return None if self.k_buffer is None else self.k_buffer[:, :, :self.length]

    @property
    def values(self) -> torch.Tensor | None:
        """The valid values, a view [B, Hkv, length, D] (None before allocation)."""
        return None if self.v_buffer is None else self.v_buffer[:, :, :self.length]

    def _complete_chunks(self, n: int) -> int:
        cfg = self.config
        return max(0, n - cfg.sink) // cfg.chunk

    def _new_reps(self, like: torch.Tensor) -> torch.Tensor | None:
        if self.config.rep == "max":
            return None
        return layout.new_reps(like, self.config.sink, self.config.chunk, self.config.rep)

    # ------------------------------------------------------------------ allocation
    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int | None = None) -> None:
        """Allocate empty buffers [batch, heads, capacity, head_dim] (drops any content).

        ``capacity`` defaults to ``max_length`` when set, else a small first size.
        """
        if capacity is None:
            capacity = self.max_length if self.max_length is not None else _MIN_CAPACITY
        if self.max_length is not None and capacity > self.max_length:
            raise ValueError(f"capacity {capacity} exceeds max_length={self.max_length}")
        if dtype not in ops.FLOAT_DTYPES + (torch.float64,):
            raise ValueError(f"the cache holds float16, bfloat16 or float32 keys and values "
                             f"(float64 on the reference backend), got {dtype}")
        if not (isinstance(head_dim, int) and head_dim >= 2 and head_dim % 2 == 0):
            raise ValueError(f"head_dim must be an even int >= 2, got {head_dim!r}")
        shape = (batch, heads, capacity, head_dim)
        self.k_buffer = torch.empty(shape, dtype=dtype, device=device)
        self.v_buffer = torch.empty(shape, dtype=dtype, device=device)
        self.reps = self._new_reps(self.k_buffer)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.length = 0

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
        if n <= self.capacity:
            return
        if self.max_length is not None:
            raise ValueError(f"the cache is full: {n} tokens exceed max_length={self.max_length}")
        self._regrow(_aligned(max(n, math.ceil(self.capacity * _GROWTH))))

    # ------------------------------------------------------------------ writes
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append L new tokens' raw keys and values, updating the reps of completed chunks.

        Parameters
        ----------
        k, v : [B, Hkv, L, D] raw keys and values (any strides); allocated on the first call
            with their batch, heads, head dim, dtype and device, which later calls must match.
        """
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [B, Hkv, L, D], got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        if v.shape != k.shape:
            raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
        b, h, n_new, d = k.shape
        if not self.is_allocated:
            first = self.max_length if self.max_length is not None else max(
                _aligned(max(n_new, _MIN_CAPACITY)), self._first_capacity)
            self.allocate(b, h, d, k.dtype, k.device, first)
        want = self.k_buffer.shape
        if (b, h, d) != (want[0], want[1], want[3]):
            raise ValueError(f"k must be [B={want[0]}, Hkv={want[1]}, L, D={want[3]}] like the "
                             f"cache, got {tuple(k.shape)}")
        for name, t in (("k", k), ("v", v)):
            if t.dtype != self.k_buffer.dtype or t.device != self.k_buffer.device:
                raise ValueError(f"{name} is {t.dtype} on {t.device} but the cache holds "
                                 f"{self.k_buffer.dtype} on {self.k_buffer.device}")
        old = self.length
        self._ensure_room(old + n_new)
        self.k_buffer[:, :, old:old + n_new] = k
        self.v_buffer[:, :, old:old + n_new] = v
        self.length = old + n_new
        # fill_ with a host int launches a kernel and never syncs.
        self.cache_seqlens.fill_(self.length)
        if self.reps is not None:
            start = min(self._complete_chunks(old), self.reps.shape[2])
            if self._complete_chunks(self.length) > start:
                # Every length is self.length <= capacity: nothing to check or read.
                ops.unchecked.chunk_reps(self.k_buffer, self.cache_seqlens, self.reps,
                                         sink=self.config.sink, chunk=self.config.chunk,
                                         rep=self.config.rep,
                                         backend=ops.resolve_backend(self.backend, self.k_buffer),
                                         start_chunk=start)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (0 <= length <= current length).

        Reps of chunks that become incomplete are stale but unread, and are recomputed when
        the chunk completes again.
        """
        if not (isinstance(length, int) and 0 <= length <= self.length):
            raise ValueError(f"length must be an int in [0, {self.length}], got {length!r}")
        self.length = length
        if self.cache_seqlens is not None:
            self.cache_seqlens.fill_(length)

    def reset(self) -> None:
        """Forget every token, keeping the buffers for reuse."""
        self.crop(0)

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder or repeat the sequences: batch entry i becomes old entry ``index[i]``.

        index : int64 [B'] on any device (beam search reorders; sampling repeats). Its values
            are not read on the host (a sync per beam step on a GPU): one out of range fails in
            ``index_select``.
        """
        if not (isinstance(index, torch.Tensor) and index.dim() == 1
                and not index.is_floating_point() and not index.is_complex()
                and index.dtype != torch.bool):
            raise ValueError(f"index must be a 1-D integer tensor, got "
                             f"{getattr(index, 'dtype', type(index).__name__)} "
                             f"{tuple(getattr(index, 'shape', ()))}")
        if not self.is_allocated:
            return
        index = index.to(device=self.k_buffer.device, dtype=torch.long)
        self.k_buffer = self.k_buffer.index_select(0, index)
        self.v_buffer = self.v_buffer.index_select(0, index)
        if self.reps is not None:
            self.reps = self.reps.index_select(0, index)
        self.cache_seqlens = torch.full((index.shape[0],), self.length, dtype=torch.int32,
                                        device=self.k_buffer.device)

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
        if self.is_allocated:
            ops.check_cache(q, self.k_buffer, self.v_buffer)
        if not (self.is_allocated and q.shape[2] <= self.length):
            raise ValueError(f"q must be [B, Hq, Lq, D] with Lq <= the {self.length} cached "
                             f"tokens (append the new tokens first), got "
                             f"{tuple(getattr(q, 'shape', ()))}")
        # Every length is self.length, in [Lq, capacity] by the checks above, and the reps are
        # the cache's own: neither needs a check, and the lengths are never read.
        return _attend_checked(q.contiguous(), self.k_buffer, self.v_buffer, self.cache_seqlens,
                               self.reps, self.config, inv_freq=inv_freq, rope_theta=rope_theta,
                               rope_scale=rope_scale, rope_style=rope_style, scale=scale,
                               backend=self.backend if backend is None else backend,
                               return_lse=return_lse)


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

    Example
    -------
    >>> cache = KVCache(2, ReAttentionConfig(sink=4, local=16, chunk=8, topk=2))
    >>> for layer in cache:
    ...     layer.append(torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64))
    >>> cache.seq_length
    10
    """

    def __init__(self, num_layers: int, config: ReAttentionConfig, *,
                 max_length: int | None = None, backend: str = "auto"):
        if not (isinstance(num_layers, int) and num_layers >= 1):
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        self.config = config
        self.layers = [LayerCache(config, max_length=max_length, backend=backend)
                       for _ in range(num_layers)]

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
