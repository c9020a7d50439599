"""chunk_reps parity: every backend against reference.chunk_reps_ref."""
import pytest
import torch

import reattention
from reattention import layout, reference
from reattention.testing import make_inputs, to_paged

from cases import CASES, IDS
from conftest import PARITY_BACKENDS, device_for, require

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("rep", ["bound", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chunk_reps(case, dtype, rep, backend):
    _, k, _, lens, _ = make_inputs(case, dtype, device_for(backend))
    require(backend, k)
    reps = reattention.chunk_reps(k, lens, sink=case.sink, chunk=case.chunk, rep=rep,
                                  backend=backend)
    want = layout.new_reps(k.cpu(), case.sink, case.chunk, rep).fill_(float("nan"))
    reference.chunk_reps_ref(k.cpu(), None if lens is None else lens.cpu(), want, case.sink,
                             case.chunk, rep, 0)
    done = ~want.isnan()  # only complete chunks are defined
    got = reps.cpu()
    if rep == "bound":  # min/max are exact
        assert torch.equal(got[done], want[done])
    else:  # one rounding of an fp32 sum
        torch.testing.assert_close(got[done], want[done], rtol=2e-6 if dtype == torch.float32
                                   else 8e-3, atol=1e-6)


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("rep", ["bound", "mean"])
def test_chunk_reps_incremental(rep, backend):
    """Growing a cache and updating from start_chunk equals computing all reps at once."""
    torch.manual_seed(0)
    dev = device_for(backend)
    k = torch.randn(2, 2, 300, 64, device=dev)
    require(backend, k)
    sink, chunk = 5, 16
    lens = torch.tensor([100, 37], dtype=torch.int32, device=dev)
    reps = reattention.chunk_reps(k, lens, sink=sink, chunk=chunk, rep=rep, backend=backend)
    sentinel = reps.clone()
    # Chunks beyond the complete ones are untouched by an update that adds none.
    reattention.chunk_reps(k, lens, sink=sink, chunk=chunk, rep=rep, backend=backend, reps=reps,
                           start_chunk=(100 - sink) // chunk)
    assert torch.equal(reps.nan_to_num(), sentinel.nan_to_num())
    lens2 = torch.tensor([300, 300], dtype=torch.int32, device=dev)
    reattention.chunk_reps(k, lens2, sink=sink, chunk=chunk, rep=rep, backend=backend, reps=reps,
                           start_chunk=2)  # seq 1 had 2 complete chunks, seq 0 had 5
    full = reattention.chunk_reps(k, lens2, sink=sink, chunk=chunk, rep=rep, backend="reference")
    torch.testing.assert_close(reps.cpu(), full.cpu(), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("rep", ["bound", "mean"])
def test_float64_reps_on_the_reference(rep):
    """float64 is accepted by the attention path (reference only), so reps must be too:
    reattention_attn(rep="bound"/"mean") on float64 inputs computes them on the fly."""
    torch.manual_seed(0)
    k = torch.randn(1, 2, 100, 8, dtype=torch.float64)
    reps = reattention.chunk_reps(k, sink=4, chunk=8, rep=rep, backend="reference")
    toks = k[:, :, 4:100].reshape(1, 2, 12, 8, 8)
    if rep == "bound":
        want = torch.stack([toks.amin(3), toks.amax(3)], dim=3)
    else:
        want = toks.mean(3)
    assert reps.dtype == torch.float64
    torch.testing.assert_close(reps, want, rtol=0, atol=1e-12)
    q = torch.randn(1, 4, 1, 8, dtype=torch.float64)
    out = reattention.reattention_attn(q, k, torch.randn_like(k), sink=4, local=16, chunk=8,
                                       topk=2, rep=rep, backend="reference")
    assert out.dtype == torch.float64 and out.shape == (1, 4, 1, 8)


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("rep", ["bound", "mean"])
@pytest.mark.parametrize("page", [None, 8, 3], ids=["contiguous", "paged8", "paged3"])
@pytest.mark.parametrize("m", [1, 2, 5, 40])
def test_chunk_reps_last_chunks(m, page, rep, backend):
    """last_chunks=m writes the last m complete chunks of each sequence, found from its device
    length, with the bytes start_chunk=0 writes there, and touches nothing else (NaN-filled
    reps); paged caches too (pages of a chunk, and pages a chunk straddles)."""
    torch.manual_seed(1)
    dev = device_for(backend)
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    sink, chunk = 5, 8
    lens_host = (211, 4, 5 + 3 * 8, 100)  # varlen: 25, 0, 3 and 11 complete chunks
    k = torch.randn(4, 3, 213, 64, device=dev).to(dtype)
    require(backend, k)
    lens = torch.tensor(lens_host, dtype=torch.int32, device=dev)
    table = None
    if page is not None:
        k, table = to_paged(k, lens, page, seed=2)
    kw = dict(sink=sink, chunk=chunk, rep=rep, backend=backend, block_table=table)
    full = reattention.chunk_reps(k, lens, **kw)
    reps = layout.new_reps(k, sink, chunk, rep, table).fill_(float("nan"))
    reattention.chunk_reps(k, lens, reps=reps, last_chunks=m, **kw)
    reps, full = reps.cpu(), full.cpu()
    for b, n in enumerate(lens_host):
        c = min(reps.shape[2], max(0, n - sink) // chunk)
        lo = max(0, c - m)
        assert torch.equal(reps[b, :, lo:c], full[b, :, lo:c]), b
        assert reps[b, :, :lo].isnan().all() and reps[b, :, c:].isnan().all(), b


def test_last_chunks_validation():
    k = torch.randn(1, 2, 40, 8)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="last_chunks must be"):
            reattention.chunk_reps(k, sink=4, chunk=8, rep="bound", last_chunks=bad)
    with pytest.raises(ValueError, match="last_chunks must be"):
        reattention.chunk_reps(k, sink=4, chunk=8, rep="bound", last_chunks=2, start_chunk=1)
