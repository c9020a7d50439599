"""Library loading and backend choice.

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

import glob
import importlib
import importlib.util
import os
import sys
import warnings

import torch

from .checks import _check_choice, _need

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
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

if _status["cpu"] is None:
    # attend's CPU kernel: the two ops in turn (the CUDA one, in csrc/cuda/ops_cuda.cu,
    # overlaps them).
    @torch.library.impl("reattention::attend", "CPU")
    def _attend_cpu(q, k_cache, v_cache, reps, cache_seqlens, inv_freq, sink, local, chunk, topk,
                    rep, query_block, scale, rope_scale, rope_style, positions,
                    block_table=None):
        ops = torch.ops.reattention
        idx = ops.select_chunks(q, k_cache, reps, cache_seqlens, sink, local, chunk, topk, rep,
                                query_block, block_table)
        out, lse = ops.gather_attention(q, k_cache, v_cache, cache_seqlens, idx, inv_freq, sink,
                                        local, chunk, query_block, scale, rope_scale,
                                        rope_style, positions, block_table)
        return out, lse, idx


def available_backends() -> dict[str, str | None]:
    """Map each backend to ``None`` when usable here, else the reason it is not."""
    return dict(_status)


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

