"""Where does a decode step's time go? Per-kernel device time of one ReAttention decode step.

Shapes as bench_attn.py (bf16, B=1, Hq=32, Hkv=8, D=128, sink 64, chunk 64, topk 32, local
4096). For each N, backend and rep mode: the CUDA-graph replay time of the whole step (as
bench_attn.py times it) and the torch.profiler device time of every kernel of an eager step,
averaged over repeated steps. The gap between the sum of kernel times and the replay time is
the launch-to-launch latency of the dependent kernels.

Usage: python bench/profile_step.py --out DIR [--lengths 32768,131072,1048576]
Writes DIR/profile_step-<gpu>.json and prints one line per kernel.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch

import reattention
from bench_attn import B, CHUNK, D, DTYPE, HQ, LOCAL, QB, SINK, TOPK, bench, header, make_cache
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
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA device")
    reattention.set_device_checks(False)
    inv = reattention.default_inv_freq(D, device="cuda")
    rows = []
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
                graph_us = 1e3 * bench(step, graph=True)  # as bench_attn.py times a step
                kernels = kernel_times(step)
                row = dict(n=n, backend=be, rep=rep, graph_us=graph_us,
                           kernel_sum_us=sum(kernels.values()), kernels=kernels)
                rows.append(row)
                print(f"N={n} {be}({rep}): graph {graph_us:.1f} us, kernels "
                      f"{row['kernel_sum_us']:.1f} us", flush=True)
                for name, us in kernels.items():
                    print(f"    {us:8.2f} us  {name}", flush=True)
        del k, v
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    with open(os.path.join(a.out, f"profile_step-{gpu}.json"), "w") as f:
        json.dump(dict(header=header(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
