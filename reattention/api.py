"""The public entry points: :class:`ReAttentionConfig` and :func:`reattention_attn`."""
from __future__ import annotations

import dataclasses

import torch

from . import layout, ops
from .ops import unchecked
from .rope import shared_inv_freq

__all__ = ["ReAttentionConfig", "reattention_attn"]


@dataclasses.dataclass(frozen=True)
class ReAttentionConfig:
    """Segment and selection settings shared by the op, the cache and the HF integration.

    A query block attends to at most ``scope = sink + topk*chunk + local + chunk +
    query_block`` keys (its own queries included), however long the cache grows and however
    many queries a call holds; compact positions stay below it.

    Example
    -------
    >>> cfg = ReAttentionConfig(sink=16, local=96, chunk=32, topk=4, query_block=64)
    >>> cfg.scope
    336
    """

    sink: int = 64
    local: int = 4096
    chunk: int = 64
    topk: int = 32
    query_block: int = 128
    rep: str = "max"
    positions: str = "compact"

    def __post_init__(self):
        ops.check_params(sink=self.sink, local=self.local, chunk=self.chunk, topk=self.topk,
                         query_block=self.query_block)
        if self.rep not in ops.REP_MODES:
            raise ValueError(f"rep must be one of {ops.REP_MODES}, got {self.rep!r}")
        if self.positions not in ops.POSITION_MODES:
            raise ValueError(f"positions must be one of {ops.POSITION_MODES}, "
                             f"got {self.positions!r}")

    @staticmethod
    def resolve(config: "ReAttentionConfig | None", given: dict) -> dict:
        """The settings a call runs with: ``config``'s when given, else the keywords.

        ``given`` maps setting names to the keyword values of the call; a keyword set to
        neither its default nor the config's value is ambiguous and raises ValueError.
        """
        if config is None:
            return given
        if not isinstance(config, ReAttentionConfig):
            raise ValueError(f"config must be a ReAttentionConfig, got {type(config).__name__}")
        defaults = ReAttentionConfig()
        clash = [k for k, v in given.items()
                 if v != getattr(defaults, k) and v != getattr(config, k)]
        if clash:
            raise ValueError(f"pass either config or the keywords {clash}, not both")
        return {k: getattr(config, k) for k in given}

    @property
    def scope(self) -> int:
        """Keys a query block attends to at most, its queries included (docs/design.md
        section 2)."""
        return layout.scope(self.sink, self.local, self.chunk, self.topk, self.query_block)


def reattention_attn(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor | None = None, *, sink: int = 64,
                     local: int = 4096, chunk: int = 64, topk: int = 32, query_block: int = 128,
                     rep: str = "max", reps: torch.Tensor | None = None,
                     inv_freq: torch.Tensor | None = None, rope_theta: float = 10000.0,
                     rope_scale: float = 1.0, rope_style: str = "half",
                     positions: str = "compact", scale: float | None = None,
                     backend: str = "auto", return_lse: bool = False,
                     config: ReAttentionConfig | None = None,
                     block_table: torch.Tensor | None = None):
    """ReAttention for the last Lq tokens: select chunks, then attend with re-assigned RoPE.

    Parameters
    ----------
    q : [B, Hq, Lq, D] raw (un-rotated) queries of the last Lq tokens of each sequence.
    k_cache, v_cache : [B, Hkv, Nmax, D] raw keys and values, Hq % Hkv == 0; same dtype as q
        (fp16, bf16 or fp32).
    cache_seqlens : int32 [B] valid tokens per sequence (the Lq new ones included), each in
        [Lq, Nmax]; None means Nmax.
    sink, local, chunk, topk, query_block, rep, positions : see docs/design.md section 2; or pass
        ``config`` (a :class:`ReAttentionConfig`), which then supplies all of them.
    reps : chunk representatives for rep "bound"/"mean" (:func:`chunk_reps`); computed on the
        fly when None.
    inv_freq : float32 [R/2] RoPE inverse frequencies (R <= D), wins over ``rope_theta``.
    rope_scale : cos and sin are multiplied by it (yarn's attention factor).
    rope_style : "half" (Hugging Face) or "interleaved".
    scale : softmax scale, default 1/sqrt(D).
    backend : "auto" | "cuda" | "triton" | "cpu" | "reference".
    return_lse : also return the log-sum-exp [B, Hq, Lq] float32.
    block_table : int32 [B, max_pages] for a paged cache: ``k_cache``/``v_cache`` are then
        pages [num_pages, Hkv, page_size, D], token t of sequence b in page
        ``block_table[b, t // page_size]`` at row ``t % page_size`` (Nmax = max_pages *
        page_size; ``cache_seqlens`` required). Same result as the contiguous layout, bit for
        bit on the same backend (docs/design.md section 3).

    Returns
    -------
    out : [B, Hq, Lq, D] in q's dtype, or (out, lse) when ``return_lse``.

    Example
    -------
    >>> q = torch.randn(1, 32, 1, 128); k = torch.randn(1, 8, 65536, 128); v = torch.randn_like(k)
    >>> out = reattention_attn(q, k, v, sink=64, local=4096, chunk=64, topk=32)
    >>> out.shape
    torch.Size([1, 32, 1, 128])
    """
    cfg = _call_config(config, sink=sink, local=local, chunk=chunk, topk=topk,
                       query_block=query_block, rep=rep, positions=positions)
    ops.check_cache(q, k_cache, v_cache, block_table=block_table)
    if reps is not None or cfg.rep == "max":
        ops.check_reps(reps, k_cache, lq=q.shape[2], sink=cfg.sink, local=cfg.local,
                       chunk=cfg.chunk, rep=cfg.rep, query_block=cfg.query_block,
                       block_table=block_table)
    # The one read of the lengths (on a GPU: a host sync) of the call, and of the block table.
    seqlens = ops.check_seqlens(cache_seqlens, k_cache, q.shape[2], block_table)
    if block_table is not None:
        block_table = ops.check_block_table(block_table, k_cache, seqlens)
    return _attend_checked(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), seqlens,
                           None if reps is None else reps.contiguous(), cfg, inv_freq=inv_freq,
                           rope_theta=rope_theta, rope_scale=rope_scale, rope_style=rope_style,
                           scale=scale, backend=backend, return_lse=return_lse,
                           block_table=block_table)


def _call_config(config: ReAttentionConfig | None, **keywords) -> ReAttentionConfig:
    """The settings of a call as a (validated) config: ``config`` itself when given (and not
    contradicted by a keyword), else one made from the keywords."""
    settings = ReAttentionConfig.resolve(config, keywords)
    return config if config is not None else ReAttentionConfig(**settings)


def _attend_checked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    seqlens: torch.Tensor, reps: torch.Tensor | None, cfg: ReAttentionConfig, *,
                    inv_freq: torch.Tensor | None, rope_theta: float, rope_scale: float,
                    rope_style: str, scale: float | None, backend: str, return_lse: bool,
                    block_table: torch.Tensor | None = None, on_selection=None):
    """:func:`reattention_attn` past the checks of q against the cache, the lengths and the
    reps: q, the cache and reps contiguous, ``seqlens`` int32 [B] on their device and valid.

    Checks the RoPE and softmax arguments (no device data is read), picks the backend, then
    runs the selection and the attention (``unchecked.attend``: one op on cuda, whose decode
    attention overlaps the selection). The package's caches and Hugging Face path call it
    directly: their lengths and reps are valid by construction, so they are never read.
    ``on_selection(idx)``, when given, runs between the selection and the attention (the
    tiered cache brings the selected pages to the GPU there).
    """
    if inv_freq is None:
        inv_freq = shared_inv_freq(q.shape[-1], rope_theta, q.device)
    inv_freq, scale = ops.check_attention_args(q, inv_freq, scale, rope_scale, rope_style,
                                               cfg.positions)
    be = ops.resolve_backend(backend, q)
    seg = dict(sink=cfg.sink, local=cfg.local, chunk=cfg.chunk, query_block=cfg.query_block)
    if on_selection is None:
        out, lse, _ = unchecked.attend(q, k_cache, v_cache, seqlens, reps, inv_freq=inv_freq,
                                       topk=cfg.topk, rep=cfg.rep, scale=scale,
                                       rope_scale=float(rope_scale), rope_style=rope_style,
                                       positions=cfg.positions, backend=be,
                                       block_table=block_table, **seg)
        return (out, lse) if return_lse else out
    idx = unchecked.select_chunks(q, k_cache, seqlens, reps, topk=cfg.topk, rep=cfg.rep,
                                  backend=be, block_table=block_table, **seg)
    if on_selection is not None:
        on_selection(idx)
    out, lse = unchecked.gather_attention(q, k_cache, v_cache, idx, seqlens, inv_freq=inv_freq,
                                          scale=scale, rope_scale=float(rope_scale),
                                          rope_style=rope_style, positions=cfg.positions,
                                          backend=be, block_table=block_table, **seg)
    return (out, lse) if return_lse else out
