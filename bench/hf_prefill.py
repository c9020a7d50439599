"""How fast does a transformers model prefill a prompt far past its trained length?

A tiny random Llama (2 layers, hidden 256, 4 query / 2 kv heads of dim 64,
max_position_embeddings 4096) gets ReAttention through ``reattention.hf.enable`` and prefills
N tokens (default 131072 = 32x its length) through a ``ReAttentionCache`` in chunks, then
greedily decodes a few tokens. Reported: prefill wall time, tokens/s, decode ms/token, peak
memory and the cache's bytes, beside the stock model (sdpa, DynamicCache) prefilling the same
tokens in the same chunks as the baseline, run after ``hf.disable`` (``--no-baseline`` skips
it; on the CPU its peak is the process's peak RSS, so it includes ReAttention's).

The default segments keep every re-assigned position below 4096 (sink 64 + topk 16 * chunk 64
+ local 1024 + chunk 64 + prefill chunk 1024 = 3200), so no scope warning fires.

Usage:
    python bench/hf_prefill.py --out bench/results/hf_prefill-h200.json          # CUDA, 128K
    python bench/hf_prefill.py --device cpu --n 4096 --out /tmp/hf_prefill.json  # a CPU check
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by file
import reattention  # noqa: E402
from reattention import hf, ops  # noqa: E402
from provenance import commit_id  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def header(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return dict(device=name or device.type, cuda=torch.version.cuda, torch=torch.__version__,
                transformers=transformers.__version__, commit=commit_id(),
                python=sys.version.split()[0])


def tiny_llama(device: torch.device, dtype: torch.dtype) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """Peak tensor memory since reset_peak (CUDA), or the process's peak RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def stock_prefill(model, ids: torch.Tensor, chunk_size: int, device: torch.device) -> dict:
    cache = transformers.DynamicCache(config=model.config)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, ids.shape[1], chunk_size):
        out = model(input_ids=ids[:, s:s + chunk_size], use_cache=True, logits_to_keep=1,
                    **hf._cache_kwargs(model, cache))
    sync(device)
    seconds = time.perf_counter() - t0
    return dict(prefill_s=seconds, tokens_per_s=ids.shape[1] / seconds,
                peak_mem_bytes=peak_bytes(device),
                logits_finite=bool(torch.isfinite(out.logits).all()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=131072, help="prompt tokens")
    p.add_argument("--chunk-size", type=int, default=1024, help="prefill tokens per forward")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens decoded after")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", default="auto")
    p.add_argument("--rep", default="max", choices=["max", "bound", "mean"])
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--local", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--no-baseline", action="store_true", help="skip the stock sdpa prefill")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = tiny_llama(device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, args.n),
                        generator=torch.Generator().manual_seed(0)).to(device)

    cfg = reattention.ReAttentionConfig(sink=args.sink, local=args.local, chunk=args.chunk,
                                        topk=args.topk, rep=args.rep)
    hf.enable(model, cfg, backend=args.backend)
    cache = hf.ReAttentionCache(model)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    logits = hf.prefill(model, ids, cache, chunk_size=args.chunk_size, progress=True)
    sync(device)
    prefill_s = time.perf_counter() - t0
    peak = peak_bytes(device)
    t0 = time.perf_counter()
    # An explicit all-ones mask: generate would otherwise infer padding from pad_token_id.
    out = hf.generate(model, ids, cache, attention_mask=torch.ones_like(ids),
                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                      do_sample=False, pad_token_id=0)
    sync(device)
    decode_s = time.perf_counter() - t0
    layer = cache.layers[0].kv
    cache_bytes = sum(t.numel() * t.element_size()
                      for lc in cache.layers for t in (lc.kv.k_buffer, lc.kv.v_buffer, lc.kv.reps)
                      if t is not None)

    res = dict(
        header=header(device), n=args.n, chunk_size=args.chunk_size, dtype=str(dtype),
        backend=ops.resolve_backend(args.backend, layer.k_buffer), config=dataclasses.asdict(cfg),
        max_position_embeddings=model.config.max_position_embeddings,
        prefill_s=prefill_s, tokens_per_s=args.n / prefill_s, peak_mem_bytes=peak,
        cache_bytes=cache_bytes, cache_capacity=layer.capacity,
        decode_ms_per_token=1e3 * decode_s / args.new_tokens,
        logits_finite=bool(torch.isfinite(logits).all()),
        generated=out[0, args.n:].tolist())
    # The baseline runs second, after disable(): on the CPU peak memory is the process's
    # peak RSS, which only grows, so ReAttention's figure stays its own.
    hf.disable(model)
    del cache, out, logits
    baseline = None if args.no_baseline else stock_prefill(model, ids, args.chunk_size, device)
    res["baseline_stock_sdpa"] = baseline
    h = res["header"]
    print(f"# {h['device']} | CUDA {h['cuda']} | torch {h['torch']} | transformers "
          f"{h['transformers']} | commit {h['commit']}")
    print(f"{'method':<22}{'N':>9}{'prefill s':>11}{'tok/s':>11}{'peak GiB':>10}{'decode ms/tok':>15}")
    rows = [("reattention/" + res["backend"], res)]
    if baseline is not None:
        rows.append(("stock sdpa", dict(baseline, decode_ms_per_token=float("nan"))))
    for name, r in rows:
        print(f"{name:<22}{args.n:>9}{r['prefill_s']:>11.2f}{r['tokens_per_s']:>11.0f}"
              f"{r['peak_mem_bytes'] / 2**30:>10.2f}{r['decode_ms_per_token']:>15.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
