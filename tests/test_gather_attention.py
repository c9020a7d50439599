"""gather_attention and reattention_attn parity against the reference (the tolerance rule of
docs/design.md section 2.10)."""
import math

import pytest
import torch

import reattention
from reattention import reference
from reattention.testing import assert_close_rule, lowp_attention, make_inputs

from cases import CASES, IDS
from conftest import PARITY_BACKENDS, device_for, require

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROPE = [("half", "compact", 1.0), ("interleaved", "original", 1.0), ("half", "compact", 1.25)]


def check_against_reference(case, q, k, v, lens, idx, inv_freq, out, lse, scale, style,
                            positions, rope_scale):
    dtype = q.dtype
    cpu = [None if t is None else t.cpu() for t in (q, k, v, lens, idx, inv_freq)]
    q_, k_, v_, lens_, idx_, inv_ = cpu
    kw = dict(rope_scale=rope_scale, rope_style=style, positions=positions)
    ref, ref_lse = reference.gather_attention_ref(q_.float(), k_.float(), v_.float(), lens_, idx_,
                                                  inv_, case.sink, case.local, case.chunk,
                                                  case.query_block, scale, **kw)
    low, low_lse = lowp_attention(q_, k_, v_, lens_, idx_, inv_, case, scale, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_rule(out.cpu(), ref, low, dtype, "out")
    assert_close_rule(lse.cpu(), ref_lse, low_lse, dtype, "lse")


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("style,positions,rope_scale", ROPE, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gather_attention(case, dtype, style, positions, rope_scale, backend):
    q, k, v, lens, inv_freq = make_inputs(case, dtype, device_for(backend))
    require(backend, q)
    idx = reference.select_chunks_ref(q.cpu(), k.cpu(), None,
                                      None if lens is None else lens.cpu(), case.sink,
                                      case.local, case.chunk, case.topk, "max",
                                      case.query_block).to(q.device)
    scale = 1 / math.sqrt(case.d)
    out, lse = reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv_freq,
                                            sink=case.sink, local=case.local, chunk=case.chunk,
                                            query_block=case.query_block, scale=scale,
                                            rope_scale=rope_scale, rope_style=style,
                                            positions=positions, backend=backend)
    check_against_reference(case, q, k, v, lens, idx, inv_freq, out, lse, scale, style,
                            positions, rope_scale)


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
def test_reattention_attn(case, rep, backend):
    """End to end: the backend's own selection, then outputs vs the reference on that idx."""
    dtype = torch.bfloat16
    q, k, v, lens, inv_freq = make_inputs(case, dtype, device_for(backend))
    require(backend, q)
    kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, topk=case.topk,
              query_block=case.query_block, rep=rep)
    out, lse = reattention.reattention_attn(q, k, v, lens, inv_freq=inv_freq, backend=backend,
                                            return_lse=True, **kw)
    idx = reattention.select_chunks(q, k, lens, backend=backend, **kw)
    check_against_reference(case, q, k, v, lens, idx, inv_freq, out, lse, 1 / math.sqrt(case.d),
                            "half", "compact", 1.0)


def test_config_matches_keywords():
    case = CASES[0]
    q, k, v, lens, _ = make_inputs(case, torch.float32)
    cfg = reattention.ReAttentionConfig(sink=case.sink, local=case.local, chunk=case.chunk,
                                        topk=case.topk, query_block=case.query_block)
    a = reattention.reattention_attn(q, k, v, lens, config=cfg, backend="reference")
    b = reattention.reattention_attn(q, k, v, lens, sink=case.sink, local=case.local,
                                     chunk=case.chunk, topk=case.topk,
                                     query_block=case.query_block, backend="reference")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="either config or the keywords"):
        reattention.reattention_attn(q, k, v, config=cfg, topk=case.topk + 1)


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("rep", ["max", "bound"])
def test_strided_cache_seqlens(rep, backend):
    """Lengths given as a strided view (a column of a [B, 2] table): the Triton kernels read
    lens[b] at offset b and used to see the other column (chunk reps, selection and
    attention all silently wrong)."""
    dev = device_for(backend)
    torch.manual_seed(0)
    q = torch.randn(2, 2, 3, 16, device=dev)
    k, v = torch.randn(2, 2, 1, 200, 16, device=dev).unbind(1)
    require(backend, q)
    table = torch.tensor([[150, 7], [90, 7]], dtype=torch.int32, device=dev)
    lens = table[:, 0]
    assert not lens.is_contiguous()
    kw = dict(sink=4, local=16, chunk=8, topk=2, query_block=2, rep=rep)
    out = reattention.reattention_attn(q, k, v, lens, backend=backend, **kw)
    ref = reattention.reattention_attn(q.cpu(), k.cpu(), v.cpu(), lens.cpu().contiguous(),
                                       backend="reference", **kw)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    if rep != "max":
        reps = reattention.chunk_reps(k, lens, sink=4, chunk=8, rep=rep, backend=backend)
        want = reattention.chunk_reps(k.cpu(), lens.cpu().contiguous(), sink=4, chunk=8,
                                      rep=rep, backend="reference")
        for b, n in enumerate((150, 90)):
            done = (n - 4) // 8
            assert torch.equal(reps[b, :, :done].cpu(), want[b, :, :done])


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
def test_strided_inv_freq(backend):
    """inv_freq as a strided view: the Triton kernel read inv_freq[i] at offset i and rotated
    with the wrong frequencies."""
    dev = device_for(backend)
    torch.manual_seed(0)
    q = torch.randn(1, 2, 3, 16, device=dev)
    k, v = torch.randn(2, 1, 1, 200, 16, device=dev).unbind(0)
    require(backend, q)
    inv = reattention.default_inv_freq(16)
    # Made strided on the device itself: a strided CPU tensor moved with .to(dev) arrives
    # contiguous, and the kernel would never see the stride.
    strided = inv.to(dev).repeat_interleave(2)[::2]
    assert not strided.is_contiguous() and torch.equal(strided.cpu(), inv)
    kw = dict(sink=4, local=16, chunk=8, topk=2, query_block=2)
    out = reattention.reattention_attn(q, k, v, inv_freq=strided, backend=backend, **kw)
    ref = reattention.reattention_attn(q.cpu(), k.cpu(), v.cpu(), inv_freq=inv,
                                       backend="reference", **kw)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prerotate", [False, True], ids=["in-loop", "prerotated"])
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_triton_malformed_idx_stays_inside_the_sequence(positions, prerotate, monkeypatch):
    """The public wrapper refuses a malformed idx only on the CPU; on a GPU the Triton kernel
    gets it as it is. -1 before a chunk id, or an id past the middle, must give a wrong result,
    never a read outside the sequence's tokens: here every other token of the buffer is NaN."""
    dev = device_for("triton")
    require("triton", torch.empty(1, device=dev))
    import reattention.triton_kernels.gather_attention as tga
    if prerotate:
        monkeypatch.setattr(tga, "_PREROTATE_MIN_PROGRAMS", 1)
    n, d = 150, 16
    torch.manual_seed(0)
    # The cache is a view into a NaN buffer; its own tokens past n are NaN too.
    k_buf, v_buf = (torch.full((1, 1, 400, d), math.nan, device=dev) for _ in range(2))
    k, v = k_buf[:, :, 100:300], v_buf[:, :, 100:300]
    k[:, :, :n], v[:, :, :n] = torch.randn(2, 1, 1, n, d, device=dev)
    q = torch.randn(1, 2, 3, d, device=dev)
    lens = torch.tensor([n], dtype=torch.int32, device=dev)
    inv_freq = reattention.default_inv_freq(d, device=dev)
    # M = (150 - 3 - 16 - 4) // 8 = 15 middle chunks
    idx = torch.tensor([[-1, 2, 5], [2, 20, -1]], dtype=torch.int32, device=dev).view(1, 1, 2, 3)
    out, lse = torch.ops.reattention.gather_attention_triton(
        q, k, v, lens, idx, inv_freq, 4, 16, 8, 2, d ** -0.5, 1.0, "half", positions)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # A convex combination of the sequence's values.
    assert (out.abs() <= v[:, :, :n].abs().amax(2, keepdim=True) + 1e-5).all()
