"""GPU memory of a Hugging Face decode after a long prefill, per cache layout (docs/design.md
section 3.7).

A random-weight 4-layer Llama (bf16, hidden 512, 8 q / 2 kv heads of 64: 2 KiB of K/V per
token over its layers) prefills ``--length`` tokens through ``hf.prefill`` and then decodes
``--steps`` greedy tokens with ``hf.generate``. For each layout of ``hf.ReAttentionCache``
(contiguous, paged with ``--page`` tokens a page, tiered with ``offload="cpu"``) it records the
allocated GPU memory after the prefill and after the decode, the peak during the decode, and
what the new tokens' K/V need. ``prefill`` reserves room for the prompt plus ``--steps`` new
tokens, so no layout should grow by more than that.

Usage: python bench/bench_cache_growth.py --out DIR [--length 1048576] [--steps 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import transformers

import reattention
from bench_attn import header  # this folder is on the path when a script runs from it
from reattention import hf

CFG = reattention.ReAttentionConfig(sink=64, local=1024, chunk=64, topk=8, rep="bound")
SHAPE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=1024,
             tie_word_embeddings=True, max_position_embeddings=8192)
MIB = 2**20


def allocated(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # a CPU run (a smoke test of this script) has no device memory to count
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def build(device: torch.device) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(**SHAPE)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    return hf.enable(model.eval(), CFG)


def kv_bytes_per_token() -> int:
    return 2 * SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"] * SHAPE["head_dim"] * 2


def run_layout(model, ids: torch.Tensor, steps: int, chunk: int, **layout) -> dict:
    device = ids.device
    base = allocated(device)
    cache = hf.ReAttentionCache(model, **layout)
    t0 = time.perf_counter()
    hf.prefill(model, ids, cache, chunk_size=chunk, progress=False, reserve_new_tokens=steps)
    after_prefill = allocated(device)
    prefill_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = hf.generate(model, ids, cache, max_new_tokens=steps, min_new_tokens=steps,
                      do_sample=False)
    after_decode = allocated(device)
    decode_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    row = {
        "layout": layout,
        "new_tokens": int(out.shape[1] - ids.shape[1]),
        "prefill_s": round(prefill_s, 2),
        "decode_steps_per_s": round((out.shape[1] - ids.shape[1]) / decode_s, 1),
        "cache_after_prefill_mib": round((after_prefill - base) / MIB, 1),
        "decode_growth_mib": round((after_decode - after_prefill) / MIB, 2),
        "decode_peak_over_prefill_mib": round((peak - after_prefill) / MIB, 2),
        "new_tokens_kv_mib": round((out.shape[1] - ids.shape[1]) * kv_bytes_per_token() / MIB, 2),
    }
    layers = [layer.kv for layer in cache.layers]
    if layers[0].pool is not None and hasattr(layers[0].pool, "regrows"):
        row["pool_regrows"] = sum(kv.pool.regrows for kv in layers)
    del cache, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/local")
    p.add_argument("--length", type=int, default=1 << 20)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--chunk", type=int, default=4096, help="prefill tokens per forward pass")
    p.add_argument("--page", type=int, default=64, help="page size of the paged layout")
    p.add_argument("--layouts", default="contiguous,paged,tiered")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test (no memory "
                   "figures; the tiered layout needs cuda)")
    args = p.parse_args()
    device = torch.device(args.device)
    model = build(device)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, args.length),
                        generator=torch.Generator().manual_seed(0)).to(device)
    kinds = {"contiguous": {}, "paged": {"page_size": args.page},
             "tiered": {"offload": "cpu", "max_append": args.chunk}}
    rows = []
    for name in args.layouts.split(","):
        if name not in kinds:
            raise SystemExit(f"--layouts: {name!r} is not one of {sorted(kinds)}")
        row = dict(name=name, **run_layout(model, ids, args.steps, args.chunk, **kinds[name]))
        print(json.dumps(row), flush=True)
        rows.append(row)
    res = dict(header() if device.type == "cuda" else {}, length=args.length, steps=args.steps, chunk=args.chunk,
               config=str(CFG), model=SHAPE, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cache_growth-h200.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
