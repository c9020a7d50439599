"""The CUDA backend on the GPU: parity with the reference (and Triton), opcheck, CUDA graphs.

Every test needs a CUDA device and the compiled _C_cuda library (skipped cleanly without
them, a failure when REATTENTION_REQUIRE names cuda). References run on the GPU in float32
so the 1M-token cases stay fast; the low-precision baseline of the tolerance rule is the same
reference run in the kernel's dtype.
"""
import dataclasses
import functools
import math

import pytest
import torch

import reattention
from reattention import layout, ops, reference
from reattention.testing import (NOISE, Case, assert_close_rule, assert_selection_equivalent,
                                 lowp_attention, make_inputs, max_err, to_paged)

from conftest import needs_cpp_error_path, require
from test_select_chunks import check_identical_chunks, identical_chunks_case

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]

#        b  hq hkv  lq    nmax    d  sink local chunk topk qb
CASES = [
    Case(1, 4, 4, 1, 777, 64, 8, 64, 16, 4, 1),                             # decode, MHA
    Case(1, 7, 1, 5, 523, 128, 4, 40, 8, 8, 2),                             # Hq/Hkv 7, 3 blocks
    Case(2, 4, 1, 63, 1000, 64, 0, 32, 32, 3, 16, lens=(1000, 700)),        # sink 0, 4 blocks
    Case(3, 8, 2, 1, 300, 64, 16, 32, 16, 2, 1, lens=(40, 300, 129)),       # one with M = 0
    Case(2, 4, 2, 3, 100, 64, 64, 16, 16, 4, 4, lens=(10, 100)),            # N < sink
    Case(1, 2, 2, 9, 200, 64, 8, 64, 16, 16, 4),                            # M <= topk: dense
    Case(1, 4, 2, 3, 640, 128, 8, 48, 16, 5, 2, rotary=64),                 # partial rotary
    Case(1, 8, 2, 63, 3000, 128, 64, 256, 64, 8, 128),                      # 126 rows, 2 tiles
    Case(2, 8, 2, 1, 2000, 256, 16, 128, 32, 8, 1, lens=(2000, 1501)),      # D 256 decode
    Case(1, 4, 2, 40, 1200, 256, 8, 100, 24, 6, 40),                        # D 256 prefill
    Case(1, 4, 1, 1, 5000, 128, 4, 64, 8, 256, 1),                          # topk 256
    Case(2, 8, 2, 63, 3000, 128, 5, 100, 17, 20, 128, lens=(3000, 2100)),   # many rows, chunk 17
    Case(1, 7, 1, 50, 2500, 64, 3, 64, 7, 30, 20),                          # 140 rows, chunk 7
    Case(1, 4, 1, 5, 30000, 64, 0, 16, 1, 64, 5),                           # chunk 1, 20 rows
    Case(2, 8, 2, 100, 5000, 256, 16, 300, 32, 8, 64, lens=(5000, 130),     # D 256 partial,
         rotary=192),                                                       # one N < local
    Case(1, 32, 1, 1, 2000, 128, 16, 64, 16, 4, 1),                         # Lq 1, 32 rows
    Case(1, 1, 1, 63, 900, 64, 8, 100, 16, 5, 63),                          # Hq = Hkv = 1
    Case(1, 4, 1, 64, 600, 128, 4, 40, 8, 6, 64),                           # 256 rows exactly
    Case(1, 4, 2, 33, 400, 64, 8, 48, 16, 5, 33, rotary=38),                # R/2 odd
]
IDS = [c.id for c in CASES]

# Long caches: batch 3 of different lengths, and the 1M decode shape of DESIGN.md section 5.
LONG = [
    Case(3, 8, 2, 1, 1 << 18, 128, 64, 4096, 64, 32, 1, lens=(1 << 18, 100_003, 5_000)),
    # 4369 chunks: the fused decode top-k, with every CTA of the short sequence empty
    Case(2, 8, 2, 1, 70_000, 64, 16, 64, 16, 32, 1, lens=(70_000, 3_000)),
    Case(1, 32, 8, 1, 1 << 20, 128, 64, 4096, 64, 32, 128),
    Case(1, 8, 2, 128, 1 << 20, 128, 64, 4096, 64, 32, 128),
]
LONG_IDS = [c.id for c in LONG]

# The decode kernel rotates compact positions of 16-byte rotary units by stepping (cos, sin)
# from a sincosf seed per tile (both styles), anything else with sincosf per element.
ROPE = [("half", "compact", 1.0), ("interleaved", "original", 1.0), ("half", "original", 1.25),
        ("interleaved", "compact", 1.25)]
# Cross-checks with Triton compile a kernel per shape: a few cases keep the run short.
TRITON_CASES = CASES[:4]


def cuda_inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    q, k, v, lens, inv_freq = make_inputs(case, dtype, "cuda", seed)
    require("cuda", q)
    return q, k, v, lens, inv_freq


@functools.lru_cache(maxsize=1)
def long_inputs(case: Case):
    """make_inputs' structure (per-chunk key offsets) drawn on the GPU: 1M-token caches."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", generator=g)
    q = torch.randn(case.b, case.hq, case.lq, case.d, **kw).bfloat16()
    n_rows = -(-case.nmax // case.chunk)
    offs = torch.randn(case.b, case.hkv, n_rows, 1, case.d, **kw) * 0.7
    k = torch.randn(case.b, case.hkv, n_rows, case.chunk, case.d, **kw).add_(offs)
    k = k.flatten(2, 3)[:, :, :case.nmax].bfloat16()
    v = torch.randn(case.b, case.hkv, case.nmax, case.d, **kw).bfloat16()
    lens = torch.tensor(case.lens or (case.nmax,) * case.b, dtype=torch.int32, device="cuda")
    inv_freq = reattention.default_inv_freq(case.d, device="cuda")
    require("cuda", q)
    return q, k.contiguous(), v, lens, inv_freq


def make_reps(k, lens, case, rep):
    if rep == "max":
        return None
    reps = layout.new_reps(k, case.sink, case.chunk, rep)
    reference.chunk_reps_ref(k, lens, reps, case.sink, case.chunk, rep, 0)
    return reps


def triton_ready(name: str, like: torch.Tensor, case: Case) -> bool:
    return (case in TRITON_CASES and like.dtype == torch.bfloat16
            and ops._kernel_refusal("triton", like) is None
            and hasattr(torch.ops.reattention, name + "_triton"))


# --------------------------------------------------------------------------- chunk_reps
@pytest.mark.parametrize("rep", ["bound", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chunk_reps(case, dtype, rep):
    _, k, _, lens, _ = cuda_inputs(case, dtype)
    got = layout.new_reps(k, case.sink, case.chunk, rep).fill_(float("nan"))
    torch.ops.reattention.chunk_reps(k, ops.check_seqlens(lens, k, 1), got, case.sink,
                                     case.chunk, rep, 0)
    want = layout.new_reps(k, case.sink, case.chunk, rep).fill_(float("nan"))
    reference.chunk_reps_ref(k, lens, want, case.sink, case.chunk, rep, 0)
    # Incomplete chunks stay untouched (NaN) in both.
    assert torch.equal(got.isnan(), want.isnan())
    done = ~want.isnan()
    if rep == "bound":
        assert torch.equal(got[done], want[done])
    else:  # one rounding of an fp32 sum: at most one unit in the last place apart
        torch.testing.assert_close(got[done].float(), want[done].float(), rtol=8e-3, atol=1e-5)


@pytest.mark.parametrize("rep", ["bound", "mean"])
def test_chunk_reps_incremental(rep):
    case = Case(2, 2, 2, 1, 1000, 128, 5, 16, 16, 4, 1)
    _, k, _, _, _ = cuda_inputs(case, torch.bfloat16)
    reps = layout.new_reps(k, 5, 16, rep).fill_(float("nan"))
    short = torch.tensor([300, 37], dtype=torch.int32, device="cuda")
    torch.ops.reattention.chunk_reps(k, short, reps, 5, 16, rep, 0)
    before = reps.clone()
    full = torch.tensor([1000, 1000], dtype=torch.int32, device="cuda")
    torch.ops.reattention.chunk_reps(k, full, reps, 5, 16, rep, 18)  # (300 - 5) // 16 = 18
    want = layout.new_reps(k, 5, 16, rep).fill_(float("nan"))
    reference.chunk_reps_ref(k, full, want, 5, 16, rep, 0)
    # Chunks below 18 keep what the first call wrote (NaN for sequence 1 beyond its 2).
    assert torch.equal(reps[:, :, :18].nan_to_num(), before[:, :, :18].nan_to_num())
    assert torch.equal(reps[:, :, 18:].float().nan_to_num(), want[:, :, 18:].float().nan_to_num())


# --------------------------------------------------------------------------- select_chunks
def check_selection(q, k, reps, lens, case, rep, idx):
    ref = reference.select_chunks_ref(q, k, reps, lens, case.sink, case.local, case.chunk,
                                      case.topk, rep, case.query_block)
    scores = reference.chunk_scores_ref(q, k, reps, lens, case.sink, case.local, case.chunk, rep,
                                        case.query_block)
    assert_selection_equivalent(idx, ref, scores)
    return scores


@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_select_chunks(case, dtype, rep):
    q, k, _, lens, _ = cuda_inputs(case, dtype)
    reps = make_reps(k, lens, case, rep)
    kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, topk=case.topk,
              query_block=case.query_block, rep=rep)
    idx = reattention.select_chunks(q, k, lens, reps=reps, backend="cuda", **kw)
    scores = check_selection(q, k, reps, lens, case, rep, idx)
    if triton_ready("select_chunks", q, case):
        other = reattention.select_chunks(q, k, lens, reps=reps, backend="triton", **kw)
        assert_selection_equivalent(idx, other, scores)


# The many-rows scoring GEMM folds "max" per 64-column group when chunks are multiples of 64,
# and pads partial row tiles with copies of a real row: 400 rows (3 full tiles and 16 rows),
# column tiles ending mid-tile, and all-negative scores (a zero row would outscore every key).
@pytest.mark.parametrize("chunk", [64, 128, 48])
@pytest.mark.parametrize("negative", [False, True])
def test_select_max_many_rows_chunk_groups(chunk, negative):
    case = Case(1, 8, 2, 100, 16 + 300 * chunk + 37, 128, 16, 128, chunk, 8, 100)
    q, k, _, lens, _ = cuda_inputs(case, torch.bfloat16, seed=3)
    if negative:
        q, k = -q.abs(), k.abs()
    idx = reattention.select_chunks(q, k, lens, sink=case.sink, local=case.local, chunk=chunk,
                                    topk=case.topk, query_block=case.query_block, rep="max",
                                    backend="cuda")
    check_selection(q, k, None, lens, case, "max", idx)


def test_select_chunks_ties_go_low():
    """Exact ties (duplicated chunks) resolve to the lower index, as the reference does."""
    case = Case(1, 2, 1, 1, 8 + 400 * 8 + 17, 64, 8, 16, 8, 256, 1)
    q, k, _, _, _ = cuda_inputs(case, torch.bfloat16, seed=1)
    k[:, :, 8 + 100 * 8: 8 + 110 * 8] = k[:, :, 8 + 50 * 8: 8 + 60 * 8]
    lens = ops.check_seqlens(None, k, 1)
    for rep in ("max", "bound", "mean"):
        reps = make_reps(k, None, case, rep)
        idx = torch.ops.reattention.select_chunks(q, k, reps, lens, 8, 16, 8, 256, rep, 1)
        check_selection(q, k, reps, lens, case, rep, idx)
        chosen = set(idx.flatten().tolist())
        for j in range(10):  # a copy is never taken without its lower-index original
            assert 50 + j in chosen or 100 + j not in chosen, (rep, j)


# --------------------------------------------------------------------------- gather_attention
def check_attention(case, q, k, v, lens, idx, inv_freq, out, lse, scale, **kw):
    ref, ref_lse = reference.gather_attention_ref(q.float(), k.float(), v.float(), lens, idx,
                                                  inv_freq, case.sink, case.local, case.chunk,
                                                  case.query_block, scale, **kw)
    low, low_lse = lowp_attention(q, k, v, lens, idx, inv_freq, case, scale, **kw)
    assert_close_rule(out, ref, low, q.dtype, "out")
    assert_close_rule(lse, ref_lse, low_lse, q.dtype, "lse")
    return low


# Both dtypes with the default RoPE; the other RoPE variants in bf16.
ATTN_VARIANTS = [(torch.bfloat16, *ROPE[0]), (torch.float16, *ROPE[0]),
                 *[(torch.bfloat16, *r) for r in ROPE[1:]]]


def check_cuda_attention(case, dtype, style, positions, rope_scale, scale=None):
    """CUDA gather_attention over the reference's exact selection, checked against the
    reference (scale: 1 / sqrt(D) unless given). Returns the output, the low-precision baseline
    of the tolerance rule, q, and the same call on another backend."""
    q, k, v, lens, inv_freq = cuda_inputs(case, dtype)
    idx = reference.select_chunks_ref(q, k, None, lens, case.sink, case.local, case.chunk,
                                      case.topk, "max", case.query_block)
    kw = dict(rope_scale=rope_scale, rope_style=style, positions=positions)
    scale = 1 / math.sqrt(case.d) if scale is None else scale

    def call(backend):
        return reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv_freq,
                                            sink=case.sink, local=case.local, chunk=case.chunk,
                                            query_block=case.query_block, scale=scale,
                                            backend=backend, **kw)

    out, lse = call("cuda")
    assert out.dtype == dtype and lse.dtype == torch.float32
    low = check_attention(case, q, k, v, lens, idx, inv_freq, out, lse, scale, **kw)
    return out, low, q, call


@pytest.mark.parametrize("dtype,style,positions,rope_scale", ATTN_VARIANTS,
                         ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gather_attention(case, dtype, style, positions, rope_scale):
    out, low, q, call = check_cuda_attention(case, dtype, style, positions, rope_scale)
    if triton_ready("gather_attention", q, case):
        other, _ = call("triton")
        assert_close_rule(out, other.float(), low, dtype, "out vs triton")


# Decode over ~2 * ceil(3 * SMs / 4) - 1 key tiles of 2 sequences and 2 kv heads, the last one
# partial. GQA 16 (16 rows: the m16 kernel) gets splits of two key tiles (the m16 plan: about
# three CTAs per SM), so every split's second stage, the stepped RoPE seeds of both tiles and
# the merge of ~100 splits are checked. GQA 4 (the transposed kernel, one K/V stage, up to 6
# CTAs per SM) gets two key tiles per split where the middle is shorter than the fused top-k's
# rows (fewer than 4096 chunks: the stage refilled after P V, ~100 splits), else one (a merge
# of ~200 splits): `long_middle` puts Nmax past that. Shapes follow the device's SM count so
# the plans land there. Both RoPE paths (16-byte units by stepping; R/2 = 24 per element), both
# position modes, D 128 and 256.
def decode_case(b: int, hq: int, hkv: int, d: int, n_keys: int, lens, rotary=None,
                long_middle: bool = False) -> Case:
    """A decode Case (Lq 1) with sink 16, chunk 32, topk 8 and the local window that makes
    gathered_keys_max = n_keys; Nmax 3000 tokens past the window, or 4100 chunks (long_middle).
    lens(nmax): the lengths."""
    sink, chunk, topk = 16, 32, 8
    local = n_keys - sink - topk * chunk - chunk
    nmax = local + (sink + 4100 * chunk if long_middle else 3000)
    return Case(b, hq, hkv, 1, nmax, d, sink, local, chunk, topk, 1, lens=lens(nmax),
                rotary=rotary)


def two_tile_case(d: int, rotary: int | None, hq: int = 8, long_middle: bool = False) -> Case:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = -(-3 * sms // 4)
    return decode_case(2, hq, 2, d, 64 * (2 * splits - 2) + 40,
                       lambda nmax: (nmax, nmax - 1900), rotary, long_middle)


# (d, rotary, hq, long_middle); the m16 plan (hq 32) does not depend on the middle's length.
TWO_TILE_SHAPES = [(d, r, hq, False) for hq in (8, 32) for d, r in ((128, None), (128, 48),
                                                                    (256, None))]
TWO_TILE_SHAPES += [(d, r, 8, True) for d, r in ((128, None), (128, 48), (256, None))]


@pytest.mark.parametrize("dtype,style,positions,rope_scale",
                         [(torch.bfloat16, *r) for r in ROPE] + [(torch.float16, *ROPE[0])],
                         ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("d,rotary,hq,long_middle", TWO_TILE_SHAPES, ids=str)
def test_decode_two_tile_splits(d, rotary, hq, long_middle, dtype, style, positions, rope_scale):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    check_cuda_attention(two_tile_case(d, rotary, hq, long_middle), dtype, style, positions,
                         rope_scale)


# The transposed decode kernel (blocks of at most 8 rows) on its two-stage plan: 8 sequences x
# 8 kv heads (GQA 4) over more key tiles than its one-tile plan would have splits (SMs / 4 + 2
# tiles against at most SMs / 8 splits), so it keeps two K/V stages on the three-per-SM plan:
# splits of several key tiles, a shorter last split, a partial last tile; sequences of varied
# lengths, one shorter than the local window.
def transposed_two_stage_case(d: int) -> Case:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return decode_case(8, 32, 8, d, 64 * (sms // 4 + 1) + 40,
                       lambda nmax: (nmax, nmax - 1900, 700, nmax - 1, nmax - 2900, nmax - 777,
                                     1234, nmax - 3001))


@pytest.mark.parametrize("dtype,style,positions,rope_scale",
                         [(torch.bfloat16, *ROPE[0]), (torch.bfloat16, *ROPE[1]),
                          (torch.float16, *ROPE[3])],
                         ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("d", [64, 128, 256])
def test_decode_transposed_two_stages(d, dtype, style, positions, rope_scale):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    check_cuda_attention(transposed_two_stage_case(d), dtype, style, positions, rope_scale)


# The many-rows kernel's RoPE paths: 16-byte rotary units from the table (compact) or sincosf
# (original), both styles, full and partial R; R/2 = 10 (neither style's units) and 20 (the
# interleaved units only) take the per-pair loop. Several key tiles per block, the first ones
# before every query (softmax without the mask), the last ones masked.
#        b  hq hkv  lq   nmax    d  sink local chunk topk qb
MANY_ROWS = [
    Case(2, 8, 2, 45, 900, 64, 8, 48, 16, 6, 16, lens=(900, 517)),
    Case(1, 4, 1, 70, 1200, 128, 16, 64, 16, 8, 32),
]


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("rotary", [None, 48, 40, 20], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("base", MANY_ROWS, ids=[c.id for c in MANY_ROWS])
def test_many_rows_rope_paths(base, rotary, style, positions):
    case = dataclasses.replace(base, rotary=rotary)
    q, k, v, lens, inv_freq = cuda_inputs(case, torch.bfloat16)
    idx = reference.select_chunks_ref(q, k, None, lens, case.sink, case.local, case.chunk,
                                      case.topk, "max", case.query_block)
    kw = dict(rope_style=style, positions=positions)
    scale = 1 / math.sqrt(case.d)
    out, lse = reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv_freq,
                                            sink=case.sink, local=case.local, chunk=case.chunk,
                                            query_block=case.query_block, scale=scale,
                                            backend="cuda", **kw)
    check_attention(case, q, k, v, lens, idx, inv_freq, out, lse, scale, **kw)


@pytest.mark.parametrize("sign", [-1.0, 0.0], ids=["negative", "zero"])
@pytest.mark.parametrize("base", MANY_ROWS, ids=[c.id for c in MANY_ROWS])
def test_many_rows_scale_not_positive(base, sign):
    """The many-rows softmax takes the raw row max and scales it once only when the scale is
    positive; a scale <= 0 must take the masked path on every tile and still match."""
    check_cuda_attention(base, torch.bfloat16, "half", "compact", 1.0,
                         scale=sign / math.sqrt(base.d))


# The sm_90a many-rows kernel rotates K once per query block into a workspace of at most
# 256 MiB, so a call whose blocks do not fit runs as several groups of blocks (here 3 + 3 + 1,
# every block's slot 2 x 4 x 36672 rows x 256 bytes = 75 MB); other devices run it in one launch.
# The second sequence is shorter than the local window (no middle).
#        b  hq hkv  lq    nmax    d  sink local chunk topk qb
PREROT_GROUPS = Case(2, 8, 4, 200, 40_000, 128, 16, 36_000, 64, 8, 32, lens=(40_000, 23_456))


def prerot_groups(case: Case) -> int:
    """Launch groups of the sm_90a many-rows path (docs/design.md section 4)."""
    rows = (min(case.sink, case.nmax) + case.topk * case.chunk
            + min(case.query_block + case.local + case.chunk - 1, case.nmax))
    rows = -(-rows // 64) * 64
    per_group = max(1, (256 << 20) // (case.b * case.hkv * rows * case.d * 2))
    blocks = -(-case.lq // case.query_block)
    return -(-blocks // min(per_group, blocks))


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_many_rows_several_workspace_groups(positions):
    case = PREROT_GROUPS
    assert prerot_groups(case) == 3
    q, k, v, lens, inv_freq = cuda_inputs(case, torch.bfloat16)
    idx = reference.select_chunks_ref(q, k, None, lens, case.sink, case.local, case.chunk,
                                      case.topk, "max", case.query_block)
    scale = 1 / math.sqrt(case.d)
    out, lse = reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv_freq,
                                            sink=case.sink, local=case.local, chunk=case.chunk,
                                            query_block=case.query_block, scale=scale,
                                            positions=positions, backend="cuda")
    check_attention(case, q, k, v, lens, idx, inv_freq, out, lse, scale, positions=positions)


def cuda_two_ops(case, rep, q, k, v, lens, inv_freq, positions="compact"):
    """(reps, idx, out, lse): reps (None for "max"), select_chunks, then gather_attention, each
    a separate call on the cuda backend."""
    reps = None
    if rep != "max":
        reps = reattention.chunk_reps(k, lens, sink=case.sink, chunk=case.chunk, rep=rep,
                                      backend="cuda")
    kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, query_block=case.query_block)
    idx = reattention.select_chunks(q, k, lens, reps=reps, topk=case.topk, rep=rep,
                                    backend="cuda", **kw)
    out, lse = reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv_freq,
                                            positions=positions, backend="cuda", **kw)
    return reps, idx, out, lse


def select_then_attend(case, rep, q, k, v, lens, inv_freq, positions="compact"):
    """The whole CUDA path (reps, selection, attention), each stage checked."""
    reps, idx, out, lse = cuda_two_ops(case, rep, q, k, v, lens, inv_freq, positions)
    check_selection(q, k, reps, lens, case, rep, idx)
    check_attention(case, q, k, v, lens, idx, inv_freq, out, lse, 1 / math.sqrt(case.d),
                    positions=positions)


@pytest.mark.parametrize("rep", ["max", "bound", "mean"])  # fastest: one cache per case
@pytest.mark.parametrize("case", LONG, ids=LONG_IDS)
def test_long_cache(case, rep):
    """Selection then attention at up to 1M tokens, batch 3 of different lengths."""
    select_then_attend(case, rep, *long_inputs(case))


# --------------------------------------------------------------------------- contract v2
# Calls much longer than the local window: every query block has its own middle, K_eff, local
# window [mid_end, P1] and compact shift (docs/design.md section 2), in both attention kernels.
#        b  hq hkv  lq    nmax    d  sink local chunk topk qb
V2 = [
    Case(2, 8, 2, 700, 3000, 128, 16, 64, 16, 8, 64, lens=(3000, 1200)),     # 11 blocks, GQA 4
    Case(2, 8, 2, 700, 3000, 128, 16, 64, 16, 8, 128, lens=(2999, 777)),     # 6 blocks, last 60
    Case(3, 4, 4, 700, 2500, 64, 4, 64, 8, 16, 64, lens=(2500, 700, 1501)),  # N = Lq: dense first
    Case(1, 16, 2, 700, 4000, 256, 8, 64, 32, 4, 128),                       # D 256, 8 row tiles
    Case(2, 4, 1, 700, 3000, 64, 0, 64, 17, 12, 4, lens=(3000, 2222)),       # 16 rows: decode
]                                                                            # kernel, 175 blocks
V2_IDS = [c.id for c in V2]


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("case", V2, ids=V2_IDS)
def test_v2_long_call(case, rep, positions):
    """Selection and attention of a 700-query call against the v2 reference."""
    select_then_attend(case, rep, *cuda_inputs(case, torch.bfloat16), positions=positions)


@pytest.mark.parametrize("rep", ["max", "bound"])
@pytest.mark.parametrize("case", V2, ids=V2_IDS)
def test_v2_call_equals_per_block_calls(case, rep):
    """One call returns what its blocks return as calls of their own (cache_seqlens = P1 + 1):
    the same selection bit for bit (a chunk's score depends only on its data and the block's
    rows), and the same output up to the rounding of a different key split."""
    q, k, v, lens, inv_freq = cuda_inputs(case, torch.bfloat16)
    lens = ops.check_seqlens(lens, k, case.lq)
    reps = None if rep == "max" else reattention.chunk_reps(
        k, lens, sink=case.sink, chunk=case.chunk, rep=rep, backend="cuda")
    kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, query_block=case.query_block,
              backend="cuda")
    idx = reattention.select_chunks(q, k, lens, reps=reps, topk=case.topk, rep=rep, **kw)
    out, lse = reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv_freq, **kw)
    for beta, (s, e) in enumerate(layout.query_blocks(case.lq, case.query_block)):
        blens = lens - case.lq + e
        qb = q[:, :, s:e].contiguous()
        one_idx = reattention.select_chunks(qb, k, blens, reps=reps, topk=case.topk, rep=rep, **kw)
        assert torch.equal(one_idx, idx[:, :, beta:beta + 1]), f"block {beta}"
        one, one_lse = reattention.gather_attention(qb, k, v, one_idx, blens, inv_freq=inv_freq,
                                                    **kw)
        noise = NOISE[torch.bfloat16] * max(1.0, one.float().abs().max().item())
        assert max_err(out[:, :, s:e], one) <= noise, f"block {beta}"
        assert max_err(lse[:, :, s:e], one_lse) <= 1e-4 * max(1.0, one_lse.abs().max().item())


# Exact ties on every scoring path: decode with >= 4096 chunks (bound/mean fuse the top-k into
# the scoring kernel), the many-rows GEMM kernel with chunk 17 (chunks straddle column tiles),
# and few-rows blocks of D 256 in a 9-query call.
TIES = [
    dict(hq=8, hkv=2, lq=1, query_block=1, n_chunks=5000, d=64, sink=5, local=24, chunk=8),
    dict(hq=8, hkv=2, lq=70, query_block=32, n_chunks=700, d=128, sink=3, local=40, chunk=17),
    dict(hq=4, hkv=1, lq=9, query_block=2, n_chunks=900, d=256, sink=0, local=16, chunk=16),
]


@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("shape", TIES, ids=lambda t: f"Lq{t['lq']}-Q{t['query_block']}-D{t['d']}")
def test_identical_chunks_tie_low(shape, rep):
    """34 bit-identical chunks score bit-identically wherever they fall (tile, warp, CTA chunk
    range, fused top-k candidates), so each block takes the lowest-index ones."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    q, k, copies = identical_chunks_case(**shape)
    q, k = q.cuda(), k.cuda()
    require("cuda", q)
    seg = dict(sink=shape["sink"], local=shape["local"], chunk=shape["chunk"])
    reps = None if rep == "max" else reattention.chunk_reps(
        k, sink=shape["sink"], chunk=shape["chunk"], rep=rep, backend="cuda")
    for topk in (1, 7, 33, 34):
        idx = reattention.select_chunks(q, k, reps=reps, topk=topk,
                                        query_block=shape["query_block"], rep=rep,
                                        backend="cuda", **seg)
        check_identical_chunks(idx, q, k, reps, copies, topk=topk,
                               query_block=shape["query_block"], rep=rep, **seg)


def test_strided_cache_seqlens_on_direct_op_calls():
    """torch.ops calls skip ops.check_seqlens (which makes lengths contiguous): the launchers
    must not read a strided view (a column of a [B, 2] table) as lens[b] at offset b."""
    case = Case(2, 8, 2, 3, 900, 128, 8, 64, 16, 4, 2, lens=(900, 333))
    q, k, v, lens, inv_freq = cuda_inputs(case, torch.bfloat16)
    strided = torch.stack([lens, torch.full_like(lens, 7)], 1)[:, 0]
    assert not strided.is_contiguous()
    ops_ = torch.ops.reattention
    args = (case.sink, case.local, case.chunk, case.topk, "bound", case.query_block)
    for name, lens_ in (("contiguous", lens), ("strided", strided)):
        reps = layout.new_reps(k, case.sink, case.chunk, "bound").zero_()
        ops_.chunk_reps(k, lens_, reps, case.sink, case.chunk, "bound", 0)
        idx = ops_.select_chunks(q, k, reps, lens_, *args)
        out, lse = ops_.gather_attention(q, k, v, lens_, idx, inv_freq, case.sink, case.local,
                                         case.chunk, case.query_block, 128 ** -0.5, 1.0, "half",
                                         "compact")
        if name == "contiguous":
            want = (reps, idx, out, lse)
        else:
            for got, exp in zip((reps, idx, out, lse), want):
                assert torch.equal(got, exp)


@needs_cpp_error_path
def test_float32_is_refused():
    case = CASES[0]
    q, k, v, lens, inv_freq = cuda_inputs(case, torch.bfloat16)
    q, k, v = q.float(), k.float(), v.float()
    idx = torch.full((1, 4, 1, 4), -1, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.reattention.gather_attention(q, k, v, ops.check_seqlens(None, k, 1), idx,
                                               inv_freq, 8, 64, 16, 1, 0.125, 1.0, "half",
                                               "compact")


# --------------------------------------------------------------------------- opcheck, graphs
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lq,qb", [(1, 1), (40, 16)])
def test_opcheck(dtype, lq, qb):
    case = Case(2, 8, 2, lq, 700, 128, 8, 64, 16, 4, qb, lens=(700, 433))
    q, k, v, lens, inv = cuda_inputs(case, dtype)
    for rep in ("bound", "mean"):
        reps = torch.zeros(ops.reps_shape(k, 8, 16, rep), dtype=dtype, device="cuda")
        torch.library.opcheck(torch.ops.reattention.chunk_reps.default,
                              (k, lens, reps, 8, 16, rep, 0))
        torch.library.opcheck(torch.ops.reattention.select_chunks.default,
                              (q, k, reps, lens, 8, 64, 16, 4, rep, qb))
    torch.library.opcheck(torch.ops.reattention.select_chunks.default,
                          (q, k, None, lens, 8, 64, 16, 4, "max", qb))
    idx = torch.ops.reattention.select_chunks(q, k, None, lens, 8, 64, 16, 4, "max", qb)
    torch.library.opcheck(torch.ops.reattention.gather_attention.default,
                          (q, k, v, lens, idx, inv, 8, 64, 16, qb, 0.125, 1.0, "half",
                           "compact"))


def captured(step):
    """(graph, outputs): step() run once on a side stream, then captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def check_replays(graph, outputs, q, lens, eager):
    """Replays a captured step of two sequences on new queries and lengths (20000 tokens at
    most); after each replay its outputs equal eager()'s, bit for bit."""
    for n0, n1, seed in ((20_000, 9_000, 1), (15_555, 19_999, 2)):
        g = torch.Generator(device="cuda").manual_seed(seed)
        q.copy_(torch.randn(q.shape, generator=g, device="cuda"))
        lens.copy_(torch.tensor([n0, n1], dtype=torch.int32))
        graph.replay()
        for got, want in zip(outputs, eager(), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("rep", ["bound", "max"])
def test_cuda_graph_decode_step(rep):
    """select + attend captured once, replayed on new queries and longer caches."""
    case = Case(2, 8, 2, 1, 20_000, 128, 64, 1024, 64, 8, 1, lens=(20_000, 9_000))
    q, k, v, lens, inv_freq = cuda_inputs(case, torch.bfloat16)
    reps = make_reps(k, None, case, rep)
    kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, query_block=1)

    def step():
        idx = reattention.select_chunks(q, k, lens, reps=reps, topk=case.topk, rep=rep,
                                        backend="cuda", **kw)
        return reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv_freq,
                                            backend="cuda", **kw)

    check_replays(*captured(step), q, lens, step)


# --------------------------------------------------------------------------- attend
# torch.ops.reattention.attend (what reattention_attn runs on "cuda"): on sm_90 its decode
# attention starts beside the selection's last kernel and only the CTAs that read selected
# chunks wait for it (REATTENTION_OVERLAP=0: one kernel after the other). Both ways must give
# the two ops' results bit for bit: decode shapes with one and several key tiles per split,
# sequences without middle chunks, the top-k launched early (1024 to 4096 chunks, rows of up to
# 2048 and 4096 chunks, one sequence shorter than the other), the fused top-k (over 4096
# chunks), a sink that is not a whole key tile, D 64 and 256, calls of several decode blocks,
# and a many-rows call (no overlap there).
#        b  hq hkv  lq    nmax    d  sink local chunk topk qb
ATTEND = [
    Case(3, 8, 2, 1, 300, 64, 16, 32, 16, 2, 1, lens=(40, 300, 129)),       # one with M = 0
    Case(2, 8, 2, 1, 2000, 256, 16, 128, 32, 8, 1, lens=(2000, 1501)),      # D 256
    Case(1, 32, 8, 1, 40_000, 128, 64, 1024, 64, 32, 1),                    # one tile per split
    Case(1, 32, 8, 1, 131_072, 128, 64, 4096, 64, 32, 1),                   # early top-k
    Case(2, 8, 2, 1, 200_000, 128, 64, 4096, 64, 32, 1, lens=(200_000, 90_000)),  # early, 16/thread
    Case(2, 8, 2, 1, 300_000, 128, 24, 2048, 64, 16, 1, lens=(300_000, 7_000)),  # fused top-k
    Case(1, 64, 4, 1, 30_000, 128, 64, 4096, 64, 64, 1),                    # 16 rows, 2 tiles
    Case(2, 4, 2, 5, 3000, 128, 16, 64, 16, 8, 2, lens=(3000, 1500)),       # 3 blocks of <= 4 rows
    Case(1, 8, 1, 4, 2000, 64, 8, 64, 16, 4, 2),                            # 2 blocks of 16 rows
    Case(2, 8, 2, 40, 3000, 128, 16, 64, 16, 8, 16, lens=(3000, 1200)),     # many rows
]


@pytest.mark.parametrize("mode", ["0", "1"])
@pytest.mark.parametrize("rep", ["bound", "max", "mean"])
@pytest.mark.parametrize("case", ATTEND, ids=[c.id for c in ATTEND])
def test_attend_equals_the_two_ops(case, rep, mode, monkeypatch):
    q, k, v, lens, inv_freq = cuda_inputs(case, torch.bfloat16)
    if lens is None:  # the op takes the lengths as a tensor
        lens = torch.full((case.b,), case.nmax, dtype=torch.int32, device="cuda")
    reps, idx, want, want_lse = cuda_two_ops(case, rep, q, k, v, lens, inv_freq)
    monkeypatch.setenv("REATTENTION_OVERLAP", mode)
    out, lse, got_idx = torch.ops.reattention.attend(
        q, k, v, reps, lens, inv_freq, case.sink, case.local, case.chunk, case.topk, rep,
        case.query_block, 1 / math.sqrt(case.d), 1.0, "half", "compact", None)
    torch.testing.assert_close(got_idx, idx, rtol=0, atol=0)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    api = reattention.reattention_attn(q, k, v, lens, sink=case.sink, local=case.local,
                                       chunk=case.chunk, topk=case.topk,
                                       query_block=case.query_block, rep=rep, reps=reps,
                                       inv_freq=inv_freq, backend="cuda")
    torch.testing.assert_close(api, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["0", "1"])
def test_attend_paged_and_graph(mode, monkeypatch):
    """attend on a paged cache, captured in a CUDA graph and replayed on new queries and
    lengths: the two ops' results, bit for bit."""
    monkeypatch.setenv("REATTENTION_OVERLAP", mode)
    case = Case(2, 16, 4, 1, 20_000, 128, 64, 1024, 64, 8, 1, lens=(20_000, 9_000))
    q, k, v, lens, inv_freq = cuda_inputs(case, torch.bfloat16)
    full = torch.full_like(lens, case.nmax)  # every token paged: the replays grow the lengths
    kp, table = to_paged(k, full, 64)
    vp, _ = to_paged(v, full, 64)
    reps = reattention.chunk_reps(kp, full, sink=case.sink, chunk=case.chunk, rep="bound",
                                  backend="cuda", block_table=table)
    args = (case.sink, case.local, case.chunk, case.topk, "bound", 1, 1 / math.sqrt(case.d),
            1.0, "half", "compact", table)

    def step():
        return torch.ops.reattention.attend(q, kp, vp, reps, lens, inv_freq, *args)

    kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, query_block=1)

    def two_ops():
        idx = reattention.select_chunks(q, kp, lens, reps=reps, topk=case.topk, rep="bound",
                                        backend="cuda", block_table=table, **kw)
        out, lse = reattention.gather_attention(q, kp, vp, idx, lens, inv_freq=inv_freq,
                                                backend="cuda", block_table=table, **kw)
        return out, lse, idx

    check_replays(*captured(step), q, lens, two_ops)


def test_sanitizer_smoke():
    """A tiny run of every kernel path, small enough for compute-sanitizer (-k sanitizer)."""
    for case, rep in ((Case(2, 8, 2, 1, 700, 64, 8, 64, 16, 4, 1, lens=(700, 301)), "bound"),
                      (Case(1, 4, 2, 40, 600, 128, 8, 64, 16, 4, 16), "max"),
                      (Case(1, 4, 2, 3, 500, 256, 8, 64, 24, 4, 2), "mean")):
        select_then_attend(case, rep, *cuda_inputs(case, torch.bfloat16))
