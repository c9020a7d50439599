"""Where the 4096-query prefill call's time goes besides its kernels (CUDA, bench_attn's shape).

Prints one JSON object:

- ``host_us_median``: host time of one ``reattention_attn`` call while the GPU is busy with a
  sleep kernel ahead of it (launches and checks only, nothing waits);
- ``busy_ahead_us_median``: CUDA-event time of the call with the GPU kept busy ahead of the
  start event (no launch gap can show; the previous call's lines are still in the L2);
- ``do_bench_us``: the same call timed as ``bench_attn.py`` times it (triton's do_bench, which
  clears the L2 before every call);
- ``local<L>``: the attention and pre-pass kernels alone for local windows 1024 to 8192 (the
  same selection otherwise), from which a fixed cost per CTA and a cost per key iteration fit.

Also prints a cProfile table of 20 calls (the Python side). Usage:
    python bench/probe_prefill_call.py
"""
from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reattention  # noqa: E402
from bench_attn import (B, CHUNK, D, DTYPE, HQ, LOCAL, QB, SINK, TOPK,  # noqa: E402
                        bench, make_cache)
from probe_l2 import timed  # noqa: E402
from profile_step import kernel_times  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("probe_prefill_call.py needs a CUDA device")
    reattention.set_device_checks(False)
    n = 1 << 20
    k, v = make_cache(n, seed=1)
    lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
    inv = reattention.default_inv_freq(D, device="cuda")
    reps = reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep="bound", backend="cuda")
    q = torch.randn(B, HQ, 4096, D, device="cuda", dtype=DTYPE)

    def call():
        return reattention.reattention_attn(q, k, v, lens, sink=SINK, local=LOCAL, chunk=CHUNK,
                                            topk=TOPK, query_block=QB, rep="bound", reps=reps,
                                            inv_freq=inv, backend="cuda")

    call()
    torch.cuda.synchronize()
    res = {}
    host = []
    for _ in range(30):
        torch.cuda._sleep(50_000_000)
        t0 = time.perf_counter()
        call()
        host.append(1e6 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
    res["host_us_median"] = statistics.median(host)
    res["busy_ahead_us_median"] = timed(call, lambda: None, 30, sleep_cycles=20_000_000)
    res["do_bench_us"] = 1e3 * bench(call, graph=False)

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        torch.cuda._sleep(5_000_000)
        call()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(35)
    print(text.getvalue())

    for local in (1024, 2048, 4096, 8192):
        idx = reattention.select_chunks(q, k, lens, reps=reps, sink=SINK, local=local,
                                        chunk=CHUNK, topk=TOPK, query_block=QB, rep="bound",
                                        backend="cuda")
        times = kernel_times(lambda: reattention.gather_attention(
            q, k, v, idx, lens, sink=SINK, local=local, chunk=CHUNK, query_block=QB,
            inv_freq=inv, backend="cuda"))
        res[f"local{local}"] = dict(
            attn_us=sum(t for name, t in times.items() if "prefill_sm90" in name),
            prerot_us=sum(t for name, t in times.items() if "prerot" in name),
            keys=SINK + TOPK * CHUNK + local + QB)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
