"""RoPE: inverse frequencies and the rotation itself (docs/design.md section 2.7), shared by
the reference, the public API and the integrations."""
from __future__ import annotations

import functools

import torch

__all__ = ["default_inv_freq", "shared_inv_freq", "apply_rope", "rope_angles"]


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


def rope_angles(pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Angles ``float32(pos) * inv_freq`` computed in float32, as Hugging Face does.

    pos: int [L]; inv_freq: [R/2] -> [L, R/2] float32.
    """
    return pos.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor,
               rope_scale: float = 1.0, style: str = "half") -> torch.Tensor:
    """Rotate the first ``R = 2 * len(inv_freq)`` dims of ``x`` at positions ``pos``.

    Parameters
    ----------
    x : [..., L, D] float tensor (float32/float64 for exactness).
    pos : int tensor [L], the position of each row.
    inv_freq : [R/2] float32 inverse frequencies, ``R <= D``.
    rope_scale : cos and sin are multiplied by it (yarn's attention factor).
    style : "half" pairs (i, i + R/2) (Hugging Face), "interleaved" pairs (2i, 2i + 1).

    Returns
    -------
    Tensor of ``x``'s shape and dtype; dims from R on pass through unrotated.
    """
    half = inv_freq.shape[0]
    r = 2 * half
    ang = rope_angles(pos, inv_freq)
    if x.dtype == torch.float64:
        ang = ang.to(torch.float64)
    # cos/sin in (at least) float32, then rounded to x's dtype, as Hugging Face does.
    cos = (ang.cos() * rope_scale).to(x.dtype)
    sin = (ang.sin() * rope_scale).to(x.dtype)
    out = x.clone()
    if style == "half":
        x1, x2 = x[..., :half], x[..., half:r]
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:r] = x2 * cos + x1 * sin
    elif style == "interleaved":
        x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
        out[..., 0:r:2] = x1 * cos - x2 * sin
        out[..., 1:r:2] = x2 * cos + x1 * sin
    else:
        raise ValueError(f"rope_style must be 'half' or 'interleaved', got {style!r}")
    return out
