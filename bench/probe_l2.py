"""How much of the decode attention's time is the trip to DRAM for its K/V rows?

An experiment with the existing ops, before building an L2 prefetch of the gathered rows into
the selection kernels (bench/NOTES.md, "Round eight"). Shapes as bench_attn.py (bf16, B=1,
Hq=32, Hkv=8, D=128, sink 64, chunk 64, topk 32, local 4096, bound reps). For each length the
step's attention call (`gather_attention` with the selection's idx) is timed alone, eager, one
CUDA-event pair around a CUDA-graph replay of the call, median of --reps calls, in four states of the L2 cache:
  warm      the call after itself (what a replayed benchmark step sees at 32K/128K, where the
            step's reps do not flush the L2);
  cold      after a 256 MiB write that evicts the L2 (what a model's decode sees: the other
            layers ran in between);
  fixed     cold, then the sink and local rows of K and V read back into the L2;
  all       cold, then every gathered row of K and V read back (sink, selected chunks, local).
The reads that refill the L2 are index_select calls outside the timed pair. The whole step
(`reattention_attn`: select + attend) is timed warm and cold the same way.

Usage: python bench/probe_l2.py --out DIR [--lengths 131072,1048576] [--reps 200]
Writes DIR/probe_l2-<gpu>.json and prints one line per length.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import reattention
from bench_attn import B, CHUNK, D, HKV, HQ, LOCAL, SINK, TOPK, header, make_cache, save_json


def timed(fn, before, reps: int, sleep_cycles: int = 200_000) -> float:
    """Median microseconds of fn() between two CUDA events, before() run ahead of each.
    ``sleep_cycles`` of GPU sleep go ahead of each pair: more than the host needs to queue
    before() and fn() (a call whose host time is long needs more)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    out = []
    for _ in range(reps):
        torch.cuda._sleep(sleep_cycles)  # the GPU stays busy while the host queues the pair
        before()
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3)
    return statistics.median(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/local")
    p.add_argument("--lengths", default="131072,1048576")
    p.add_argument("--reps", type=int, default=200)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_l2.py needs a CUDA device")
    reattention.set_device_checks(False)
    inv = reattention.default_inv_freq(D, device="cuda")
    flush_buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    rows = []
    for n in (int(x) for x in a.lengths.split(",")):
        k, v = make_cache(n)
        lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
        reps = reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep="bound")
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=k.dtype)
        seg = dict(sink=SINK, local=LOCAL, chunk=CHUNK, query_block=1)

        def select():
            return reattention.select_chunks(q, k, lens, reps=reps, topk=TOPK, rep="bound",
                                             backend="cuda", **seg)

        idx = select()

        def attend():
            return reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv,
                                                backend="cuda", **seg)

        def step():  # the public call: on CUDA its selection may prefetch the fixed rows
            return reattention.reattention_attn(q, k, v, lens, reps=reps, rep="bound",
                                                topk=TOPK, inv_freq=inv, backend="cuda", **seg)

        # Rows of the flat [B * Hkv * n, D] views that the attention reads, per kv head.
        local0 = SINK + CHUNK * (max(0, n - 1 - LOCAL - SINK) // CHUNK)  # mid_end, P0 = n - 1
        fixed_tok = torch.cat([torch.arange(SINK), torch.arange(local0, n)]).cuda()
        sel = idx[0, :, 0].long()  # [Hkv, topk] chunk ids of the middle
        sel_tok = (SINK + sel[:, :, None] * CHUNK + torch.arange(CHUNK, device="cuda")).flatten(1)
        heads = torch.arange(HKV, device="cuda")[:, None] * n
        fixed_rows = (heads + fixed_tok[None]).flatten()
        all_rows = torch.cat([fixed_rows, (heads + sel_tok).flatten()])
        kf, vf = k.view(-1, D), v.view(-1, D)

        def flush():
            flush_buf.zero_()

        def refill(r):
            def f():
                flush()
                kf.index_select(0, r)
                vf.index_select(0, r)
            return f

        def graphed(fn):
            fn()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            return g.replay

        attend, step = graphed(attend), graphed(step)
        row = dict(n=n, attn_warm=timed(attend, lambda: None, a.reps),
                   attn_cold=timed(attend, flush, a.reps),
                   attn_fixed=timed(attend, refill(fixed_rows), a.reps),
                   attn_all=timed(attend, refill(all_rows), a.reps),
                   step_warm=timed(step, lambda: None, a.reps),
                   step_cold=timed(step, flush, a.reps))
        rows.append(row)
        print(f"N={n}: attention warm {row['attn_warm']:.1f} us, cold {row['attn_cold']:.1f}, "
              f"fixed rows in L2 {row['attn_fixed']:.1f}, all rows in L2 {row['attn_all']:.1f}; "
              f"step (graph) warm {row['step_warm']:.1f}, cold {row['step_cold']:.1f}", flush=True)
        del k, v, reps, kf, vf
        torch.cuda.empty_cache()
    save_json(a.out, "probe_l2", dict(header=header(), unit="us", rows=rows))


if __name__ == "__main__":
    main()
