"""Where does a decode step's time go? Per-kernel device time of one ReAttention decode step.

Shapes as bench_attn.py (bf16, B=1, Hq=32, Hkv=8, D=128, sink 64, chunk 64, topk 32, local
4096). For each N, backend and rep mode: the CUDA-graph replay time of the whole step (as
bench_attn.py times it) and the torch.profiler device time of every kernel of an eager step,
averaged over repeated steps. The gap between the sum of kernel times and the replay time is
the launch-to-launch latency of the dependent kernels.

With --prefill it profiles the prefill call of bench_attn.py instead: one 4096-query call at the
largest length (32 query blocks of 128, bound reps given, selection included), kernel by kernel,
and the exact (max) selection of 128 queries.

Usage: python bench/profile_step.py --out DIR [--lengths 32768,131072,1048576] [--prefill]
Writes DIR/profile_step-<gpu>.json (DIR/profile_prefill-<gpu>.json with --prefill) and prints
one line per kernel.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

import reattention
from bench_attn import (B, CHUNK, D, DTYPE, HQ, LOCAL, QB, SINK, TOPK, bench, header, make_cache,
                        save_json)
from reattention import ops

STEPS = 20


def kernel_times(fn) -> dict[str, float]:
    """Mean device microseconds per step of every kernel ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            fn()
        torch.cuda.synchronize()
    acc: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            acc[evt.name[:90]] += evt.device_time / STEPS
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/local")
    p.add_argument("--lengths", default="32768,131072,1048576")
    p.add_argument("--backends", default="cuda,triton")
    p.add_argument("--reps", default="bound,mean")
    p.add_argument("--prefill", action="store_true",
                   help="profile the 4096-query prefill call and the exact selection instead")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA device")
    reattention.set_device_checks(False)
    inv = reattention.default_inv_freq(D, device="cuda")
    rows = []

    def record(n, be, what, fn, graph):
        """Time ``fn`` (graph replay for decode, eager for prefill) and profile its kernels."""
        ms = bench(fn, graph=graph)
        kernels = kernel_times(fn)
        row = dict(n=n, backend=be, what=what, us=1e3 * ms,
                   kernel_sum_us=sum(kernels.values()), kernels=kernels)
        rows.append(row)
        print(f"N={n} {be} {what}: {row['us']:.1f} us, kernels {row['kernel_sum_us']:.1f} us",
              flush=True)
        for name, us in kernels.items():
            print(f"    {us:8.2f} us  {name}", flush=True)

    if a.prefill:
        n, lq = max(int(x) for x in a.lengths.split(",")), 4096
        k, v = make_cache(n, seed=1)
        lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
        reps = reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep="bound")
        q = torch.randn(B, HQ, lq, D, device="cuda", dtype=DTYPE)
        q128 = q[:, :, -128:].contiguous()
        for be in a.backends.split(","):
            if ops.available_backends()[be] is not None:
                continue
            record(n, be, "prefill 4096 q (bound, with selection)",
                   lambda be=be: reattention.reattention_attn(
                       q, k, v, lens, sink=SINK, local=LOCAL, chunk=CHUNK, topk=TOPK,
                       query_block=QB, rep="bound", reps=reps, inv_freq=inv, backend=be), False)
            record(n, be, "bound selection of 4096 q",
                   lambda be=be: reattention.select_chunks(
                       q, k, lens, reps=reps, sink=SINK, local=LOCAL, chunk=CHUNK, topk=TOPK,
                       query_block=QB, rep="bound", backend=be), False)
            record(n, be, "exact (max) selection of 128 q",
                   lambda be=be: reattention.select_chunks(
                       q128, k, lens, sink=SINK, local=LOCAL, chunk=CHUNK, topk=TOPK,
                       query_block=128, rep="max", backend=be), False)
        save_json(a.out, "profile_prefill", dict(header=header(), rows=rows))
        return
    for n in (int(x) for x in a.lengths.split(",")):
        k, v = make_cache(n)
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
        lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
        for rep in a.reps.split(","):
            reps = reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep=rep)
            for be in a.backends.split(","):
                if ops.available_backends()[be] is not None:
                    continue

                def step(be=be, rep=rep, reps=reps):
                    return reattention.reattention_attn(
                        q, k, v, lens, sink=SINK, local=LOCAL, chunk=CHUNK, topk=TOPK,
                        query_block=QB, rep=rep, reps=reps, inv_freq=inv, backend=be)
                # the graph replay, as bench_attn.py times a decode step
                record(n, be, f"decode ({rep}), graph", step, True)
        del k, v
        torch.cuda.empty_cache()
    save_json(a.out, "profile_step", dict(header=header(), rows=rows))


if __name__ == "__main__":
    main()
