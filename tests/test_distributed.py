"""Context parallel (reattention.distributed) against single-process reattention_attn.

One spawn of 3 gloo processes runs every multi-rank case (3-rank cases on the world group,
2-rank cases on a subgroup of ranks 0 and 1, which also exercises ``group=``) and the CPU
smoke run of bench/bench_cp.py; each case's test then asserts on what the ranks recorded:
the same selection as one process, outputs to fp32 rounding (for bf16, the tolerance rule of
docs/design.md section 2.10), and identical results on every rank.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import math
import os
import sys
import traceback
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import reattention
from reattention.distributed import (CPLayout, chunk_reps_cp, gather_attention_cp,
                                     reattention_attn_cp, select_chunks_cp)
from reattention import distributed, ops
from reattention.testing import (NOISE, Case, assert_close_rule, assert_selection_equivalent,
                                 lowp_attention, make_inputs)

from conftest import require

WORLD = 3
BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bench",
                     "bench_cp.py")


@dataclasses.dataclass(frozen=True)
class CPCase:
    case: Case
    rep: str
    world: int
    starts: tuple[int, ...] | None = None  # None: CPLayout.split
    backend: str = "reference"
    dtype: torch.dtype = torch.float32
    rope: tuple[str, str, float] = ("half", "compact", 1.0)  # style, positions, rope_scale
    group_bytes: int | None = None  # distributed._GROUP_BYTES on every device (None: default)

    @property
    def id(self) -> str:
        lay = "split" if self.starts is None else "at" + "_".join(map(str, self.starts[1:]))
        style, positions, rope_scale = self.rope
        grp = "" if self.group_bytes is None else f"-G{self.group_bytes}"
        return (f"R{self.world or 'all'}-{self.rep}-{self.case.id}-{lay}-{self.backend}-"
                f"{str(self.dtype)[6:]}-{style}-{positions}-s{rope_scale}{grp}")


#              b  hq hkv  lq  nmax   d  sink local chunk topk qb
DECODE = Case(1, 8, 2, 1, 700, 64, 8, 64, 16, 4, 1)
VARLEN = Case(2, 4, 4, 1, 700, 32, 8, 64, 16, 5, 1, lens=(700, 300))
PREFILL = Case(1, 8, 2, 40, 700, 64, 8, 64, 16, 4, 16)
GQA7 = Case(1, 7, 1, 1, 523, 128, 4, 40, 8, 8, 1)
ODD = Case(2, 4, 1, 63, 650, 32, 0, 32, 16, 3, 16, lens=(650, 400))
DENSE = Case(1, 4, 2, 9, 200, 32, 8, 64, 16, 16, 4)  # M <= topk: dense attention
# Three lengths: on 3 ranks the 120-token sequence lies on rank 0 only and the 500-token one
# on ranks 0 and 1, so each rank runs sequences of different key layouts separately;
# 37 queries are 4 whole blocks of 8 and one of 5.
VAR3 = Case(3, 6, 2, 37, 900, 32, 8, 64, 16, 4, 8, lens=(900, 500, 120))
# Lq far above local: every query block has its own middle and local window, and late blocks
# may select chunks the call itself wrote. 300 queries are 4 blocks of 64 and one of 44, or
# 8 blocks of 37 and one of 4; the 333-token sequence's first block has no middle at all.
LONG64 = Case(2, 6, 2, 300, 700, 32, 4, 24, 8, 3, 64, lens=(700, 333))
LONG37 = Case(2, 6, 2, 300, 700, 32, 4, 24, 8, 3, 37, lens=(700, 333))
LONG_GQA7 = Case(1, 7, 1, 300, 611, 64, 4, 24, 8, 3, 37)

CP_CASES = [
    CPCase(DECODE, "max", 2),
    CPCase(DECODE, "bound", 3),
    CPCase(VARLEN, "bound", 3),  # the short sequence ends on rank 1; rank 2 holds none of it
    CPCase(PREFILL, "max", 2),
    CPCase(PREFILL, "bound", 3),
    # Rank 1 holds two middle chunks and the local window's first tokens: 48 tokens, too few
    # for the selection op to score a chunk beside 40 query slots; the window straddles
    # ranks 1 and 2.
    CPCase(PREFILL, "max", 3, starts=(0, 552, 600)),
    CPCase(PREFILL, "mean", 3, starts=(0, 552, 600)),
    # Rank 1 holds one middle chunk, fewer tokens than the queries.
    CPCase(PREFILL, "bound", 3, starts=(0, 568, 584)),
    CPCase(GQA7, "mean", 3),
    CPCase(ODD, "max", 3, rope=("interleaved", "original", 1.0)),
    CPCase(ODD, "bound", 2, rope=("half", "compact", 1.25)),
    CPCase(DENSE, "max", 2),
    CPCase(VAR3, "bound", 3),
    CPCase(VAR3, "max", 3, rope=("interleaved", "original", 1.0)),
    # A budget of one block per group: the whole blocks run in four groups, not one.
    CPCase(VAR3, "mean", 2, group_bytes=1),
    CPCase(LONG64, "max", 3),
    CPCase(LONG64, "bound", 2, rope=("interleaved", "original", 1.0)),
    # Rank 1 holds [300, 500): the call's queries start at 400 (and at 33 in the short
    # sequence), so its first blocks own no chunk there and later ones own more and more.
    CPCase(LONG64, "mean", 3, starts=(0, 300, 500)),
    CPCase(LONG37, "max", 3, starts=(0, 300, 500), rope=("half", "original", 1.0)),
    CPCase(LONG37, "bound", 3),
    # Rank 1 holds 56 tokens, fewer than the 300 queries: its chunks are all added by hand.
    CPCase(LONG37, "mean", 3, starts=(0, 452, 508)),
    CPCase(LONG37, "max", 2, group_bytes=1),
    CPCase(LONG_GQA7, "bound", 3, rope=("half", "compact", 1.25)),
    CPCase(LONG_GQA7, "mean", 2, starts=(0, 396)),
    CPCase(DECODE, "max", 3, dtype=torch.bfloat16),
    CPCase(PREFILL, "bound", 2, dtype=torch.bfloat16),
    CPCase(DECODE, "bound", 3, backend="cpu"),
    CPCase(PREFILL, "max", 2, backend="cpu"),
    CPCase(ODD, "mean", 3, backend="cpu"),
    CPCase(LONG64, "bound", 3, backend="cpu"),
    CPCase(LONG37, "max", 3, starts=(0, 300, 500), backend="cpu"),
    CPCase(LONG_GQA7, "mean", 2, backend="cpu", rope=("interleaved", "original", 1.0)),
]
BENCH_ARGS = ["--tiny", "--iters", "2", "--warmup", "1", "--reps", "bound"]


# GPU (gpu marker): NCCL over every visible GPU, kernel backends; "world" is set at run time
# (one rank on a one-GPU machine, where NCCL still carries the result comparisons).
GPU_CASES = [
    CPCase(DECODE, "bound", 0, backend="cuda", dtype=torch.bfloat16),
    CPCase(PREFILL, "max", 0, backend="cuda", dtype=torch.bfloat16),
    CPCase(PREFILL, "mean", 0, backend="triton", dtype=torch.bfloat16),
    CPCase(DECODE, "max", 0, backend="triton", dtype=torch.float16),
    CPCase(LONG_GQA7, "bound", 0, backend="cuda", dtype=torch.bfloat16),
    CPCase(LONG_GQA7, "max", 0, backend="triton", dtype=torch.bfloat16),
]


def _run_case(c: CPCase, rank: int, group, device) -> dict:
    case = c.case
    style, positions, rope_scale = c.rope
    q, k, v, lens, inv_freq = make_inputs(case, c.dtype, device)
    kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, topk=case.topk,
              query_block=case.query_block, rep=c.rep)
    att = dict(inv_freq=inv_freq, rope_style=style, positions=positions, rope_scale=rope_scale)
    layout = (CPLayout.split(case.nmax, c.world, sink=case.sink, chunk=case.chunk)
              if c.starts is None else CPLayout(c.starts, case.nmax))
    ks, vs = layout.shard(k, rank), layout.shard(v, rank)
    budget = {"other": c.group_bytes} if c.group_bytes else distributed._GROUP_BYTES
    with mock.patch.object(distributed, "_GROUP_BYTES", budget):
        idx = select_chunks_cp(q, ks, layout, lens, backend=c.backend, group=group, **kw)
        out, lse = reattention_attn_cp(q, ks, vs, layout, lens, backend=c.backend,
                                       return_lse=True, group=group, **kw, **att)
    ref_idx = reattention.select_chunks(q, k, lens, backend=c.backend, **kw)
    ref, ref_lse = reattention.reattention_attn(q, k, v, lens, backend=c.backend,
                                                return_lse=True, **kw, **att)
    res = dict(idx_equal=torch.equal(idx, ref_idx),
               out_err=(out.double() - ref.double()).abs().max().item(),
               lse_err=(lse.double() - ref_lse.double()).abs().max().item())
    # A kernel backend scores in its own arithmetic; the CP merge re-scores candidates as the
    # reference does, so they may differ at near-ties only (docs/design.md section 2.10).
    scores = reattention.reference.chunk_scores_ref(
        q.cpu(), k.cpu(), None if c.rep == "max" else reattention.chunk_reps(
            k.cpu(), None if lens is None else lens.cpu(), sink=case.sink, chunk=case.chunk,
            rep=c.rep, backend="reference"),
        None if lens is None else lens.cpu(), case.sink, case.local, case.chunk, c.rep,
        case.query_block)
    try:
        assert_selection_equivalent(idx, ref_idx, scores)
        res["near_tie"] = "ok"
    except AssertionError as e:
        res["near_tie"] = str(e)
    # The same selection and merge on every rank: gather both and compare bit for bit.
    mine = torch.cat([out.float().flatten(), lse.flatten(), idx.float().flatten()])
    parts = [torch.empty_like(mine) for _ in range(c.world)]
    dist.all_gather(parts, mine, group=group)
    res["ranks_identical"] = all(torch.equal(p, parts[0]) for p in parts)
    if c.dtype != torch.float32:
        # The tolerance rule (docs/design.md section 2.10) against the fp32 reference on the
        # same selection.
        scale = 1 / math.sqrt(case.d)
        f32, _ = reattention.reference.gather_attention_ref(
            q.float(), k.float(), v.float(), lens, idx, inv_freq, case.sink, case.local,
            case.chunk, case.query_block, scale, rope_scale, style, positions)
        low, _ = lowp_attention(q, k, v, lens, idx, inv_freq, case, scale,
                                rope_scale=rope_scale, rope_style=style, positions=positions)
        try:
            assert_close_rule(out, f32, low, c.dtype, "cp out")
            res["rule"] = "ok"
        except AssertionError as e:
            res["rule"] = str(e)
    return res


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_cp", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _usable(c: CPCase, device) -> bool:
    like = torch.empty(1, 1, 1, c.case.d, dtype=c.dtype, device=device)
    return ops._kernel_refusal(c.backend, like) is None


def _worker(rank: int, world: int, init: str, out_dir: str, on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)  # 3 processes share the CI machine's 2 cores
        device = torch.device("cpu")
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=init, rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    pair = dist.new_group([0, 1]) if world > 2 else None
    results = {}
    for c in GPU_CASES if on_gpu else CP_CASES:
        key = c.id
        if on_gpu:
            c = dataclasses.replace(c, world=world)
        if rank >= c.world or not _usable(c, device):
            continue
        try:
            results[key] = _run_case(c, rank, pair if c.world < world else None, device)
        except Exception:  # recorded and asserted by the case's test
            results[key] = dict(error=traceback.format_exc())
    if not on_gpu:
        try:
            _load_bench().main(BENCH_ARGS + ["--out", os.path.join(out_dir, "bench.json")])
        except Exception:
            results["bench"] = dict(error=traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(tmp_path_factory, world: int, on_gpu: bool) -> tuple[list[dict], dict | None]:
    d = tmp_path_factory.mktemp("gpu" if on_gpu else "cp")
    mp.spawn(_worker, args=(world, f"file://{d / 'rendezvous'}", str(d), on_gpu), nprocs=world,
             join=True)
    ranks = [json.loads((d / f"rank{r}.json").read_text()) for r in range(world)]
    bench = d / "bench.json"
    return ranks, json.loads(bench.read_text()) if bench.exists() else None


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    return _spawn(tmp_path_factory, WORLD, on_gpu=False)


@pytest.fixture(scope="module")
def gpu_results(tmp_path_factory):
    return _spawn(tmp_path_factory, torch.cuda.device_count(), on_gpu=True)


def _check(c: CPCase, ranks: list[dict], world: int, exact: bool) -> None:
    for rank in range(world):
        res = ranks[rank][c.id]
        where = f"rank {rank}"
        assert "error" not in res, f"{where}:\n{res.get('error')}"
        if exact:
            assert res["idx_equal"], f"{where}: selection differs from the single-process one"
        assert res["near_tie"] == "ok", f"{where}: {res['near_tie']}"
        assert res["ranks_identical"], f"{where}: ranks disagree"
        if c.dtype == torch.float32:
            tol = NOISE[torch.float32]
            assert res["out_err"] <= tol, f"{where}: out error {res['out_err']:.3g}"
            assert res["lse_err"] <= tol, f"{where}: lse error {res['lse_err']:.3g}"
        else:
            assert res["rule"] == "ok", f"{where}: {res['rule']}"


@pytest.mark.parametrize("c", CP_CASES, ids=[c.id for c in CP_CASES])
def test_cp_matches_single_process(c, cp_results):
    if c.backend != "reference":
        require(c.backend, torch.empty(1, 1, 1, c.case.d, dtype=c.dtype))
    _check(c, cp_results[0], c.world, exact=True)


@pytest.mark.gpu
@pytest.mark.parametrize("c", GPU_CASES, ids=[c.id for c in GPU_CASES])
def test_cp_nccl_matches_single_gpu(c, gpu_results):
    require(c.backend, torch.empty(1, 1, 1, c.case.d, dtype=c.dtype, device="cuda"))
    _check(c, gpu_results[0], torch.cuda.device_count(), exact=False)


def test_bench_cp_runs_on_gloo(cp_results):
    ranks, bench = cp_results
    for r in ranks:
        assert "bench" not in r, r.get("bench", {}).get("error")
    assert bench is not None and bench["header"]["world_size"] == WORLD
    modes = {(row["mode"], row["rep"]) for row in bench["rows"]}
    assert modes == {("decode", "bound"), ("prefill", "bound")}
    for row in bench["rows"]:
        assert row["cp_ms"] > 0 and row["single_ms"] > 0
        assert row["max_err"] <= NOISE[torch.float32], row


# --------------------------------------------------------------------------- one process
def test_one_rank_without_distributed_equals_single_device():
    case = PREFILL
    q, k, v, lens, inv_freq = make_inputs(case, torch.float32)
    kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, topk=case.topk,
              query_block=case.query_block, rep="bound", inv_freq=inv_freq)
    layout = CPLayout.split(case.nmax, 1, sink=case.sink, chunk=case.chunk)
    out, lse = reattention_attn_cp(q, k, v, layout, lens, backend="reference",
                                   return_lse=True, **kw)
    ref, ref_lse = reattention.reattention_attn(q, k, v, lens, backend="reference",
                                                return_lse=True, **kw)
    assert (out - ref).abs().max().item() <= NOISE[torch.float32]
    assert (lse - ref_lse).abs().max().item() <= NOISE[torch.float32]


@pytest.mark.parametrize("case,starts", [
    (LONG37, (0, 300, 500)),
    (LONG64, (0, 452, 508)),
    (LONG_GQA7, (0, 396)),
    (LONG64, (0,)),
    (PREFILL, (0, 552, 600)),
    (VAR3, (0, 328, 616)),
], ids=lambda x: "at" + "_".join(map(str, x[1:])) if isinstance(x, tuple) else x.id)
def test_op_plan_scores_only_selectable_chunks(case, starts):
    """Asked for every chunk it scores (topk = all), the shard's select_chunks op, run as
    _op_plan says, scores exactly the shard chunks [0, keep) of each block whose picks are
    kept, all selectable by the block; [keep, owned) is added by hand, and stays small."""
    q, k, _, lens, _ = make_inputs(case, torch.float32)
    layout = CPLayout(starts, case.nmax)
    glens = [case.nmax] * case.b if lens is None else lens.tolist()
    seg = dict(sink=case.sink, local=case.local, chunk=case.chunk, query_block=case.query_block)
    for rank in range(layout.world_size):
        sh = distributed._Shard(layout, None, rank, layout.world_size, glens)
        blocks, segs = distributed._block_segments(sh, case.lq, **seg)
        lo, hi = layout.chunk_range(rank, case.sink, case.chunk)
        s0 = layout.shard_sink(rank, case.sink)
        ks = layout.shard(k, rank)
        owned = [[max(0, min(hi, s.n_mid) - lo) for s in row] for row in segs]
        first, lengths, keeps = distributed._op_plan(owned, blocks, ks.shape[2], s0, case.chunk)
        added = max(o - kp for keep, row in zip(keeps, owned) for o, kp in zip(row, keep))
        assert added <= -(-case.lq // case.chunk) + 1, (rank, added)
        if layout.world_size == 1:  # one shard: the op alone selects
            assert keeps == owned
        if rank == layout.world_size - 1:  # the op serves the newest shard's blocks
            assert any(map(any, keeps))
        if first == len(blocks):
            continue
        every = ks.shape[2] // case.chunk
        scored = reattention.select_chunks(
            q[:, :, blocks[first][0]:], ks, torch.tensor(lengths, dtype=torch.int32),
            sink=s0, local=0, chunk=case.chunk, topk=every, query_block=case.query_block,
            rep="max", backend="reference")
        for b, (keep, row) in enumerate(zip(keeps, owned)):
            assert keep[:first] == [0] * first
            for beta in range(first, len(blocks)):
                got = scored[b, :, beta - first]
                m = int((got[0] >= 0).sum())
                assert keep[beta] in (0, m) and keep[beta] <= row[beta], (rank, b, beta)
                if keep[beta]:
                    assert torch.equal(got[:, :m], torch.arange(m).expand(case.hkv, -1).int())


def test_chunk_reps_cp_incremental():
    """Growing the cache and updating reps from the first new chunk equals a fresh build."""
    case = DECODE
    _, k, _, _, _ = make_inputs(case, torch.float32)
    layout = CPLayout((0,), case.nmax)
    kw = dict(sink=case.sink, chunk=case.chunk, rep="bound", backend="reference")
    short = torch.tensor([300], dtype=torch.int32)
    reps = chunk_reps_cp(k, layout, short, **kw)
    done = (300 - case.sink) // case.chunk
    chunk_reps_cp(k, layout, None, reps=reps, start_chunk=done, **kw)
    full = chunk_reps_cp(k, layout, None, **kw)
    assert torch.equal(reps, full)


def test_layout_split():
    layout = CPLayout.split(1000, 3, sink=8, chunk=16)
    # 62 whole chunks: 20, 21 and 21 of them, the sink on rank 0, the ragged tail on rank 2.
    assert layout.starts == (0, 8 + 20 * 16, 8 + 41 * 16)
    assert layout.bounds(2) == (664, 1000)
    assert layout.chunk_range(0, 8, 16) == (0, 20)
    assert layout.chunk_range(2, 8, 16) == (41, 62)
    lens = torch.tensor([1000, 400, 5], dtype=torch.int32)
    assert layout.shard_seqlens(lens, 1).tolist() == [336, 72, 0]


@pytest.mark.parametrize("starts,nmax,match", [
    ((1, 50), 100, "starts"),
    ((0, 50, 50), 100, "starts"),
    ((0, 50), 50, "nmax"),
])
def test_layout_rejects_bad_bounds(starts, nmax, match):
    with pytest.raises(ValueError, match=match):
        CPLayout(starts, nmax)


def test_layout_rejects_more_ranks_than_chunks():
    with pytest.raises(ValueError, match="world_size"):
        CPLayout.split(100, 7, sink=8, chunk=16)


def test_bad_shards_raise():
    case = DECODE
    q, k, v, lens, inv_freq = make_inputs(case, torch.float32)
    kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, topk=case.topk,
              query_block=case.query_block, backend="reference")
    with pytest.raises(ValueError, match="chunk boundaries"):
        CPLayout((0, 20), case.nmax).check(case.sink, case.chunk)
    with pytest.raises(ValueError, match="k_shard of rank 0"):
        reattention_attn_cp(q, k[:, :, :500], v[:, :, :500], CPLayout((0,), case.nmax), lens,
                            **kw)
    with pytest.raises(ValueError, match="2 shards"):
        reattention_attn_cp(q, k, v, CPLayout((0, 40), case.nmax), lens, **kw)
    with pytest.raises(ValueError, match="cache_seqlens"):
        reattention_attn_cp(q, k, v, CPLayout((0,), case.nmax),
                            torch.tensor([case.nmax + 1], dtype=torch.int32), **kw)
    idx = torch.zeros(1, case.hkv, 2, case.topk, dtype=torch.int32)
    with pytest.raises(ValueError, match="idx"):
        gather_attention_cp(q, k, v, idx, CPLayout((0,), case.nmax), lens, inv_freq=inv_freq,
                            sink=case.sink, local=case.local, chunk=case.chunk,
                            query_block=case.query_block)
