"""When each kernel of a decode step runs: the step as one CUDA-graph replay, kernel by kernel.

bench_attn.py's decode shape (bf16, B 1, Hq 32, Hkv 8, D 128, sink 64, chunk 64, topk 32,
local 4096, `bound` reps) at each length, for each value of REATTENTION_OVERLAP given (1: the
decode attention of `torch.ops.reattention.attend` starts beside the selection, 0: one kernel
after the other; docs/design.md section 3.5). For each: the median of five timings of 200
back-to-back replays (CUDA events), then 10 replays under the profiler, each after a sync, and
per kernel the median start and end relative to the replay's first kernel. profile_step.py's
kernel times come from eager calls, where the host's launches can separate the kernels; here
the graph holds the whole step, so the overlap shows.

Usage: python bench/timeline_step.py [--overlap 0,1] [--lengths ...] [--out DIR]
Writes DIR/timeline_step-<gpu>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

import reattention
from bench_attn import (B, CHUNK, D, DTYPE, HQ, LOCAL, QB, SINK, TOPK, header, make_cache,
                        save_json)


def replay_timeline(graph: torch.cuda.CUDAGraph, replays: int = 10) -> dict:
    """Median (start, end) in us of each kernel of a replay, from its first kernel's start."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
            torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    per = len(evs) // replays
    spans: dict[str, list[tuple[float, float]]] = {}
    for r in range(replays):
        group = evs[r * per:(r + 1) * per]
        t0 = group[0].time_range.start
        for e in group:
            name = e.name.split("<")[0].split("::")[-1] if "<" in e.name else e.name
            spans.setdefault(name[:40], []).append((e.time_range.start - t0,
                                                    e.time_range.end - t0))
    return {name: [statistics.median(a for a, _ in v), statistics.median(b for _, b in v)]
            for name, v in spans.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/local")
    p.add_argument("--lengths", default="32768,131072,1048576")
    p.add_argument("--overlap", default="0,1", help="REATTENTION_OVERLAP values to run")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("timeline_step.py needs a CUDA device")
    reattention.set_device_checks(False)
    inv = reattention.default_inv_freq(D, device="cuda")
    rows = []
    for n in (int(x) for x in a.lengths.split(",")):
        k, v = make_cache(n)
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
        lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
        reps = reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep="bound")
        for mode in a.overlap.split(","):
            os.environ["REATTENTION_OVERLAP"] = mode  # read by the op as the graph is captured

            def step():
                return reattention.reattention_attn(
                    q, k, v, lens, sink=SINK, local=LOCAL, chunk=CHUNK, topk=TOPK,
                    query_block=QB, rep="bound", reps=reps, inv_freq=inv, backend="cuda")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            for _ in range(20):
                graph.replay()
            times = []
            for _ in range(5):
                e0 = torch.cuda.Event(enable_timing=True)
                e1 = torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(200):
                    graph.replay()
                e1.record()
                torch.cuda.synchronize()
                times.append(e0.elapsed_time(e1) / 200 * 1e3)
            kernels = replay_timeline(graph)
            rows.append(dict(n=n, overlap=mode, step_us=statistics.median(times),
                             step_runs_us=times, kernels=kernels))
            print(f"N={n} REATTENTION_OVERLAP={mode}: step {statistics.median(times):.2f} us",
                  flush=True)
            for name, (t0, t1) in sorted(kernels.items(), key=lambda kv: kv[1][0]):
                print(f"   {t0:7.2f} -> {t1:7.2f} us  {name}", flush=True)
            del graph
        del k, v, reps
        torch.cuda.empty_cache()
    save_json(a.out, "timeline_step", dict(header=header(), rows=rows))


if __name__ == "__main__":
    main()
