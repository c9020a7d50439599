"""RoPE helpers shared by the public API and the model integrations."""
from __future__ import annotations

import functools

import torch

from .reference import apply_rope, rope_angles

__all__ = ["default_inv_freq", "apply_rope", "rope_angles"]


@functools.lru_cache(maxsize=32)
def _inv_freq_cached(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return (1.0 / (theta ** exponents)).to(device)


def shared_inv_freq(rotary_dim: int, theta: float = 10000.0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`default_inv_freq` without the copy: one tensor cached per (R, theta, device), so
    a decode step allocates nothing. For the package's own read-only use (rope_theta when no
    inv_freq is given); it must never be modified in place."""
    if not (isinstance(rotary_dim, int) and rotary_dim >= 2 and rotary_dim % 2 == 0):
        raise ValueError(f"rotary_dim must be an even int >= 2, got {rotary_dim!r}")
    if not theta > 0:
        raise ValueError(f"rope_theta must be > 0, got {theta!r}")
    return _inv_freq_cached(rotary_dim, float(theta), torch.device(device))


def default_inv_freq(rotary_dim: int, theta: float = 10000.0,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Plain RoPE inverse frequencies ``1 / theta^(2i / R)``, i < R/2, float32 [R/2].

    Computed as Hugging Face's default rope initialisation does. The result is the caller's
    own tensor (a copy of a cached one), so scaling it in place is safe.

    Example
    -------
    >>> default_inv_freq(128).shape
    torch.Size([64])
    """
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")
    return shared_inv_freq(rotary_dim, theta, device).clone()
