"""The needle model and the attention methods it is evaluated with.

:func:`load_model` loads the tiny Llama shipped in ``weights/`` (trained at 512 tokens on the
task of :mod:`.data`); :func:`use_method` runs it with one of :data:`METHODS`, and
:func:`answer` decodes its greedy answer to a batch of prompts.
"""
import contextlib
import os

import torch

from .data import BOS, PAD, TRAINED_LENGTH, VALUE_LEN, VOCAB_SIZE

# The attention shape the ops see (the CLI checks a named backend against it).
HEAD_DIM = 64


def model_config():
    """The tiny Llama's configuration (4 layers, hidden 256, GQA 4/2, head dim 64).

    Returns
    -------
    transformers.LlamaConfig
        ``max_position_embeddings`` is the trained length, 512.

    Examples
    --------
    >>> cfg = model_config()
    >>> cfg.num_key_value_heads, cfg.head_dim
    (2, 64)
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=TRAINED_LENGTH,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=None,
        pad_token_id=PAD,
    )


WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def load_model(device="cpu", dtype=torch.float32):
    """The shipped needle model, ready for inference.

    Parameters
    ----------
    device : str or torch.device
    dtype : torch.dtype
        Weights are stored in fp16; fp32 on the CPU, bf16 or fp16 on a GPU (the CUDA
        kernels take 16-bit inputs).

    Returns
    -------
    model : transformers.LlamaForCausalLM
        In eval mode, stock ``sdpa`` attention.
    config : transformers.LlamaConfig

    Examples
    --------
    >>> model, config = load_model()
    >>> config.max_position_embeddings
    512
    """
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    # A bar for loading 38 small tensors only clutters the demo's output.
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model = LlamaForCausalLM.from_pretrained(WEIGHTS_DIR, dtype=dtype, attn_implementation="sdpa")
    finally:
        if bar:
            logging.enable_progress_bar()
    return model.to(device).eval(), model.config


# --------------------------------------------------------------------------- methods
METHODS = ("dense", "window", "reattention-max", "reattention-bound", "reattention-mean")
# Panel titles of the heatmap.
METHOD_TITLES = {
    "dense": "dense RoPE",
    "window": "sink + window\n(StreamingLLM-style)",
    "reattention-max": "ReAttention\nmax (exact)",
    "reattention-bound": "ReAttention\nbound reps",
    "reattention-mean": "ReAttention\nmean reps",
}
# What each method is, one line each (the demo prints them before its table).
METHOD_DESCRIPTIONS = {
    "dense": "full causal attention, RoPE at the original positions (what the model was "
             "trained with)",
    "window": "sink + local window only, the same key budget as ReAttention "
              "(StreamingLLM-style)",
    "reattention-max": "ReAttention with exact chunk scores (every raw key of a chunk)",
    "reattention-bound": "ReAttention with min/max chunk representatives",
    "reattention-mean": "ReAttention with mean chunk representatives",
}
# The settings of docs/design.md section 6: a query block attends to at most 16 + 4 * 32 + 96
# + 32 + 64 = 336 keys, below the trained length 512, whatever the prefill chunk size (each
# query block is a call of its own), so PREFILL_CHUNK is a speed knob only.
NEEDLE_SETTINGS = {"sink": 16, "local": 96, "chunk": 32, "topk": 4, "query_block": 64}
PREFILL_CHUNK = 1024
# Exact max scores cost N^2 over a prefill, too slow for the CPU demo's 3 minutes.
CPU_DEMO_METHODS = ("dense", "window", "reattention-bound")
_WINDOW_ATTN = "needle-window"
_WINDOW_ATTR = "_needle_window"


def method_config(method):
    """The ReAttentionConfig a method runs with (None for dense).

    The window gets ReAttention's whole budget of keys: its local window also takes the
    ``topk * chunk`` keys that ReAttention spends on selected chunks.
    """
    from .. import ReAttentionConfig

    if method == "dense":
        return None
    if method == "window":
        s = NEEDLE_SETTINGS
        return ReAttentionConfig(**dict(s, local=s["local"] + s["topk"] * s["chunk"]))
    return ReAttentionConfig(**NEEDLE_SETTINGS, rep=method.split("-")[1])


def _window_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """Attention over the sink and the local window only, at contiguous positions.

    It is what ReAttention keeps when it selects no chunk: gather_attention with every chunk
    id -1, so each query block attends to its own [sink | local window] (docs/design.md
    section 2) at positions 0, 1, 2, ...
    """
    from .. import gather_attention

    config, state, backend = getattr(module, _WINDOW_ATTR)
    b, hkv, lq = key.shape[0], key.shape[1], query.shape[2]
    idx = torch.full((b, hkv, -(-lq // config.query_block), 1), -1, dtype=torch.int32,
                     device=query.device)
    out, _ = gather_attention(query, key, value, idx, inv_freq=state.inv_freq_on(query.device),
                              sink=config.sink, local=config.local, chunk=config.chunk,
                              query_block=config.query_block, scale=scaling,
                              rope_scale=state.rope_scale, rope_style=state.rope_style,
                              backend=backend)
    return out.transpose(1, 2), None


@contextlib.contextmanager
def use_method(model, method, backend="auto"):
    """Run ``model`` with one of :data:`METHODS` inside the block, stock outside.

    ReAttention and the window go through :func:`reattention.hf.enable`, so their caches
    hold raw keys; the window then swaps in its own attention function.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "dense":
        yield
        return
    import transformers

    from .. import hf

    hf.enable(model, method_config(method), backend=backend)
    modules = [m for m in model.get_decoder().modules() if hasattr(m, "layer_idx")]
    try:
        if method == "window":
            transformers.AttentionInterface.register(_WINDOW_ATTN, _window_attention)
            # The RoPE that hf.enable read off the model (inv_freq, scaling, style).
            state = hf._require_state(model)
            for m in modules:
                setattr(m, _WINDOW_ATTR, (method_config(method), state, backend))
            model.set_attn_implementation(_WINDOW_ATTN)
        yield
    finally:
        for m in modules:
            if hasattr(m, _WINDOW_ATTR):
                delattr(m, _WINDOW_ATTR)
        hf.disable(model)


@torch.no_grad()
def answer(model, method, input_ids, chunk_size=PREFILL_CHUNK, offload=None):
    """Greedy answer of ``model`` (inside ``use_method(model, method)``) to prompts.

    The prompt but its last token is prefilled (in chunks of ``chunk_size`` for the
    cached methods), then the last token and each answer token are decoded one at a time,
    so the question's own query chooses the chunks that answer it.

    Parameters
    ----------
    input_ids : torch.LongTensor [B, L] on the model's device, equal lengths.
    offload : None or "cpu": the ReAttention methods' cache keeps its middle in host memory
        (``hf.ReAttentionCache(offload=...)``; rep "max" cannot, and raises).

    Returns
    -------
    torch.LongTensor [B, VALUE_LEN]
    """
    from .. import hf

    if method == "dense":
        cache = hf._cache_of(model(input_ids=input_ids[:, :-1], use_cache=True,
                                   logits_to_keep=1))
    else:
        tiers = {} if offload is None else dict(offload=offload, max_append=chunk_size)
        cache = hf.ReAttentionCache(model, **tiers)
        hf.prefill(model, input_ids, cache, chunk_size=chunk_size, progress=False,
                   reserve_new_tokens=VALUE_LEN)
    # The cache keyword this transformers takes (past_key_values before 5.24, cache after).
    feed = hf._cache_kwargs(model, cache)
    tok, out = input_ids[:, -1:], []
    for _ in range(VALUE_LEN):
        logits = model(input_ids=tok, use_cache=True, **feed).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, dim=1)
