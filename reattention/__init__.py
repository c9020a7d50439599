"""ReAttention: read contexts far past a RoPE model's trained length, with no training.

Keys are cached without RoPE; each query block picks its most relevant chunks of the cache by
a position-agnostic score, then attends over [sink | selected chunks | local window] with RoPE
at re-assigned positions, so no distance exceeds the attention scope.

The package by role (docs/design.md section 4): :mod:`.api` (this page's entry points),
:mod:`.ops` (the three ops: checks, backends, fake kernels, unchecked cores), :mod:`.layout`
(segment arithmetic), :mod:`.rope`, :mod:`.reference` (the spec), :mod:`.cache`, and the
integrations :mod:`.hf` (needs transformers) and :mod:`.distributed`.
"""
from __future__ import annotations

from . import cache, layout, ops, reference, rope
from .api import ReAttentionConfig, reattention_attn
from .ops import available_backends, chunk_reps, gather_attention, select_chunks, set_device_checks
from .rope import default_inv_freq

__all__ = [
    "ReAttentionConfig",
    "reattention_attn",
    "select_chunks",
    "chunk_reps",
    "gather_attention",
    "default_inv_freq",
    "available_backends",
    "set_device_checks",
    "ops",
    "reference",
    "layout",
    "rope",
    "cache",
]
__version__ = "0.1.0"
