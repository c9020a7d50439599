"""Triton backend on a real GPU: long caches, a prefill block, CUDA-graph decode, opcheck.

The CPU parity grid (tests/test_*.py under TRITON_INTERPRET=1) covers odd shapes; these cover
what only a GPU can: N = 128K and 1M decode, a 4096-query prefill block, head dims 64/256 with
fp16/fp32 on the compiled kernels, large RoPE angles (original positions at 1M), a decode
step captured in a CUDA graph and replayed after the lengths change in place, long calls of
many query blocks (contract v2) on both attention paths, and exact ties spread over many
scoring tiles and top-k segments.
"""
import math

import pytest
import torch

import reattention
from reattention import reference
from reattention.testing import assert_close_rule, assert_selection_equivalent

pytestmark = pytest.mark.gpu


def _require_triton():
    why = reattention.ops.available_backends().get("triton")
    if why is not None:
        pytest.skip(f"triton backend unavailable: {why}")


def _inputs(b, hq, hkv, lq, n, d, dtype, chunk, seed=0):
    """q [b,hq,lq,d], k/v [b,hkv,n,d] on the GPU; keys get a per-chunk offset (as in
    reattention.testing.make_inputs) so that chunk scores are well separated."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, lq, d, device="cuda", generator=g)
    k = torch.randn(b, hkv, n, d, device="cuda", generator=g)
    offs = torch.randn(b, hkv, -(-n // chunk), d, device="cuda", generator=g) * 0.7
    k += offs.repeat_interleave(chunk, dim=2)[:, :, :n]
    v = torch.randn(b, hkv, n, d, device="cuda", generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check(q, k, v, lens, *, sink, local, chunk, topk, query_block, rep, positions="compact",
           rope_style="half", rotary=None):
    """Triton selection and attention against the reference (near-tie and 2x-error rules)."""
    d = q.shape[-1]
    rotary = rotary or d
    inv = 1.0 / (10000.0 ** (torch.arange(0, rotary, 2, device="cuda").float() / rotary))
    seg = dict(sink=sink, local=local, chunk=chunk)
    reps = None
    if rep != "max":
        reps = reattention.chunk_reps(k, lens, sink=sink, chunk=chunk, rep=rep, backend="triton")
        want = reattention.chunk_reps(k, lens, sink=sink, chunk=chunk, rep=rep,
                                      backend="reference")
        for b, n in enumerate([k.shape[2]] * k.shape[0] if lens is None else lens.tolist()):
            done = max(0, n - sink) // chunk  # only complete chunks are defined
            if rep == "bound":
                assert torch.equal(reps[b, :, :done], want[b, :, :done])
            else:
                torch.testing.assert_close(reps[b, :, :done], want[b, :, :done], rtol=8e-3,
                                           atol=1e-6)
    idx = reattention.select_chunks(q, k, lens, reps=reps, topk=topk, query_block=query_block,
                                    rep=rep, backend="triton", **seg)
    ref_idx = reference.select_chunks_ref(q, k, reps, lens, sink, local, chunk, topk, rep,
                                          query_block)
    scores = reference.chunk_scores_ref(q, k, reps, lens, sink, local, chunk, rep, query_block)
    assert_selection_equivalent(idx, ref_idx, scores)
    scale = 1 / math.sqrt(d)
    kw = dict(rope_scale=1.0, rope_style=rope_style, positions=positions)
    out, lse = reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv,
                                            query_block=query_block, scale=scale,
                                            backend="triton", **seg, **kw)
    args = (lens, idx, inv, sink, local, chunk, query_block, scale)
    ref, ref_lse = reference.gather_attention_ref(q.float(), k.float(), v.float(), *args, **kw)
    low, low_lse = reference.gather_attention_ref(q, k, v, *args, compute_dtype=q.dtype, **kw)
    assert_close_rule(out, ref, low, q.dtype, "out")
    assert_close_rule(lse, ref_lse, low_lse, q.dtype, "lse")


LONG = dict(sink=64, local=4096, chunk=64, topk=32)


@pytest.mark.parametrize("rep", ["bound", "mean", "max"])
@pytest.mark.parametrize("n", [128 * 1024, 1024 * 1024], ids=["128K", "1M"])
def test_decode_long(n, rep):
    _require_triton()
    q, k, v = _inputs(1, 32, 8, 1, n, 128, torch.bfloat16, 64, seed=n % 97)
    _check(q, k, v, None, query_block=128, rep=rep, **LONG)


def test_decode_1m_original_positions():
    """RoPE angles up to ~1e6 rad: accurate sin/cos (libdevice) or this drifts far."""
    _require_triton()
    n = 1024 * 1024
    q, k, v = _inputs(1, 32, 8, 1, n, 128, torch.bfloat16, 64, seed=3)
    _check(q, k, v, None, query_block=128, rep="mean", positions="original",
           rope_style="interleaved", **LONG)


def test_decode_batch_varlen():
    _require_triton()
    n = 128 * 1024
    q, k, v = _inputs(3, 32, 8, 1, n, 128, torch.bfloat16, 64, seed=5)
    lens = torch.tensor([n, 77777, 4200], dtype=torch.int32, device="cuda")
    _check(q, k, v, lens, query_block=128, rep="bound", **LONG)


@pytest.mark.parametrize("n,rep", [(1024 * 1024, "mean"), (128 * 1024, "bound")],
                         ids=["1M-mean", "128K-bound"])
def test_prefill_block(n, rep):
    _require_triton()
    q, k, v = _inputs(1, 32, 8, 4096, n, 128, torch.bfloat16, 64, seed=7)
    _check(q, k, v, None, query_block=128, rep=rep, **LONG)


@pytest.mark.parametrize("d,dtype,hq,hkv,lq,rotary", [
    (64, torch.float16, 7, 1, 300, None),
    (256, torch.bfloat16, 8, 2, 130, None),
    (256, torch.float32, 4, 4, 1, 128),
    (128, torch.float32, 8, 2, 63, 96),
], ids=["D64-fp16-G7", "D256-bf16", "D256-fp32-R128", "D128-fp32-R96"])
def test_head_dims_dtypes(d, dtype, hq, hkv, lq, rotary):
    _require_triton()
    q, k, v = _inputs(2, hq, hkv, lq, 20000, d, dtype, 32, seed=d)
    lens = torch.tensor([20000, 9001], dtype=torch.int32, device="cuda")
    for rep, style in (("max", "half"), ("bound", "interleaved")):
        _check(q, k, v, lens, sink=16, local=512, chunk=32, topk=24, query_block=64, rep=rep,
               rope_style=style, rotary=rotary)


@pytest.mark.parametrize("rep", ["bound", "max"])
def test_cuda_graph_decode(rep):
    """Capture reattention_attn (Lq=1) once; replay after changing lengths and q in place."""
    _require_triton()
    nmax = 64 * 1024
    q, k, v = _inputs(2, 32, 8, 1, nmax, 128, torch.bfloat16, 64, seed=11)
    lens = torch.tensor([nmax, 50000], dtype=torch.int32, device="cuda")
    inv = reattention.default_inv_freq(128, device="cuda")
    # Reps of every chunk of the preallocated cache: valid for any shorter length too.
    reps = None if rep == "max" else reattention.chunk_reps(
        k, None, sink=64, chunk=64, rep=rep, backend="triton")
    kw = dict(sink=64, local=4096, chunk=64, topk=32, query_block=128, rep=rep, reps=reps)
    reattention.reattention_attn(q, k, v, lens, inv_freq=inv, backend="triton", **kw)
    torch.cuda.synchronize()  # kernels compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = reattention.reattention_attn(q, k, v, lens, inv_freq=inv, backend="triton", **kw)
    for new_lens, seed in (([30001, nmax], 1), ([4100, 65000], 2)):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        eager = reattention.reattention_attn(q, k, v, lens, inv_freq=inv, backend="triton",
                                             **kw)
        assert torch.equal(out, eager), "graph replay differs from the eager triton call"
        idx = reattention.select_chunks(q, k, lens, backend="triton", **kw)
        ref_idx = reference.select_chunks_ref(q, k, reps, lens, 64, 4096, 64, 32, rep, 128)
        scores = reference.chunk_scores_ref(q, k, reps, lens, 64, 4096, 64, rep, 128)
        assert_selection_equivalent(idx, ref_idx, scores)
        args = (lens, idx, inv, 64, 4096, 64, 128, 128 ** -0.5)
        ref, _ = reference.gather_attention_ref(q.float(), k.float(), v.float(), *args)
        low, _ = reference.gather_attention_ref(q, k, v, *args, compute_dtype=q.dtype)
        assert_close_rule(out, ref, low, q.dtype, "graph replay out")


@pytest.mark.parametrize("hq,hkv,d,dtype", [
    (16, 4, 128, torch.bfloat16),  # 4 row tiles per block of 128: pre-rotated keys
    (4, 4, 64, torch.float16),     # one row tile per block: keys rotated in the loop
    (6, 2, 64, torch.float32),
], ids=["G4-D128-bf16", "G1-D64-fp16", "G3-D64-fp32"])
@pytest.mark.parametrize("query_block", [128, 64])
def test_prefill_many_blocks(query_block, hq, hkv, d, dtype):
    """Contract v2 (docs/design.md section 2): Lq = 1500 queries, far more than local = 256, so
    every query block has its own mid_end, K_eff and local window; the second sequence is short
    enough that its first blocks have fewer than topk middle chunks."""
    _require_triton()
    q, k, v = _inputs(2, hq, hkv, 1500, 40000, d, dtype, 32, seed=13)
    lens = torch.tensor([40000, 2200], dtype=torch.int32, device="cuda")
    for rep, positions, style in (("max", "compact", "half"), ("bound", "original", "interleaved"),
                                  ("mean", "compact", "interleaved")):
        _check(q, k, v, lens, sink=32, local=256, chunk=32, topk=16, query_block=query_block,
               rep=rep, positions=positions, rope_style=style)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
def test_exact_ties_across_tiles(rep, dtype):
    """300 bit-identical chunks scattered over a 128K cache land in every slot of the scoring
    tiles (16 chunks of raw keys, 32 or 64 reps per tile) and in several top-k segments; they
    outscore every other chunk, so each block, decode or prefill, must select the lowest 32."""
    _require_triton()
    n, sink, chunk, local, topk = 128 * 1024, 64, 64, 4096, 32
    g = torch.Generator(device="cuda").manual_seed(17)
    k = torch.randn(1, 8, n, 128, device="cuda", generator=g) * 0.05
    keys = torch.randn(1, 8, chunk, 128, device="cuda", generator=g).abs()
    tied = torch.randperm(1900, device="cuda", generator=g)[:300].sort().values
    for j in tied.tolist():
        k[:, :, sink + j * chunk: sink + (j + 1) * chunk] = keys
    k = k.to(dtype)
    for lq, query_block in ((1, 1), (256, 128)):
        q = torch.randn(1, 32, lq, 128, device="cuda", generator=g).abs().to(dtype)
        reps = None if rep == "max" else reattention.chunk_reps(
            k, None, sink=sink, chunk=chunk, rep=rep, backend="triton")
        idx = reattention.select_chunks(q, k, reps=reps, sink=sink, local=local, chunk=chunk,
                                        topk=topk, query_block=query_block, rep=rep,
                                        backend="triton")
        want = tied[:topk].to(torch.int32).expand_as(idx)
        assert torch.equal(idx, want), f"Lq={lq}: {idx.flatten(0, 2)[:2].tolist()}"


def test_opcheck_cuda():
    """opcheck (schema, fake tensors, autograd registration, aot dispatch) on CUDA tensors."""
    _require_triton()
    q, k, v = _inputs(1, 4, 2, 3, 700, 64, torch.bfloat16, 16)
    lens = torch.tensor([650], dtype=torch.int32, device="cuda")
    inv = reattention.default_inv_freq(64, device="cuda")
    ops = torch.ops.reattention
    reps = k.new_zeros(1, 2, (700 - 8) // 16, 2, 64)
    torch.library.opcheck(ops.chunk_reps_triton, (k, lens, reps, 8, 16, "bound", 0))
    idx = ops.select_chunks_triton(q, k, reps, lens, 8, 64, 16, 5, "bound", 2)
    torch.library.opcheck(ops.select_chunks_triton, (q, k, reps, lens, 8, 64, 16, 5, "bound", 2))
    torch.library.opcheck(ops.select_chunks_triton, (q, k, None, lens, 8, 64, 16, 5, "max", 2))
    torch.library.opcheck(ops.gather_attention_triton, (q, k, v, lens, idx, inv, 8, 64, 16, 2,
                                                        0.125, 1.0, "half", "compact"))
