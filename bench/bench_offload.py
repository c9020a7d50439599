"""Where does the tiered cache pay off? (docs/design.md section 3.7)

One 8B-shaped layer (bf16, Hq 32, Hkv 8, D 128, sink 64, chunk 64, topk 32, local 4096, rep
bound) holding N tokens, all on the GPU (a contiguous LayerCache) against tiered
(``offload="cpu"``: the middle in pinned host memory), in one run:

  decode (a)  a new random query every step: every selected page is cold, so the step is
              bound by the host link; its floor is the bytes the step fetched over the
              measured pinned host-to-device bandwidth
  decode (b)  slowly drifting queries (q_t = q_{t-1} + 0.05 noise, renormalised): mostly hot
  prefill     one 4096-query call at N (selection and fetch included), eager
  memory      GPU bytes each cache holds; host bytes of the tiered one

Decode steps replay a CUDA graph of ``attend`` (a fresh query copied in before each replay,
in both caches); medians of CUDA-event timings. The hot-set hit rate comes from the tiered
cache's own counters.

Usage: python bench/bench_offload.py --out DIR [--n 1048576] [--backend cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import reattention
from bench_attn import header  # this folder is on the path when a script runs from it
from reattention.cache import LayerCache

HQ, HKV, D = 32, 8, 128
CFG = dict(sink=64, local=4096, chunk=64, topk=32, query_block=128, rep="bound")
APPEND = 4096


def h2d_bandwidth() -> float:
    """Pinned host -> device copy bandwidth, GB/s (1 GiB, median of 10)."""
    src = torch.empty(1 << 29, dtype=torch.int16, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return src.numel() * 2 / (statistics.median(times) * 1e-3) / 1e9


def build(n: int, offload: bool, backend: str, seed: int = 0) -> LayerCache:
    cfg = reattention.ReAttentionConfig(**CFG)
    cache = LayerCache(cfg, backend=backend, **(dict(offload="cpu", max_append=APPEND)
                                                if offload else {}))
    cache.reserve(n)
    g = torch.Generator(device="cuda").manual_seed(seed)
    for s in range(0, n, APPEND):
        m = min(APPEND, n - s)
        k = torch.randn(1, HKV, m, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, HKV, m, D, device="cuda", dtype=torch.bfloat16, generator=g)
        cache.append(k, v)
    torch.cuda.synchronize()
    return cache


def cache_gpu_bytes(cache: LayerCache) -> int:
    if cache.tiered:
        return cache.pool.gpu_bytes
    return sum(t.numel() * t.element_size() for t in (cache.k_buffer, cache.v_buffer, cache.reps)
               if t is not None)


def decode_steps(cache: LayerCache, queries: list[torch.Tensor]) -> list[float]:
    """Per-step ms of [copy the next query in, replay the captured attend]."""
    q = queries[0].clone()
    cache.attend(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cache.attend(q)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            cache.attend(q)
    torch.cuda.current_stream().wait_stream(stream)
    if cache.tiered:  # count the replays only
        cache.pool.lookups.zero_()
        cache.pool.hits.zero_()
    times = []
    for x in queries:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        q.copy_(x)
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def query_streams(steps: int, seed: int = 1) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    rand = [torch.randn(1, HQ, 1, D, device="cuda", generator=g).bfloat16() for _ in range(steps)]
    drift, q = [], torch.randn(1, HQ, 1, D, device="cuda", generator=g)
    for _ in range(steps):
        q = q + 0.05 * torch.randn(q.shape, device="cuda", generator=g)
        q = q / q.norm(dim=-1, keepdim=True) * D ** 0.5
        drift.append(q.bfloat16())
    return {"random": rand, "drift": drift}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--n", type=int, default=1 << 20)
    p.add_argument("--backend", default="cuda")
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_offload.py needs a CUDA device")
    reattention.set_device_checks(False)
    res = dict(header=header(), config=dict(CFG, Hq=HQ, Hkv=HKV, D=D, dtype="bf16", n=a.n,
                                            backend=a.backend, append=APPEND), rows=[])
    bw = h2d_bandwidth()
    res["h2d_gbps"] = bw
    page_bytes = CFG["chunk"] * D * 2  # one kv head's chunk of K (V the same)
    streams = query_streams(a.steps)
    g = torch.Generator(device="cuda").manual_seed(2)
    q_prefill = torch.randn(1, HQ, APPEND, D, device="cuda", generator=g).bfloat16()
    for offload in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        cache = build(a.n, offload, a.backend)
        name = "tiered" if offload else "all-gpu"
        row = dict(cache=name, build_s=time.time() - t0, gpu_bytes=cache_gpu_bytes(cache),
                   peak_allocated=torch.cuda.max_memory_allocated())
        if offload:
            row["host_bytes"] = cache.pool.host_bytes
        for kind, qs in streams.items():
            ms = decode_steps(cache, qs)
            row[f"decode_{kind}_ms"] = statistics.median(ms[len(ms) // 4:])
            if offload:
                lookups, hits = int(cache.pool.lookups), int(cache.pool.hits)
                misses_per_step = (lookups - hits) / len(qs)
                fetched = misses_per_step * 2 * page_bytes
                row[f"decode_{kind}_hit_rate"] = hits / max(1, lookups)
                row[f"decode_{kind}_bytes_fetched"] = fetched
                row[f"decode_{kind}_floor_ms"] = fetched / (bw * 1e9) * 1e3
        cache.attend(q_prefill)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            cache.attend(q_prefill)
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        row["prefill_4096_ms"] = statistics.median(times)
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        del cache
    base, tier = res["rows"]
    res["summary"] = dict(
        drift_vs_all_gpu=tier["decode_drift_ms"] / base["decode_drift_ms"],
        random_vs_floor=tier["decode_random_ms"] / max(1e-9, tier["decode_random_floor_ms"]),
        random_vs_all_gpu=tier["decode_random_ms"] / base["decode_random_ms"],
        prefill_vs_all_gpu=tier["prefill_4096_ms"] / base["prefill_4096_ms"],
        gpu_bytes_fraction=tier["gpu_bytes"] / base["gpu_bytes"])
    print(json.dumps(res["summary"], indent=1))
    os.makedirs(a.out, exist_ok=True)
    gpu = res["header"]["gpu"].split()[-1].lower()
    with open(os.path.join(a.out, f"offload-{gpu}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
