"""Input validation of the public ops: every failure is a ValueError that names the argument
and what was expected (docs/design.md section 3.4)."""
from __future__ import annotations

import functools
import itertools
import math

import torch

from .. import layout

REP_MODES = ("max", "bound", "mean")
ROPE_STYLES = ("half", "interleaved")
POSITION_MODES = ("compact", "original")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_check_device_values = True


def set_device_checks(enabled: bool) -> None:
    """Turn the value check of device-resident ``cache_seqlens`` on or off.

    Checking that every length lies in [Lq, Nmax] needs the values on the host: one
    device sync per public call (``reattention_attn`` checks once for its two ops; the
    package's caches and Hugging Face path keep their lengths valid and never read them,
    docs/design.md section 3.5). It is skipped automatically
    while a CUDA graph is being captured; turn it off for eager decode loops that must never
    sync.
    """
    global _check_device_values
    _check_device_values = bool(enabled)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_choice(name: str, value, choices) -> None:
    _need(value in choices, f"{name} must be one of {choices}, got {value!r}")


def _check_tensor(name: str, t, ndim: int) -> None:
    _need(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _need(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None = None,
                block_table: torch.Tensor | None = None) -> None:
    """Validate q [B, Hq, Lq, D] against the cache [B, Hkv, Nmax, D], or against pages
    [num_pages, Hkv, page_size, D] with ``block_table`` (its shape and dtype; the values are
    checked by :func:`check_block_table`).

    When the shapes do not fit but would with some of the tensors read as [B, L, H, D]
    (the layout of a projection before ``.transpose(1, 2)``), the error says which to
    transpose.
    """
    if block_table is not None:
        _check_paged(q, k_cache, v_cache, block_table)
        return
    _check_tensor("q", q, 4)
    _check_tensor("k_cache", k_cache, 4)
    _need(q.dtype in FLOAT_DTYPES or q.dtype == torch.float64,
          f"q must be float16, bfloat16 or float32, got {q.dtype}")
    tensors = [("k_cache", k_cache)] + ([("v_cache", v_cache)] if v_cache is not None else [])
    for name, t in tensors:
        _check_tensor(name, t, 4)
        _need(t.dtype == q.dtype, f"{name} dtype {t.dtype} does not match q dtype {q.dtype}")
        _need(t.device == q.device, f"{name} is on {t.device} but q is on {q.device}")
    shapes = {"q": tuple(q.shape), "k_cache": tuple(k_cache.shape),
              "v_cache": None if v_cache is None else tuple(v_cache.shape)}
    why = _shape_mismatch(**shapes)
    if why is not None:
        raise ValueError(why + _layout_hint(shapes))


def _check_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                 block_table: torch.Tensor) -> None:
    """check_cache for a paged cache: pages [num_pages, Hkv, page_size, D], block_table int32
    [B, max_pages] (docs/design.md section 3)."""
    _check_tensor("q", q, 4)
    _need(q.dtype in FLOAT_DTYPES or q.dtype == torch.float64,
          f"q must be float16, bfloat16 or float32, got {q.dtype}")
    b, hq, lq, d = q.shape
    check_table_shape(block_table, q.device, b)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t is None:
            continue
        _check_tensor(name, t, 4)
        _need(t.dtype == q.dtype, f"{name} dtype {t.dtype} does not match q dtype {q.dtype}")
        _need(t.device == q.device, f"{name} is on {t.device} but q is on {q.device}")
        _need(t.shape[0] >= 1 and t.shape[2] >= 1 and t.shape[3] == d,
              f"{name} with a block_table must be pages [num_pages, Hkv, page_size, D={d}], "
              f"got {tuple(t.shape)}")
    _need(lq >= 1, f"q must hold at least one query (Lq >= 1), got shape {tuple(q.shape)}")
    _need(d >= 2 and d % 2 == 0, f"head dim D (q.shape[-1]) must be even and >= 2, got {d}")
    hkv = k_cache.shape[1]
    _need(hkv >= 1 and hq >= 1 and hq % hkv == 0,
          f"q heads Hq={hq} must be a positive multiple of k_cache heads Hkv={hkv} (GQA)")
    _need(v_cache is None or v_cache.shape == k_cache.shape,
          f"v_cache shape {tuple(v_cache.shape) if v_cache is not None else None} must equal "
          f"k_cache shape {tuple(k_cache.shape)}")
    nmax = block_table.shape[1] * k_cache.shape[2]
    _need(nmax >= lq, f"the block table holds Nmax={nmax} tokens, fewer than the Lq={lq} queries")


def check_table_shape(block_table, device: torch.device, batch: int | None = None) -> None:
    """block_table must be int32 [B, max_pages >= 1] on ``device`` (B = ``batch`` when given)."""
    _check_tensor("block_table", block_table, 2)
    _need(block_table.dtype == torch.int32,
          f"block_table must be int32 [B, max_pages], got {block_table.dtype}")
    _need(block_table.device == device,
          f"block_table is on {block_table.device} but the cache is on {device}")
    _need(batch is None or block_table.shape[0] == batch,
          f"block_table must have B={batch} rows (one per sequence), got "
          f"{tuple(block_table.shape)}")
    _need(block_table.shape[1] >= 1, "block_table must have at least one column (max_pages)")


def check_block_table(block_table: torch.Tensor, k_cache: torch.Tensor,
                      seqlens: torch.Tensor) -> torch.Tensor:
    """The block table as the kernels read it (contiguous), after checking that every page
    holding one of the first N_b tokens of sequence b is a page of ``k_cache``.

    The values are read as ``cache_seqlens`` are: on the host always, on a GPU unless a CUDA
    graph is being captured or :func:`set_device_checks` turned the checks off. Unchecked,
    a bad entry gives a wrong result; the kernels clamp it, so it is never read out of bounds.
    """
    on_host = block_table.device.type == "cpu"
    capturing = block_table.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if block_table.numel() and (on_host or (_check_device_values and not capturing)):
        page_size, num_pages = k_cache.shape[2], k_cache.shape[0]
        used = (seqlens.to(torch.int64) + page_size - 1) // page_size           # [B]
        cols = torch.arange(block_table.shape[1], device=block_table.device)
        live = cols[None, :] < used[:, None]
        bad = live & ((block_table < 0) | (block_table >= num_pages))
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {i}]={int(block_table[b, i])} must be a page of "
                             f"k_cache, in [0, num_pages={num_pages}) (sequence {b} has "
                             f"{int(seqlens[b])} tokens on {int(used[b])} pages)")
    return block_table.contiguous()


def _shape_mismatch(q: tuple, k_cache: tuple, v_cache: tuple | None) -> str | None:
    """The first way q [B, Hq, Lq, D] and the cache [B, Hkv, Nmax, D] do not fit, or None."""
    b, hq, lq, d = q
    if lq < 1:
        return f"q must hold at least one query (Lq >= 1), got shape {q}"
    if d < 2 or d % 2:
        return f"head dim D (q.shape[-1]) must be even and >= 2, got {d}"
    for name, shape in (("k_cache", k_cache), ("v_cache", v_cache)):
        if shape is not None and (shape[0] != b or shape[3] != d):
            return f"{name} must be [B={b}, Hkv, Nmax, D={d}], got {shape}"
    hkv, nmax = k_cache[1], k_cache[2]
    if not (hkv >= 1 and hq >= 1 and hq % hkv == 0):
        return f"q heads Hq={hq} must be a positive multiple of k_cache heads Hkv={hkv} (GQA)"
    if v_cache is not None and v_cache != k_cache:
        return f"v_cache shape {v_cache} must equal k_cache shape {k_cache}"
    if nmax < lq:
        return f"k_cache holds Nmax={nmax} tokens, fewer than the Lq={lq} queries"
    return None


def _layout_hint(shapes: dict) -> str:
    """'; q looks like [B, L, H, D] ...' for the fewest tensors whose dims 1 and 2, swapped,
    make the shapes fit; '' when no such swap does."""
    names = [n for n, s in shapes.items() if s is not None]
    for count in range(1, len(names) + 1):
        for swapped in itertools.combinations(names, count):
            trial = {n: (s[0], s[2], s[1], s[3]) if n in swapped else s
                     for n, s in shapes.items()}
            if _shape_mismatch(**trial) is None:
                return "".join(
                    f"; {n} looks like [B, {x}, H, D]; this API takes [B, H, {x}, D] (torch SDPA "
                    f"layout): pass {n}.transpose(1, 2)"
                    for n, x in ((n, "L" if n == "q" else "N") for n in swapped))
    return ""


def check_seqlens(cache_seqlens, k_cache: torch.Tensor, lq: int,
                  block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Return int32 [B] contiguous lengths on the cache's device; None means Nmax for every
    sequence (and is refused for a paged cache, whose pages past a sequence's end need not
    exist).

    Given lengths are read (on a GPU: a host sync) to check that each lies in [Lq, Nmax],
    except while a CUDA graph is being captured or after ``set_device_checks(False)``; each
    public call runs this once, and the caches, whose lengths are valid by construction,
    never do.
    """
    b, _, nmax, _ = layout.cache_shape(k_cache, block_table)
    device = k_cache.device
    if cache_seqlens is None:
        _need(block_table is None, "cache_seqlens is required with a block_table (paged cache)")
        return _full_lengths(b, nmax, device)
    _check_tensor("cache_seqlens", cache_seqlens, 1)
    _need(cache_seqlens.dtype == torch.int32,
          f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    _need(cache_seqlens.shape[0] == b,
          f"cache_seqlens must have B={b} entries, got {cache_seqlens.shape[0]}")
    _need(cache_seqlens.device == device,
          f"cache_seqlens is on {cache_seqlens.device} but the cache is on {device}")
    on_host = device.type == "cpu"
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if cache_seqlens.numel() and (on_host or (_check_device_values and not capturing)):
        lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
        _need(lq <= lo and hi <= nmax,
              f"cache_seqlens must lie in [Lq={lq}, Nmax={nmax}], got values in [{lo}, {hi}]")
    # The Triton and CUDA kernels read lens[b] at offset b: a strided view (a column of a
    # table, or one length expanded to [B]) would be read as other memory.
    return cache_seqlens.contiguous()


@functools.lru_cache(maxsize=64)
def _full_lengths_cached(b: int, nmax: int, device: torch.device) -> torch.Tensor:
    return torch.full((b,), nmax, dtype=torch.int32, device=device)


def _full_lengths(b: int, nmax: int, device: torch.device) -> torch.Tensor:
    return _full_lengths_cached(b, nmax, device)


def check_params(*, sink: int, chunk: int, local: int | None = None, topk: int | None = None,
                 query_block: int | None = None) -> None:
    """Validate the integer segment parameters."""
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)
    for name, value, low in (("sink", sink, 0), ("chunk", chunk, 1), ("local", local, 0),
                             ("topk", topk, 1), ("query_block", query_block, 1)):
        if value is None:
            continue
        _need(is_int(value) and value >= low, f"{name} must be an int >= {low}, got {value!r}")


reps_shape = layout.reps_shape


def check_reps(reps, k_cache: torch.Tensor, *, lq: int, sink: int, local: int, chunk: int,
               rep: str, query_block: int = 1, block_table: torch.Tensor | None = None) -> None:
    """Check user-given reps against the cache; "max" takes none."""
    if rep == "max":
        _need(reps is None, "reps must be None with rep='max' (it scores the raw keys)")
        return
    b, h, nmax, d = layout.cache_shape(k_cache, block_table)
    want = "[B, Hkv, n_chunks, 2, D]" if rep == "bound" else "[B, Hkv, n_chunks, D]"
    _check_tensor("reps", reps, 5 if rep == "bound" else 4)
    _need(reps.shape[:2] == (b, h) and reps.shape[-1] == d
          and (rep != "bound" or reps.shape[3] == 2),
          f"reps for rep={rep!r} must be {want} = [{b}, {h}, n_chunks, "
          f"{'2, ' if rep == 'bound' else ''}{d}], got {tuple(reps.shape)}")
    _need(reps.dtype == k_cache.dtype, f"reps dtype {reps.dtype} must match k_cache {k_cache.dtype}")
    _need(reps.device == k_cache.device, f"reps is on {reps.device} but k_cache on {k_cache.device}")
    # The call's last block has the most middle chunks (contract v2); lq == 0 (a cache read
    # without queries of its own, as a context-parallel shard is) can select every whole chunk.
    most = (max(0, nmax - sink) // chunk if lq == 0
            else layout.max_middle_chunks(nmax, lq, query_block, sink, local, chunk))
    _need(reps.shape[2] >= most,
          f"reps holds {reps.shape[2]} chunks but the cache can have {most} middle chunks")


def check_inv_freq(inv_freq: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """inv_freq [R/2] with R <= D, returned as float32 on q's device."""
    _check_tensor("inv_freq", inv_freq, 1)
    d = q.shape[-1]
    _need(1 <= inv_freq.shape[0] <= d // 2,
          f"inv_freq must have between 1 and D/2={d // 2} entries, got {inv_freq.shape[0]}")
    _need(inv_freq.is_floating_point(), f"inv_freq must be floating point, got {inv_freq.dtype}")
    # contiguous: the Triton kernel reads inv_freq[i] at offset i.
    return inv_freq.to(device=q.device, dtype=torch.float32).contiguous()


def check_attention_args(q: torch.Tensor, inv_freq: torch.Tensor, scale, rope_scale,
                         rope_style: str, positions: str) -> tuple[torch.Tensor, float]:
    """Validate the RoPE/softmax arguments; return (float32 inv_freq on q's device, scale)."""
    _check_choice("rope_style", rope_style, ROPE_STYLES)
    _check_choice("positions", positions, POSITION_MODES)
    _need(isinstance(rope_scale, (int, float)) and math.isfinite(rope_scale),
          f"rope_scale must be a finite number, got {rope_scale!r}")
    inv_freq = check_inv_freq(inv_freq, q)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    _need(isinstance(scale, (int, float)) and math.isfinite(scale),
          f"scale must be a finite number or None, got {scale!r}")
    return inv_freq, float(scale)


def check_idx(idx, q: torch.Tensor, k_cache: torch.Tensor, query_block: int) -> None:
    """idx must be int32 [B, Hkv, ceil(Lq/query_block), topk] on q's device."""
    _check_tensor("idx", idx, 4)
    b, _, lq, _ = q.shape
    n_blocks = -(-lq // query_block)
    _need(idx.dtype == torch.int32, f"idx must be int32, got {idx.dtype}")
    _need(idx.device == q.device, f"idx is on {idx.device} but q is on {q.device}")
    _need(idx.shape[:3] == (b, k_cache.shape[1], n_blocks) and idx.shape[3] >= 1,
          f"idx must be [B={b}, Hkv={k_cache.shape[1]}, n_blocks={n_blocks}, topk], "
          f"got {tuple(idx.shape)}")


def check_idx_values(idx: torch.Tensor, seqlens: torch.Tensor, lq: int, *, sink: int,
                     local: int, chunk: int, query_block: int) -> None:
    """Every entry of a host-resident idx is -1 or a middle chunk j < M of its sequence and
    query block, and the -1 padding of each row comes last.

    An out-of-range j would gather tokens outside the middle (the local window twice, or past
    the cache) and -2 would be skipped as padding, silently. Device tensors are not read
    here (no host sync): there a malformed idx gives a wrong result, and the kernels clamp
    every gathered token so it is never read outside the cache.
    """
    if idx.device.type != "cpu" or idx.numel() == 0:
        return
    m = torch.tensor([[layout.block_segments(n, lq, s, e, sink, local, chunk).n_mid
                       for s, e in layout.query_blocks(lq, query_block)]
                      for n in seqlens.tolist()], dtype=torch.int64).reshape(idx.shape[0], 1, -1, 1)
    bad = (idx < -1) | (idx >= m)
    if bool(bad.any()):
        where = tuple(int(x) for x in bad.nonzero()[0])
        raise ValueError(f"idx{list(where)}={int(idx[where])} must be -1 or a middle chunk of "
                         f"sequence {where[0]} and query block {where[2]}, which has "
                         f"M={int(m[where[0], 0, where[2], 0])} chunks")
    # -1 pads the end of a row: the Triton kernel takes the first (idx >= 0).sum() entries.
    early = (idx[..., :-1] < 0) & (idx[..., 1:] >= 0)
    if bool(early.any()):
        row = tuple(int(x) for x in early.nonzero()[0][:3])
        raise ValueError(f"idx{list(row)} = {idx[row].tolist()}: the -1 padding must come after "
                         f"the selected chunks")

