"""The graph-captured decode step of reattention.hf (DecodeGraph) and the device-side append
it is built on.

On the CPU the very same step runs uncaptured (``DecodeGraph.capture = False``: static input
buffers, appends at the device length, host lengths advanced afterwards): its logits must equal
the eager path's bit for bit (torch.equal: the same ops in the same order on the same
bytes), so must its greedy tokens. The captured replay itself needs a GPU (marked ``gpu``).
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import reattention  # noqa: E402
from reattention import hf  # noqa: E402
from reattention.cache import LayerCache  # noqa: E402

from test_hf import _ids, _model, _sparse  # noqa: E402

GRAPH_MODELS = ["llama3", "mistral", "qwen2-yarn", "qwen3-qknorm"]


# --------------------------------------------------------------------------- LayerCache
@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
@pytest.mark.parametrize("max_length", [None, 97])
def test_append_on_device_equals_append(rep, max_length):
    """Same keys, values, lengths and reps as append, for decode (L=1) and longer appends,
    whether the buffers are fixed or grow (make_room regrows like append)."""
    cfg = reattention.ReAttentionConfig(sink=5, local=8, chunk=4, topk=2, query_block=4, rep=rep)
    torch.manual_seed(0)
    eager = LayerCache(cfg, max_length=max_length, backend="reference")
    device = LayerCache(cfg, max_length=max_length, backend="reference")
    prompt = torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    eager.append(*prompt)
    device.append(*prompt)
    for n_new in [1] * 9 + [3, 1, 7, 1] * 5:
        if eager.length + n_new > (max_length or 10 ** 9):
            break
        k, v = torch.randn(2, 3, n_new, 8), torch.randn(2, 3, n_new, 8)
        eager.append(k, v)
        device.make_room(n_new)
        before = device.length
        device.append_on_device(k, v)
        assert device.length == before  # the host length waits for advance()
        device.advance(n_new)
        assert device.length == eager.length
        assert torch.equal(device.cache_seqlens, eager.cache_seqlens)
        assert torch.equal(device.keys, eager.keys) and torch.equal(device.values, eager.values)
        if rep != "max":
            done = eager._complete_chunks(eager.length)
            assert torch.equal(device.reps[:, :, :done], eager.reps[:, :, :done])
    assert eager.length > 40


def test_append_on_device_refuses_what_it_cannot_serve():
    cfg = reattention.ReAttentionConfig(sink=4, local=8, chunk=4, topk=2, query_block=4,
                                        rep="bound")
    kv = torch.randn(1, 2, 9, 8)
    paged = LayerCache(cfg, page_size=4)
    paged.append(kv, kv)
    with pytest.raises(ValueError, match="contiguous layout: a paged cache"):
        paged.make_room(1)
    with pytest.raises(ValueError, match="contiguous layout"):
        paged.append_on_device(kv[:, :, :1], kv[:, :, :1])
    with pytest.raises(ValueError, match="allocated"):
        LayerCache(cfg).make_room(1)
    full = LayerCache(cfg, max_length=10)
    full.append(kv, kv)
    with pytest.raises(ValueError, match="exceed the capacity"):
        full.append_on_device(kv[:, :, :2], kv[:, :, :2])
    with pytest.raises(ValueError, match="max_length"):
        full.make_room(2)
    with pytest.raises(ValueError, match=r"k must be \[B=1, Hkv=2"):
        full.append_on_device(kv[:, :1, :1], kv[:, :1, :1])
    with pytest.raises(ValueError, match="n_new must be"):
        full.advance(2)


# --------------------------------------------------------------------------- generate
def _generate(model, ids, cache, graph: bool, **kw):
    """Greedy generate with the uncaptured graph step (graph=True) or eagerly, with logits."""
    hf.decode_graph(model).capture = False
    kw.setdefault("do_sample", False)
    out = hf.generate(model, ids, cache, max_new_tokens=kw.pop("new", 14), pad_token_id=0, return_dict_in_generate=True, output_logits=True,
                      disable_compile=not graph, attention_mask=torch.ones_like(ids), **kw)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("name", GRAPH_MODELS)
@pytest.mark.parametrize("rep", ["max", "bound"])
def test_graph_step_equals_eager_generate(name, rep):
    """Selection active (topk 2 of up to 15 chunks), a prefilled cache and a fresh one."""
    model = _model(name)
    ids = _ids(100)
    hf.enable(model, _sparse(rep))
    runner = hf.decode_graph(model)
    want, want_logits = _generate(model, ids, hf.ReAttentionCache(model), graph=False)
    assert runner.replays == 0
    got, got_logits = _generate(model, ids, hf.ReAttentionCache(model), graph=True)
    assert torch.equal(got, want) and torch.equal(got_logits, want_logits)
    assert runner.replays == 13  # every step but the prefill's
    # A prefilled cache (hf.prefill's query blocks differ from generate's one-shot prompt's).
    runs = []
    for graph in (False, True):
        cache = hf.ReAttentionCache(model)
        hf.prefill(model, ids, cache, chunk_size=32, progress=False)
        runs.append(_generate(model, ids, cache, graph=graph))
        assert cache.get_seq_length() == 113
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runner.replays == 26


@pytest.mark.parametrize("rep", ["max", "mean"])
def test_graph_step_batch_and_crop(rep):
    """Batch 3, then crop and decode again from the cropped cache (the buffers stay put, so a
    captured graph would stay valid: the step's key does not change)."""
    model = _model("llama3")
    ids = _ids(90, b=3)
    hf.enable(model, _sparse(rep))
    runs = {}
    for graph in (False, True):
        cache = hf.ReAttentionCache(model)
        first = _generate(model, ids, cache, graph=graph)
        cache.crop(-9)
        again = _generate(model, first[0][:, :-8], cache, graph=graph)
        runs[graph] = first, again, cache.get_seq_length()
    for a, b in zip(runs[False][:2], runs[True][:2]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert runs[False][2] == runs[True][2] == (90 + 13 - 9) + 2 + 13
    assert hf.decode_graph(model)._key is not None


def test_generate_reserves_so_no_decode_step_regrows(monkeypatch):
    regrows = []
    regrow = LayerCache._regrow
    monkeypatch.setattr(LayerCache, "_regrow",
                        lambda self, capacity: regrows.append(capacity) or regrow(self, capacity))
    model = _model("llama3")
    ids = _ids(70)
    hf.enable(model, _sparse("bound"))
    hf.decode_graph(model).capture = False
    cache = hf.ReAttentionCache(model)
    hf.prefill(model, ids, cache, chunk_size=32, progress=False, reserve_new_tokens=1)
    assert cache.layers[0].kv.capacity < 70 + 300
    hf.generate(model, ids, cache, max_new_tokens=300, min_new_tokens=300, do_sample=False,
                pad_token_id=0)
    assert cache.get_seq_length() == 70 + 299
    grown = cache.layers[0].kv.capacity
    # One reservation per layer for the prompt and every new token (aligned to 256), where
    # growing step by step would have gone 256 -> 384.
    assert grown == 512 and regrows == [512, 512]
    cache.reset()
    hf.generate(model, ids[:, :60], cache, max_new_tokens=200, min_new_tokens=200,
                do_sample=False, pad_token_id=0)
    assert cache.layers[0].kv.capacity == grown and len(regrows) == 2  # room enough
    paged = hf.ReAttentionCache(model, page_size=8)
    hf.generate(model, ids, paged, max_new_tokens=200, min_new_tokens=200, do_sample=False,
                pad_token_id=0)
    assert paged.get_seq_length() == 70 + 199
    assert all(layer.kv.pool.regrows == 0 for layer in paged.layers)
    fixed = hf.ReAttentionCache(model, max_length=80)  # generate may end early: no error
    hf.generate(model, ids, fixed, max_new_tokens=5, do_sample=False, pad_token_id=0)


def test_graph_step_leaves_paged_caches_and_beams_eager_and_disable_removes_it():
    model = _model("llama3")
    ids = _ids(50)
    hf.enable(model, _sparse("bound"))
    runner = hf.decode_graph(model)
    want, want_logits = _generate(model, ids, hf.ReAttentionCache(model), graph=False)
    got, got_logits = _generate(model, ids, hf.ReAttentionCache(model, page_size=8), graph=True)
    assert torch.equal(got, want) and torch.equal(got_logits, want_logits)
    assert runner.replays == 0  # generate decodes a paged cache eagerly
    paged = hf.ReAttentionCache(model, page_size=8)
    hf.prefill(model, ids, paged, progress=False)
    with pytest.raises(ValueError, match="contiguous ReAttentionCache"):
        runner(input_ids=ids[:, -1:], use_cache=True, **hf._cache_kwargs(model, paged))
    beams = dict(num_beams=3, num_return_sequences=2, new=6)
    want = _generate(model, ids, hf.ReAttentionCache(model), graph=False, **beams)
    got = _generate(model, ids, hf.ReAttentionCache(model), graph=True, **beams)
    assert torch.equal(got[0], want[0]) and runner.replays == 0  # beam search: eager
    sampled = dict(do_sample=True, num_return_sequences=2, new=6)
    torch.manual_seed(5)
    want = _generate(model, ids, hf.ReAttentionCache(model), graph=False, **sampled)
    torch.manual_seed(5)
    got = _generate(model, ids, hf.ReAttentionCache(model), graph=True, **sampled)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert runner.replays == 5  # sampling (a repeated batch of 2) decodes through the step
    hf.disable(model)
    assert not {"get_compiled_call", "_valid_auto_compile_criteria"} & set(vars(model))
    with pytest.raises(ValueError, match="enable"):
        hf.decode_graph(model)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("rep", ["bound", "max"])
def test_captured_decode_equals_eager_at_128k(rep):
    """The needle model at 128K tokens: 64 greedy tokens from one CUDA graph replay each equal
    the eager decode's, logits bit for bit."""
    from reattention.needle.model import NEEDLE_SETTINGS, load_model

    model, _ = load_model("cuda", torch.bfloat16)
    cfg = reattention.ReAttentionConfig(**dict(NEEDLE_SETTINGS, rep=rep))
    hf.enable(model, cfg)
    ids = torch.randint(2, model.config.vocab_size, (1, 128 * 1024),
                        generator=torch.Generator().manual_seed(0)).cuda()
    runner = hf.decode_graph(model)
    outs = {}
    for graph in (False, True):
        cache = hf.ReAttentionCache(model)
        hf.prefill(model, ids, cache, chunk_size=8192, progress=False, reserve_new_tokens=64)
        out = hf.generate(model, ids, cache, max_new_tokens=64, min_new_tokens=64,
                          do_sample=False, return_dict_in_generate=True, output_logits=True,
                          disable_compile=not graph)
        outs[graph] = out.sequences, torch.stack(out.logits)
    assert torch.equal(outs[True][0], outs[False][0])
    assert torch.equal(outs[True][1], outs[False][1])
    assert runner.replays == 63 and runner.captures == 1  # generate's prefill: 1 eager token


@pytest.mark.gpu
@pytest.mark.parametrize("rep", ["bound", "max"])
def test_prefill_and_graph_decode_never_sync(rep):
    """hf.prefill in large calls and the replayed decode step make no host sync: under
    torch.cuda's sync debug mode "error" any device-to-host read raises."""
    from reattention.needle.model import NEEDLE_SETTINGS, load_model

    model, _ = load_model("cuda", torch.bfloat16)
    hf.enable(model, reattention.ReAttentionConfig(**dict(NEEDLE_SETTINGS, rep=rep)))
    ids = torch.randint(2, model.config.vocab_size, (1, 32 * 1024),
                        generator=torch.Generator().manual_seed(1)).cuda()
    cache = hf.ReAttentionCache(model)
    runner = hf.decode_graph(model)
    feed = hf._cache_kwargs(model, cache)
    tok = ids[:, -1:]
    step = lambda: runner(input_ids=tok, use_cache=True, **feed)  # noqa: E731
    # Room for everything up front: a regrowth would move the buffers and make the next step
    # capture again (torch.cuda.graph synchronises), inside the checked region.
    hf.prefill(model, ids[:, :8192], cache, chunk_size=4096, progress=False,
               reserve_new_tokens=ids.shape[1])
    step()  # the capture: outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hf.prefill(model, ids, cache, chunk_size=8192, progress=False, reserve_new_tokens=64)
        for _ in range(8):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert runner.replays == 9 and cache.get_seq_length() == ids.shape[1] - 1 + 8
