"""Needle in a haystack with a tiny Llama trained at 512 tokens.

The task is key-value recall over random filler tokens. A needle

    KEY k1 k2 VAL v1 v2 v3 v4

sits at some depth of a haystack of random content tokens, and the prompt ends with
the question ``QUERY k1 k2 VAL``; the answer is ``v1 v2 v3 v4`` (greedy decoding).
The model only ever sees sequences of at most ``TRAINED_LENGTH`` tokens; everything
past that length measures length extrapolation.
"""

import contextlib
import os
import time

import torch

# Token ids. Content tokens (filler, keys, values) are the ids from FIRST_CONTENT on;
# the ids below it are markers that never occur in filler.
PAD, BOS, KEY, VAL, QUERY = 0, 1, 2, 3, 4
FIRST_CONTENT = 16
VOCAB_SIZE = 512
KEY_LEN = 2
VALUE_LEN = 4
NEEDLE_LEN = 2 + KEY_LEN + VALUE_LEN  # KEY, keys, VAL, values
QUESTION_LEN = 2 + KEY_LEN  # QUERY, keys, VAL
TRAINED_LENGTH = 512
# The shortest prompt make_sample builds: BOS, room for twice a needle, the question.
MIN_LENGTH = 1 + 2 * NEEDLE_LEN + QUESTION_LEN


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
        head_dim=64,
        max_position_embeddings=TRAINED_LENGTH,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=None,
        pad_token_id=PAD,
    )


def _content(generator, *shape, device="cpu"):
    return torch.randint(FIRST_CONTENT, VOCAB_SIZE, shape, generator=generator, device=device)


def make_sample(length, depth, seed, distractors=0):
    """One needle-in-a-haystack prompt and its answer.

    Parameters
    ----------
    length : int
        Prompt length in tokens, question included (at least
        ``1 + 2 * (1 + distractors) * NEEDLE_LEN + QUESTION_LEN``).
    depth : float
        Where the needle starts, as a fraction of the haystack: 0.0 right after BOS,
        1.0 right before the question.
    seed : int
        Seeds the filler, the key, the value and the distractors.
    distractors : int
        Extra key-value pairs with other keys, placed at random depths.

    Returns
    -------
    input_ids : torch.LongTensor [length]
        ``BOS, filler..., KEY k1 k2 VAL v1..v4, filler..., QUERY k1 k2 VAL``.
    answer_ids : torch.LongTensor [VALUE_LEN]
        ``v1..v4``.

    Examples
    --------
    >>> ids, answer = make_sample(512, 0.5, seed=0)
    >>> ids.shape, answer.shape
    (torch.Size([512]), torch.Size([4]))
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    haystack = length - 1 - QUESTION_LEN
    # Twice the needles' length guarantees room for a random place that overlaps none.
    if haystack < 2 * (1 + distractors) * NEEDLE_LEN:
        raise ValueError(f"length {length} is too short for {1 + distractors} needles")
    g = torch.Generator().manual_seed(seed)
    ids = _content(g, length)
    ids[0] = BOS
    # Keys are distinct so that the question has one answer.
    keys = []
    while len(keys) < 1 + distractors:
        k = _content(g, KEY_LEN)
        if not any(torch.equal(k, other) for other in keys):
            keys.append(k)
    values = _content(g, 1 + distractors, VALUE_LEN)
    slots = haystack - NEEDLE_LEN
    starts = [1 + round(depth * slots)]
    # Distractors go where they overlap neither the needle nor each other.
    while len(starts) < 1 + distractors:
        s = 1 + int(torch.randint(0, slots + 1, (1,), generator=g))
        if all(abs(s - t) >= NEEDLE_LEN for t in starts):
            starts.append(s)
    for s, k, v in zip(starts, keys, values):
        ids[s : s + NEEDLE_LEN] = torch.cat([torch.tensor([KEY]), k, torch.tensor([VAL]), v])
    ids[-QUESTION_LEN:] = torch.cat([torch.tensor([QUERY]), keys[0], torch.tensor([VAL])])
    return ids, values[0].clone()


def make_batch(batch, length, generator, max_pairs=8, device="cpu"):
    """A training batch of key-value recall: pairs and their questions among filler.

    Each sequence holds between 1 and ``max_pairs`` key-value pairs and one question
    per pair, placed at random after its pair, so the distances between needle and
    question cover 0..length and every prefix is itself a short sample.

    Parameters
    ----------
    batch, length : int
        Output shape.
    generator : torch.Generator
        On ``device``; drives all randomness.
    max_pairs : int
        Pairs per sequence at most (``2 * max_pairs * NEEDLE_LEN < length``).

    Returns
    -------
    input_ids : torch.LongTensor [batch, length]
    labels : torch.LongTensor [batch, length]
        The answer tokens of every question, -100 elsewhere; aligned with
        ``input_ids`` (the model shifts them).
    """
    item = NEEDLE_LEN  # a question with its answer is as long as a needle
    n_items = 2 * max_pairs
    fill = length - 1 - n_items * item
    if fill < 0:
        raise ValueError(f"length {length} cannot hold {max_pairs} pairs")

    def rand(*shape):
        return torch.rand(shape, generator=generator, device=device)

    ids = _content(generator, batch, length, device=device)
    ids[:, 0] = BOS
    labels = torch.full_like(ids, -100)

    # Order items by a random time: a pair at u, its question later, at u + (1 - u) w.
    u = rand(batch, max_pairs)
    t = torch.cat([u, u + (1 - u) * rand(batch, max_pairs).clamp_min(1e-3)], dim=1)
    order = t.argsort(dim=1)
    # Random gaps of filler between items: sorted cut points of the filler budget.
    cuts = (rand(batch, n_items) * (fill + 1)).floor().long().sort(dim=1).values
    slot = torch.empty_like(order)
    slot.scatter_(1, order, torch.arange(n_items, device=device).expand(batch, -1))
    start = 1 + cuts.gather(1, slot) + slot * item  # [batch, n_items]

    # Unused pairs (and their questions) stay filler: 1..max_pairs pairs per row.
    n_pairs = torch.randint(1, max_pairs + 1, (batch, 1), generator=generator, device=device)
    used = torch.arange(max_pairs, device=device) < n_pairs
    keys = _content(generator, batch, max_pairs, KEY_LEN, device=device)
    values = _content(generator, batch, max_pairs, VALUE_LEN, device=device)

    def marker(tok):
        return torch.full((batch, max_pairs, 1), tok, device=device)

    pair = torch.cat([marker(KEY), keys, marker(VAL), values], dim=2)
    question = torch.cat([marker(QUERY), keys, marker(VAL), values], dim=2)
    tokens = torch.cat([pair, question], dim=1)  # [batch, n_items, item]
    target = tokens.clone()
    target[:, :max_pairs] = -100
    target[:, max_pairs:, : item - VALUE_LEN] = -100
    keep = torch.cat([used, used], dim=1)

    pos = start.unsqueeze(2) + torch.arange(item, device=device)  # [batch, n_items, item]
    rows = torch.arange(batch, device=device).view(batch, 1, 1).expand_as(pos)
    ids[rows[keep], pos[keep]] = tokens[keep]
    labels[rows[keep], pos[keep]] = target[keep]
    return ids, labels


# --------------------------------------------------------------------------- model
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "needle_data")


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
        model = LlamaForCausalLM.from_pretrained(DATA_DIR, dtype=dtype, attn_implementation="sdpa")
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
    from . import ReAttentionConfig

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
    from . import gather_attention

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

    from . import hf

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
def answer(model, method, input_ids, chunk_size=PREFILL_CHUNK):
    """Greedy answer of ``model`` (inside ``use_method(model, method)``) to prompts.

    The prompt but its last token is prefilled (in chunks of ``chunk_size`` for the
    cached methods), then the last token and each answer token are decoded one at a time,
    so the question's own query chooses the chunks that answer it.

    Parameters
    ----------
    input_ids : torch.LongTensor [B, L] on the model's device, equal lengths.

    Returns
    -------
    torch.LongTensor [B, VALUE_LEN]
    """
    if method == "dense":
        out = model(input_ids=input_ids[:, :-1], use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
    else:
        from . import hf

        cache = hf.ReAttentionCache(model)
        hf.prefill(model, input_ids, cache, chunk_size=chunk_size, progress=False,
                   reserve_new_tokens=VALUE_LEN)
    tok, out = input_ids[:, -1:], []
    for _ in range(VALUE_LEN):
        logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, dim=1)


# --------------------------------------------------------------------------- evaluation
def _sample_seed(seed, length, depth_index, sample):
    return ((seed * 7919 + length) * 104729 + depth_index) * 1_000_003 + sample


def evaluate(model, lengths, depths, samples, methods=METHODS, *, batch=4,
             chunk_size=PREFILL_CHUNK, dense_max_len=None, backend="auto", seed=0,
             progress=None):
    """Needle accuracy of each method over lengths x depths.

    Every method answers the same prompts: ``samples`` per (length, depth), batched
    ``batch`` at a time.

    Parameters
    ----------
    model : the needle model (:func:`load_model`).
    lengths : list of int, prompt lengths in tokens.
    depths : list of float in [0, 1], needle depths.
    samples : int, prompts per (length, depth).
    methods : names from :data:`METHODS`.
    dense_max_len : int, optional
        Skip dense attention above this length (its cost grows as the square).
    progress : callable(line, results), optional
        Called after each (length, method) with a one-line summary and the results so far
        (to print them, or save them before a long run ends).

    Returns
    -------
    dict
        ``accuracy[method][i]`` is the list of per-depth fractions at ``lengths[i]``, or None
        where the method was skipped; ``seconds[method]`` a [len(lengths)] list; plus the
        settings.

    Examples
    --------
    >>> model, _ = load_model()
    >>> res = evaluate(model, [512, 8192], [0.0, 0.5, 1.0], samples=2)
    >>> print(format_table(res))
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods must be among {METHODS}, got {m!r}")
    for name, value in (("samples", samples), ("batch", batch)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    device = model.device
    res = {
        "trained_length": TRAINED_LENGTH,
        "lengths": list(lengths),
        "depths": list(depths),
        "samples": samples,
        "methods": list(methods),
        "settings": dict(NEEDLE_SETTINGS, prefill_chunk=chunk_size),
        "device": str(device),
        "dtype": str(model.dtype),
        "accuracy": {m: [None] * len(lengths) for m in methods},
        "seconds": {m: [None] * len(lengths) for m in methods},
    }
    cases = [(d, s) for d in range(len(depths)) for s in range(samples)]
    for li, length in enumerate(lengths):
        for m in methods:
            if m == "dense" and dense_max_len is not None and length > dense_max_len:
                continue
            hits = [0] * len(depths)
            t0 = time.perf_counter()
            with use_method(model, m, backend):
                for i in range(0, len(cases), batch):
                    group = cases[i : i + batch]
                    pairs = [make_sample(length, depths[d], _sample_seed(seed, length, d, s))
                             for d, s in group]
                    ids = torch.stack([p[0] for p in pairs]).to(device)
                    want = torch.stack([p[1] for p in pairs])
                    got = answer(model, m, ids, chunk_size).cpu()
                    for (d, _), ok in zip(group, (got == want).all(dim=1).tolist()):
                        hits[d] += ok
                    if progress is not None and len(cases) > batch:  # long cells show life
                        print(f"    {length} tokens {m}: {i + len(group)}/{len(cases)} prompts, "
                              f"{time.perf_counter() - t0:.1f} s", flush=True)
            res["seconds"][m][li] = round(time.perf_counter() - t0, 2)
            res["accuracy"][m][li] = [h / samples for h in hits]
            if progress is not None:
                acc = sum(hits) / len(cases)
                progress(f"  {length:>8} tokens  {m:<18} {100 * acc:5.1f}%  "
                         f"({res['seconds'][m][li]:.1f} s)", res)
    return res


def _length_label(length):
    mult = length / TRAINED_LENGTH
    size = f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)
    return f"{size} ({mult:.3g}x)"


def format_table(res):
    """Accuracy per method and length (mean over depths), as a markdown table."""
    head = ["method"] + [_length_label(n) for n in res["lengths"]]
    rows = []
    for m in res["methods"]:
        cells = []
        for per_depth in res["accuracy"][m]:
            cells.append("-" if per_depth is None else
                         f"{100 * sum(per_depth) / len(per_depth):.0f}%")
        rows.append([m] + cells)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(head), rule] + [line(r) for r in rows])


def plot_heatmap(res, path, methods=None):
    """Depth x length accuracy heatmaps, one panel per method, written to ``path`` (PNG).

    Parameters
    ----------
    res : dict from :func:`evaluate`.
    path : str, output file.
    methods : list of str, optional; default every method in ``res``.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plot_heatmap needs matplotlib (pip install matplotlib)") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(methods or res["methods"])
    lengths, depths = res["lengths"], res["depths"]
    panel = max(1.7, 0.42 * len(lengths))
    fig, axes = plt.subplots(1, len(methods), squeeze=False, sharey=True,
                             figsize=(1.0 + panel * len(methods), 1.6 + 0.25 * len(depths)))
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list(
        "needle", ["#d7301f", "#fdae61", "#ffffbf", "#66bd63", "#1a9850"]
    ).with_extremes(bad="#d9d9d9")  # cells a method skipped
    for ax, m in zip(axes[0], methods):
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for li, per_depth in enumerate(res["accuracy"][m]):
            if per_depth is not None:
                grid[:, li] = torch.tensor(per_depth)
        image = ax.imshow(grid.numpy(), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_title(METHOD_TITLES[m], fontsize=9)
        ax.set_xticks(range(len(lengths)), [_length_label(n).split(" ")[0] for n in lengths],
                      rotation=90, fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths], fontsize=7)
        ax.set_xlabel("context length", fontsize=8)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02, pad=0.01, label="accuracy")
    n = res["samples"]
    fig.suptitle(f"Needle retrieval of a model trained at {res['trained_length']} tokens "
                 f"({n} sample{'s' * (n != 1)} per cell; grey: not run)", fontsize=10, y=1.08)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------- diagnosis
_PROBE_ATTN = "needle-probe"
_PROBE_ATTR = "_needle_probe"


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    """ReAttention that also records, at decode steps, which chunks each kv head selected."""
    import transformers

    from . import hf, select_chunks

    config, picks = getattr(module, _PROBE_ATTR)
    if query.shape[2] == 1:
        idx = select_chunks(query, key, sink=config.sink, local=config.local,
                            chunk=config.chunk, topk=config.topk,
                            query_block=config.query_block, rep=config.rep)
        picks.append((module.layer_idx, idx[:, :, 0].cpu()))  # [B, Hkv, topk]
    attend = transformers.AttentionInterface._global_mapping[hf.ATTN_NAME]
    return attend(module, query, key, value, attention_mask, **kwargs)


@torch.no_grad()
def selection_recall(model, method, length, depths, samples, *, chunk_size=PREFILL_CHUNK,
                     backend="auto", seed=0):
    """How often the chunk holding the needle's first value token is selected.

    Measured at the decode step of the question's last token, the step that must find the
    needle, per layer and kv head. When ReAttention misses a needle, this says whether the
    selection or the attention after it failed. Use depths that put the needle in the
    middle of the cache: in the sink or the local window it is never a selectable chunk.

    Parameters
    ----------
    model : the needle model; method : a ReAttention method of :data:`METHODS`.
    length : int; depths : list of float; samples : int per depth.

    Returns
    -------
    torch.Tensor [num_layers, num_kv_heads] float, the fraction of prompts whose needle
    chunk was selected.

    Examples
    --------
    >>> model, _ = load_model()
    >>> selection_recall(model, "reattention-mean", 8192, [0.25, 0.5, 0.75], samples=2)
    """
    import transformers

    from . import hf

    if not method.startswith("reattention-"):
        raise ValueError(f"method must be a ReAttention method, got {method!r}")
    config = method_config(method)
    transformers.AttentionInterface.register(_PROBE_ATTN, _probe_attention)
    cfg = model.config
    hits = torch.zeros(cfg.num_hidden_layers, cfg.num_key_value_heads)
    total = 0
    with use_method(model, method, backend):
        modules = [m for m in model.get_decoder().modules() if hasattr(m, "layer_idx")]
        model.set_attn_implementation(_PROBE_ATTN)
        try:
            for d_i, depth in enumerate(depths):
                for s in range(samples):
                    ids, _ = make_sample(length, depth, _sample_seed(seed, length, d_i, s))
                    picks = []
                    for m in modules:
                        setattr(m, _PROBE_ATTR, (config, picks))
                    value_pos = int((ids == VAL).nonzero()[0]) + 1
                    chunk = (value_pos - config.sink) // config.chunk
                    cache = hf.ReAttentionCache(model)
                    ids = ids[None].to(model.device)
                    hf.prefill(model, ids, cache, chunk_size=chunk_size, progress=False)
                    model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
                    for layer, idx in picks:
                        hits[layer] += (idx[0] == chunk).any(-1).float()
                    total += 1
        finally:
            for m in modules:
                if hasattr(m, _PROBE_ATTR):
                    delattr(m, _PROBE_ATTR)
    return hits / total


# --------------------------------------------------------------------------- command line
def default_lengths(max_len=None):
    """1x, 16x, 64x the trained length (the CPU demo), or with ``max_len`` 1x, 4x, 16x,
    64x, 128x and then x4 steps up to ``max_len`` (included); ``[max_len]`` alone when it is
    below the trained length."""
    if max_len is None:
        return [TRAINED_LENGTH * m for m in (1, 16, 64)]
    lengths = [TRAINED_LENGTH * m for m in (1, 4, 16, 64, 128) if TRAINED_LENGTH * m <= max_len]
    if not lengths:
        return [max_len]
    while lengths[-1] * 4 <= max_len:
        lengths.append(lengths[-1] * 4)
    if lengths[-1] != max_len and max_len > TRAINED_LENGTH:
        lengths.append(max_len)
    return lengths


def _int_at_least(low):
    """argparse type: an int >= ``low`` (argparse turns the error into a usage message)."""
    import argparse

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {value}")
        return value
    return parse


def _comma_list(item, choices=None):
    """argparse type: a non-empty comma-separated list, each entry through ``item``."""
    import argparse

    def parse(text):
        values = [item(x) for x in text.split(",")]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(choices)}")
        return values
    return parse


def main(argv=None):
    """``python -m reattention``: the needle demo; prints the accuracy table.

    Examples
    --------
    >>> main(["--samples", "1", "--depths", "3"])                 # CPU, 1x 16x 64x
    >>> main(["--device", "cuda", "--max-len", "1048576", "--plot", "needle.png"])
    """
    import argparse
    import json
    import sys

    from .ops import BACKENDS

    p = argparse.ArgumentParser(
        prog="python -m reattention",
        description="Needle in a haystack: a tiny Llama trained at 512 tokens, asked for a "
                    "key's value far past that length, with dense attention, a sink + local "
                    "window, and ReAttention.",
        epilog="python -m reattention --check runs only the backend report and the parity "
               "check that come before the demo.")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--max-len", type=_int_at_least(MIN_LENGTH), default=None,
                   help="longest prompt; lengths 1x 4x 16x 64x 128x then x4 up to it "
                        "(default: 1x 16x 64x = 512, 8K, 32K tokens)")
    p.add_argument("--lengths", type=_comma_list(_int_at_least(MIN_LENGTH)), default=None,
                   help="explicit comma-separated prompt lengths (overrides --max-len)")
    p.add_argument("--depths", type=_int_at_least(1), default=None,
                   help="needle depths, evenly from 0%% to 100%% (default 5 on the CPU, 11 on "
                        "a GPU; 1 puts the needle at 50%%)")
    p.add_argument("--samples", type=_int_at_least(1), default=None,
                   help="prompts per (length, depth) (default 1 on the CPU, 4 on a GPU)")
    p.add_argument("--methods", type=_comma_list(str, METHODS), default=None,
                   help="comma-separated, from " + ", ".join(METHODS) + " (default on the CPU: "
                        + ", ".join(CPU_DEMO_METHODS) + "; on a GPU: all)")
    p.add_argument("--batch", type=_int_at_least(1), default=None,
                   help="prompts per forward pass (default 5 on the CPU, 16 on a GPU)")
    p.add_argument("--dense-max-len", type=_int_at_least(0), default=None,
                   help="skip dense attention above this length (default 8192 on the CPU, "
                        "131072 on a GPU: it costs N^2 and fails from 4x on; 0 skips it)")
    p.add_argument("--chunk-size", type=_int_at_least(1), default=PREFILL_CHUNK,
                   help="prefill chunk")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default float32 on the CPU, bfloat16 on a GPU, whose "
                        "kernels take 16-bit inputs)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="ReAttention op backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write the depth x length heatmap PNG here")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: {args.device!r} is not a torch device (cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda, but torch sees no CUDA device")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("python -m reattention: the needle demo needs transformers (pip install "
                         "'reattention[needle]'); --check runs the backend report and the "
                         "parity check without it") from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("argument --plot needs matplotlib (pip install 'reattention[needle]')")
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    model, _ = load_model(device, dtype)
    lengths = args.lengths or default_lengths(args.max_len)
    n_depths = args.depths if args.depths is not None else (11 if gpu else 5)
    depths = [i / (n_depths - 1) for i in range(n_depths)] if n_depths > 1 else [0.5]
    samples = args.samples or (4 if gpu else 1)
    methods = args.methods or (list(METHODS) if gpu else list(CPU_DEMO_METHODS))
    batch = args.batch or (16 if gpu else 5)
    dense_max = args.dense_max_len if args.dense_max_len is not None else (
        131072 if gpu else 8192)
    print(f"needle: model trained at {TRAINED_LENGTH} tokens; {len(depths)} depths x "
          f"{samples} sample{'s' * (samples != 1)} per length; ReAttention "
          f"{NEEDLE_SETTINGS}, prefill chunk {args.chunk_size}; {device} {model.dtype}",
          flush=True)

    def save(res):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)

    def progress(line, res):
        print(line, flush=True)
        save(res)  # a run cut short still leaves what it measured

    t0 = time.perf_counter()
    res = evaluate(model, lengths, depths, samples, methods, batch=batch,
                   chunk_size=args.chunk_size, dense_max_len=dense_max, backend=args.backend,
                   seed=args.seed, progress=progress)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    save(res)
    print()
    print(format_table(res))
    print(f"\n{res['total_seconds']:.0f} s; '-': skipped (dense above {dense_max} tokens)")
    if args.plot:
        plot_heatmap(res, args.plot)
        print(f"heatmap written to {args.plot}", file=sys.stderr)
    return 0
