"""Whole-model speed: prefill and decode tokens/s of a Hugging Face model, ReAttention against
transformers' own fast path, in one run (docs/design.md section 5).

Models are built from configs with random weights (no download), bf16:
  1b   Llama-3.2-1B-shaped: 16 layers, hidden 2048, 32 q / 8 kv heads of 64, llama3 RoPE
  8b   Llama-3.1-8B-shaped: 32 layers, hidden 4096, 32 q / 8 kv heads of 128, llama3 RoPE
  tiny 2 layers, hidden 256 (a smoke test that runs on the CPU)

Rows, per (model, prompt length), each with prefill and decode tokens/s and peak GPU memory:
  sdpa-static   transformers' SDPA attention with its StaticCache: ``model.generate`` with that
                cache compiles the decode step on a GPU (its "reduce-overhead" CUDA graphs);
                the prompt is prefilled in one forward pass
  reattention   ``hf.enable`` + ``hf.ReAttentionCache``: ``hf.prefill`` in ``--chunk`` token
                calls, then eager decode steps
  reattention-graph   the same prefill, then decode steps that each replay one CUDA graph
                (``hf.decode_graph(model)``, what ``generate`` uses on a GPU; its capture
                happens at the first step, outside the timed median)
  reattention-tiered   the same as reattention with ``offload="cpu"`` (``--tiered``)
A path that runs out of memory records the error and the run goes on. Decode tokens/s of ours
is the median over ``--steps`` greedy steps of one token (batch 1), each synchronised;
sdpa-static's is the difference of two ``generate`` calls over ``--steps`` more tokens (see
:func:`sdpa_static`). Prefill tokens/s is the prompt length over the prefill's wall time,
synchronised. Every row records its peak GPU memory and ``decode_growth_mib``, the growth of
allocated GPU memory from the first decode step to the last (sdpa-static: over its prefill
generate call).

The defaults (1b at 32K and 128K) run in a few minutes on an H200; ``--models 1b,8b
--lengths 32768,131072,524288,1048576`` is the full table. Options for the rows that do not fit
one pass or one GPU:
  --paths          run only these paths (e.g. ``reattention-tiered`` alone at 8B and 1M, where
                   the all-GPU cache cannot fit and would only fail after a long prefill)
  --sdpa-chunk C   prefill sdpa-static in C-token forward passes (transformers'
                   ``prefill_chunk_size``, eager) instead of one pass, whose activations do not
                   fit at 8B and 512K
  --sdpa-prefill-max-len N   above N tokens sdpa-static times its decode only (its decode
                   does not need the long prefill, see :func:`sdpa_static`)
  --layers L       keep L of the model's layers (e.g. an 8B-shaped slice of 4 layers, on which
                   a dense 512K prefill costs minutes instead of most of an hour); rows name
                   the model ``8b/4L``

Usage: python bench/bench_model.py --out DIR [--models 1b,8b] [--lengths 32768,131072]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch
import transformers

import reattention
from bench_attn import header  # this folder is on the path when a script runs from it
from reattention import hf

CFG = reattention.ReAttentionConfig(sink=64, local=4096, chunk=64, topk=32, query_block=128,
                                    rep="bound")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
               tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
               tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024,
                 tie_word_embeddings=True),
}


def build(name: str, device: torch.device, dtype: torch.dtype, layers: int | None = None):
    shape = dict(SHAPES[name])
    if layers:
        shape["num_hidden_layers"] = layers
    config = transformers.LlamaConfig(**shape, max_position_embeddings=131072,
                                      rope_parameters=dict(LLAMA3_ROPE))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocated_mib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@torch.no_grad()
def sdpa_static(model, ids: torch.Tensor, steps: int, prefill_chunk: int = 0,
                prefill: bool = True) -> dict:
    """transformers' fast path: StaticCache, one-pass prefill, compiled decode (on a GPU).

    A compiled static-cache decode step attends over the whole ``max_cache_len`` buffer
    (static shapes; the mask hides the unwritten part), so its time does not depend on how
    much of the cache is filled. Decode is therefore timed from a 64-token prompt in the
    cache sized for the full length, as two generates that differ by ``steps`` tokens only
    (their prefill and set-up cancel): one dense prefill of the full prompt per length, not
    three. ``prefill_chunk`` > 0 prefills in forward passes of that many tokens (eager:
    transformers would otherwise compile one more graph for the chunk shape); ``prefill``
    False skips the prefill timing (the row then has decode figures only).
    """
    device = ids.device
    n = ids.shape[1]
    cache = transformers.StaticCache(config=model.config, max_cache_len=n + 2 * steps + 8)
    kw = dict(do_sample=False, pad_token_id=0, past_key_values=cache)
    short = ids[:, -64:]
    model.generate(short, max_new_tokens=steps, min_new_tokens=steps, **kw)  # compile
    walls = {}
    for new in (1 + steps, 1 + 2 * steps):
        cache.reset()
        sync(device)
        t0 = time.perf_counter()
        model.generate(short, max_new_tokens=new, min_new_tokens=new, **kw)
        sync(device)
        walls[new] = time.perf_counter() - t0
    decode = max(1e-9, walls[1 + 2 * steps] - walls[1 + steps]) / steps
    compiled = model._valid_auto_compile_criteria({"past_key_values": cache},
                                                   model.generation_config)
    row = dict(decode_tok_s=1.0 / decode, decode_ms=decode * 1e3, compiled_decode=bool(compiled))
    if not prefill:
        return dict(row, prefill="not timed (--sdpa-prefill-max-len)")
    cache.reset()
    sync(device)
    before = allocated_mib(device)
    chunked = dict(prefill_chunk_size=prefill_chunk, disable_compile=True) if prefill_chunk else {}
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kw, **chunked)
    sync(device)
    wall = time.perf_counter() - t0
    if prefill_chunk:
        row["prefill_chunk"] = prefill_chunk
    return dict(row, prefill_tok_s=n / wall, decode_growth_mib=allocated_mib(device) - before)


@torch.no_grad()
def ours(model, ids: torch.Tensor, steps: int, chunk: int, backend: str, graph: bool = False,
         profile: bool = False, **tiers) -> dict:
    """hf.prefill in chunk-token calls, then decode steps of one token: eager, or (graph)
    each one replay of the decode step's CUDA graph."""
    device = ids.device
    hf.enable(model, CFG, backend=backend)
    try:
        cache = hf.ReAttentionCache(model, **tiers)
        sync(device)
        t0 = time.perf_counter()
        logits = hf.prefill(model, ids, cache, chunk_size=chunk, progress=False,
                            reserve_new_tokens=steps + 8)
        sync(device)
        prefill = time.perf_counter() - t0
        feed = hf._cache_kwargs(model, cache)
        step = hf.decode_graph(model) if graph else model
        tok = ids[:, -1:]
        times = []
        for i in range(steps):
            sync(device)
            t0 = time.perf_counter()
            logits = step(input_ids=tok, use_cache=True, **feed).logits[:, -1]
            tok = logits.argmax(-1, keepdim=True)
            sync(device)
            times.append(time.perf_counter() - t0)
            if i == 0:
                first = allocated_mib(device)
        decode = statistics.median(times[len(times) // 4:])
        kernels = _profile_steps(step, tok, feed, device) if profile else None
        row = dict(prefill_tok_s=ids.shape[1] / prefill, decode_tok_s=1.0 / decode,
                   decode_ms=decode * 1e3, decode_growth_mib=allocated_mib(device) - first)
        if graph:
            row["graph_replays"] = hf.decode_graph(model).replays
        if kernels is not None:
            row["step_kernels_us"] = kernels
        if tiers:
            pools = [layer.kv.pool for layer in cache.layers]
            lookups = sum(int(p.lookups) for p in pools)
            row["hit_rate"] = sum(int(p.hits) for p in pools) / lookups if lookups else None
        return row
    finally:
        hf.disable(model)


def _profile_steps(step, tok, feed, device, n: int = 4) -> dict | None:
    """Device time per decode step of each kernel (summed by name, the 25 largest, in us),
    from torch.profiler over ``n`` more steps; None off a GPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            logits = step(input_ids=tok, use_cache=True, **feed).logits[:, -1]
            tok = logits.argmax(-1, keepdim=True)
        sync(device)
    totals: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name[:90]] = totals.get(e.name[:90], 0.0) + e.device_time / n
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:25]
    return dict(total=round(sum(totals.values()), 1), **{k: round(v, 1) for k, v in top})


def run_row(fn, device: torch.device, **kw) -> dict:
    reset_peak(device)
    try:
        row = fn(**kw)
    except torch.OutOfMemoryError as e:
        row = dict(error=f"OutOfMemoryError: {str(e).splitlines()[0][:200]}")
    row["peak_gib"] = peak_gib(device)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--models", default="1b")
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--chunk", type=int, default=4096, help="hf.prefill chunk_size")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="auto")
    p.add_argument("--tiered", action="store_true", help="also run the tiered cache at every length")
    p.add_argument("--profile", action="store_true",
                   help="record the kernels of a graph decode step (torch.profiler)")
    p.add_argument("--sdpa-max-len", type=int, default=524288,
                   help="skip transformers' path above this length (its prefill is O(N^2))")
    p.add_argument("--sdpa-prefill-max-len", type=int, default=None,
                   help="above this length sdpa-static times its decode only")
    p.add_argument("--sdpa-chunk", type=int, default=0,
                   help="prefill sdpa-static in forward passes of this many tokens (0: one pass)")
    p.add_argument("--paths", default=None, help="comma list of the paths to run (default: all)")
    p.add_argument("--layers", type=int, default=None,
                   help="keep this many of each model's layers (rows name the model NAME/<L>L)")
    a = p.parse_args(argv)
    for arg in ("steps", "chunk", "layers", "sdpa_chunk"):
        value = getattr(a, arg)
        if value is not None and value < (0 if arg == "sdpa_chunk" else 1):
            raise ValueError(f"--{arg.replace('_', '-')} must be positive, got {value}")
    known = {"sdpa-static", "reattention", "reattention-graph", "reattention-tiered"}
    wanted = set(a.paths.split(",")) if a.paths else known
    if not wanted <= known:
        raise ValueError(f"--paths: unknown {sorted(wanted - known)}; known {sorted(known)}")
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reattention.set_device_checks(False)
    res = dict(header=header() if device.type == "cuda" else {}, config=dict(
        reattention=dataclasses.asdict(CFG), steps=a.steps, chunk=a.chunk, dtype=str(dtype),
        layers=a.layers, sdpa_chunk=a.sdpa_chunk), rows=[])
    os.makedirs(a.out, exist_ok=True)
    for name in a.models.split(","):
        model = build(name, device, dtype, a.layers)
        label = f"{name}/{a.layers}L" if a.layers else name
        for n in (int(x) for x in a.lengths.split(",")):
            ids = torch.randint(2, model.config.vocab_size, (1, n), device=device,
                                generator=torch.Generator(device).manual_seed(n))
            paths = []
            if n <= a.sdpa_max_len:
                timed = a.sdpa_prefill_max_len is None or n <= a.sdpa_prefill_max_len
                paths.append(("sdpa-static", sdpa_static, dict(
                    model=model, ids=ids, steps=a.steps, prefill_chunk=a.sdpa_chunk,
                    prefill=timed)))
            common = dict(model=model, ids=ids, steps=a.steps, chunk=a.chunk, backend=a.backend)
            paths.append(("reattention", ours, common))
            paths.append(("reattention-graph", ours, dict(common, graph=True,
                                                          profile=a.profile)))
            if a.tiered:
                paths.append(("reattention-tiered", ours,
                              dict(common, offload="cpu", max_append=a.chunk)))
            for path, fn, kw in paths:
                if path not in wanted:
                    continue
                row = dict(model=label, n=n, path=path, **run_row(fn, device, **kw))
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                with open(os.path.join(a.out, "model-bench.json"), "w") as f:
                    json.dump(res, f, indent=1)
        del model
        reset_peak(device)


if __name__ == "__main__":
    main()
