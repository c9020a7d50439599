"""How fast is select_chunks when a query block has many rows? (docs/design.md section 5)

Shapes: bf16, B=1, Hq=32, Hkv=8, D=128, sink 64, chunk 64, topk 32, local 4096, query_block 128
(512 rows per kv head and block), a cache of N = 1M tokens. Rows, each the median of
triton.testing.do_bench, per backend in ONE run (Triton is the named baseline):
  max   exact selection for 128 queries (target <= 2.5 ms) and for a 4096-query prefill block
  bound the 4096-query prefill block's selection over min/max reps
  mean  the same over mean reps
TFLOP/s counts the scoring GEMM: 2 * Hq * Lq * columns * column length (columns = keys for
max, reps for bound/mean; bound vectors are 2D long).

Usage: python bench/time_select.py --out DIR [--backends cuda,triton] [--n 1048576]
Writes DIR/time_select-<gpu>.json and prints one JSON line per row.
"""
from __future__ import annotations

import argparse
import functools
import json

import torch

import reattention
from bench_attn import (B, CHUNK, D, DTYPE, HKV, HQ, LOCAL, QB, SINK, TOPK, bench, header,
                        make_cache, save_json)

SHAPES = [("max", 128), ("max", 4096), ("bound", 4096), ("mean", 4096)]


def run(backends: list[str], n: int) -> dict:
    res = dict(header=header(), config=dict(B=B, Hq=HQ, Hkv=HKV, D=D, dtype="bf16", sink=SINK,
                                            chunk=CHUNK, topk=TOPK, local=LOCAL,
                                            query_block=QB, n=n), rows=[])
    reattention.set_device_checks(False)
    k, _ = make_cache(n)
    lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
    reps = {r: reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep=r)
            for r in ("bound", "mean")}
    for rep, lq in SHAPES:
        q = torch.randn(B, HQ, lq, D, device="cuda", dtype=DTYPE)
        # Each query block scores its own middle (contract v2): sum the work block by block.
        flop = 0
        for s, e in reattention.layout.query_blocks(lq, QB):
            m = reattention.layout.block_segments(n, lq, s, e, SINK, LOCAL, CHUNK).n_mid
            cols, vec = {"max": (m * CHUNK, D), "bound": (m, 2 * D), "mean": (m, D)}[rep]
            flop += 2 * HQ * (e - s) * cols * vec
        for be in backends:
            row = dict(kind="select", n=n, lq=lq, rep=rep, method=be)
            try:
                select = functools.partial(
                    reattention.select_chunks, q, k, lens, reps=reps.get(rep), sink=SINK,
                    local=LOCAL, chunk=CHUNK, topk=TOPK, query_block=QB, rep=rep, backend=be)
                ms = bench(select, graph=False)
                row.update(ms=ms, tflops=flop / (ms * 1e-3) / 1e12)
            except Exception as e:  # noqa: BLE001 - a benchmark row reports any failure
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--n", type=int, default=1 << 20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("time_select.py needs a CUDA device")
    res = run(args.backends.split(","), args.n)
    print(json.dumps(res["header"]))
    save_json(args.out, "time_select", res)


if __name__ == "__main__":
    main()
