"""Comparison rules shared by the test suite (and usable by anyone adding a backend).

- Outputs: a backend's max error against the float32 reference may be at most twice the
  error of PyTorch's own low-precision run of the same computation, plus the dtype's
  rounding noise (the FlashAttention rule, docs/design.md section 2.10).
- Selections: equal up to swaps among chunks whose scores lie within a small margin of the
  k-th score (docs/design.md section 2.10).
"""
from __future__ import annotations

import dataclasses

import torch

from . import reference

# Rounding noise per dtype, relative to the largest reference value.
NOISE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity shape. ``lens`` None means every sequence is Nmax long."""

    b: int
    hq: int
    hkv: int
    lq: int
    nmax: int
    d: int
    sink: int
    local: int
    chunk: int
    topk: int
    query_block: int
    lens: tuple[int, ...] | None = None
    rotary: int | None = None  # R < D for partial rotary

    @property
    def id(self) -> str:
        lens = "" if self.lens is None else "-L" + "_".join(map(str, self.lens))
        return (f"B{self.b}-H{self.hq}x{self.hkv}-Lq{self.lq}-N{self.nmax}{lens}-D{self.d}"
                f"-S{self.sink}W{self.local}C{self.chunk}K{self.topk}Q{self.query_block}"
                + (f"-R{self.rotary}" if self.rotary else ""))

    def seg(self) -> dict:
        return dict(sink=self.sink, local=self.local, chunk=self.chunk)


def make_inputs(case: Case, dtype: torch.dtype, device="cpu", seed: int = 0):
    """Random q [B,Hq,Lq,D], k/v caches [B,Hkv,Nmax,D], lengths, inv_freq for ``case``.

    Keys get a per-chunk offset so chunk scores are well separated (few near-ties) and the
    selection is meaningful; values are plain normal.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.b, case.hq, case.lq, case.d, generator=g)
    k = torch.randn(case.b, case.hkv, case.nmax, case.d, generator=g)
    n_chunk_rows = (case.nmax + case.chunk - 1) // case.chunk
    offs = torch.randn(case.b, case.hkv, n_chunk_rows, case.d, generator=g) * 0.7
    k = k + offs.repeat_interleave(case.chunk, dim=2)[:, :, :case.nmax]
    v = torch.randn(case.b, case.hkv, case.nmax, case.d, generator=g)
    lens = None
    if case.lens is not None:
        lens = torch.tensor(case.lens, dtype=torch.int32, device=device)
    rotary = case.rotary or case.d
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), lens,
            inv_freq.to(device))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_rule(out: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor,
                      dtype: torch.dtype, what: str = "output") -> None:
    """``max|out - ref| <= 2 max|lowp - ref| + noise(dtype) * max(1, max|ref|)``."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out.float()).all(), f"{what}: non-finite values"
    err, base = max_err(out, ref), max_err(lowp, ref)
    noise = NOISE[dtype] * max(1.0, ref.double().abs().max().item() if ref.numel() else 1.0)
    assert err <= 2 * base + noise, (
        f"{what}: max error {err:.3g} > 2 x PyTorch {dtype} error {base:.3g} + noise {noise:.3g}")


def assert_selection_equivalent(idx: torch.Tensor, ref_idx: torch.Tensor, scores: torch.Tensor,
                                rel_margin: float = 1e-3) -> None:
    """Check ``idx`` against ``ref_idx`` up to near-ties of the k-th score.

    scores : [B, Hkv, n_blocks, n_cols] from :func:`reference.chunk_scores_ref`.
    """
    assert idx.shape == ref_idx.shape and idx.dtype == torch.int32, (
        f"idx {tuple(idx.shape)} {idx.dtype} vs reference {tuple(ref_idx.shape)} int32")
    idx, ref_idx, scores = idx.cpu(), ref_idx.cpu(), scores.cpu().double()
    for row in range(idx.shape[0] * idx.shape[1] * idx.shape[2]):
        b, rest = divmod(row, idx.shape[1] * idx.shape[2])
        h, beta = divmod(rest, idx.shape[2])
        got, want = idx[b, h, beta], ref_idx[b, h, beta]
        k_eff = int((want >= 0).sum())
        where = f"(b={b}, h={h}, block={beta})"
        assert int((got >= 0).sum()) == k_eff and bool((got[k_eff:] == -1).all()), (
            f"{where}: expected {k_eff} indices then -1 padding, got {got.tolist()}")
        sel = got[:k_eff]
        assert bool((sel[1:] > sel[:-1]).all()), f"{where}: not strictly ascending: {sel.tolist()}"
        if k_eff == 0 or torch.equal(sel, want[:k_eff]):
            continue
        sc = scores[b, h, beta]
        kth = sc[want[:k_eff].long()].min()
        margin = rel_margin * (kth.abs() + 1.0)
        picked = sc[sel.long()]
        assert bool((picked >= kth - margin).all()), (
            f"{where}: selected chunks {sel.tolist()} include scores below the k-th "
            f"{kth.item():.6g} - {margin.item():.3g}")
        must = (sc > kth + margin).nonzero().flatten()
        missing = set(must.tolist()) - set(sel.tolist())
        assert not missing, f"{where}: chunks {sorted(missing)} clearly above the k-th are missing"


def lowp_attention(q, k, v, lens, idx, inv_freq, case: Case, scale: float, **kw):
    """PyTorch's own run of gather-attention in q's low-precision dtype (the error baseline)."""
    return reference.gather_attention_ref(q, k, v, lens, idx, inv_freq, case.sink, case.local,
                                          case.chunk, case.query_block, scale,
                                          compute_dtype=q.dtype, **kw)


def to_paged(cache: torch.Tensor, lens: torch.Tensor, page_size: int, *, seed: int = 0,
             spare_pages: int = 3, fill: float = float("nan"),
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A paged copy of a contiguous cache [B, Hkv, Nmax, D] (docs/design.md section 3):
    (pages [num_pages, Hkv, page_size, D], block_table int32 [B, ceil(Nmax / page_size)]).

    Each sequence's tokens [0, N_b) go to pages in a random order among ``spare_pages`` extra
    ones; every other element of the pool (unused pages, the tail of a sequence's last page)
    holds ``fill`` (NaN: a kernel that reads it shows), and the table entries past a
    sequence's pages are -1. Compare against the contiguous cache padded to max_pages *
    page_size tokens.
    """
    b_, hkv, nmax, d = cache.shape
    max_pages = -(-nmax // page_size)
    used = [-(-int(n) // page_size) for n in lens.tolist()]
    num_pages = sum(used) + spare_pages
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_pages, generator=g).tolist()
    pages = cache.new_full((num_pages, hkv, page_size, d), fill)
    table = torch.full((b_, max_pages), -1, dtype=torch.int32)
    for b, n in enumerate(lens.tolist()):
        for i in range(used[b]):
            page = order.pop()
            table[b, i] = page
            t0, t1 = i * page_size, min(n, (i + 1) * page_size)
            pages[page, :, : t1 - t0] = cache[b, :, t0:t1]
    return pages, table.to(cache.device)


def pad_tokens(cache: torch.Tensor, nmax: int) -> torch.Tensor:
    """``cache`` [B, Hkv, N, D] with zero tokens appended up to ``nmax``."""
    extra = nmax - cache.shape[2]
    return cache if extra == 0 else torch.cat(
        [cache, cache.new_zeros(*cache.shape[:2], extra, cache.shape[3])], dim=2)
