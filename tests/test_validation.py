"""Every bad input of docs/design.md section 3.4 raises ValueError naming the argument, per backend."""
import re
import subprocess
import sys
import types

import pytest
import torch

import reattention

from conftest import require

BACKENDS = ["auto", "reference", "cpu", "triton", "cuda"]


def inputs(**over):
    t = dict(q=torch.randn(1, 4, 2, 16), k=torch.randn(1, 2, 300, 16),
             v=torch.randn(1, 2, 300, 16), lens=None)
    t.update(over)
    return t


KW = dict(sink=4, local=32, chunk=8, topk=2, query_block=4, rep="max")

BAD = {
    "q rank": (dict(q=torch.randn(4, 2, 16)), {}, "q must have 4 dims"),
    "k rank": (dict(k=torch.randn(2, 300, 16)), {}, "k_cache must have 4 dims"),
    "v shape": (dict(v=torch.randn(1, 2, 299, 16)), {}, "v_cache shape"),
    "k dtype": (dict(k=torch.randn(1, 2, 300, 16, dtype=torch.float16)), {}, "k_cache dtype"),
    "v dtype": (dict(v=torch.randn(1, 2, 300, 16, dtype=torch.bfloat16)), {}, "v_cache dtype"),
    "q dtype": (dict(q=torch.randint(0, 3, (1, 4, 2, 16)), k=torch.randint(0, 3, (1, 2, 300, 16)),
                     v=torch.randint(0, 3, (1, 2, 300, 16))), {}, "q must be float16"),
    "device": (dict(k=torch.randn(1, 2, 300, 16, device="meta")), {}, "k_cache is on meta"),
    "gqa": (dict(q=torch.randn(1, 3, 2, 16)), {}, "multiple of k_cache heads"),
    "odd D": (dict(q=torch.randn(1, 4, 2, 15), k=torch.randn(1, 2, 300, 15),
                   v=torch.randn(1, 2, 300, 15)), {}, "head dim D"),
    "batch": (dict(k=torch.randn(2, 2, 300, 16), v=torch.randn(2, 2, 300, 16)), {}, "k_cache must be"),
    "lens low": (dict(lens=torch.tensor([1], dtype=torch.int32)), {}, "cache_seqlens must lie in"),
    "lens high": (dict(lens=torch.tensor([301], dtype=torch.int32)), {}, "cache_seqlens must lie in"),
    "lens dtype": (dict(lens=torch.tensor([100])), {}, "cache_seqlens must be int32"),
    "lens size": (dict(lens=torch.tensor([100, 100], dtype=torch.int32)), {}, "cache_seqlens must have"),
    "topk": ({}, dict(topk=0), "topk must be an int >= 1"),
    "chunk": ({}, dict(chunk=0), "chunk must be an int >= 1"),
    "sink": ({}, dict(sink=-1), "sink must be an int >= 0"),
    "local": ({}, dict(local=-5), "local must be an int >= 0"),
    "query_block": ({}, dict(query_block=0), "query_block must be an int >= 1"),
    "mode": ({}, dict(rep="median"), "rep must be one of"),
    "rope_style": ({}, dict(rope_style="neox"), "rope_style must be one of"),
    "positions": ({}, dict(positions="absolute"), "positions must be one of"),
    "inv_freq": ({}, dict(inv_freq=torch.ones(9)), "inv_freq must have between 1 and D/2"),
    "reps with max": ({}, dict(reps=torch.zeros(1, 2, 37, 16)), "reps must be None with rep='max'"),
    "reps shape": ({}, dict(rep="mean", reps=torch.zeros(1, 2, 37, 8)), "reps for rep='mean'"),
    "backend": ({}, dict(backend="metal"), "backend must be one of"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_value_error(name, backend):
    t_over, kw_over, msg = BAD[name]
    t = inputs(**t_over)
    kw = dict(KW, backend=backend)
    kw.update(kw_over)
    with pytest.raises(ValueError, match=msg):
        reattention.reattention_attn(t["q"], t["k"], t["v"], t["lens"], **kw)


HINT = (r"{0} looks like \[B, {1}, H, D\]; this API takes \[B, H, {1}, D\] \(torch SDPA "
        r"layout\): pass {0}\.transpose\(1, 2\)")


@pytest.mark.parametrize("swapped", [("q",), ("k_cache", "v_cache"), ("q", "k_cache", "v_cache"),
                                     ("v_cache",)])
def test_bhld_layout_error_says_which_tensor_to_transpose(swapped):
    """A decode query and a cache passed as [B, L, H, D] (a projection before
    .transpose(1, 2)): the error names each tensor read that way."""
    t = dict(q=torch.randn(1, 8, 1, 16), k_cache=torch.randn(1, 2, 301, 16),
             v_cache=torch.randn(1, 2, 301, 16))
    t = {n: x.transpose(1, 2) if n in swapped else x for n, x in t.items()}
    with pytest.raises(ValueError) as e:
        reattention.reattention_attn(t["q"], t["k_cache"], t["v_cache"], **KW)
    for name in ("q", "k_cache", "v_cache"):
        hint = re.search(HINT.format(name, "L" if name == "q" else "N"), str(e.value))
        assert bool(hint) == (name in swapped), str(e.value)


def test_bhld_query_hint_from_the_ops_and_the_cache():
    q = torch.randn(1, 1, 8, 16)  # [B, L, H, D]
    k = torch.randn(1, 2, 301, 16)
    with pytest.raises(ValueError, match=HINT.format("q", "L")):
        reattention.select_chunks(q, k, **KW)
    with pytest.raises(ValueError, match=HINT.format("q", "L")):
        reattention.gather_attention(q, k, k, torch.zeros(1, 2, 1, 2, dtype=torch.int32),
                                     inv_freq=reattention.default_inv_freq(16), sink=4,
                                     local=32, chunk=8, query_block=4)
    layer = reattention.cache.LayerCache(reattention.ReAttentionConfig(sink=4, local=32, chunk=8))
    layer.append(torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16))
    with pytest.raises(ValueError, match=HINT.format("q", "L")):
        layer.attend(q)


def test_no_hint_when_no_transposed_reading_fits():
    t = inputs(q=torch.randn(1, 5, 1, 16))  # Hq=5 over Hkv=2 either way
    with pytest.raises(ValueError, match=r"positive multiple of k_cache heads Hkv=2 \(GQA\)$"):
        reattention.reattention_attn(t["q"], t["k"], t["v"], **KW)


def test_named_backend_that_cannot_run_says_why():
    t = inputs()
    with pytest.raises(ValueError, match="backend='cuda' cannot run this call"):
        reattention.reattention_attn(t["q"], t["k"], t["v"], backend="cuda", **KW)


def test_cuda_refuses_float32_naming_the_backends_that_take_it(monkeypatch):
    # README: fp32 on the cuda backend is a ValueError naming the backends that take it.
    # A stand-in for a CUDA tensor: the refusal reads only device, dtype and shape.
    monkeypatch.setitem(reattention.ops._status, "cuda", None)
    like = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32,
                                 shape=(1, 4, 2, 128))
    with pytest.raises(ValueError, match="backend='cuda' cannot run this call: .*float32; "
                                         "run it on the triton or reference backend"):
        reattention.ops.resolve_backend("cuda", like)


def test_rope_theta_errors_name_the_argument_of_the_call():
    with pytest.raises(ValueError, match=r"^theta must be > 0"):
        reattention.default_inv_freq(128, theta=-1.0)
    t = inputs()
    with pytest.raises(ValueError, match=r"^rope_theta must be > 0"):
        reattention.reattention_attn(t["q"], t["k"], t["v"], rope_theta=0.0, **KW)


def test_chunk_reps_rejects_max_and_bad_start():
    k = torch.randn(1, 2, 100, 16)
    with pytest.raises(ValueError, match="rep must be one of"):
        reattention.chunk_reps(k, sink=4, chunk=8, rep="max")
    with pytest.raises(ValueError, match="start_chunk must be"):
        reattention.chunk_reps(k, sink=4, chunk=8, rep="bound", start_chunk=-1)


def test_gather_attention_checks_idx():
    t = inputs()
    inv = reattention.default_inv_freq(16)
    for idx, msg in ((torch.zeros(1, 2, 1, 2), "idx must be int32"),
                     (torch.zeros(1, 2, 3, 2, dtype=torch.int32), r"idx must be \[B=1")):
        with pytest.raises(ValueError, match=msg):
            reattention.gather_attention(t["q"], t["k"], t["v"], idx, inv_freq=inv, sink=4,
                                         local=32, chunk=8, query_block=4)


def test_config_validates():
    with pytest.raises(ValueError, match="topk must be"):
        reattention.ReAttentionConfig(topk=0)
    with pytest.raises(ValueError, match="rep must be one of"):
        reattention.ReAttentionConfig(rep="avg")


def gather_with_host_idx(backend, row, lq, n):
    """gather_attention on CPU tensors (sink 4, local 16, chunk 8: M = (n - lq - 20) // 8
    middle chunks) with one idx row, where the wrapper reads idx on the host."""
    t = inputs(q=torch.randn(1, 2, lq, 16), k=torch.randn(1, 1, n, 16),
               v=torch.randn(1, 1, n, 16))
    if backend == "cpu":
        require("cpu", t["q"])
    if backend == "triton" and reattention.ops._kernel_refusal("triton", t["q"]) is not None:
        pytest.skip("the triton backend runs CPU tensors only under TRITON_INTERPRET=1")
    idx = torch.tensor(row, dtype=torch.int32).view(1, 1, 1, -1)
    return reattention.gather_attention(t["q"], t["k"], t["v"], idx,
                                        inv_freq=reattention.default_inv_freq(16), sink=4,
                                        local=16, chunk=8, query_block=4, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("j", [9, 11, -2])
def test_gather_attention_checks_idx_values(j, backend):
    """Chunk 9 of a 100-token cache (M = 9) lies in the local window; the reference used to
    gather it a second time, and skip -2 as padding, silently."""
    with pytest.raises(ValueError, match=rf"idx\[0, 0, 0, 0\]={j} must be -1 or a middle chunk"):
        gather_with_host_idx(backend, [j, -1], lq=1, n=100)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
def test_empty_batch(rep, backend):
    """B = 0 (an empty serving batch) gives empty outputs; the length check used to call
    torch.aminmax on the empty cache_seqlens and fail with a RuntimeError."""
    q, k, v = torch.randn(0, 2, 1, 8), torch.randn(0, 1, 50, 8), torch.randn(0, 1, 50, 8)
    if reattention.ops._kernel_refusal(backend, q) is not None:
        pytest.skip(reattention.ops._kernel_refusal(backend, q))
    kw = dict(sink=2, local=4, chunk=4, topk=2, query_block=1, rep=rep, backend=backend)
    for lens in (None, torch.zeros(0, dtype=torch.int32)):
        out, lse = reattention.reattention_attn(q, k, v, lens, return_lse=True, **kw)
        assert out.shape == (0, 2, 1, 8) and lse.shape == (0, 2, 1)


def test_empty_batch_cpu_gather_attention():
    """B = 0 on the cpu backend: gather_attention divided by the number of (b, h, block)
    items (0) when sizing its work split and killed the process with SIGFPE. Run in a child
    process so a crash fails the test instead of the whole session."""
    if reattention.available_backends()["cpu"] is not None:
        pytest.skip("the cpu backend is not built")
    code = ("import torch, reattention\n"
            "q, k = torch.randn(0, 2, 1, 8), torch.randn(0, 1, 50, 8)\n"
            "out, lse = reattention.reattention_attn(q, k, k.clone(), sink=2, local=4, chunk=4,\n"
            "    topk=2, backend='cpu', return_lse=True)\n"
            "print(tuple(out.shape), tuple(lse.shape))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, f"rc {res.returncode}: {res.stderr[-500:]}"
    assert res.stdout.strip() == "(0, 2, 1, 8) (0, 2, 1)"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("row", [[-1, 2, 5], [2, -1, 5]])
def test_gather_attention_checks_idx_padding_comes_last(row, backend):
    """-1 before a selected chunk: the Triton kernel read past the selected chunks and
    returned values of 1e28 while the reference and cpu skipped the -1."""
    with pytest.raises(ValueError, match=r"idx\[0, 0, 0\] = .*padding must come after"):
        gather_with_host_idx(backend, row, lq=3, n=200)


def test_review_fixes_bad_inputs_get_value_errors():
    """Found by review: each of these passed a check or crashed outside one."""
    from reattention import layout, ops
    from reattention.cache import LayerCache
    # A context-parallel shard (lq=0) can select every whole chunk: reps one chunk short
    # must be refused (it was accepted and then read out of bounds).
    k = torch.randn(1, 2, 4 + 3 * 8, 16)
    short = layout.new_reps(k, 4, 8, "bound")[:, :, :2]
    with pytest.raises(ValueError, match="reps holds 2 chunks"):
        ops.check_reps(short, k, lq=0, sink=4, local=0, chunk=8, rep="bound")
    # Zero query heads are not a [B, L, H, D] layout to transpose into.
    with pytest.raises(ValueError, match="positive multiple") as e:
        reattention.select_chunks(torch.randn(1, 0, 3, 16), k, sink=4, local=8, chunk=8,
                                  topk=2, query_block=4, rep="max", backend="reference")
    assert "transpose" not in str(e.value)
    cache = LayerCache(reattention.ReAttentionConfig(sink=4, local=8, chunk=8, topk=2),
                       backend="reference")
    cache.append(k, k)
    with pytest.raises(ValueError, match="index must be a 1-D integer tensor"):
        cache.select_batch(torch.tensor([0.5]))


def test_cli_refuses_an_unwritable_output_folder_before_running(capsys):
    pytest.importorskip("transformers")
    from reattention.needle.cli import _parse
    for flag in ("--plot", "--json"):
        with pytest.raises(SystemExit) as e:
            _parse([flag, "/nonexistent-folder/out"])
        assert e.value.code == 2
        assert f"argument {flag}: cannot write into /nonexistent-folder" in capsys.readouterr().err
