"""Would the decode step gain from attending to its sink and local window beside the selection?

An experiment with the existing ops, before any kernel is built for it (bench/NOTES.md, "The
decode step after round six"). Shapes as bench_attn.py (bf16, B=1, Hq=32, Hkv=8, D=128, sink 64,
chunk 64, topk 32, local 4096, bound reps). Three CUDA-graph-replayed steps per length:
  now     select, then attend to [sink | 32 selected chunks | local window] (today's step);
  serial  select, then attend to sink + local only (idx all -1), then to the selected chunks only
          (sink 0, local 0: 32 chunks and the query's own key): the same key count split in two
          attention calls, one after the other;
  forked  the sink + local call on a side stream, forked before the selection and joined after
          the selected-chunks call: what overlapping the selection-independent part could give.
The two partial outputs are not merged (a merge of two lse-weighted rows adds about one small
kernel), and the positions of the split calls differ from the real step's, which does not change
their cost. `forked` against `now` bounds what a real implementation could gain.

Usage: python bench/probe_fork.py --out DIR [--lengths 131072,1048576]
Writes DIR/probe_fork-<gpu>.json and prints one line per length.
"""
from __future__ import annotations

import argparse

import torch

import reattention
from bench_attn import (B, CHUNK, D, DTYPE, HKV, HQ, LOCAL, SINK, TOPK, bench, header, make_cache,
                        save_json)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/local")
    p.add_argument("--lengths", default="131072,1048576")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_fork.py needs a CUDA device")
    reattention.set_device_checks(False)
    inv = reattention.default_inv_freq(D, device="cuda")
    side = torch.cuda.Stream()
    rows = []
    for n in (int(x) for x in a.lengths.split(",")):
        k, v = make_cache(n)
        lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
        reps = reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep="bound")
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
        seg = dict(sink=SINK, local=LOCAL, chunk=CHUNK, query_block=1)
        none = torch.full((B, HKV, 1, TOPK), -1, dtype=torch.int32, device="cuda")

        def select():
            return reattention.select_chunks(q, k, lens, reps=reps, topk=TOPK, rep="bound",
                                             backend="cuda", **seg)

        def fixed_part():
            return reattention.gather_attention(q, k, v, none, lens, inv_freq=inv,
                                                backend="cuda", **seg)

        def selected_part(idx):
            return reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv, sink=0,
                                                local=0, chunk=CHUNK, query_block=1,
                                                backend="cuda")

        def now():
            return reattention.gather_attention(q, k, v, select(), lens, inv_freq=inv,
                                                backend="cuda", **seg)

        def serial():
            fixed = fixed_part()
            return fixed, selected_part(select())

        def forked():
            cur = torch.cuda.current_stream()
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                fixed = fixed_part()
            sel = selected_part(select())
            cur.wait_stream(side)
            return fixed, sel

        row = dict(n=n, **{name: 1e3 * bench(fn, graph=True)
                           for name, fn in (("now", now), ("serial", serial),
                                            ("forked", forked))})
        rows.append(row)
        print(f"N={n}: now {row['now']:.1f} us, serial {row['serial']:.1f} us, "
              f"forked {row['forked']:.1f} us", flush=True)
        del k, v, reps
        torch.cuda.empty_cache()
    save_json(a.out, "probe_fork", dict(header=header(), unit="us", rows=rows))


if __name__ == "__main__":
    main()
