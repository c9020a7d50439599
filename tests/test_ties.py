"""Exact ties go to the lower chunk index (docs/design.md section 2) on every backend.

34 bit-identical chunks (the same keys, so the same reps) must get bit-identical scores wherever
they sit in a backend's tiles, so that the tie rule alone orders them. They are scattered over
the middle, with every other chunk made of small keys so that the tied ones are the best chunks
of every query block: a selection of topk <= 34 is then exactly the 34's lowest topk indices.
A GEMM that rounds some columns differently fails this: numpy's matmul under OpenBLAS's AVX2
kernels did (the Triton interpreter's tl.dot); OPENBLAS_CORETYPE=Haswell picks those kernels on
any x86 machine.
"""
import pytest
import torch

import reattention
from reattention import layout, reference
from reattention.testing import assert_selection_equivalent

from conftest import PARITY_BACKENDS, device_for, require

SINK, LOCAL, CHUNK = 5, 24, 8
N_TIED = 34
# (Lq, query_block): decode, and 37 queries in blocks of 16 (3 blocks, the last one of 5).
BLOCKS = [(1, 1), (37, 16)]
TOPKS = (1, 7, N_TIED, 40)


def tied_inputs(lq, dtype, device, seed=0):
    """q [2, 4, Lq, 64] (GQA 2:1), k [2, 2, 789, 64], lengths (789, 700), the tied indices.

    Every query block of both sequences has M >= 78 middle chunks; the tied chunks lie among
    chunks 0..77. q and the tied keys are positive (|randn|, full mantissas), so the tied chunks
    score about 40 with every rep, the others (0.05 * randn) about 1 at most.
    """
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, d = 2, 4, 2, 64
    nmax = 789
    q = torch.randn(b, hq, lq, d, generator=g).abs()
    k = torch.randn(b, hkv, nmax, d, generator=g) * 0.05
    tied = torch.randperm(78, generator=g)[:N_TIED].sort().values
    chunk_keys = torch.randn(b, hkv, CHUNK, d, generator=g).abs()  # one chunk per (b, h)
    for j in tied.tolist():
        k[:, :, SINK + j * CHUNK: SINK + (j + 1) * CHUNK] = chunk_keys
    lens = torch.tensor([789, 700], dtype=torch.int32, device=device)
    return q.to(device, dtype), k.to(device, dtype), lens, tied


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("lq,query_block", BLOCKS, ids=[f"Lq{a}-Q{b}" for a, b in BLOCKS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
def test_exact_ties_go_to_the_lower_index(rep, dtype, lq, query_block, backend):
    q, k, lens, tied = tied_inputs(lq, dtype, device_for(backend))
    require(backend, q)
    kw = dict(sink=SINK, local=LOCAL, chunk=CHUNK, query_block=query_block, rep=rep)
    reps = None
    if rep != "max":  # the backend's own reps: identical chunks must give identical reps too
        reps = reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep=rep, backend=backend)
    n_blocks = -(-lq // query_block)
    for topk in TOPKS:
        idx = reattention.select_chunks(q, k, lens, reps=reps, topk=topk, backend=backend,
                                        **kw).cpu()
        assert idx.shape == (2, 2, n_blocks, topk)
        if topk <= N_TIED:
            want = tied[:topk].to(torch.int32).expand(2, 2, n_blocks, topk)
            assert torch.equal(idx, want), (
                f"topk={topk}: expected the lowest tied chunks {tied[:topk].tolist()} in every "
                f"(b, h, block), got {idx.flatten(0, 2).tolist()}")
        else:
            # All tied chunks, then the best of the others, whose near-ties may go either way.
            assert all(set(tied.tolist()) <= set(row.tolist()) for row in idx.flatten(0, 2))
            cpu = [None if t is None else t.cpu() for t in (q, k, reps, lens)]
            args = (*cpu, SINK, LOCAL, CHUNK)
            ref = reference.select_chunks_ref(*args, topk, rep, query_block)
            assert_selection_equivalent(idx, ref,
                                        reference.chunk_scores_ref(*args, rep, query_block))


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("n_chunks", [300, 700, 4095, 4096])
def test_ties_at_the_kth_score_outnumber_the_rest(n_chunks, rep, backend):
    """Every middle chunk but five is one bit-identical chunk, so hundreds to thousands of exact
    ties sit at the k-th score: the five hot chunks, then the lowest tied indices. On CUDA this
    overflows the top-k's candidate filter (it then falls back to a radix select) for the
    larger rows, and 4095 / 4096 chunks sit on either side of the fused decode top-k."""
    dev = device_for(backend)
    sink, local, chunk, lq = 4, 8, 4, 1
    n = sink + n_chunks * chunk + local + chunk // 2 + lq
    assert layout.block_segments(n, lq, 0, lq, sink, local, chunk).n_mid == n_chunks
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, lq, 64, generator=g).abs()
    base = torch.randn(1, 1, chunk, 64, generator=g).abs().bfloat16().float()
    k = base.repeat(1, 1, -(-n // chunk), 1)[:, :, :n].clone()
    hot = torch.randperm(n_chunks, generator=g)[:5].tolist()
    for r, j in enumerate(hot):  # distinct scores well above the tied one
        k[:, :, sink + j * chunk: sink + (j + 1) * chunk] = base * (2 + r)
    q, k = q.to(dev, torch.bfloat16), k.to(dev, torch.bfloat16)
    require(backend, q)
    reps = None
    if rep != "max":
        reps = reattention.chunk_reps(k, sink=sink, chunk=chunk, rep=rep, backend=backend)
    for topk in (3, 32):
        idx = reattention.select_chunks(q, k, reps=reps, topk=topk, sink=sink, local=local,
                                        chunk=chunk, query_block=1, rep=rep, backend=backend)
        best = hot[::-1][:topk]  # the hotter, the later in `hot`
        want = sorted(best + [j for j in range(n_chunks) if j not in hot][:topk - len(best)])
        assert idx.flatten().tolist() == want, (topk, idx.flatten().tolist(), want)
