"""Context parallel ReAttention: one sequence's KV cache split across ranks (torch.distributed).

An 8B model at 4M tokens holds ~512 GB of KV cache, more than one GPU. Here every rank holds
one contiguous piece of each sequence's cache and the result equals single-device
:func:`reattention.reattention_attn` up to rounding, on NCCL (GPUs) or gloo (CPUs).

The split: contiguous, chunk-aligned token ranges
-------------------------------------------------
Rank r holds global tokens ``[starts[r], starts[r+1])`` (the last rank up to Nmax), and every
start after rank 0's is a chunk boundary ``sink + j * chunk`` (:class:`CPLayout`). So the
sink lives on rank 0, each middle chunk on exactly one rank, and the newest tokens (the local
window and the queries' own keys) on the last rank that holds any of the sequence; a local
window straddling two ranks is fine, since each rank attends to whatever part of
``[sink | selected chunks | local]`` lies in its range. Contiguous rather than round-robin
because:

- each shard is an ordinary ``[B, Hkv, n, D]`` cache with aligned chunks (sink 0 on ranks
  > 0), so the single-device ``select_chunks``/``chunk_reps`` kernels score it unchanged, and a
  decode step appends to one rank only;
- a rank's keys form one contiguous run of the gathered sequence, so their compact positions
  follow from the global selection by a count (how many selected chunks precede them);
- the cost that grows with the context is scoring N/chunk reps (N keys for ``rep="max"``),
  which any equal split balances; attention reads at most topk*chunk middle keys in all, so
  an uneven share of the selected chunks costs little.

One call, per rank (``q``, lengths and settings identical on every rank)
-----------------------------------------------------------------------
1. Local candidates. Query block beta may select the global chunks j < M_beta, its own
   middle (docs/design.md section 2.2), which grows with the block. The backend's
   ``select_chunks`` runs on the shard as a call of its own (sink 0 after rank 0, local 0),
   from the first block that owns a chunk here; its middle grows with the block too, and its
   per-sequence length is chosen so that every block's scored chunks are ones the block may
   select (:func:`_op_plan`). The valid chunks it does not reach (about ceil(Lq/chunk) per
   block at most) are added as candidates, every candidate's exact score is recomputed the
   way :func:`reattention.reference.chunk_scores_ref` does (cheap next to the scoring of
   the shard), and the rank keeps its top-k (higher score first, then lower chunk index).
2. One ``all_gather`` of R*topk (score, global chunk id) per (batch, kv head, query block);
   every rank sorts them by the same rule (docs/design.md section 2.5), so all ranks hold the
   same selection and it is the single-device one: a chunk of the global top-k is in its own
   rank's top-k under the same order.
3. Attention over the rank's part of each block's gathered sequence (the sink, the selected
   chunks, the block's own local window [mid_end_beta, P1]), in PyTorch (fp32 accumulate),
   with RoPE at positions from the GLOBAL selection; gives (out_r, lse_r) per rank. The
   ``gather_attention`` op cannot be reused here: a rank's keys start at a compact position
   that differs per (kv head, query block), and shifting positions instead would change the
   fp32 RoPE angles' rounding.
4. One ``all_gather`` of (out_r, lse_r); every rank merges them by lse in rank order.

Steps 1 and 3 are eager PyTorch, so their cost is mostly the number of ops: both run whole
groups of query blocks at once (as many as fit _GROUP_BYTES of temporaries; a decode step
is one group), and step 3 also every sequence whose key row has the same layout on this
rank. A block's key row has one width per sequence (its local slots are padded to the widest
local window the sequence has here, at most local + chunk - 1 + query_block keys whatever Lq
is), so a group computes what block-by-block code would, with the same GEMM row counts and
softmax lengths, as the rounding may depend on them (on the CPU the results are
bit-identical); a shorter last query block is its own group, and sequences of different
layouts are not padded to one.

Two collectives per call (none with one rank); the host reads ``cache_seqlens`` once (a sync
on GPUs), and sends per-sequence bookkeeping back in small non-blocking copies.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from . import ReAttentionConfig, ops, reference
from .layout import block_segments, query_blocks
from .rope import apply_rope, shared_inv_freq

__all__ = [
    "CPLayout",
    "chunk_reps_cp",
    "select_chunks_cp",
    "gather_attention_cp",
    "reattention_attn_cp",
]


@dataclasses.dataclass(frozen=True)
class CPLayout:
    """Which global tokens each rank holds: rank r has ``[starts[r], starts[r+1])``.

    Parameters
    ----------
    starts : first global token of each rank's shard; ``starts[0] == 0``, strictly increasing.
        For a call with ``sink`` and ``chunk`` every later start must be a chunk boundary
        ``sink + j * chunk`` (checked per call).
    nmax : global capacity (the Nmax of the unsharded cache); the last rank holds
        ``[starts[-1], nmax)``.

    Example
    -------
    >>> layout = CPLayout.split(1 << 20, 4, sink=64, chunk=64)
    >>> layout.bounds(1)
    (262144, 524288)
    """

    starts: tuple[int, ...]
    nmax: int

    def __post_init__(self):
        starts = tuple(self.starts)
        object.__setattr__(self, "starts", starts)
        ok = (len(starts) >= 1 and all(isinstance(s, int) for s in starts) and starts[0] == 0
              and all(a < b for a, b in zip(starts, starts[1:])))
        if not ok:
            raise ValueError(f"starts must be ints, starting at 0, strictly increasing; "
                             f"got {starts}")
        if not (isinstance(self.nmax, int) and self.nmax > starts[-1]):
            raise ValueError(f"nmax must be an int > starts[-1]={starts[-1]} (the last rank holds "
                             f"at least one token), got {self.nmax!r}")

    @classmethod
    def split(cls, nmax: int, world_size: int, *, sink: int, chunk: int) -> "CPLayout":
        """Split the middle chunks of a cache of ``nmax`` tokens evenly over ``world_size`` ranks.

        Rank 0 also holds the sink; the last rank also the tokens after the last whole chunk.
        """
        ops.check_params(sink=sink, chunk=chunk)
        n_chunks = max(0, nmax - sink) // chunk
        if not (isinstance(world_size, int) and 1 <= world_size <= max(1, n_chunks)):
            raise ValueError(f"world_size must be an int in [1, {max(1, n_chunks)}] (one whole "
                             f"chunk per rank at least), got {world_size!r}")
        starts = [0] + [sink + (r * n_chunks // world_size) * chunk for r in range(1, world_size)]
        return cls(tuple(starts), nmax)

    @property
    def world_size(self) -> int:
        return len(self.starts)

    def bounds(self, rank: int) -> tuple[int, int]:
        """Global token range ``(start, end)`` of ``rank``'s shard."""
        ends = self.starts[1:] + (self.nmax,)
        return self.starts[rank], ends[rank]

    def shard(self, t: torch.Tensor, rank: int) -> torch.Tensor:
        """``rank``'s slice (a view) of a full cache-like tensor ``[B, H, Nmax, ...]``."""
        start, end = self.bounds(rank)
        return t[:, :, start:end]

    def shard_seqlens(self, cache_seqlens: torch.Tensor, rank: int) -> torch.Tensor:
        """Valid tokens of each sequence inside ``rank``'s shard: int32 [B]."""
        start, end = self.bounds(rank)
        return (cache_seqlens - start).clamp(0, end - start).to(torch.int32)

    def shard_sink(self, rank: int, sink: int) -> int:
        """The sink as the shard sees it: chunks are aligned to it, so 0 after rank 0."""
        return sink if rank == 0 else 0

    def chunk_range(self, rank: int, sink: int, chunk: int) -> tuple[int, int]:
        """Global middle-chunk ids ``[lo, hi)`` whose tokens lie in ``rank``'s shard."""
        start, end = self.bounds(rank)
        lo = 0 if rank == 0 else (start - sink) // chunk
        return lo, max(0, end - sink) // chunk

    def check(self, sink: int, chunk: int) -> None:
        """Every start after rank 0's must be a chunk boundary at or after the sink."""
        bad = [s for s in self.starts[1:] if s < sink or (s - sink) % chunk]
        if bad:
            raise ValueError(f"layout starts {bad} are not chunk boundaries sink + j*chunk "
                             f"(sink={sink}, chunk={chunk}): rank 0 must hold the whole sink "
                             f"and every chunk must lie on one rank")


# --------------------------------------------------------------------------- plumbing
def _rank_world(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("this process is not a member of group")
        return rank, dist.get_world_size(group)
    if group is not None:
        raise ValueError("group given but torch.distributed is not initialized")
    return 0, 1


def _all_gather(t: torch.Tensor, group, world: int) -> list[torch.Tensor]:
    if world == 1:
        return [t]
    # A list all_gather: all_gather_into_tensor is deprecated on newer torch, and its
    # replacement is missing on the GPU box's 2.11.
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _to_device(rows, device) -> torch.Tensor:
    """Small int64 per-sequence bookkeeping built on the host, sent without a stream sync
    (a blocking host-to-device copy would wait for every kernel queued so far)."""
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


# Query blocks are processed in groups whose largest fp32 temporary stays under a budget
# (the logits in attention, the products of "bound" scoring), per device type. On a GPU,
# fewer groups mean fewer kernel launches: a decode step is one group; a 4096-query prefill
# over 32/8 heads at 1M tokens attends in seven groups of up to five blocks (~100 MB of
# logits per block) and rescores "bound" candidates block by block (~400 MB of products
# per block). On the CPU, temporaries over ~32 MB are fresh mmaps whose page faults cost
# more than the ops saved: a 512-query prefill took 1.8x longer with 512 MB groups.
_GROUP_BYTES = {"cpu": 24 << 20, "other": 512 << 20}


def _block_groups(lq: int, query_block: int, bytes_per_query: int,
                  device: torch.device) -> list[tuple[int, int, int]]:
    """Query blocks in groups ``(first block, end block, queries per block)``.

    Whole blocks are grouped up to the device's _GROUP_BYTES of temporaries
    (``bytes_per_query`` each, one block at least); a shorter last block is a group of its
    own, so that every matrix product has the shape it has block by block (a GEMM's rounding
    may depend on its row count).
    """
    budget = _GROUP_BYTES.get(device.type, _GROUP_BYTES["other"])
    full, rem = divmod(lq, query_block)
    step = max(1, budget // max(1, bytes_per_query * query_block))
    groups = [(s, min(full, s + step), query_block) for s in range(0, full, step)]
    return groups + [(full, full + 1, rem)] if rem else groups


def _query_rows(q: torch.Tensor, hkv: int, query_block: int, group: tuple[int, int, int]
                ) -> torch.Tensor:
    """The queries of one block group: [B, Hkv, n, G * nq, D], G = Hq / Hkv.

    Row (g, i) of block beta is its query i of q head h * G + g, the order
    reference.chunk_scores_ref uses.
    """
    b_, hq, _, d = q.shape
    s, e, nq = group
    rows = q[:, :, s * query_block: s * query_block + (e - s) * nq]
    rows = rows.unflatten(1, (hkv, hq // hkv)).unflatten(3, (e - s, nq))
    return rows.transpose(2, 3).reshape(b_, hkv, e - s, -1, d)


@dataclasses.dataclass(frozen=True)
class _Shard:
    """What one call knows about this rank's place, validated once per public call."""

    layout: CPLayout
    group: object
    rank: int
    world: int
    lens: list[int]  # GLOBAL valid tokens per sequence, on the host

    @property
    def start(self) -> int:
        return self.layout.bounds(self.rank)[0]


def _place(k_shard, layout: CPLayout, group, sink: int, chunk: int) -> tuple[int, int]:
    """Check the shard against the layout and the group; return (rank, world size)."""
    if not isinstance(layout, CPLayout):
        raise ValueError(f"layout must be a CPLayout, got {type(layout).__name__}")
    if not (isinstance(k_shard, torch.Tensor) and k_shard.dim() == 4):
        raise ValueError("k_shard must be a [B, Hkv, n_r, D] tensor")
    ops.check_params(sink=sink, chunk=chunk)
    rank, world = _rank_world(group)
    if layout.world_size != world:
        raise ValueError(f"layout has {layout.world_size} shards but the group has {world} ranks")
    layout.check(sink, chunk)
    start, end = layout.bounds(rank)
    if k_shard.shape[2] != end - start:
        raise ValueError(f"k_shard of rank {rank} must hold tokens [{start}, {end}) of the "
                         f"layout ({end - start}), got {k_shard.shape[2]}")
    return rank, world


def _global_seqlens(cache_seqlens, k_shard, layout: CPLayout, lq: int) -> torch.Tensor:
    """Validated GLOBAL lengths, int32 [B] on the shard's device (None: layout.nmax)."""
    # check_seqlens reads (B, Nmax, device) off a cache; a zero-size stand-in gives it the
    # global Nmax without allocating anything.
    stand_in = k_shard.new_empty((k_shard.shape[0], 0, layout.nmax, 0))
    return ops.check_seqlens(cache_seqlens, stand_in, lq)


def _shard(q, k_shard, v_shard, layout: CPLayout, cache_seqlens, group, sink: int,
           chunk: int) -> _Shard:
    """Validate q and the shard, and read the global lengths to the host (one sync)."""
    # A shard may be shorter than the queries, so check_cache's Nmax >= Lq test does not
    # apply; one query column checks everything else (ranks, dtypes, devices, heads).
    ops.check_cache(q[:, :, :1] if isinstance(q, torch.Tensor) and q.dim() == 4 else q,
                    k_shard, v_shard)
    rank, world = _place(k_shard, layout, group, sink, chunk)
    lens = _global_seqlens(cache_seqlens, k_shard, layout, q.shape[2]).tolist()
    return _Shard(layout, group, rank, world, [int(n) for n in lens])


# --------------------------------------------------------------------------- reps
def chunk_reps_cp(k_shard: torch.Tensor, layout: CPLayout,
                  cache_seqlens: torch.Tensor | None = None, *, sink: int, chunk: int, rep: str,
                  backend: str = "auto", reps: torch.Tensor | None = None,
                  start_chunk: int = 0, group=None) -> torch.Tensor:
    """Chunk representatives of this rank's shard (no communication).

    Parameters
    ----------
    k_shard : [B, Hkv, n_r, D] this rank's raw keys, tokens ``layout.bounds(rank)``.
    layout : the :class:`CPLayout` shared by all ranks.
    cache_seqlens : int32 [B] GLOBAL valid tokens per sequence, or None for ``layout.nmax``.
    rep : "bound" or "mean".
    reps, start_chunk : update an existing reps tensor in place from shard chunk
        ``start_chunk`` on (a decode step appending to the last rank), as in
        reattention.chunk_reps.

    Returns
    -------
    reps : "bound" [B, Hkv, n_c, 2, D] or "mean" [B, Hkv, n_c, D] for the shard's chunks in
        shard order (shard chunk i is global chunk ``layout.chunk_range(rank, ...)[0] + i``),
        ``n_c = (n_r - shard_sink) // chunk``.

    Example
    -------
    >>> reps = chunk_reps_cp(k_shard, layout, sink=64, chunk=64, rep="bound")
    """
    rank, _ = _place(k_shard, layout, group, sink, chunk)
    lens = _global_seqlens(cache_seqlens, k_shard, layout, 0)
    return ops.chunk_reps(k_shard, layout.shard_seqlens(lens, rank),
                          sink=layout.shard_sink(rank, sink), chunk=chunk, rep=rep,
                          backend=backend, reps=reps, start_chunk=start_chunk)


# --------------------------------------------------------------------------- selection
def _best_first(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Order along the last dim: higher score first, then lower id (the tie rule of
    docs/design.md section 2.5)."""
    by_id = ids.argsort(dim=-1, stable=True)
    by_score = scores.gather(-1, by_id).argsort(dim=-1, descending=True, stable=True)
    return by_id.gather(-1, by_score)


def _candidate_scores(q, k_shard, reps, cand, shard_sink, chunk, rep, query_block):
    """Exact scores of shard-local chunk ids ``cand`` [B, Hkv, n_blocks, K] (-1: none).

    reference.rep_scores over the candidates (chunk_scores_ref's arithmetic), for groups of
    query blocks at once; returns fp32 (fp64 for fp64 input) [B, Hkv, n_blocks, K], -inf
    where ``cand`` is -1.
    """
    b_, hkv, n_blocks, n_cand = cand.shape
    hq, d = q.shape[1], q.shape[-1]
    acc = reference._acc_dtype(q)
    ids = cand.clamp(min=0)
    if rep == "max":  # the candidates' token ids
        ids = (shard_sink + ids[..., None] * chunk
               + torch.arange(chunk, device=q.device)).flatten(-2)
    # Per query: its logits [K*C] ("max"), two products [K, D] ("bound").
    width = {"max": chunk, "bound": 2 * d, "mean": 1}[rep]
    per_query = b_ * hq * n_cand * width * torch.finfo(acc).bits // 8
    parts = []
    for group in _block_groups(q.shape[2], query_block, per_query, q.device):
        s, e, _ = group
        flat = ids[:, :, s:e].flatten(2)  # [B, Hkv, blocks * (K*C or K)]
        if rep == "max":
            cols = k_shard.gather(2, flat[..., None].expand(-1, -1, -1, d))
        elif rep == "bound":
            cols = reps.gather(2, flat[..., None, None].expand(-1, -1, -1, 2, d))
        else:
            cols = reps.gather(2, flat[..., None].expand(-1, -1, -1, d))
        cols = cols.unflatten(2, (e - s, -1)).to(acc)
        rows = _query_rows(q, hkv, query_block, group).to(acc)
        parts.append(reference.rep_scores(rows, cols, rep, chunk).amax(-2))
    scores = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
    return scores.masked_fill(cand < 0, -math.inf)


def _block_segments(sh: _Shard, lq: int, *, sink, local, chunk, query_block):
    """The query blocks [s, e) of the call and, per sequence, each block's global segments
    (docs/design.md section 2.2): ``(blocks, segs)`` with ``segs[b][beta]`` a Segments."""
    blocks = query_blocks(lq, query_block)
    return blocks, [[block_segments(n, lq, s, e, sink, local, chunk) for s, e in blocks]
                    for n in sh.lens]


def _op_plan(owned: list[list[int]], blocks: list[tuple[int, int]], cap: int, s0: int,
             chunk: int) -> tuple[int, list[int], list[list[int]]]:
    """How the shard's ``select_chunks`` op serves each sequence: (first, lengths, keep).

    ``owned[b][beta]``: block beta of sequence b may select the shard chunks [0, owned) (the
    chunks of its middle held here). The op runs on the call's blocks ``first...``, from the
    first block that owns a chunk in any sequence (queries from ``blocks[first][0]`` on, Lq'
    of them), with sink ``s0``, local 0 and length L_b; as a call of its own it scores, for
    the block at offset s' of its queries, the shard chunks [0, m) with
    ``m = max(0, L_b - Lq' + s' - s0) // chunk`` (layout.block_segments), so m grows with the
    block as the block's global middle does. L_b is the largest length in [Lq', cap] with
    m <= owned for every block that owns a chunk here: then the op's top-k of such a block is
    taken over chunks it may select only, and holds every chunk of the block's top-k that it
    scored. A block where even L_b = Lq' scores too much (a chunk it may not select could push
    one out) trusts none of the op's picks.

    Returns ``first`` (``len(blocks)`` when the op is not run: nothing is owned here, or the
    shard holds fewer than Lq' tokens), the lengths L_b, and per (b, beta) ``keep``: the op's
    picks below it are kept, the chunks [keep, owned) are added by hand.
    """
    n_blocks = len(blocks)
    first = min(next((beta for beta, o in enumerate(row) if o), n_blocks) for row in owned)
    lq_op = blocks[-1][1] - blocks[min(first, n_blocks - 1)][0]
    if first == n_blocks or cap < lq_op:
        return n_blocks, [0] * len(owned), [[0] * n_blocks for _ in owned]
    off = blocks[first][0]
    lengths, keeps = [], []
    for row in owned:
        # m <= o  <=>  L - Lq' + s' - s0 < (o + 1) * chunk  (for o >= 0)
        most = min(((o + 1) * chunk - 1 + lq_op - (s - off) + s0
                    for o, (s, _) in zip(row[first:], blocks[first:]) if o), default=lq_op)
        length = min(cap, max(lq_op, most))
        keep = [0] * first
        for o, (s, e) in zip(row[first:], blocks[first:]):
            m = block_segments(length, lq_op, s - off, e - off, s0, 0, chunk).n_mid
            keep.append(m if m <= o else 0)
        lengths.append(length)
        keeps.append(keep)
    return first, lengths, keeps


def _local_topk(q, k_shard, reps, sh: _Shard, blocks, segs, *, sink, chunk, topk,
                query_block, rep, backend):
    """This rank's top-k middle chunks: (scores [B,Hkv,nb,topk], global ids int64, -1 pad),
    best first (higher score, then lower id).

    Block beta of sequence b may select the global chunks j < M_beta, here the shard chunks
    [0, owned) (shard chunk i is global chunk lo + i). The candidates of a block are the op's
    picks among the chunks it scored (see _op_plan) and the rest of [0, owned) added by hand;
    every candidate is rescored exactly, the way chunk_scores_ref scores it.
    """
    b_, hkv, cap = q.shape[0], k_shard.shape[1], k_shard.shape[2]
    n_blocks = len(blocks)
    lo, hi = sh.layout.chunk_range(sh.rank, sink, chunk)
    s0 = sh.layout.shard_sink(sh.rank, sink)
    owned = [[max(0, min(hi, seg.n_mid) - lo) for seg in row] for row in segs]
    first, lengths, keeps = _op_plan(owned, blocks, cap, s0, chunk)
    width = max(o - k for keep, row in zip(keeps, owned) for o, k in zip(row, keep))
    # One transfer per call: the op's lengths, then keep and owned per block.
    meta = _to_device([[n] + keep + row for n, keep, row in zip(lengths, keeps, owned)],
                      q.device)
    keep, own = meta[:, 1:1 + n_blocks], meta[:, 1 + n_blocks:]  # [B, nb]
    picked = torch.full((b_, hkv, n_blocks, topk), -1, dtype=torch.int64, device=q.device)
    if first < n_blocks:
        # The lengths lie in [Lq', cap] by the choice of L: no device read.
        picked[:, :, first:] = ops.unchecked.select_chunks(
            q[:, :, first * query_block:].contiguous(), k_shard.contiguous(),
            meta[:, 0].to(torch.int32), None if reps is None else reps.contiguous(), sink=s0,
            local=0, chunk=chunk, topk=topk, query_block=query_block, rep=rep,
            backend=ops.resolve_backend(backend, q))
        picked.masked_fill_(picked >= keep[:, None, :, None], -1)
    added = keep[..., None] + torch.arange(width, device=q.device)  # [B, nb, width]
    added = added.masked_fill(added >= own[..., None], -1)
    cand = torch.cat([picked, added[:, None].expand(-1, hkv, -1, -1)], -1)
    scores = _candidate_scores(q, k_shard, reps, cand, s0, chunk, rep, query_block)
    order = _best_first(scores, cand)[..., :topk]
    ids = cand.gather(-1, order)
    if lo:
        ids = torch.where(ids >= 0, ids + lo, ids)
    return scores.gather(-1, order), ids


def select_chunks_cp(q: torch.Tensor, k_shard: torch.Tensor, layout: CPLayout,
                     cache_seqlens: torch.Tensor | None = None, *,
                     reps: torch.Tensor | None = None, sink: int, local: int, chunk: int,
                     topk: int, query_block: int, rep: str, backend: str = "auto",
                     group=None) -> torch.Tensor:
    """Top-k middle chunks over the whole sharded cache: the single-device selection.

    Parameters
    ----------
    q : [B, Hq, Lq, D] raw queries of the last Lq tokens, the same on every rank.
    k_shard : [B, Hkv, n_r, D] this rank's raw keys (tokens ``layout.bounds(rank)``).
    layout : the :class:`CPLayout` shared by all ranks.
    cache_seqlens : int32 [B] GLOBAL valid tokens per sequence (each in [Lq, layout.nmax]),
        the same on every rank; None means ``layout.nmax``.
    reps : this rank's reps for "bound"/"mean" (:func:`chunk_reps_cp`), computed when None.
    backend : runs ``select_chunks``/``chunk_reps`` on the shard; see reattention.ops.

    Returns
    -------
    idx : int32 [B, Hkv, ceil(Lq / query_block), topk] GLOBAL chunk ids, ascending, -1
        padded, identical on every rank.

    Example
    -------
    >>> idx = select_chunks_cp(q, k_shard, layout, sink=64, local=4096, chunk=64, topk=32,
    ...                        query_block=128, rep="max")
    """
    sh = _shard(q, k_shard, None, layout, cache_seqlens, group, sink, chunk)
    return _select(q, k_shard, reps, sh, sink=sink, local=local, chunk=chunk, topk=topk,
                   query_block=query_block, rep=rep, backend=backend)


def _select(q, k_shard, reps, sh: _Shard, *, sink, local, chunk, topk, query_block, rep,
            backend) -> torch.Tensor:
    ops.check_params(sink=sink, local=local, chunk=chunk, topk=topk, query_block=query_block)
    if rep not in ops.REP_MODES:
        raise ValueError(f"rep must be one of {ops.REP_MODES}, got {rep!r}")
    s0 = sh.layout.shard_sink(sh.rank, sink)
    if rep == "max":
        ops.check_reps(reps, k_shard, lq=0, sink=s0, local=0, chunk=chunk, rep=rep)
    elif reps is None:
        # shard_seqlens clamps the lengths to [0, n_r]: no device read.
        reps = ops.unchecked.chunk_reps(
            k_shard.contiguous(), sh.layout.shard_seqlens(_to_device(sh.lens, q.device), sh.rank),
            sink=s0, chunk=chunk, rep=rep, backend=ops.resolve_backend(backend, k_shard))
    else:
        # lq=0, local=0: the candidates may reach the shard's last whole chunk.
        ops.check_reps(reps, k_shard, lq=0, sink=s0, local=0, chunk=chunk, rep=rep)
    blocks, segs = _block_segments(sh, q.shape[2], sink=sink, local=local, chunk=chunk,
                                   query_block=query_block)
    scores, best = _local_topk(q, k_shard, reps, sh, blocks, segs, sink=sink, chunk=chunk,
                               topk=topk, query_block=query_block, rep=rep, backend=backend)
    if sh.world > 1:  # one rank's top-k is already in merge order
        # One collective: ids travel bit-cast inside the score tensor.
        bits = torch.int64 if scores.dtype == torch.float64 else torch.int32
        parts = _all_gather(torch.stack([scores, best.to(bits).view(scores.dtype)]), sh.group,
                            sh.world)
        all_scores = torch.cat([p[0] for p in parts], -1)
        all_ids = torch.cat([p[1].view(bits) for p in parts], -1).long()
        best = all_ids.gather(-1, _best_first(all_scores, all_ids)[..., :topk])
    k_eff = [[min(topk, seg.n_mid) for seg in row] for row in segs]
    if min(map(min, k_eff)) == topk:
        return best.sort(dim=-1).values.to(torch.int32)
    # Blocks with fewer than topk middle chunks keep their K_eff best; the rest is -1.
    pad = torch.iinfo(torch.int64).max
    drop = (_to_device(k_eff, q.device)[:, None, :, None]
            <= torch.arange(topk, device=q.device))
    idx = best.masked_fill(drop, pad).sort(dim=-1).values
    return idx.masked_fill_(idx == pad, -1).to(torch.int32)


# --------------------------------------------------------------------------- attention
def _attend_shard(q, k_shard, v_shard, idx, sh: _Shard, *, inv_freq, sink, local, chunk,
                  query_block, scale, rope_scale, rope_style, positions):
    """This rank's part of the attention: (out [B,Hq,Lq,D], lse [B,Hq,Lq]) in fp32/fp64.

    Keys of block beta's gathered sequence held here (docs/design.md section 2.6): the sink
    (rank 0), the selected chunks in ``[lo, hi)``, and the tokens of the block's own local
    window ``[mid_end_beta, P1]`` in the shard. Positions are the global ones. Queries that see
    no key here get lse -inf and out 0.

    Each query block's key row is [sink here | topk*chunk slots | width local slots]; a slot of
    a chunk held elsewhere (or of -1 padding) is masked, and local slot i holds the block's
    local token ``loc0 + i`` (``loc0 = max(shard start, mid_end_beta)``), masked from the
    block's count of local tokens here on. ``width``, the most local tokens any block of the
    sequence has here, is at most local + chunk - 1 + query_block whatever Lq is. Sequences
    with the same row layout (sink here, width) run together, over groups of query blocks:
    every block's softmax then reduces over the same keys as block by block, in the same order.
    """
    b_, hq, lq, d = q.shape
    hkv, cap = k_shard.shape[1], k_shard.shape[2]
    g = hq // hkv
    topk = idx.shape[-1]
    acc = reference._acc_dtype(q)
    dev = q.device
    start = sh.start
    lo, hi = sh.layout.chunk_range(sh.rank, sink, chunk)
    blocks, segs = _block_segments(sh, lq, sink=sink, local=local, chunk=chunk,
                                   query_block=query_block)
    n_blocks = len(blocks)
    out = torch.empty(b_, hkv, g, lq, d, dtype=acc, device=dev)
    lse = torch.empty(b_, hkv, g, lq, dtype=acc, device=dev)
    # Per sequence: its first query, then per block its mid_end, its first local token here
    # and its number of local tokens here.
    layouts = {}
    for b, (n, row) in enumerate(zip(sh.lens, segs)):
        end = min(start + cap, n)  # this shard's valid tokens: [start, end)
        p0 = n - lq
        loc0 = [max(start, seg.mid_end) for seg in row]
        n_loc = [max(0, min(end, p0 + e) - first) for first, (_, e) in zip(loc0, blocks)]
        layouts.setdefault((max(0, min(sink, end) - start), max(n_loc)), []).append(
            [b, p0] + [seg.mid_end for seg in row] + loc0 + n_loc)
    offs = torch.arange(sink, sink + chunk, device=dev)
    heads = torch.arange(hkv, device=dev)[:, None, None]
    never = torch.iinfo(torch.int64).max  # the "original position" of a key not held here
    for (n_sink, width), seqs in layouts.items():
        meta = _to_device(seqs, dev)
        p0 = meta[:, 1].view(-1, 1, 1, 1)  # [Bs, 1, 1, 1]
        # [Bs, 1, nb, 1] each
        mid_end, loc0, n_loc = meta[:, 2:].view(-1, 3, 1, n_blocks, 1).unbind(1)
        bs = meta[:, 0].view(-1, 1, 1, 1)
        whole = len(seqs) == b_  # else: index_select/index_put on these sequences
        q_seq = q if whole else q.index_select(0, meta[:, 0])
        idx_seq = idx if whole else idx.index_select(0, meta[:, 0])
        n_keys = n_sink + topk * chunk + width
        per_query = len(seqs) * hq * n_keys * torch.finfo(acc).bits // 8  # its logits
        for s, e, nq in _block_groups(lq, query_block, per_query, dev):
            sel = idx_seq[:, :, s:e].long()  # [Bs, Hkv, nbg, topk], ascending, -1 padded
            nbg = e - s
            lead = sel.shape[:3]
            n_sel = (sel >= 0).sum(-1, keepdim=True) * chunk  # [Bs, Hkv, nbg, 1]
            # Compact position of a local key or query at P: P - shift.
            shift = mid_end[:, :, s:e] - sink - n_sel  # [Bs, Hkv, nbg, 1]
            ctok = sel.clamp(min=0)[..., None] * chunk + offs  # [Bs, Hkv, nbg, topk, C]
            away = ((sel < lo) | (sel >= hi))[..., None]
            tok = [ctok.flatten(-2)]  # global token ids, for the gather
            seen = [ctok.masked_fill(away, never).flatten(-2)]  # and for the causal mask
            # Slot i of the selection sits right after the sink whatever rank holds it (a
            # block with a selection has the whole sink).
            kpos = [torch.arange(sink, sink + topk * chunk, device=dev).expand(*lead, -1)]
            if n_sink:
                sink_tok = torch.arange(start, start + n_sink, device=dev).expand(*lead, -1)
                for part in (tok, seen, kpos):
                    part.insert(0, sink_tok)
            if width:
                ar = torch.arange(width, device=dev)
                loc_tok = (loc0[:, :, s:e] + ar).expand(*lead, -1)
                tok.append(loc_tok)
                seen.append(loc_tok.masked_fill(ar >= n_loc[:, :, s:e], never))
                kpos.append(loc_tok - shift)
            tok, seen, kpos = (torch.cat(part, -1) for part in (tok, seen, kpos))
            q_off = torch.arange(s * query_block, s * query_block + nbg * nq,
                                 device=dev).view(nbg, nq)
            q_orig = p0 + q_off  # [Bs, 1, nbg, nq]
            if positions == "compact":
                qpos = q_orig - shift  # [Bs, Hkv, nbg, nq]
            else:
                kpos, qpos = tok, q_orig
            qpos = qpos[..., None, :].expand(-1, hkv, -1, g, -1).flatten(3)  # rows (g, i)
            gi = (tok - start if start else tok).clamp(0, cap - 1)  # [Bs, Hkv, nbg, L]
            k, v = k_shard[bs, heads, gi], v_shard[bs, heads, gi]  # [Bs, Hkv, nbg, L, D]
            rows = _query_rows(q_seq, hkv, query_block, (s, e, nq))  # [Bs,Hkv,nbg,G*nq,D]
            # One RoPE call for the keys and queries of the group.
            x = torch.cat([k, rows], 3).to(acc)
            x = apply_rope(x.flatten(0, 3), torch.cat([kpos, qpos], -1).flatten(), inv_freq,
                           rope_scale, rope_style).view_as(x)
            k, rows = x[..., :n_keys, :], x[..., n_keys:, :]
            # [Bs*Hkv*nbg, G*nq, L]: bmm is what matmul runs on these shapes, minus reshapes
            logits = torch.bmm(rows.flatten(0, 2), k.flatten(0, 2).transpose(1, 2)).mul_(scale)
            unseen = seen[:, :, :, None, None, :] > q_orig[..., None, :, None]
            logits.view(*lead, g, nq, -1).masked_fill_(unseen, -math.inf)
            lse_blk = torch.logsumexp(logits, dim=-1)  # [Bs*Hkv*nbg, G*nq]
            prob = logits.sub_(lse_blk[..., None]).exp_().nan_to_num_(0.0)
            o = torch.bmm(prob, v.to(acc).flatten(0, 2))
            o = o.view(*lead, g, nq, d).transpose(2, 3)  # [Bs, Hkv, G, nbg, nq, D]
            cols = slice(s * query_block, s * query_block + nbg * nq)
            for dst, src in ((out[:, :, :, cols].unflatten(3, (nbg, nq)), o),
                             (lse[:, :, :, cols].unflatten(3, (nbg, nq)),
                              lse_blk.view(*lead, g, nq).transpose(2, 3))):
                if whole:
                    dst.copy_(src)
                else:
                    dst[meta[:, 0]] = src
    return out.flatten(1, 2), lse.flatten(1, 2)


def gather_attention_cp(q: torch.Tensor, k_shard: torch.Tensor, v_shard: torch.Tensor,
                        idx: torch.Tensor, layout: CPLayout,
                        cache_seqlens: torch.Tensor | None = None, *, inv_freq: torch.Tensor,
                        sink: int, local: int, chunk: int, query_block: int,
                        scale: float | None = None, rope_scale: float = 1.0,
                        rope_style: str = "half", positions: str = "compact",
                        group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over [sink | chunks in ``idx`` | local] of the sharded cache, merged by lse.

    Parameters
    ----------
    q : [B, Hq, Lq, D] raw queries, the same on every rank.
    k_shard, v_shard : [B, Hkv, n_r, D] this rank's raw keys and values.
    idx : int32 [B, Hkv, n_blocks, topk] GLOBAL chunk ids (:func:`select_chunks_cp`).
    layout, cache_seqlens : as in :func:`select_chunks_cp`.
    inv_freq, scale, rope_scale, rope_style, positions : as in reattention.gather_attention.

    Returns
    -------
    out : [B, Hq, Lq, D] in q's dtype; lse : [B, Hq, Lq] float32; identical on every rank.

    Example
    -------
    >>> out, lse = gather_attention_cp(q, k_shard, v_shard, idx, layout,
    ...                                inv_freq=default_inv_freq(128), sink=64, local=4096,
    ...                                chunk=64, query_block=128)
    """
    sh = _shard(q, k_shard, v_shard, layout, cache_seqlens, group, sink, chunk)
    ops.check_params(sink=sink, local=local, chunk=chunk, query_block=query_block)
    inv_freq, scale = ops.check_attention_args(q, inv_freq, scale, rope_scale, rope_style,
                                               positions)
    ops.check_idx(idx, q, k_shard, query_block)
    return _gather(q, k_shard, v_shard, idx, sh, inv_freq=inv_freq, sink=sink, local=local,
                   chunk=chunk, query_block=query_block, scale=scale,
                   rope_scale=float(rope_scale), rope_style=rope_style, positions=positions)


def _gather(q, k_shard, v_shard, idx, sh: _Shard, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part, then one all_gather and the same lse merge on every rank."""
    out, lse = _attend_shard(q, k_shard, v_shard, idx, sh, **kw)
    if sh.world > 1:  # one rank's lse is finite (each query sees itself): nothing to merge
        d = q.shape[-1]
        parts = torch.stack(_all_gather(torch.cat([out, lse[..., None]], -1), sh.group,
                                        sh.world))
        lse_r = parts[..., d]  # [R, B, Hq, Lq]
        lse = torch.logsumexp(lse_r, dim=0)
        out = (torch.exp(lse_r - lse)[..., None] * parts[..., :d]).sum(0)
    return out.to(q.dtype), lse.to(torch.float32)


def reattention_attn_cp(q: torch.Tensor, k_shard: torch.Tensor, v_shard: torch.Tensor,
                        layout: CPLayout, cache_seqlens: torch.Tensor | None = None, *,
                        sink: int = 64, local: int = 4096, chunk: int = 64, topk: int = 32,
                        query_block: int = 128, rep: str = "max",
                        reps: torch.Tensor | None = None, inv_freq: torch.Tensor | None = None,
                        rope_theta: float = 10000.0, rope_scale: float = 1.0,
                        rope_style: str = "half", positions: str = "compact",
                        scale: float | None = None, backend: str = "auto",
                        return_lse: bool = False, config: ReAttentionConfig | None = None,
                        group=None):
    """:func:`reattention.reattention_attn` over a cache sharded across the ranks of ``group``.

    Every rank of ``group`` calls it with the same ``q``, ``cache_seqlens`` and settings and
    its own shard; every rank gets the same result, equal to the single-device call on the
    full cache up to rounding (the selection is the same).

    Parameters
    ----------
    q : [B, Hq, Lq, D] raw queries of the last Lq tokens of each sequence.
    k_shard, v_shard : [B, Hkv, n_r, D] this rank's raw keys and values: global tokens
        ``layout.bounds(rank)`` of the [B, Hkv, Nmax, D] cache (``layout.shard(k, rank)``).
    layout : :class:`CPLayout`, e.g. ``CPLayout.split(Nmax, world_size, sink=..., chunk=...)``.
    cache_seqlens : int32 [B] GLOBAL valid tokens per sequence, or None for ``layout.nmax``.
    reps : this rank's reps for "bound"/"mean" (:func:`chunk_reps_cp`), computed when None.
    backend : backend of the shard's selection ops ("auto", "cuda", "triton", "cpu",
        "reference"); the attention part runs in PyTorch.
    group : the process group holding the shards (default: the whole world). Without an
        initialized torch.distributed the call runs as one rank.
    Other keywords : as in :func:`reattention.reattention_attn`.

    Returns
    -------
    out : [B, Hq, Lq, D] in q's dtype, or (out, lse [B, Hq, Lq] float32) with ``return_lse``.

    Example
    -------
    >>> layout = CPLayout.split(k.shape[2], dist.get_world_size(), sink=64, chunk=64)
    >>> r = dist.get_rank()
    >>> out = reattention_attn_cp(q, layout.shard(k, r), layout.shard(v, r), layout)
    """
    cfg = ReAttentionConfig.resolve(config, dict(sink=sink, local=local, chunk=chunk, topk=topk,
                                       query_block=query_block, rep=rep, positions=positions))
    # Validate everything before the selection kernels run.
    sh = _shard(q, k_shard, v_shard, layout, cache_seqlens, group, cfg["sink"], cfg["chunk"])
    if inv_freq is None:
        inv_freq = shared_inv_freq(q.shape[-1], rope_theta, q.device)
    inv_freq, scale = ops.check_attention_args(q, inv_freq, scale, rope_scale, rope_style,
                                               cfg["positions"])
    seg = dict(sink=cfg["sink"], local=cfg["local"], chunk=cfg["chunk"],
               query_block=cfg["query_block"])
    idx = _select(q, k_shard, reps, sh, topk=cfg["topk"], rep=cfg["rep"], backend=backend,
                  **seg)
    out, lse = _gather(q, k_shard, v_shard, idx, sh, inv_freq=inv_freq, scale=scale,
                       rope_scale=float(rope_scale), rope_style=rope_style,
                       positions=cfg["positions"], **seg)
    return (out, lse) if return_lse else out
