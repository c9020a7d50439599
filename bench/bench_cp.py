"""How fast is ReAttention with one sequence's cache split over GPUs (context parallel)?

Shapes (docs/design.md section 5): bf16, B=1, Hq=32, Hkv=8, D=128, sink 64, chunk 64, topk 32,
local 4096, query_block 128; cache lengths 1M, 2M and 4M tokens split with CPLayout.split.
Rows per length and rep mode, each beside the single-device baseline of the same run:
  decode   one query, select + attend (reattention_attn_cp), eager;
  prefill  a 4096-query block, selection included.
cp_ms is the median over --iters calls (ranks synchronised before each call; the slowest
rank's median is reported); single_ms is reattention.reattention_attn on the whole cache on
rank 0 (every length fits one H200 for one layer: 4M tokens of K and V are 16 GiB); max_err
is max |cp - single| of the outputs. Reps for "bound"/"mean" are built before timing, as a
cache keeps them.

Usage (writes JSON to --out on rank 0 and prints a table):
  torchrun --nproc-per-node 2 bench/bench_cp.py --out bench/results/cp-h200x2.json   (NCCL)
  python bench/bench_cp.py --out bench/results/cp-h200x1.json             (one GPU, one rank)
  torchrun --nproc-per-node 2 bench/bench_cp.py --tiny --out /tmp/cp.json (CPU, gloo)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by file
import reattention  # noqa: E402
from reattention.distributed import CPLayout, chunk_reps_cp, reattention_attn_cp  # noqa: E402
from provenance import commit_id  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shapes:
    b: int
    hq: int
    hkv: int
    d: int
    sink: int
    chunk: int
    topk: int
    local: int
    query_block: int
    prefill: int
    lengths: tuple[int, ...]
    dtype: torch.dtype


FULL = Shapes(1, 32, 8, 128, 64, 64, 32, 4096, 128, 4096, (1 << 20, 2 << 20, 4 << 20),
              torch.bfloat16)
# CPU smoke shapes: the same code path in seconds (CI runs it on gloo).
TINY = Shapes(1, 4, 2, 64, 8, 16, 4, 64, 16, 40, (1500,), torch.float32)


def header(device: torch.device, world: int, backend: str) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(gpu=gpu, cuda=torch.version.cuda, torch=torch.__version__, commit=commit_id(),
                python=sys.version.split()[0], world_size=world,
                dist_backend=dist.get_backend() if dist.is_initialized() else None,
                op_backend=backend)


def setup() -> tuple[int, int, torch.device]:
    """Join torchrun's process group when launched by it; else run as one rank."""
    if not dist.is_initialized() and "RANK" in os.environ:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, dev
    on_gpu = dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, iters: int, warmup: int, collective: bool) -> float:
    """Median milliseconds per call; ``collective`` calls start together on every rank."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if collective and dist.is_initialized():
            dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def slowest(ms: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return ms
    t = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def run_length(s: Shapes, n: int, reps_modes, rank, world, device, args) -> list[dict]:
    layout = CPLayout.split(n, world, sink=s.sink, chunk=s.chunk)
    # The same seed on every rank: shards are slices of one cache that rank 0 also holds
    # whole for the single-device baseline.
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(s.b, s.hkv, n, s.d, device=device, dtype=s.dtype, generator=g)
    v = torch.randn(s.b, s.hkv, n, s.d, device=device, dtype=s.dtype, generator=g)
    qs = {lq: torch.randn(s.b, s.hq, lq, s.d, device=device, dtype=s.dtype, generator=g)
          for lq in (1, s.prefill)}
    ks, vs = layout.shard(k, rank), layout.shard(v, rank)
    if world > 1:
        ks, vs = ks.clone(), vs.clone()
    keep_full = rank == 0 and not args.no_single
    if not keep_full:
        del k, v
    kw = dict(sink=s.sink, local=s.local, chunk=s.chunk, topk=s.topk, query_block=s.query_block,
              backend=args.backend)
    rows = []
    for rep in reps_modes:
        shard_reps = full_reps = None
        if rep != "max":
            shard_reps = chunk_reps_cp(ks, layout, sink=s.sink, chunk=s.chunk, rep=rep,
                                       backend=args.backend)
            if keep_full:
                full_reps = reattention.chunk_reps(k, sink=s.sink, chunk=s.chunk, rep=rep,
                                                   backend=args.backend)
        for mode, lq in (("decode", 1), ("prefill", s.prefill)):
            q = qs[lq]

            def cp():
                return reattention_attn_cp(q, ks, vs, layout, rep=rep, reps=shard_reps, **kw)

            def single():
                return reattention.reattention_attn(q, k, v, rep=rep, reps=full_reps, **kw)

            cp_ms = slowest(time_ms(cp, device, args.iters, args.warmup, True), device)
            cp_out = cp()
            row = dict(mode=mode, n=n, lq=lq, rep=rep, world_size=world, cp_ms=cp_ms)
            if keep_full:
                row["single_ms"] = time_ms(single, device, args.iters, args.warmup, False)
                row["speedup"] = row["single_ms"] / cp_ms
                row["max_err"] = (cp_out.float() - single().float()).abs().max().item()
            if dist.is_initialized():
                dist.barrier()  # rank 0's single-device runs are not collective
            rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file written by rank 0")
    p.add_argument("--lengths", default=None, help="comma list of cache lengths (tokens)")
    p.add_argument("--reps", default="bound,max", help="comma list of rep modes")
    p.add_argument("--backend", default="auto", help="backend of the selection ops")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-single", action="store_true", help="skip the single-device baseline")
    p.add_argument("--tiny", action="store_true", help="CPU smoke shapes (fp32, ~2K tokens)")
    args = p.parse_args(argv)
    s = TINY if args.tiny else FULL
    if args.lengths:
        s = dataclasses.replace(s, lengths=tuple(int(x) for x in args.lengths.split(",")))
    rank, world, device = setup()
    rows = []
    for n in s.lengths:
        rows += run_length(s, n, args.reps.split(","), rank, world, device, args)
    if rank == 0:
        result = dict(header=header(device, world, args.backend),
                      shapes={k: str(v) if isinstance(v, torch.dtype) else v
                              for k, v in dataclasses.asdict(s).items()},
                      rows=rows)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(" ".join(f"{k}={v}" for k, v in result["header"].items()))
        print(f"{'mode':8} {'N':>9} {'rep':6} {'R':>2} {'cp ms':>9} {'single ms':>10} "
              f"{'speedup':>8} {'max err':>9}")
        for r in rows:
            print(f"{r['mode']:8} {r['n']:9d} {r['rep']:6} {r['world_size']:2d} "
                  f"{r['cp_ms']:9.3f} {r.get('single_ms', float('nan')):10.3f} "
                  f"{r.get('speedup', float('nan')):8.2f} {r.get('max_err', float('nan')):9.2g}")
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
