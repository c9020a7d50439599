"""What the decode attention's time is made of: a fixed chain per CTA, or its keys.

The attention of a decode step alone (`gather_attention` given a selection, graph replay) at
N = 131072 with bench_attn.py's shapes (bf16, Hq 32, Hkv 8, D 128, sink 64, chunk 64), over
gathered sequences of different lengths: local window and topk varied. Up to 99 key tiles per
kv head, plan_attention gives every split one 64-key tile (one CTA per tile and kv head, six
CTAs per SM on an H200), so the rows run one wave of 8 x tiles CTAs each; longer sequences get
splits of several tiles. For each row: the graph-replay time of the call, the profiler's time of
its attention and merge kernels, and the key tiles per kv head.

Usage: python bench/probe_decode_attn.py [--out DIR]
Writes DIR/probe_decode_attn-<gpu>.json.
"""
from __future__ import annotations

import argparse

import torch

import reattention
from bench_attn import B, CHUNK, D, DTYPE, HQ, SINK, bench, header, make_cache, save_json
from profile_step import kernel_times

N = 131072
# (local, topk): from 13 to 129 key tiles per kv head
SHAPES = ((256, 8), (512, 16), (1024, 16), (1024, 32), (2048, 32), (3072, 32), (4096, 32),
          (4096, 64))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/local")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_decode_attn.py needs a CUDA device")
    reattention.set_device_checks(False)
    inv = reattention.default_inv_freq(D, device="cuda")
    k, v = make_cache(N)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
    lens = torch.full((B,), N, dtype=torch.int32, device="cuda")
    reps = reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep="bound")
    rows = []
    for local, topk in SHAPES:
        kw = dict(sink=SINK, local=local, chunk=CHUNK, query_block=1)
        idx = reattention.select_chunks(q, k, lens, reps=reps, topk=topk, rep="bound",
                                        backend="cuda", **kw)

        def call(idx=idx, kw=kw):
            return reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv,
                                                backend="cuda", **kw)
        us = 1e3 * bench(call, graph=True)
        kernels = kernel_times(call)
        keys = SINK + topk * CHUNK + local
        tiles = -(-keys // 64)
        attn = sum(t for name, t in kernels.items() if "gather_attention_kernel" in name)
        merge = sum(t for name, t in kernels.items() if "merge_splits" in name)
        row = dict(local=local, topk=topk, keys=keys, tiles=tiles, graph_us=us,
                   attention_us=attn, merge_us=merge, kernels=kernels)
        rows.append(row)
        print(f"local {local:5d} topk {topk:3d}: {keys:5d} keys, {tiles:3d} tiles per kv head; "
              f"call {us:5.1f} us, attention {attn:5.2f} us, merge {merge:4.2f} us", flush=True)
    save_json(a.out, "probe_decode_attn", dict(header=header(), n=N, rows=rows))


if __name__ == "__main__":
    main()
