"""Op wrappers: input validation (once, here), backend choice, fake kernels.

Backends
--------
"reference"  reattention.reference, plain PyTorch, any device (slow, the spec).
"cpu"        torch.ops.reattention.* from the compiled ``_C`` library, CPU tensors.
"cuda"       torch.ops.reattention.* from ``_C_cuda``, CUDA tensors, fp16/bf16.
"triton"     torch.ops.reattention.*_triton from triton_kernels/ (installed as
             reattention.triton_kernels), CUDA tensors (or CPU tensors under
             TRITON_INTERPRET=1).
"auto"       cuda -> triton -> reference on CUDA tensors; cpu -> reference on CPU tensors.
             A fallback that is not the first choice warns once.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import glob
import importlib
import importlib.util
import math
import os
import sys
import warnings

import torch

from .. import layout, reference

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
REP_MODES = ("max", "bound", "mean")
ROPE_STYLES = ("half", "interleaved")
POSITION_MODES = ("compact", "original")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (64, 128, 256)  # the CUDA kernels' instantiations
TRITON_MAX_HEAD_DIM = 256  # any even head dim up to this

# The compiled libraries sit in the package directory, one level up.
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_status: dict[str, str | None] = {}  # backend -> None when usable, else why not


def _find_library(stem: str) -> str | None:
    """Path of the built library reattention/<stem>.*.so, or None."""
    hits = sorted(p for p in glob.glob(os.path.join(_HERE, stem + ".*"))
                  if p.endswith((".so", ".pyd", ".dylib")))
    return hits[0] if hits else None


def _load(stem: str, missing: str) -> str | None:
    """Load reattention/<stem>.*.so; return None on success, else why it is unusable."""
    path = _find_library(stem)
    if path is None:
        return missing
    try:
        torch.ops.load_library(path)
        return None
    except OSError as e:
        return f"loading {os.path.basename(path)} failed: {e}"


def _import_triton_kernels():
    """The Triton twins: ``reattention.triton_kernels`` as a wheel installs them, or in a source
    checkout the ``triton_kernels/`` directory beside ``reattention/``, loaded by path under
    the same name (a plain ``import triton_kernels`` could find the Triton project's package
    of that name instead)."""
    name = __package__.rpartition(".")[0] + ".triton_kernels"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
    init = os.path.join(os.path.dirname(_HERE), "triton_kernels", "__init__.py")
    if not os.path.isfile(init):
        raise ImportError(f"neither {name} nor a source checkout's triton_kernels/ was found")
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _load_libraries() -> None:
    _status["cpu"] = _load("_C", "the compiled extension reattention/_C is not built "
                                 "(pip install .)")
    if _status["cpu"] is not None:
        _status["cuda"] = "needs the _C library: " + _status["cpu"]
    elif not (torch.version.cuda and torch.cuda.is_available()):
        _status["cuda"] = "torch has no usable CUDA device"
    else:
        _status["cuda"] = _load("_C_cuda", "reattention/_C_cuda was not built (no nvcc at "
                                           "build time, or a CPU build of torch)")
    try:
        _import_triton_kernels()  # registers reattention::*_triton
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        if torch.cuda.is_available() or interp:
            _status["triton"] = None
        else:
            _status["triton"] = "no CUDA device (set TRITON_INTERPRET=1 to run it on the CPU)"
    except ImportError as e:
        _status["triton"] = f"triton_kernels could not be imported: {e}"
    _status["reference"] = None


_load_libraries()


def available_backends() -> dict[str, str | None]:
    """Map each backend to ``None`` when usable here, else the reason it is not."""
    return dict(_status)


# --------------------------------------------------------------------------- fake kernels
if _status["cpu"] is None:
    @torch.library.register_fake("reattention::chunk_reps")
    def _chunk_reps_fake(k_cache, cache_seqlens, reps, sink, chunk, mode, start_chunk):
        return None

    @torch.library.register_fake("reattention::select_chunks")
    def _select_chunks_fake(q, k_cache, reps, cache_seqlens, sink, local, chunk, topk, mode,
                            query_block):
        b, _, lq, _ = q.shape
        n_blocks = -(-lq // query_block)
        return q.new_empty((b, k_cache.shape[1], n_blocks, topk), dtype=torch.int32)

    @torch.library.register_fake("reattention::gather_attention")
    def _gather_attention_fake(q, k_cache, v_cache, cache_seqlens, idx, inv_freq, sink, local,
                               chunk, query_block, scale, rope_scale, rope_style, positions):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# --------------------------------------------------------------------------- validation
_check_device_values = True


# Set while a caller that has validated the values (or keeps them valid by construction, as
# the caches do) runs the ops: they then skip reading cache_seqlens and idx again, which on a
# GPU would be one host sync per read. Shapes, dtypes and devices are still checked.
_values_checked = contextvars.ContextVar("reattention_values_checked", default=False)


@contextlib.contextmanager
def _values_already_checked():
    token = _values_checked.set(True)
    try:
        yield
    finally:
        _values_checked.reset(token)


def set_device_checks(enabled: bool) -> None:
    """Turn the value check of device-resident ``cache_seqlens`` on or off.

    Checking that every length lies in [Lq, Nmax] needs the values on the host: one
    device sync per public call (``reattention_attn`` checks once for its two ops; the
    package's caches keep their lengths valid and skip it). It is skipped automatically
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
                ) -> None:
    """Validate q [B, Hq, Lq, D] against the cache [B, Hkv, Nmax, D]."""
    _check_tensor("q", q, 4)
    _check_tensor("k_cache", k_cache, 4)
    _need(q.dtype in FLOAT_DTYPES or q.dtype == torch.float64,
          f"q must be float16, bfloat16 or float32, got {q.dtype}")
    b, hq, lq, d = q.shape
    _need(lq >= 1, f"q must hold at least one query (Lq >= 1), got shape {tuple(q.shape)}")
    _need(d >= 2 and d % 2 == 0, f"head dim D (q.shape[-1]) must be even and >= 2, got {d}")
    tensors = [("k_cache", k_cache)] + ([("v_cache", v_cache)] if v_cache is not None else [])
    for name, t in tensors:
        _check_tensor(name, t, 4)
        _need(t.dtype == q.dtype, f"{name} dtype {t.dtype} does not match q dtype {q.dtype}")
        _need(t.device == q.device, f"{name} is on {t.device} but q is on {q.device}")
        _need(t.shape[0] == b and t.shape[3] == d,
              f"{name} must be [B={b}, Hkv, Nmax, D={d}], got {tuple(t.shape)}")
    hkv, nmax = k_cache.shape[1], k_cache.shape[2]
    _need(hkv >= 1 and hq % hkv == 0,
          f"q heads Hq={hq} must be a multiple of k_cache heads Hkv={hkv} (GQA)")
    if v_cache is not None:
        _need(v_cache.shape == k_cache.shape,
              f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape "
              f"{tuple(k_cache.shape)}")
    _need(nmax >= lq, f"k_cache holds Nmax={nmax} tokens, fewer than the Lq={lq} queries")


def check_seqlens(cache_seqlens, k_cache: torch.Tensor, lq: int) -> torch.Tensor:
    """Return int32 [B] lengths on the cache's device; None means Nmax for every sequence."""
    b, nmax, device = k_cache.shape[0], k_cache.shape[2], k_cache.device
    if cache_seqlens is None:
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
    if (cache_seqlens.numel() and not _values_checked.get()
            and (on_host or (_check_device_values and not capturing))):
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
               rep: str, query_block: int = 1) -> None:
    """Check user-given reps against the cache; "max" takes none."""
    if rep == "max":
        _need(reps is None, "reps must be None with rep='max' (it scores the raw keys)")
        return
    b, h, nmax, d = k_cache.shape
    want = "[B, Hkv, n_chunks, 2, D]" if rep == "bound" else "[B, Hkv, n_chunks, D]"
    _check_tensor("reps", reps, 5 if rep == "bound" else 4)
    _need(reps.shape[:2] == (b, h) and reps.shape[-1] == d
          and (rep != "bound" or reps.shape[3] == 2),
          f"reps for rep={rep!r} must be {want} = [{b}, {h}, n_chunks, "
          f"{'2, ' if rep == 'bound' else ''}{d}], got {tuple(reps.shape)}")
    _need(reps.dtype == k_cache.dtype, f"reps dtype {reps.dtype} must match k_cache {k_cache.dtype}")
    _need(reps.device == k_cache.device, f"reps is on {reps.device} but k_cache on {k_cache.device}")
    # The call's last block has the most middle chunks (contract v2).
    most = layout.max_middle_chunks(nmax, lq, query_block, sink, local, chunk)
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


# --------------------------------------------------------------------------- backend choice
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def _kernel_refusal(backend: str, t: torch.Tensor) -> str | None:
    """Why ``backend`` cannot take these tensors (None when it can)."""
    why = _status.get(backend)
    if why is not None:
        return why
    dev = t.device.type
    if backend == "cpu" and dev != "cpu":
        return f"the cpu backend needs CPU tensors, got {dev}"
    if backend == "cuda":
        if dev != "cuda":
            return f"the cuda backend needs CUDA tensors, got {dev}"
        if t.dtype not in (torch.float16, torch.bfloat16):
            return (f"the cuda backend takes float16/bfloat16, got {t.dtype}; run it on the "
                    f"triton or reference backend (cpu: with the tensors on the CPU)")
    if backend == "triton" and dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1)"
    if backend == "cuda" and t.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"the cuda backend supports head dims {KERNEL_HEAD_DIMS}, got {t.shape[-1]}"
    if backend == "triton" and t.shape[-1] > TRITON_MAX_HEAD_DIM:
        return (f"the triton backend supports head dims up to {TRITON_MAX_HEAD_DIM}, "
                f"got {t.shape[-1]}")
    if backend != "reference" and t.dtype == torch.float64:
        return "float64 runs only on the reference backend"
    return None


def resolve_backend(backend: str, t: torch.Tensor) -> str:
    """Pick the backend for tensors like ``t``; raise ValueError when a named one can't."""
    _check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        why = _kernel_refusal(backend, t)
        _need(why is None, f"backend={backend!r} cannot run this call: {why}")
        return backend
    order = ("cuda", "triton", "reference") if t.is_cuda else ("cpu", "reference")
    reasons = []
    for name in order:
        why = _kernel_refusal(name, t)
        if why is None:
            if reasons:
                _warn_once(f"reattention: using backend {name!r} because " + "; ".join(reasons))
            return name
        reasons.append(f"{name}: {why}")
    raise ValueError("no backend can run this call: " + "; ".join(reasons))


def _op(name: str, backend: str):
    if backend == "triton":
        return getattr(torch.ops.reattention, name + "_triton")
    return getattr(torch.ops.reattention, name)


# --------------------------------------------------------------------------- wrappers
def chunk_reps(k_cache: torch.Tensor, cache_seqlens: torch.Tensor | None = None, *, sink: int,
               chunk: int, rep: str, backend: str = "auto", reps: torch.Tensor | None = None,
               start_chunk: int = 0) -> torch.Tensor:
    """Chunk representatives of the complete middle chunks of a raw-key cache.

    Parameters
    ----------
    k_cache : [B, Hkv, Nmax, D] raw keys (fp16, bf16 or fp32).
    cache_seqlens : int32 [B] valid tokens per sequence, or None for Nmax.
    sink, chunk : chunk j covers tokens [sink + j*chunk, sink + (j+1)*chunk).
    rep : "bound" (min/max per dim) or "mean" (centroid).
    reps : an existing reps tensor to update in place (incremental), or None to allocate.
    start_chunk : only chunks j >= start_chunk are (re)computed.

    Returns
    -------
    reps : "bound" [B, Hkv, n_chunks, 2, D] or "mean" [B, Hkv, n_chunks, D] in the cache
        dtype, ``n_chunks = (Nmax - sink) // chunk``; chunks not yet complete are left as they
        were (uninitialised in a new tensor).

    Example
    -------
    >>> k = torch.randn(1, 8, 4096, 128)
    >>> reps = chunk_reps(k, sink=64, chunk=64, rep="bound")
    >>> reps.shape
    torch.Size([1, 8, 63, 2, 128])
    """
    _check_tensor("k_cache", k_cache, 4)
    # float64 is the reference's exact mode (as q in check_cache); resolve_backend keeps it
    # off the kernel backends.
    _need(k_cache.dtype in FLOAT_DTYPES or k_cache.dtype == torch.float64,
          f"k_cache must be fp16, bf16, fp32 (or fp64 on the reference backend), "
          f"got {k_cache.dtype}")
    _need(k_cache.shape[-1] % 2 == 0, f"head dim D must be even, got {k_cache.shape[-1]}")
    check_params(sink=sink, chunk=chunk)
    _check_choice("rep", rep, ("bound", "mean"))
    _need(isinstance(start_chunk, int) and start_chunk >= 0,
          f"start_chunk must be an int >= 0, got {start_chunk!r}")
    seqlens = check_seqlens(cache_seqlens, k_cache, 0)
    if reps is None:
        reps = layout.new_reps(k_cache, sink, chunk, rep)
    else:
        check_reps(reps, k_cache, lq=1, sink=sink, local=0, chunk=chunk, rep=rep)
    k_cache = k_cache.contiguous()
    be = resolve_backend(backend, k_cache)
    if be == "reference":
        reference.chunk_reps_ref(k_cache, seqlens, reps, sink, chunk, rep, start_chunk)
    else:
        _need(reps.is_contiguous(), "reps must be contiguous for the kernel backends")
        _op("chunk_reps", be)(k_cache, seqlens, reps, sink, chunk, rep, start_chunk)
    return reps


def select_chunks(q: torch.Tensor, k_cache: torch.Tensor,
                  cache_seqlens: torch.Tensor | None = None, *, reps: torch.Tensor | None = None,
                  sink: int, local: int, chunk: int, topk: int, query_block: int, rep: str,
                  backend: str = "auto") -> torch.Tensor:
    """Select the top-k middle chunks per (batch, kv head, query block).

    Parameters
    ----------
    q : [B, Hq, Lq, D] raw (un-rotated) queries of the last Lq tokens.
    k_cache : [B, Hkv, Nmax, D] raw keys, Hq % Hkv == 0.
    cache_seqlens : int32 [B] or None (Nmax); each in [Lq, Nmax].
    reps : chunk representatives for rep "bound"/"mean" (computed on the fly when None);
        must be None for "max".
    rep : "max" (exact, reads raw keys), "bound" or "mean".

    Returns
    -------
    idx : int32 [B, Hkv, ceil(Lq / query_block), topk], ascending, padded with -1.

    Example
    -------
    >>> q, k = torch.randn(1, 32, 1, 128), torch.randn(1, 8, 16384, 128)
    >>> idx = select_chunks(q, k, sink=64, local=4096, chunk=64, topk=32, query_block=128, rep="max")
    >>> idx.shape
    torch.Size([1, 8, 1, 32])
    """
    check_cache(q, k_cache)
    check_params(sink=sink, local=local, chunk=chunk, topk=topk, query_block=query_block)
    _check_choice("rep", rep, REP_MODES)
    seqlens = check_seqlens(cache_seqlens, k_cache, q.shape[2])
    if reps is not None or rep == "max":
        check_reps(reps, k_cache, lq=q.shape[2], sink=sink, local=local, chunk=chunk, rep=rep,
                   query_block=query_block)
    be = resolve_backend(backend, q)
    if reps is None and rep != "max":
        reps = chunk_reps(k_cache, seqlens, sink=sink, chunk=chunk, rep=rep, backend=be)
    q, k_cache = q.contiguous(), k_cache.contiguous()
    if be == "reference":
        return reference.select_chunks_ref(q, k_cache, reps, seqlens, sink, local, chunk, topk,
                                           rep, query_block)
    reps = reps.contiguous() if reps is not None else None
    return _op("select_chunks", be)(q, k_cache, reps, seqlens, sink, local, chunk, topk, rep,
                                    query_block)


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
    if idx.device.type != "cpu" or idx.numel() == 0 or _values_checked.get():
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


def gather_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     idx: torch.Tensor, cache_seqlens: torch.Tensor | None = None, *,
                     inv_freq: torch.Tensor, sink: int, local: int, chunk: int,
                     query_block: int, scale: float | None = None, rope_scale: float = 1.0,
                     rope_style: str = "half", positions: str = "compact",
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over [sink | chunks in ``idx`` | local] with RoPE at re-assigned positions.

    Parameters
    ----------
    q : [B, Hq, Lq, D] raw queries; k_cache, v_cache : [B, Hkv, Nmax, D] raw keys and values.
    idx : int32 [B, Hkv, n_blocks, topk] from :func:`select_chunks`, or built the same way:
        middle chunk ids j < M_b of each sequence, the -1 padding after them. Checked (ValueError)
        when idx is on the CPU; on a GPU it is not read on the host (no sync), and an entry out
        of that contract gives a wrong result (never an out-of-bounds read).
    inv_freq : [R/2] RoPE inverse frequencies, R <= D.

    Returns
    -------
    out : [B, Hq, Lq, D] in q's dtype; lse : [B, Hq, Lq] float32.

    Example
    -------
    >>> idx = select_chunks(q, k, sink=64, local=4096, chunk=64, topk=32, query_block=128, rep="max")
    >>> out, lse = gather_attention(q, k, v, idx, inv_freq=default_inv_freq(128), sink=64,
    ...                             local=4096, chunk=64, query_block=128)
    """
    check_cache(q, k_cache, v_cache)
    check_params(sink=sink, local=local, chunk=chunk, query_block=query_block)
    inv_freq, scale = check_attention_args(q, inv_freq, scale, rope_scale, rope_style, positions)
    check_idx(idx, q, k_cache, query_block)
    seqlens = check_seqlens(cache_seqlens, k_cache, q.shape[2])
    check_idx_values(idx, seqlens, q.shape[2], sink=sink, local=local, chunk=chunk,
                     query_block=query_block)
    be = resolve_backend(backend, q)
    q, k_cache, v_cache, idx = (t.contiguous() for t in (q, k_cache, v_cache, idx))
    if be == "reference":
        return reference.gather_attention_ref(q, k_cache, v_cache, seqlens, idx, inv_freq, sink,
                                              local, chunk, query_block, scale,
                                              float(rope_scale), rope_style, positions)
    return _op("gather_attention", be)(q, k_cache, v_cache, seqlens, idx, inv_freq, sink, local,
                                       chunk, query_block, scale, float(rope_scale),
                                       rope_style, positions)
