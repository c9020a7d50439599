"""Triton backend of reattention: one file per op, registered with ``torch.library``.

Importing this package registers ``torch.ops.reattention.chunk_reps_triton``,
``select_chunks_triton`` and ``gather_attention_triton`` (same argument lists as the C++
schemas in csrc/ops.cpp). It raises ImportError when triton is missing, which
reattention/ops/backends.py reports as "backend unavailable". On the CPU the kernels run under the
Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported).
"""
try:
    import triton  # noqa: F401
except ImportError as e:  # re-raised with the reason so the backend list can show it
    raise ImportError(f"the triton backend needs the triton package ({e})") from e

from .chunk_reps import chunk_reps_triton
from .gather_attention import gather_attention_triton
from .select_chunks import select_chunks_triton

__all__ = ["chunk_reps_triton", "gather_attention_triton", "select_chunks_triton"]
