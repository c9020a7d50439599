"""Hugging Face transformers integration: any RoPE decoder, unchanged model code.

:func:`enable` turns a stock transformers model into a ReAttention model in place:

* the model's rotary module is hooked to return ``cos = 1, sin = 0``, so the model's own
  ``apply_rotary_pos_emb`` becomes an exact identity: the cache receives raw keys and the
  attention function raw queries;
* an attention function registered as ``"reattention"`` in ``transformers.AttentionInterface``
  applies RoPE itself at re-assigned positions (through :func:`reattention.reattention_attn`),
  with the ``inv_freq`` and ``attention_scaling`` taken from the original rotary module, so
  default, linear, llama3, yarn, dynamic and longrope scalings carry over (dynamic and
  longrope at their trained-length frequencies);
* no mask function is registered for it, so ``create_causal_mask`` returns None and no
  N x N mask is ever built; the attention function is causal by construction. Padding
  masks are refused by a check on the decoder's inputs.

:class:`ReAttentionCache` is a transformers ``Cache`` whose layers are
:class:`reattention.cache.LayerCache` buffers (raw K/V written in place, chunk reps kept
current), and :func:`prefill` feeds a long prompt through it in chunks. ``model.generate``
called without a cache creates one itself.

On a GPU, ``generate``'s decode steps (one new token per sequence) replay one CUDA graph per
token (:class:`DecodeGraph`): transformers hands its decode steps to ``get_compiled_call``
when ``_valid_auto_compile_criteria`` holds, and :func:`enable` sets both on the model so
that they hold for a contiguous :class:`ReAttentionCache` and return the graph runner. The
prefill, paged and tiered caches (their pages are bookkept on the host) and
``generate(disable_compile=True)`` run eagerly.

transformers 5.24 renamed the cache keyword of ``forward`` and ``generate`` from
``past_key_values`` to ``cache`` (the old name warns); older versions know only
``past_key_values``. :func:`generate` passes a cache under the name the installed version
takes, and so do this module's own forward calls.

Example
-------
>>> import reattention
>>> from reattention import hf
>>> cfg = reattention.ReAttentionConfig(sink=64, local=4096, chunk=64, topk=32, rep="max")
>>> model = hf.enable(model, cfg)
>>> cache = hf.ReAttentionCache(model, cfg)
>>> logits = hf.prefill(model, input_ids, cache, chunk_size=4096)
>>> out = hf.generate(model, input_ids, cache, max_new_tokens=32)
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings

import torch
import transformers
from transformers.cache_utils import Cache, CacheLayerMixin

from . import layout, ops
from .api import ReAttentionConfig, reattention_attn
from .cache import LayerCache

__all__ = ["enable", "disable", "is_enabled", "ReAttentionCache", "DecodeGraph", "decode_graph",
           "prefill", "generate", "ATTN_NAME"]

ATTN_NAME = "reattention"
# Rope types whose inv_freq depends on the sequence length: we fix it at the trained length.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
# Attribute that carries the per-model state on the model and on its attention modules.
_STATE_ATTR = "_reattention_state"
# Attribute that ties the key tensor returned by a cache update to its LayerCache.
_LAYER_TAG = "_reattention_layer"
# The GenerationMixin method in which generate() builds its cache when none is given.
_PREPARE_CACHE = "_prepare_cache_for_generation"
# The GenerationMixin methods through which generate() picks a compiled decode step: enable()
# overrides them per model so that the decode steps replay a CUDA graph (DecodeGraph).
_COMPILE_CRITERIA = "_valid_auto_compile_criteria"
_COMPILED_CALL = "get_compiled_call"
# The cache keyword of generate() and the key of the cache in its model_kwargs: "cache" from
# transformers 5.24 on (where "past_key_values" warns), "past_key_values" before. generate()
# takes **kwargs, so the name is read off the generation step it feeds them to.
_GENERATE_CACHE = ("cache" if "cache" in inspect.signature(
    transformers.GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values")


@dataclasses.dataclass
class _State:
    config: ReAttentionConfig
    inv_freq: torch.Tensor  # float32 [R/2], moved to the queries' device on first use there
    rope_scale: float
    rope_style: str
    backend: str
    trained_length: int
    previous_attn: str
    hooks: list
    tagged: list
    # the model's own attributes (its __dict__ entries, None where it had none) that enable()
    # overrides, to put back on disable()
    previous_attrs: dict = dataclasses.field(default_factory=dict)
    decode: "DecodeGraph | None" = None
    warned_scope: bool = False

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return self.inv_freq


# --------------------------------------------------------------------------- attention
def _warn_scope(state: _State, n: int, lq: int) -> None:
    """Warn once when re-assigned positions can leave the model's trained range.

    Under compact positions a query of a block sits below sink + topk*chunk + local + chunk +
    the block's queries (docs/design.md section 2), whatever the call's Lq; with N tokens in
    all it is also below N. So a large prefill chunk_size is as safe as a small one.
    """
    cfg = state.config
    reach = min(n, layout.scope(cfg.sink, cfg.local, cfg.chunk, cfg.topk,
                                min(lq, cfg.query_block)))
    if state.warned_scope or reach <= state.trained_length:
        return
    state.warned_scope = True
    warnings.warn(
        f"reattention: positions reach {reach} > the model's trained length "
        f"{state.trained_length} (sink {cfg.sink} + topk*chunk {cfg.topk * cfg.chunk} + local "
        f"{cfg.local} + chunk {cfg.chunk} + {min(lq, cfg.query_block)} queries of a block); "
        f"use a smaller local, topk, chunk or query_block", stacklevel=3)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float | None = None, dropout: float = 0.0,
               sliding_window: int | None = None, softcap: float | None = None,
               **kwargs):  # position_ids, use_cache, ...: positions follow from the cache
    """The ``"reattention"`` entry of ``transformers.AttentionInterface``.

    Parameters
    ----------
    module : the model's attention module (carries the state set by :func:`enable`).
    query : [B, Hq, Lq, D] raw queries of the newest Lq tokens.
    key, value : [B, Hkv, N, D] raw keys/values; when they come from a
        :class:`ReAttentionCache` their full buffers, lengths and reps are used instead.
    attention_mask : must be None (no mask function is registered for this attention).

    Returns
    -------
    (out [B, Lq, Hq, D], None)
    """
    state = getattr(module, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError(f"attn_implementation {ATTN_NAME!r} needs reattention.hf.enable(model)")
    if dropout:
        raise ValueError("reattention: attention dropout (training) is not supported")
    if softcap is not None:
        raise ValueError(f"reattention: attention logit softcapping (softcap={softcap}) is not "
                         f"supported")
    if attention_mask is not None:
        raise ValueError("reattention: attention masks are not supported (no padding, no custom "
                         "4-D masks); causality is built in")
    layer = getattr(key, _LAYER_TAG, None)
    n = key.shape[2] if layer is None else layer.length
    if sliding_window is not None and n > sliding_window:
        raise ValueError(f"reattention: this layer uses sliding-window attention (window "
                         f"{sliding_window}) and {n} tokens exceed the window; sliding-window "
                         f"layers are not supported past their window")
    _warn_scope(state, n, query.shape[2])
    if query.shape[2] > n:
        raise ValueError(f"reattention: {query.shape[2]} queries but only {n} cached tokens")
    rope = dict(inv_freq=state.inv_freq_on(query.device), rope_scale=state.rope_scale,
                rope_style=state.rope_style, scale=scaling, backend=state.backend)
    if layer is not None:
        # A ReAttentionCache layer: its full buffers, lengths and reps, which are valid by
        # construction, so its lengths are never read (a host sync per layer on a GPU).
        out = layer.attend(query, **rope)
    else:
        # No ReAttention cache (use_cache=False or a stock cache): the keys are the whole sequence, queries
        # last; reps for bound/mean are computed on the fly.
        out = reattention_attn(query, key, value, config=state.config, **rope)
    return out.transpose(1, 2), None


transformers.AttentionInterface.register(ATTN_NAME, _attention)


# --------------------------------------------------------------------------- hooks
def _identity_rotary(module, args, output):
    """Replace (cos, sin) by (1, 0): apply_rotary_pos_emb then returns q and k unchanged."""
    cos, sin = output
    return torch.ones_like(cos), torch.zeros_like(sin)


def _refuse_masks(module, args, kwargs):
    """Decoder pre-hook: masks are dropped by create_causal_mask, so refuse padding here."""
    mask = kwargs.get("attention_mask")
    if mask is None and args:
        # A bare decoder (AutoModel) is often called as model(input_ids, attention_mask).
        try:
            mask = inspect.signature(module.forward).bind_partial(*args).arguments.get(
                "attention_mask")
        except TypeError:
            mask = None
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"reattention: custom {mask.dim()}-D attention masks are not supported")
    if not bool(mask.all()):
        raise ValueError("reattention: padded batches are not supported (attention_mask has "
                         "zeros); run sequences one at a time or batch equal lengths unpadded")
    return None


def _find_rotary(decoder: torch.nn.Module) -> torch.nn.Module:
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        found = [m for m in decoder.modules() if isinstance(getattr(m, "inv_freq", None),
                                                            torch.Tensor)]
        if len(found) != 1:
            raise ValueError(f"reattention: expected exactly one rotary embedding module in "
                             f"{type(decoder).__name__}, found {len(found)}; models with "
                             f"several (e.g. per-layer-type RoPE) are not supported")
        rotary = found[0]
    if not isinstance(getattr(rotary, "rope_type", None), str):
        raise ValueError(f"reattention: {type(rotary).__name__} has per-layer-type RoPE "
                         f"(rope_type={getattr(rotary, 'rope_type', None)!r}); not supported")
    return rotary


def _rope_of(rotary: torch.nn.Module, text_config) -> tuple[torch.Tensor, float, int]:
    """(inv_freq float32 [R/2], attention scaling, trained length) of a rotary module."""
    if rotary.rope_type in _LENGTH_DEPENDENT_ROPE:
        # The frequencies valid at the trained length: re-assigned positions stay below it.
        inv_freq = rotary.original_inv_freq
    else:
        inv_freq = rotary.inv_freq
    trained = text_config.max_position_embeddings
    if rotary.rope_type == "longrope":
        # longrope's short factors are what the model saw up to its original length.
        trained = text_config.rope_parameters.get("original_max_position_embeddings", trained)
    return inv_freq.detach().to(torch.float32).clone(), float(rotary.attention_scaling), trained


# --------------------------------------------------------------------------- enable/disable
def is_enabled(model: torch.nn.Module) -> bool:
    """True when :func:`enable` is in effect on ``model``."""
    return isinstance(getattr(model, _STATE_ATTR, None), _State)


def enable(model: "transformers.PreTrainedModel", config: ReAttentionConfig | None = None, *,
           backend: str = "auto", rope_style: str = "half") -> "transformers.PreTrainedModel":
    """Make ``model`` use ReAttention, in place; :func:`disable` restores stock behaviour.

    Parameters
    ----------
    model : a transformers decoder with rotary position embedding (Llama, Mistral, Qwen2,
        Qwen3, ...) whose attention goes through ``AttentionInterface``.
    config : ReAttentionConfig, default ``ReAttentionConfig()``.
    backend : backend of the ops ("auto", "cpu", "cuda", "triton", "reference").
    rope_style : "half" (the transformers convention, default) or "interleaved".

    Returns
    -------
    The same model object. Its ``generate`` creates a :class:`ReAttentionCache` when given no
    cache (and refuses a stock ``cache_implementation``).

    Example
    -------
    >>> model = hf.enable(model, reattention.ReAttentionConfig(sink=64, local=4096))
    >>> hf.disable(model)
    """
    config = ReAttentionConfig() if config is None else config
    if not isinstance(config, ReAttentionConfig):
        raise ValueError(f"config must be a ReAttentionConfig, got {type(config).__name__}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    if rope_style not in ops.ROPE_STYLES:
        raise ValueError(f"rope_style must be one of {ops.ROPE_STYLES}, got {rope_style!r}")
    if is_enabled(model):
        disable(model)
    decoder = model.get_decoder()
    rotary = _find_rotary(decoder)
    text_config = model.config.get_text_config(decoder=True)
    inv_freq, rope_scale, trained = _rope_of(rotary, text_config)
    state = _State(config=config, inv_freq=inv_freq, rope_scale=rope_scale,
                   rope_style=rope_style, backend=backend, trained_length=trained,
                   previous_attn=model.config._attn_implementation, hooks=[], tagged=[])
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        # transformers only logs this; with raw q/k and stock attention the model would be wrong.
        raise ValueError(f"reattention: {type(model).__name__} does not route attention through "
                         f"transformers.AttentionInterface, so it cannot be enabled")
    state.hooks.append(rotary.register_forward_hook(_identity_rotary))
    state.hooks.append(decoder.register_forward_pre_hook(_refuse_masks, with_kwargs=True))
    def override(name, attr):
        state.previous_attrs[name] = model.__dict__.get(name)
        setattr(model, name, attr)
    if hasattr(model, _PREPARE_CACHE):
        override(_PREPARE_CACHE, _generate_with_own_cache(model, getattr(model, _PREPARE_CACHE)))
    if hasattr(model, _COMPILE_CRITERIA) and hasattr(model, _COMPILED_CALL):
        state.decode = DecodeGraph(model)
        override(_COMPILE_CRITERIA, _graph_criteria(model, state.decode))
        override(_COMPILED_CALL, lambda compile_config=None: state.decode)
    # Attention modules are the ones that know their layer; the attention function gets
    # the module, so the state rides on it.
    for m in [model, *(m for m in decoder.modules() if hasattr(m, "layer_idx"))]:
        setattr(m, _STATE_ATTR, state)
        state.tagged.append(m)
    return model


def disable(model: "transformers.PreTrainedModel") -> "transformers.PreTrainedModel":
    """Undo :func:`enable`: remove the hooks and restore the previous attention implementation.

    Returns the same model object; a no-op when ReAttention is not enabled.
    """
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, _State):
        return model
    for h in state.hooks:
        h.remove()
    for m in state.tagged:
        delattr(m, _STATE_ATTR)
    for name, previous in state.previous_attrs.items():
        if previous is None:
            model.__dict__.pop(name, None)
        else:
            setattr(model, name, previous)
    if state.decode is not None:
        state.decode.release()
    model.set_attn_implementation(state.previous_attn)
    return model


def _generate_with_own_cache(model, prepare):
    """Wrap generate()'s cache preparation so that a call without a cache gets a fresh
    :class:`ReAttentionCache`: a stock cache would work from dynamic concatenated keys
    (recomputing bound/mean reps over the whole cache at every step) or, for the static
    kinds, hand over padded buffers the attention would read as tokens.

    A :class:`ReAttentionCache` (given or made here) is then reserved for the prompt plus the
    new tokens (``generation_config.max_length``), so that no decode step regrows it: a regrown
    buffer moves, and a captured decode graph would have to be captured again."""
    def prepare_cache(generation_config, model_kwargs, *args, **kwargs):
        if (model_kwargs.get(_GENERATE_CACHE) is None
                and generation_config.use_cache is not False):
            kind = generation_config.cache_implementation
            if kind is not None:
                raise ValueError(f"reattention: generate(cache_implementation={kind!r}) builds a "
                                 f"stock cache ReAttention cannot read; leave it unset, or pass "
                                 f"one: reattention.hf.generate(model, input_ids, "
                                 f"reattention.hf.ReAttentionCache(model), ...)")
            model_kwargs[_GENERATE_CACHE] = ReAttentionCache(model)
        cache = model_kwargs.get(_GENERATE_CACHE)
        if isinstance(cache, ReAttentionCache) and generation_config.max_length is not None:
            cache.reserve(generation_config.max_length, up_to_max_length=True)
        return prepare(generation_config, model_kwargs, *args, **kwargs)
    return prepare_cache


def _graph_criteria(model, decode: "DecodeGraph"):
    """generate()'s ``_valid_auto_compile_criteria`` for an enabled model: True (decode through
    ``get_compiled_call``, i.e. ``decode``) for a :class:`ReAttentionCache` that
    :class:`DecodeGraph` serves on a CUDA device (on any device once ``decode.capture`` is
    False: the uncaptured step), unless ``disable_compile`` or beam search (each of its steps
    reorders the cache into new buffers, which would capture a graph per step); False otherwise,
    so every other cache decodes eagerly as before (a stock static cache would be read as
    tokens, padding included, and is refused when generate builds it)."""
    def criteria(model_kwargs, generation_config):
        if (generation_config.disable_compile or (generation_config.num_beams or 1) > 1
                or (model.device.type != "cuda" and decode.capture is not False)):
            return False
        cache = next((model_kwargs[n] for n in ("cache", "past_key_values")
                      if model_kwargs.get(n) is not None), None)
        return isinstance(cache, ReAttentionCache) and decode.serves(cache)
    return criteria


def _require_state(model) -> _State:
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, _State):
        raise ValueError("reattention: call reattention.hf.enable(model, config) first")
    return state


# --------------------------------------------------------------------------- cache
class ReAttentionLayer(CacheLayerMixin):
    """A transformers cache layer backed by a :class:`reattention.cache.LayerCache`.

    ``update`` appends raw K/V in place and returns views [B, Hkv, N, D] of the valid tokens
    (what any attention function expects); the key view also carries its LayerCache so the
    ReAttention attention function reads the full buffers, lengths and reps instead. A paged
    layer has no such view (its tokens sit in pages): it returns [B, Hkv, N, D] stand-ins that
    are one NaN broadcast (no memory, and loudly wrong if anything but the ReAttention
    attention function reads them).
    """

    # Not for torch.compile: an append reads the host-side length. DecodeGraph captures the
    # decode step in a CUDA graph instead (with on_device set, the appends read no host length).
    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, config: ReAttentionConfig, max_length: int | None = None,
                 backend: str = "auto", page_size: int | None = None, **tiers):
        super().__init__()
        self.kv = LayerCache(config, max_length=max_length, backend=backend,
                             page_size=page_size, **tiers)
        # Set by DecodeGraph around a decode step: append with LayerCache.append_on_device.
        self.on_device = False

    def _publish(self) -> None:
        kv = self.kv
        if kv.pool is not None:
            b, h, d = kv._dims[:3]
            if getattr(self, "_nan", None) is None:  # one per layer: no allocation per step
                self._nan = kv.pool.k.new_full((1, 1, 1, 1), float("nan"))
            self.keys = self._nan.expand(b, h, kv.length, d)
            self.values = self._nan.expand(b, h, kv.length, d)
        else:
            self.keys, self.values = kv.keys, kv.values
        if self.keys is not None:
            setattr(self.keys, _LAYER_TAG, self.kv)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kv.allocate(b, h, d, key_states.dtype, key_states.device)
        self.is_initialized = True
        self._publish()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on_device:
            self.kv.append_on_device(key_states, value_states)
        else:
            self.kv.append(key_states, value_states)
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        self._publish()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.kv.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv.length + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.kv.max_length is None else self.kv.max_length

    def reset(self) -> None:
        self.kv.reset()
        self._publish()

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: remove that many tokens; positive (legacy): keep that many at most."""
        n = self.kv.length
        keep = min(tokens_to_remove, n) if tokens_to_remove > 0 else max(0, n + tokens_to_remove)
        self.kv.crop(keep)
        self._publish()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.kv.select_batch(beam_idx)
        self._publish()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv.is_allocated:
            b = self.kv.batch_size
            self.kv.select_batch(torch.arange(b).repeat_interleave(repeats))
            self._publish()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self.kv.select_batch(indices)
        self._publish()


class ReAttentionCache(Cache):
    """A transformers ``Cache`` of raw keys and values for a model with ReAttention enabled.

    Parameters
    ----------
    model : a model passed to :func:`enable`.
    config : ReAttentionConfig, default the one given to :func:`enable` (must equal it).
    max_length : int, optional
        Preallocate every layer for this many tokens (appending past it raises); default
        grows geometrically.
    backend : backend for the rep updates, default the one given to :func:`enable`.
    page_size : int, optional
        Store every layer in pages of this many tokens (:class:`reattention.cache.PagePool`):
        appends never copy stored tokens once :meth:`reserve` sized the pools
        (:func:`prefill` reserves the prompt plus ``reserve_new_tokens``).
    offload : None or "cpu"
        "cpu": tiered layers (:class:`reattention.offload.TieredPool`): the middle of every
        layer in pinned host memory; the GPU keeps the reps, sink, local window and
        ``hot_pages`` pages per layer. Needs rep "bound" or "mean" (any sink: pages of
        gcd(sink, chunk) tokens).
    hot_pages, max_append : for offload, see :class:`reattention.cache.LayerCache`; a call of
        :func:`prefill` must not exceed ``max_append`` tokens (its ``chunk_size``).

    Example
    -------
    >>> cache = hf.ReAttentionCache(model)
    >>> out = hf.generate(model, input_ids, cache, max_new_tokens=32)
    """

    def __init__(self, model: "transformers.PreTrainedModel",
                 config: ReAttentionConfig | None = None, *, max_length: int | None = None,
                 backend: str | None = None, page_size: int | None = None,
                 offload: str | None = None, hot_pages: int | None = None,
                 max_append: int = 4096):
        state = _require_state(model)
        if config is not None and config != state.config:
            raise ValueError(f"config {config} differs from the one given to enable(): "
                             f"{state.config}")
        text_config = model.config.get_text_config(decoder=True)
        tiers = dict(offload=offload, hot_pages=hot_pages, max_append=max_append)
        layers = [ReAttentionLayer(state.config, max_length,
                                   state.backend if backend is None else backend, page_size,
                                   **tiers)
                  for _ in range(text_config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.config = state.config

    def reserve(self, n: int, *, up_to_max_length: bool = False) -> None:
        """Make room for ``n`` tokens in every layer (before or after the first update).

        ``up_to_max_length``: a layer of a fixed ``max_length`` below ``n`` is left as it is
        instead of raising (generate reserves its longest possible output this way, which an
        early end of sequence may never reach).
        """
        for layer in self.layers:
            kv = layer.kv
            kv.reserve(min(n, kv.max_length) if up_to_max_length and kv.max_length else n)


# --------------------------------------------------------------------------- graph decode
def _copy_out(x):
    """A copy of a forward output field that outlives the next replay (tensors, and tuples
    of them, live in the graph's memory); the cache and plain values as they are."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_copy_out(y) for y in x)
    return x


class DecodeGraph:
    """Runs a decode step of an enabled model, one new token per sequence, as one CUDA graph
    replay (:func:`enable` hands it to ``generate`` as the model's compiled call).

    On the first decode call, and again whenever the batch, an input's shape or dtype, or a
    cache buffer (moved by a regrowth or a batch reorder) changes, it copies the inputs into
    static buffers, runs the step twice on a side stream (warm-up: lazy initialisations;
    the cache's device lengths are put back after each) and captures ``model.__call__`` in a
    CUDA graph. Every call then copies the inputs in, replays the graph, advances each
    layer's host-side length by one (:meth:`reattention.cache.LayerCache.advance`) and
    returns a copy of the output.

    The graph stays valid as the cache grows: the appends write at the device length
    (:meth:`reattention.cache.LayerCache.append_on_device`), the rep update covers the last
    chunks of each sequence from its device length, and the attention ops size their grids
    and workspaces from the cache's capacity, never from a host length. The model's own
    positions, frozen at capture, are unused: its rotary is hooked to the identity and no
    mask is built for this attention. A decode call's 2-D ``attention_mask`` is dropped: it
    extends the prompt's mask, which the eager prefill found all ones, with ones.

    Calls of more than one token (the prefill), and caches it does not serve (paged, tiered:
    :meth:`serves`), run eagerly; so does beam search, which ``generate`` keeps off it. With ``capture=False`` (or on a CPU model) it runs the
    very same step uncaptured: static buffers, device appends, advance.

    Attributes
    ----------
    replays : decode steps run (graph replays, or uncaptured steps when not capturing).
    captures : graphs captured.

    Example
    -------
    >>> out = hf.generate(model, input_ids, cache, max_new_tokens=32)  # on a GPU
    >>> hf.decode_graph(model).replays
    31
    """

    def __init__(self, model: torch.nn.Module, capture: bool | None = None):
        self.model = model
        self.capture = capture
        self.replays = 0
        self.captures = 0
        self.release()

    def release(self) -> None:
        """Drop the captured graph and its buffers (the next decode call captures again)."""
        self._graph = None
        self._key = None
        self._static: dict = {}
        self._out = None

    @staticmethod
    def serves(cache: Cache) -> bool:
        """True for a :class:`ReAttentionCache` whose layers are all contiguous."""
        return isinstance(cache, ReAttentionCache) and all(
            layer.kv.page_size is None and not layer.kv.tiered for layer in cache.layers)

    def __call__(self, **inputs):
        cache = next((inputs[n] for n in ("cache", "past_key_values")
                      if inputs.get(n) is not None), None)
        ids = inputs.get("input_ids")
        if (ids is None or ids.dim() != 2 or ids.shape[1] != 1 or inputs.get("inputs_embeds")
                is not None or not isinstance(cache, ReAttentionCache)
                or cache.get_seq_length() == 0):
            return self.model(**inputs)  # a prefill: eager
        if not self.serves(cache):
            raise ValueError("reattention: a CUDA-graph decode step needs a contiguous "
                             "ReAttentionCache; paged and tiered caches keep their pages on the "
                             "host (generate(disable_compile=True) decodes them eagerly)")
        mask = inputs.pop("attention_mask", None)
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError("reattention: only 2-D all-ones attention masks are supported")
        layers = [layer.kv for layer in cache.layers]
        for kv in layers:
            kv.make_room(1)  # may regrow: the key below then differs and the step is recaptured
        key = self._key_of(inputs, layers)
        capture = (self.capture if self.capture is not None
                   else ids.is_cuda and torch.cuda.is_available())
        if key != self._key:
            self.release()
            self._static = {n: v.clone() if isinstance(v, torch.Tensor) else v
                            for n, v in inputs.items()}
            if capture:
                self._capture(cache, layers)
            self._key = key
        for n, v in inputs.items():
            if isinstance(v, torch.Tensor):
                self._static[n].copy_(v)
        if capture:
            self._graph.replay()
            out = self._out
        else:
            out = self._step(cache)
        for kv in layers:
            kv.advance(1)
        self.replays += 1
        return type(out)(**{n: _copy_out(v) for n, v in out.items()})

    @staticmethod
    def _key_of(inputs: dict, layers: list) -> tuple:
        """What a captured graph depends on: input shapes and settings, the cache's buffers."""
        def sig(v):
            if isinstance(v, torch.Tensor):
                return ("tensor", tuple(v.shape), v.dtype, v.device)
            if isinstance(v, Cache):
                return ("cache", id(v))
            return ("value", repr(v))
        bufs = tuple((t.data_ptr(), tuple(t.shape))
                     for kv in layers
                     for t in (kv.k_buffer, kv.v_buffer, kv.reps, kv.cache_seqlens)
                     if t is not None)
        return tuple(sorted((n, sig(v)) for n, v in inputs.items())), bufs

    def _step(self, cache: "ReAttentionCache"):
        for layer in cache.layers:
            layer.on_device = True
        try:
            return self.model(**self._static)
        finally:
            for layer in cache.layers:
                layer.on_device = False

    def _capture(self, cache: "ReAttentionCache", layers: list) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(cache)
                for kv in layers:  # the warm-up appended a token: put the lengths back
                    kv.cache_seqlens.fill_(kv.length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._out = self._step(cache)
        self._graph = graph
        self.captures += 1


def decode_graph(model: torch.nn.Module) -> DecodeGraph:
    """The :class:`DecodeGraph` that runs ``generate``'s decode steps of an enabled model."""
    state = _require_state(model)
    if state.decode is None:
        raise ValueError(f"reattention: {type(model).__name__} has no generate() decode steps")
    return state.decode


# --------------------------------------------------------------------------- prefill
@torch.no_grad()
def prefill(model: "transformers.PreTrainedModel", input_ids: torch.Tensor,
            cache: ReAttentionCache, chunk_size: int = 4096, progress: bool = True, *,
            reserve_new_tokens: int = 1024) -> torch.Tensor:
    """Feed a long prompt through the model in chunks and return the last token's logits.

    The cache then holds every prompt token but the last, so that
    ``hf.generate(model, input_ids, cache, ...)`` (which feeds the tokens the cache lacks)
    starts by feeding exactly that one. A non-empty cache is treated as
    holding ``input_ids[:, :cache.get_seq_length()]``.

    Parameters
    ----------
    model : a model passed to :func:`enable`.
    input_ids : int64 [B, L], unpadded.
    cache : a :class:`ReAttentionCache` of this model.
    chunk_size : prompt tokens per forward pass (queries per ReAttention call).
    progress : show a tqdm progress bar.
    reserve_new_tokens : room reserved beyond the prompt, so generation does not regrow the
        buffers at once.

    Returns
    -------
    logits : [B, vocab] float, the next-token logits after the whole prompt.

    Example
    -------
    >>> logits = hf.prefill(model, input_ids, cache, chunk_size=4096)
    >>> out = hf.generate(model, input_ids, cache, max_new_tokens=32)
    """
    _require_state(model)
    if not isinstance(cache, ReAttentionCache):
        raise ValueError(f"cache must be a ReAttentionCache, got {type(cache).__name__}")
    if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2):
        raise ValueError(f"input_ids must be a [B, L] tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    total = input_ids.shape[1]
    start = cache.get_seq_length()
    if start >= total:
        raise ValueError(f"the cache already holds {start} tokens, input_ids has {total}: "
                         f"nothing to prefill")
    cache.reserve(total + reserve_new_tokens)
    keep_one = ({"logits_to_keep": 1}
                if "logits_to_keep" in inspect.signature(model.forward).parameters else {})
    feed = _cache_kwargs(model, cache)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total - start, unit="tok", desc="reattention prefill")
    for s in range(start, total, chunk_size):
        e = min(total, s + chunk_size)
        out = model(input_ids=input_ids[:, s:e], use_cache=True, **feed, **keep_one)
        if bar is not None:
            bar.update(e - s)
    if bar is not None:
        bar.close()
    cache.crop(-1)
    return out.logits[:, -1]


# --------------------------------------------------------------------------- cache keyword
def _cache_kwargs(model: torch.nn.Module, cache: Cache | None) -> dict:
    """``{name: cache}`` for ``model(...)``, under the cache keyword its ``forward`` takes.

    ``cache`` on transformers >= 5.24 (``past_key_values`` there warns that it goes away in
    5.40), ``past_key_values`` before; read off the signature, so that custom models that
    kept the old name get it. A forward with neither takes generate's name.
    """
    params = inspect.signature(model.forward).parameters
    name = next((n for n in ("cache", "past_key_values") if n in params), _GENERATE_CACHE)
    return {name: cache}


def _cache_of(output) -> Cache | None:
    """The cache a forward or ``generate(return_dict_in_generate=True)`` output returns.

    Its field is ``cache`` on transformers >= 5.24, where reading ``past_key_values`` logs a
    deprecation message, and ``past_key_values`` before.
    """
    names = {f.name for f in dataclasses.fields(output)}
    return getattr(output, "cache" if "cache" in names else "past_key_values", None)


def generate(model: "transformers.PreTrainedModel", input_ids: torch.Tensor,
             cache: Cache | None = None, **kwargs):
    """``model.generate(input_ids, **kwargs)`` with ``cache`` passed under the keyword the
    installed transformers takes.

    transformers >= 5.24 calls it ``cache`` and warns on ``past_key_values``
    (a FutureWarning: removed in 6.0); older versions know only ``past_key_values``. Use this
    instead of either name to run on both.

    Parameters
    ----------
    model : a transformers generative model, usually one passed to :func:`enable`.
    input_ids : int64 [B, L], the whole prompt (a prefilled cache holds a prefix of it).
    cache : a :class:`ReAttentionCache` (or any transformers Cache) to decode from, or None:
        then an enabled model's ``generate`` creates a fresh :class:`ReAttentionCache`.
    **kwargs : any other ``generate`` argument (``max_new_tokens``, ``do_sample``, ...).

    Returns
    -------
    What ``model.generate`` returns: int64 [B, L + new] tokens, or its output object under
    ``return_dict_in_generate=True``.

    Example
    -------
    >>> cache = hf.ReAttentionCache(model)
    >>> logits = hf.prefill(model, input_ids, cache)
    >>> out = hf.generate(model, input_ids, cache, max_new_tokens=32, do_sample=False)
    """
    if "past_key_values" in kwargs:
        raise ValueError("past_key_values: pass the cache as hf.generate's argument cache")
    if cache is not None:
        if not isinstance(cache, Cache):
            raise ValueError(f"cache must be a transformers Cache (hf.ReAttentionCache(model)) "
                             f"or None, got {type(cache).__name__}")
        kwargs[_GENERATE_CACHE] = cache
    return model.generate(input_ids, **kwargs)
