"""reattention.hf on tiny random transformers models (CPU, fp32, no downloads).

The strong checks: with topk >= M (every middle chunk selected) ReAttention *is* dense causal
attention with original positions, so the enabled model must reproduce the stock model's
logits and greedy tokens; with topk < M the ReAttentionCache path must equal the same
ReAttention run over stock-cached keys (reps recomputed from scratch), which checks the
in-place buffers and the incremental reps while selection is active.
"""
import logging
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

transformers = pytest.importorskip("transformers")

import reattention  # noqa: E402
from reattention import hf  # noqa: E402

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              max_position_embeddings=128)


def _config(name: str, **over):
    t = transformers
    kw = dict(COMMON, **over)
    if name == "llama3":
        rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=32)
        return t.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope,
                             **kw), t.LlamaForCausalLM
    if name == "llama-dynamic":
        rope = dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)
        return t.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope,
                             **kw), t.LlamaForCausalLM
    if name == "mistral":
        kw.setdefault("sliding_window", None)
        return t.MistralConfig(num_attention_heads=4, num_key_value_heads=1, **kw), \
            t.MistralForCausalLM
    if name == "qwen2-yarn":
        rope = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                    original_max_position_embeddings=32)
        return t.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope,
                             **kw), t.Qwen2ForCausalLM
    if name == "qwen3-qknorm":  # q/k norm before RoPE; Hq/Hkv = 7
        return t.Qwen3Config(num_attention_heads=7, num_key_value_heads=1, head_dim=16, **kw), \
            t.Qwen3ForCausalLM
    if name == "phi-partial":  # partial rotary: R = D/2
        rope = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)
        return t.PhiConfig(num_attention_heads=4, num_key_value_heads=4, rope_parameters=rope,
                           **kw), t.PhiForCausalLM
    if name == "phi3-longrope":
        rope = dict(rope_type="longrope", rope_theta=10000.0,
                    short_factor=[1.0 + 0.1 * i for i in range(8)],
                    long_factor=[2.0 + 0.5 * i for i in range(8)],
                    original_max_position_embeddings=64)
        return t.Phi3Config(num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope,
                            pad_token_id=0, eos_token_id=1, bos_token_id=1, **kw), \
            t.Phi3ForCausalLM
    if name == "gemma":
        return t.GemmaConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=16, **kw), \
            t.GemmaForCausalLM
    if name == "gemma2-softcap":
        return t.Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **kw), \
            t.Gemma2ForCausalLM
    raise KeyError(name)


MODELS = ["llama3", "llama-dynamic", "mistral", "qwen2-yarn", "qwen3-qknorm", "phi-partial",
          "phi3-longrope", "gemma"]


def _model(name="llama3", attn="sdpa", **over):
    config, cls = _config(name, **over)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return cls(config).eval()


def _ids(n, b=1, seed=1):
    return torch.randint(2, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


# sink 4 + local 16 with chunk 8: a 100-token prompt has up to 9 middle chunks.
DENSE = reattention.ReAttentionConfig(sink=4, local=16, chunk=8, topk=16, query_block=8)


def _sparse(rep="max"):
    return reattention.ReAttentionConfig(sink=4, local=16, chunk=8, topk=2, query_block=8,
                                         rep=rep)


@torch.no_grad()
def _chunked_logits(model, ids, cache, step):
    """Logits of every position, feeding ``ids`` through ``cache`` ``step`` tokens at a time."""
    return torch.cat([model(ids[:, s:s + step], **hf._cache_kwargs(model, cache)).logits
                      for s in range(0, ids.shape[1], step)], dim=1)


@torch.no_grad()
def _stock_logits(model, ids):
    return model(ids).logits


@pytest.mark.parametrize("name", MODELS)
def test_every_chunk_selected_equals_stock_attention(name):
    model = _model(name)
    ids = _ids(100)
    stock = {"sdpa": _stock_logits(model, ids)}
    model.set_attn_implementation("eager")
    stock["eager"] = _stock_logits(model, ids)
    model.set_attn_implementation("sdpa")
    hf.enable(model, DENSE)
    cache = hf.ReAttentionCache(model)
    # 13-token steps: blocks of 8 queries cut across steps, N never a multiple of the chunk.
    via_cache = _chunked_logits(model, ids, cache, 13)
    no_cache = _stock_logits(model, ids)
    assert cache.get_seq_length() == 100
    for ref in stock.values():
        torch.testing.assert_close(via_cache, ref, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(no_cache, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["llama3", "qwen3-qknorm", "phi-partial"])
def test_greedy_generate_is_token_identical(name):
    model = _model(name)
    ids = _ids(60)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kw)
    hf.enable(model, DENSE)
    cache = hf.ReAttentionCache(model)
    logits = hf.prefill(model, ids, cache, chunk_size=16, progress=False)
    assert cache.get_seq_length() == 59  # generate feeds the last prompt token itself
    assert torch.equal(logits.argmax(-1), want[:, 60])
    got = hf.generate(model, ids, cache, **kw)
    assert torch.equal(got, want)
    chunked = hf.generate(model, ids, hf.ReAttentionCache(model), prefill_chunk_size=16, **kw)
    assert torch.equal(chunked, want)
    assert torch.equal(model.generate(ids, **kw), want)  # no cache given: generate makes one


def test_beam_search_and_sampling_match_stock():
    """Beams reorder the cache (reorder_cache); several samples repeat it (batch_repeat_interleave)."""
    model = _model("llama3")
    ids = _ids(40)
    runs = [dict(num_beams=3, num_return_sequences=2, do_sample=False),
            dict(num_return_sequences=3, do_sample=True)]
    want = []
    for kw in runs:
        torch.manual_seed(3)
        want.append(model.generate(ids, max_new_tokens=6, pad_token_id=0, **kw))
    hf.enable(model, DENSE)
    for kw, w in zip(runs, want):
        torch.manual_seed(3)
        got = hf.generate(model, ids, hf.ReAttentionCache(model), max_new_tokens=6,
                          pad_token_id=0, **kw)
        assert torch.equal(got, w)


def test_generate_without_a_cache_makes_a_reattention_cache():
    """generate() with no cache used to build a stock cache: concatenated keys (bound reps
    recomputed over the whole cache at every step), or padded buffers for the static kinds,
    read as tokens. It now gets a ReAttentionCache, the same as passing one; a cache that is
    passed is kept (transformers >= 5.24 keys it as "cache" in generate's model_kwargs, where
    one set under the old key was dropped for a stock DynamicCache)."""
    model = _model("llama3")
    ids = _ids(100)
    hf.enable(model, _sparse("bound"))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(ids, return_dict_in_generate=True, **kw)
    made = hf._cache_of(out)
    assert isinstance(made, hf.ReAttentionCache) and made.get_seq_length() == 105
    mine = hf.ReAttentionCache(model)
    given = hf.generate(model, ids, mine, return_dict_in_generate=True, **kw)
    assert hf._cache_of(given) is mine and mine.get_seq_length() == 105
    assert torch.equal(out.sequences, given.sequences)
    with pytest.raises(ValueError, match=r"hf\.generate\(model, input_ids, reattention\.hf\."
                                         r"ReAttentionCache\(model\)"):
        model.generate(ids, cache_implementation="static", **kw)
    hf.disable(model)
    assert "_prepare_cache_for_generation" not in vars(model)
    assert not isinstance(hf._cache_of(model.generate(ids, return_dict_in_generate=True, **kw)),
                          hf.ReAttentionCache)


@pytest.mark.parametrize("rep", ["max", "bound", "mean"])
def test_cache_path_equals_stock_cache_path_while_selecting(rep):
    model = _model("llama3")
    ids = _ids(100)
    stock = _stock_logits(model, ids)
    hf.enable(model, _sparse(rep))
    ours = _chunked_logits(model, ids, hf.ReAttentionCache(model), 13)
    # A stock DynamicCache hands the attention function plain concatenated raw keys.
    plain = _chunked_logits(model, ids, transformers.DynamicCache(config=model.config), 13)
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    assert (ours - stock).abs().max() > 1e-3  # selection is really active


def test_enable_disable_round_trip_restores_stock_exactly():
    model = _model("qwen2-yarn", attn="eager")
    ids = _ids(90)
    stock = _stock_logits(model, ids)
    hf.enable(model, _sparse())
    assert hf.is_enabled(model) and model.config._attn_implementation == hf.ATTN_NAME
    sparse = _stock_logits(model, ids)
    hf.enable(model, _sparse("bound"))  # re-enabling replaces the first enable
    hf.disable(model)
    assert not hf.is_enabled(model) and model.config._attn_implementation == "eager"
    assert torch.equal(_stock_logits(model, ids), stock)
    hf.disable(model)  # a second disable is a no-op
    hf.enable(model, _sparse())
    assert torch.equal(_stock_logits(model, ids), sparse)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op allocates (views excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.largest = max(self.largest, t.numel())
        return out


def test_prompt_16x_trained_length_prefills_and_generates_in_linear_memory():
    model = _model("llama3", max_position_embeddings=64)
    cfg = reattention.ReAttentionConfig(sink=4, local=16, chunk=8, topk=2, query_block=16)
    hf.enable(model, cfg)
    largest, buffer = {}, {}
    for n in (512, 1024):  # 8x and 16x
        ids = _ids(n, seed=n)
        cache = hf.ReAttentionCache(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no scope warning: 60 <= 64
            warnings.filterwarnings("ignore", message="reattention: using backend")
            with _LargestTensor() as probe:
                logits = hf.prefill(model, ids, cache, chunk_size=16, progress=False)
        assert torch.isfinite(logits).all()
        kv = cache.layers[0].kv
        assert kv.length == n - 1 and kv.capacity <= n + 1024 + 256
        largest[n], buffer[n] = probe.largest, kv.k_buffer.numel()
        # Nothing bigger than one layer's key buffer: no N x N mask or score matrix.
        assert largest[n] <= buffer[n] < n * n // 4
        out = hf.generate(model, ids, cache, max_new_tokens=4, min_new_tokens=4,
                          do_sample=False, pad_token_id=0)
        assert out.shape == (1, n + 4) and torch.equal(out[:, :n], ids)
        assert cache.get_seq_length() == n + 3
    assert largest[1024] <= 2.5 * largest[512]


def test_batch_without_padding_matches_one_by_one():
    model = _model("mistral")
    hf.enable(model, _sparse("mean"))
    ids = _ids(70, b=3)
    both = _chunked_logits(model, ids, hf.ReAttentionCache(model), 16)
    for b in range(3):
        one = _chunked_logits(model, ids[b:b + 1], hf.ReAttentionCache(model), 16)
        torch.testing.assert_close(both[b:b + 1], one, rtol=1e-5, atol=1e-5)


def test_padding_and_custom_masks_raise():
    model = _model("llama3")
    hf.enable(model, DENSE)
    ids = _ids(20, b=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with pytest.raises(ValueError, match="padded"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="padded"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="4-D"):
        model(ids, attention_mask=torch.zeros(2, 1, 20, 20))
    full = _stock_logits(model, ids)
    torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)).logits, full)


def test_padding_mask_given_positionally_to_a_bare_decoder_raises():
    """AutoModel-style use, decoder(input_ids, attention_mask): the pre-hook read only the
    keyword and let the padding mask through, to be dropped (pad tokens attended to)."""
    config, _ = _config("llama3")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaModel(config).eval()
    hf.enable(model, DENSE)
    ids = _ids(20, b=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with pytest.raises(ValueError, match="padded"):
        model(ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, torch.ones_like(ids)).last_hidden_state,
                                   model(ids).last_hidden_state)


def test_scope_warning_fires_once():
    model = _model("llama3", max_position_embeddings=64)
    hf.enable(model, reattention.ReAttentionConfig(sink=4, local=40, chunk=8, topk=2))
    cache = hf.ReAttentionCache(model)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _chunked_logits(model, _ids(130), cache, 40)
    hits = [w for w in seen if "trained length 64" in str(w.message)]
    assert len(hits) == 1


def test_sliding_window_layers_raise_past_their_window():
    model = _model("mistral", sliding_window=32)
    ids = _ids(48)
    stock = _stock_logits(model, ids[:, :32])
    hf.enable(model, DENSE)
    torch.testing.assert_close(_stock_logits(model, ids[:, :32]), stock, rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="sliding-window"):
        _stock_logits(model, ids)


def test_softcap_raises():
    model = _model("gemma2-softcap", attn="eager")
    hf.enable(model, DENSE)
    with pytest.raises(ValueError, match="softcap"):
        _stock_logits(model, _ids(10))


def test_cache_interface():
    model = _model("llama3")
    with pytest.raises(ValueError, match="enable"):
        hf.ReAttentionCache(model)
    hf.enable(model, _sparse("bound"))
    with pytest.raises(ValueError, match="differs"):
        hf.ReAttentionCache(model, DENSE)
    cache = hf.ReAttentionCache(model, max_length=200)
    assert isinstance(cache, transformers.Cache) and not cache.is_compileable
    assert cache.get_seq_length() == 0 and cache.get_max_length() == 200
    ids = _ids(90)
    full = _chunked_logits(model, ids, cache, 30)
    assert cache.get_seq_length() == 90 and cache.get_mask_sizes(5, 0) == (95, 0)
    assert cache.layers[1].keys.shape == (1, 2, 90, 16)
    cache.crop(-30)
    assert cache.get_seq_length() == 60
    torch.testing.assert_close(_chunked_logits(model, ids[:, 60:], cache, 30), full[:, 60:],
                               rtol=1e-6, atol=1e-6)
    cache.reset()
    assert cache.get_seq_length() == 0
    torch.testing.assert_close(_chunked_logits(model, ids, cache, 30), full, rtol=1e-6,
                               atol=1e-6)
    with pytest.raises(ValueError, match="max_length"):
        _chunked_logits(model, _ids(111), cache, 111)
    with pytest.raises(ValueError, match="nothing to prefill"):
        hf.prefill(model, ids, cache, progress=False)


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_our_calls_use_the_cache_keyword_of_the_installed_transformers(monkeypatch):
    """transformers 5.24 renamed forward's and generate's past_key_values to cache: the old
    name raises a FutureWarning and reading it off an output logs a deprecation message;
    older versions know only past_key_values. enable, prefill, generate (given a cache or
    making one) and reading the cache back must draw neither, on either version."""
    recorder = _Recorder()
    # warning_once remembers messages for the whole process: let every one through here.
    monkeypatch.setattr(logging.Logger, "warning_once", logging.Logger.warning)
    log = logging.getLogger("transformers")
    log.addHandler(recorder)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model = _model("llama3")
            ids = _ids(50)
            kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
            hf.enable(model, _sparse())
            cache = hf.ReAttentionCache(model)
            hf.prefill(model, ids, cache, chunk_size=16, progress=False)
            got = hf.generate(model, ids, cache, return_dict_in_generate=True, **kw)
            assert hf._cache_of(got) is cache and cache.get_seq_length() == 52
            made = hf._cache_of(model.generate(ids, return_dict_in_generate=True, **kw))
            assert isinstance(made, hf.ReAttentionCache)
            assert torch.equal(hf.generate(model, ids, **kw), got.sequences)
    finally:
        log.removeHandler(recorder)
    said = [str(w.message) for w in seen] + recorder.messages
    assert not [m for m in said if "past_key_values" in m or "deprecat" in m.lower()], said
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], said
    with pytest.raises(ValueError, match="past_key_values"):
        hf.generate(model, ids, past_key_values=cache, **kw)


def test_cache_keyword_follows_the_forward_signature():
    """A custom model that kept the old name (or takes **kwargs only) gets what it reads."""
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return past_key_values

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None):
            return cache

    class Loose(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return kwargs

    marker = object()
    assert Old()(None, **hf._cache_kwargs(Old(), marker)) is marker
    assert New()(None, **hf._cache_kwargs(New(), marker)) is marker
    assert list(Loose()(None, **hf._cache_kwargs(Loose(), marker))) == [hf._GENERATE_CACHE]
    stock = _model("llama3")
    name, = hf._cache_kwargs(stock, marker)
    assert name == hf._GENERATE_CACHE  # stock models take the name generate() takes


def test_import_reattention_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import reattention\n"
            "try:\n    import reattention.hf\nexcept ImportError:\n    print('hf-needs-transformers')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "hf-needs-transformers"


def test_generate_refuses_a_cache_that_is_not_a_cache():
    model = _model("llama3")
    hf.enable(model, reattention.ReAttentionConfig(sink=4, local=16, chunk=8, topk=2))
    with pytest.raises(ValueError, match="cache must be a transformers Cache"):
        hf.generate(model, _ids(20), "not a cache", max_new_tokens=1)


@pytest.mark.parametrize("name", ["llama3", "qwen3-qknorm"])
@pytest.mark.parametrize("rep", ["max", "bound"])
def test_paged_cache_logits_equal_contiguous(name, rep):
    """The paged cache (pages of 8 and of 5 tokens) gives the contiguous cache's logits bit
    for bit, through chunked prefill, greedy generation, beams and repeated samples."""
    model = _model(name)
    ids = _ids(100)
    hf.enable(model, _sparse(rep), backend="cpu")
    want = _chunked_logits(model, ids, hf.ReAttentionCache(model), 13)
    for page_size in (8, 5):
        cache = hf.ReAttentionCache(model, page_size=page_size)
        assert torch.equal(_chunked_logits(model, ids, cache, 13), want)
        assert cache.layers[0].kv.pool.pages_in_use == -(-100 // page_size)
        stand_in = cache.layers[1].keys  # [B, Hkv, N, D], one NaN broadcast
        assert stand_in.shape[::2] == (1, 100) and stand_in.isnan().all()
    kw = dict(max_new_tokens=6, pad_token_id=0)
    runs = [dict(do_sample=False), dict(num_beams=3, num_return_sequences=2, do_sample=False),
            dict(num_return_sequences=3, do_sample=True)]
    for run in runs:
        torch.manual_seed(3)
        flat = hf.generate(model, ids[:, :40], hf.ReAttentionCache(model), **kw, **run)
        torch.manual_seed(3)
        paged = hf.generate(model, ids[:, :40], hf.ReAttentionCache(model, page_size=8), **kw,
                            **run)
        assert torch.equal(paged, flat), run


@pytest.mark.parametrize("rep", ["bound", "mean"])
def test_tiered_cache_logits_equal_contiguous(rep):
    """offload="cpu" (both tiers in host memory here): chunked-prefill logits and greedy
    tokens equal the contiguous cache's bit for bit, with a hot set that must evict."""
    model = _model("llama3")
    ids = _ids(100)
    cfg = reattention.ReAttentionConfig(sink=8, local=16, chunk=8, topk=2, query_block=8,
                                        rep=rep)
    hf.enable(model, cfg, backend="cpu")
    want = _chunked_logits(model, ids, hf.ReAttentionCache(model), 13)
    cache = hf.ReAttentionCache(model, offload="cpu", max_append=13,
                                hot_pages=2 * 2 * 2)  # B * Hkv * n_blocks * topk
    assert torch.equal(_chunked_logits(model, ids, cache, 13), want)
    pool = cache.layers[0].kv.pool
    assert pool.host_upto > pool.sink_pages and int(pool.lookups) > int(pool.hits)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    flat = hf.generate(model, ids[:, :40], hf.ReAttentionCache(model), **kw)
    tiered = hf.generate(model, ids[:, :40], hf.ReAttentionCache(model, offload="cpu"), **kw)
    assert torch.equal(tiered, flat)
