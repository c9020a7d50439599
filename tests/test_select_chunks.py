"""select_chunks parity: every backend against reference.select_chunks_ref (near-tie rule)."""
import pytest
import torch

import reattention
from reattention import reference
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
