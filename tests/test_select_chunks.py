"""select_chunks parity: every backend against reference.select_chunks_ref (near-tie rule)."""
import pytest
import torch

import reattention
from reattention import layout, reference
from reattention.testing import assert_selection_equivalent, make_inputs

from cases import CASES, IDS
from conftest import PARITY_BACKENDS, device_for, require

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_select_chunks(case, dtype, rep, backend):
    q, k, _, lens, _ = make_inputs(case, dtype, device_for(backend))
    require(backend, q)
    reps = None
    if rep != "max":
        reps = reattention.chunk_reps(k, lens, sink=case.sink, chunk=case.chunk, rep=rep,
                                      backend="reference")
    kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, topk=case.topk,
              query_block=case.query_block, rep=rep)
    idx = reattention.select_chunks(q, k, lens, reps=reps, backend=backend, **kw)
    cpu = [None if t is None else t.cpu() for t in (q, k, reps, lens)]
    ref = reference.select_chunks_ref(cpu[0], cpu[1], cpu[2], cpu[3], case.sink, case.local,
                                      case.chunk, case.topk, rep, case.query_block)
    scores = reference.chunk_scores_ref(cpu[0], cpu[1], cpu[2], cpu[3], case.sink, case.local,
                                        case.chunk, rep, case.query_block)
    assert_selection_equivalent(idx, ref, scores)


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
def test_select_chunks_large_topk(backend):
    """topk up to 256 with more chunks than that, and exact ties broken to the lower index."""
    dev = device_for(backend)
    torch.manual_seed(1)
    q = torch.randn(1, 2, 1, 64, device=dev)
    k = torch.randn(1, 1, 8 + 400 * 8 + 16 + 1, 64, device=dev)
    k[:, :, 8 + 100 * 8: 8 + 110 * 8] = k[:, :, 8 + 50 * 8: 8 + 60 * 8]  # tied chunks
    require(backend, q)
    idx = reattention.select_chunks(q, k, sink=8, local=16, chunk=8, topk=256, query_block=1,
                                    rep="max", backend=backend)
    ref = reference.select_chunks_ref(q.cpu(), k.cpu(), None, None, 8, 16, 8, 256, "max", 1)
    assert torch.equal(idx.cpu(), ref)


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
def test_select_chunks_many_chunks(backend, rep="bound"):
    """2100 chunks, topk 100, two sequences: Triton's top-k goes through two levels of segment
    sorts (2100 -> 640 -> 256 keys) and CUDA's decode scoring splits the row over many CTAs."""
    dev = device_for(backend)
    torch.manual_seed(2)
    sink, chunk, local = 4, 8, 16
    n = sink + 2100 * chunk + local + 1
    q = torch.randn(2, 4, 1, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, 2, n, 64, device=dev, dtype=torch.bfloat16)
    lens = torch.tensor([n, 2345], dtype=torch.int32, device=dev)
    require(backend, q)
    reps = reattention.chunk_reps(k, lens, sink=sink, chunk=chunk, rep=rep, backend="reference")
    kw = dict(sink=sink, local=local, chunk=chunk, topk=100, query_block=1, rep=rep)
    idx = reattention.select_chunks(q, k, lens, reps=reps, backend=backend, **kw)
    cpu = [t.cpu() for t in (q, k, reps, lens)]
    args = (*cpu, sink, local, chunk)
    ref = reference.select_chunks_ref(*args, 100, rep, 1)
    assert_selection_equivalent(idx, ref, reference.chunk_scores_ref(*args, rep, 1))


def identical_chunks_case(hq, hkv, lq, query_block, n_chunks, d, sink, local, chunk, seed=0):
    """bf16 q [1, Hq, Lq, D], k [1, Hkv, N, D] and the set of 34 middle chunks of k that are
    bit-identical copies of one chunk outscoring every other chunk under every rep (its keys
    lean on dim 0, where every query is positive). N - Lq = sink + n_chunks*chunk + local +
    chunk // 2, so the call's first block has n_chunks middle chunks; up to two copies lie past
    them, in the middle of later blocks only (contract v2)."""
    g = torch.Generator().manual_seed(seed)
    n = sink + n_chunks * chunk + local + chunk // 2 + lq
    blocks = layout.query_blocks(lq, query_block)
    m_first, m_last = (layout.block_segments(n, lq, s, e, sink, local, chunk).n_mid
                       for s, e in (blocks[0], blocks[-1]))
    late = list(range(m_first, m_last, 2))[:2]
    early = torch.randperm(m_first - 10, generator=g)[:34 - len(late)].tolist()
    copies = set(early) | set(late)
    q = torch.randn(1, hq, lq, d, generator=g)
    q[..., 0] = q[..., 0].abs() + 2
    k = torch.randn(1, hkv, n, d, generator=g)
    hot = torch.randn(hkv, chunk, d, generator=g)
    hot[..., 0] += 60
    for j in copies:
        k[0, :, sink + j * chunk: sink + (j + 1) * chunk] = hot
    return q.bfloat16(), k.bfloat16(), copies


def check_identical_chunks(idx, q, k, reps, copies, sink, local, chunk, topk, query_block, rep):
    """Among the copies each block may select (j < its M), exactly the lowest-index ones are
    chosen (ties go low), and the whole selection matches the reference."""
    cpu = [None if t is None else t.cpu() for t in (q, k, reps)]
    args = (*cpu, None, sink, local, chunk)
    ref = reference.select_chunks_ref(*args, topk, rep, query_block)
    assert_selection_equivalent(idx, ref, reference.chunk_scores_ref(*args, rep, query_block))
    n, lq = k.shape[2], q.shape[2]
    for beta, (s, e) in enumerate(layout.query_blocks(lq, query_block)):
        m = layout.block_segments(n, lq, s, e, sink, local, chunk).n_mid
        want = [j for j in sorted(copies) if j < m][:topk]
        for h in range(k.shape[1]):
            got = [j for j in idx[0, h, beta].tolist() if j in copies]
            assert got == want, (rep, topk, beta, h, got, want)


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("lq,query_block", [(1, 1), (40, 16)])
def test_select_chunks_identical_chunks(lq, query_block, rep, backend):
    """34 bit-identical chunks among random ones score bit-identically, so the lowest indices
    win, whatever tile, split or block they fall in. Two copies lie past the first block's
    middle: only the later blocks of the 40-query call may select them (contract v2)."""
    sink, local, chunk = 5, 24, 8
    q, k, copies = identical_chunks_case(8, 2, lq, query_block, 300, 64, sink, local, chunk)
    dev = device_for(backend)
    q, k = q.to(dev), k.to(dev)
    require(backend, q)
    reps = None
    if rep != "max":
        reps = reattention.chunk_reps(k, sink=sink, chunk=chunk, rep=rep, backend="reference")
    for topk in (1, 7, 33, 34):
        idx = reattention.select_chunks(q, k, reps=reps, sink=sink, local=local, chunk=chunk,
                                        topk=topk, query_block=query_block, rep=rep,
                                        backend=backend)
        check_identical_chunks(idx, q, k, reps, copies, sink, local, chunk, topk, query_block,
                               rep)


@pytest.mark.parametrize("n", [2, 64])
@pytest.mark.parametrize("dtype,descending", [(torch.int64, True), (torch.int32, False)],
                         ids=["int64-descending", "int32-ascending"])
def test_triton_rank_sort_equals_tl_sort(n, dtype, descending):
    """The top-k's sorts: the rank sort the interpreter runs returns tl.sort's tensor element
    for element (and torch.sort's), with repeated values (the padding keys, the -1 slots)
    among distinct ones, as the top-k kernels feed it."""
    dev = device_for("triton")
    require("triton", torch.empty(n, device=dev))
    from reattention.triton_kernels.select_chunks import _PAD_KEY
    from triton_sort_case import sort_both_ways_kernel
    g = torch.Generator().manual_seed(n)
    big = 2 ** 62 if dtype == torch.int64 else 2 ** 31 - 1
    x = torch.randint(-big, big, (n,), generator=g, dtype=dtype)
    pad = _PAD_KEY if dtype == torch.int64 else 2 ** 31 - 1
    x[torch.randperm(n, generator=g)[: n // 2]] = pad
    x = x.to(dev)
    ranked, library = torch.empty_like(x), torch.empty_like(x)
    sort_both_ways_kernel[(1,)](x, ranked, library, N=n, DESCENDING=descending)
    assert torch.equal(ranked, library), (ranked, library)
    assert torch.equal(ranked.cpu(), torch.sort(x.cpu(), descending=descending).values)
