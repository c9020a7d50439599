"""Needle accuracy over lengths x depths, its table and heatmap, and a selection probe."""
import time

import torch

from .data import TRAINED_LENGTH, VAL, make_sample
from .model import (METHOD_DESCRIPTIONS, METHOD_TITLES, METHODS, NEEDLE_SETTINGS,
                    PREFILL_CHUNK, answer, method_config, use_method)


def _sample_seed(seed, length, depth_index, sample):
    return ((seed * 7919 + length) * 104729 + depth_index) * 1_000_003 + sample


def evaluate(model, lengths, depths, samples, methods=METHODS, *, batch=4,
             chunk_size=PREFILL_CHUNK, dense_max_len=None, backend="auto", seed=0,
             progress=None, offload=None):
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
    offload : None or "cpu": the ReAttention caches keep their middle in pinned host memory
        (the tiered cache); the window and dense methods are unaffected.
    progress : callable(line, results), optional
        Called after each (length, method) with a one-line summary and the results so far
        (to print them, or save them before a long run ends).

    Returns
    -------
    dict
        ``accuracy[method][i]`` is the list of per-depth fractions at ``lengths[i]``, or None
        where the method was skipped; ``seconds[method]`` a [len(lengths)] list; on a GPU
        ``peak_gib[method]`` the peak allocated GPU memory of each cell; plus the settings.

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
        "settings": dict(NEEDLE_SETTINGS, prefill_chunk=chunk_size, offload=offload),
        "device": str(device),
        "dtype": str(model.dtype),
        "accuracy": {m: [None] * len(lengths) for m in methods},
        "seconds": {m: [None] * len(lengths) for m in methods},
        "peak_gib": {m: [None] * len(lengths) for m in methods},
    }
    cases = [(d, s) for d in range(len(depths)) for s in range(samples)]
    for li, length in enumerate(lengths):
        for m in methods:
            if m == "dense" and dense_max_len is not None and length > dense_max_len:
                continue
            hits = [0] * len(depths)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            with use_method(model, m, backend):
                for i in range(0, len(cases), batch):
                    group = cases[i : i + batch]
                    pairs = [make_sample(length, depths[d], _sample_seed(seed, length, d, s))
                             for d, s in group]
                    ids = torch.stack([p[0] for p in pairs]).to(device)
                    want = torch.stack([p[1] for p in pairs])
                    tiered = offload if m.startswith("reattention") else None
                    got = answer(model, m, ids, chunk_size, offload=tiered).cpu()
                    for (d, _), ok in zip(group, (got == want).all(dim=1).tolist()):
                        hits[d] += ok
                    if progress is not None and len(cases) > batch:  # long cells show life
                        print(f"    {length} tokens {m}: {sum(hits)}/{i + len(group)} right "
                              f"of {len(cases)} prompts, {time.perf_counter() - t0:.1f} s",
                              flush=True)
            res["seconds"][m][li] = round(time.perf_counter() - t0, 2)
            if device.type == "cuda":
                res["peak_gib"][m][li] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
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


def _accuracy(res, method, i):
    """Mean accuracy over depths of ``method`` at ``res["lengths"][i]``, or None (skipped)."""
    per_depth = res["accuracy"][method][i]
    return None if per_depth is None else sum(per_depth) / len(per_depth)


def format_table(res):
    """Accuracy per method and length (mean over depths), as a markdown table."""
    head = ["method"] + [_length_label(n) for n in res["lengths"]]
    rows = []
    for m in res["methods"]:
        cells = [_accuracy(res, m, i) for i in range(len(res["lengths"]))]
        rows.append([m] + ["-" if a is None else f"{100 * a:.0f}%" for a in cells])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(head), rule] + [line(r) for r in rows])


def summary(res):
    """One sentence on what the results show, computed from them: the best ReAttention method
    at the longest length it ran, against dense RoPE (and the window) at that length, or at
    dense's own longest run when it was skipped there. '' without a ReAttention method.

    Examples
    --------
    >>> summary(res)   # lengths 1x 16x 64x, dense skipped above 16x
    'ReAttention with min/max chunk representatives found the needle in 100% of prompts at
    64x the trained length (32K tokens), while dense RoPE attention, run up to 16x ...'
    """
    lengths = res["lengths"]

    def where(i):
        return (f"{lengths[i] / res['trained_length']:.3g}x the trained length "
                f"({_length_label(lengths[i]).split(' ')[0]} tokens)")

    def longest(method):
        runs = [i for i in range(len(lengths)) if res["accuracy"][method][i] is not None]
        return max(runs, key=lambda i: lengths[i]) if runs else None

    ours = [m for m in res["methods"] if m.startswith("reattention-") and longest(m) is not None]
    if not ours:
        return ""
    i = max((longest(m) for m in ours), key=lambda j: lengths[j])
    best = max((m for m in ours if _accuracy(res, m, i) is not None),
               key=lambda m: _accuracy(res, m, i))
    text = (f"{METHOD_DESCRIPTIONS[best]} found the needle in "
            f"{100 * _accuracy(res, best, i):.0f}% of prompts at {where(i)}")
    dense = longest("dense") if "dense" in res["methods"] else None
    if dense == i:
        text += f", where dense RoPE attention found {100 * _accuracy(res, 'dense', i):.0f}%"
    elif dense is not None:
        text += (f", while dense RoPE attention, run up to {where(dense)}, found "
                 f"{100 * _accuracy(res, 'dense', dense):.0f}% there")
    if "window" in res["methods"] and _accuracy(res, "window", i) is not None:
        text += (f"; sink + local window with the same key budget found "
                 f"{100 * _accuracy(res, 'window', i):.0f}%")
    return text + "."


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

    from .. import hf, select_chunks

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

    from .. import hf

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
                    model(input_ids=ids[:, -1:], use_cache=True, **hf._cache_kwargs(model, cache))
                    for layer, idx in picks:
                        hits[layer] += (idx[0] == chunk).any(-1).float()
                    total += 1
        finally:
            for m in modules:
                if hasattr(m, _PROBE_ATTR):
                    delattr(m, _PROBE_ATTR)
    return hits / total
