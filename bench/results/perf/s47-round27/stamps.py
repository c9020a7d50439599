"""Round twenty-seven (throwaway, run from a tree built with the try branch's stamps): per-CTA
%globaltimer stamps of one graph-replayed decode step. The kernels write their stamps (16 per
CTA) to the int64 buffer at the device address REATTENTION_STAMPS; REATTENTION_KNOBS picks the
try's knobs. Usage: python stamps.py N:rep:knobs,... OUT.json"""
import json, os, sys
import numpy as np
import torch
sys.path.insert(0, "bench")
import reattention
from bench_attn import B, CHUNK, D, DTYPE, HQ, LOCAL, QB, SINK, TOPK, make_cache

buf = torch.zeros(65536, dtype=torch.int64, device="cuda")
os.environ["REATTENTION_STAMPS"] = str(buf.data_ptr())
reattention.set_device_checks(False)
inv = reattention.default_inv_freq(D, device="cuda")
BASES = {"score": (0, 16384), "attn": (16384, 49152), "merge": (49152, 65536)}
out, raw = {}, {}
cache = {}
for spec in sys.argv[1].split(","):
    n, rep, knobs = spec.split(":")
    n = int(n)
    os.environ["REATTENTION_KNOBS"] = knobs
    if n not in cache:
        cache.clear()
        torch.cuda.empty_cache()
        cache[n] = make_cache(n)
    k, v = cache[n]
    torch.manual_seed(0)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
    lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
    reps = reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep=rep)
    step = lambda: reattention.reattention_attn(q, k, v, lens, sink=SINK, local=LOCAL, chunk=CHUNK,
                                                topk=TOPK, query_block=QB, rep=rep, reps=reps,
                                                inv_freq=inv, backend="cuda")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    res = []
    for trial in range(5):
        buf.zero_()
        torch.cuda.synchronize()
        for _ in range(20):
            g.replay()
        torch.cuda.synchronize()
        s = buf.cpu().numpy().astype(np.int64)
        t0 = s[0:16384:16][s[0:16384:16] > 0].min()
        rec = {}
        for name, (lo, hi) in BASES.items():
            blk = s[lo:hi].reshape(-1, 16)
            blk = blk[blk[:, 0] > 0]
            if len(blk) == 0:
                continue
            groups = {"all": blk}
            if name == "score":
                groups["last"] = blk[blk[:, 6] > 0]
            if name == "attn":
                groups["selected"] = blk[blk[:, 7] > 0]
                groups["window"] = blk[blk[:, 7] == 0]
            rec[name] = {}
            for tag, bb in groups.items():
                r = {"ctas": int(len(bb))}
                for sl in range(16):
                    col = bb[:, sl]
                    col = col[col > 0]
                    if len(col):
                        rel = (col - t0) / 1e3
                        r[f"s{sl}"] = [round(float(np.percentile(rel, p)), 2)
                                       for p in (0, 50, 100)] + [int(len(col))]
                rec[name][tag] = r
        res.append(rec)
        raw[f"{spec}"] = np.where(s > 0, s - t0, -1).astype(np.int64)
    out[spec] = res
    print(f"== {spec} (us from the first scoring CTA's entry; p0 / p50 / p100, count)")
    for name, r in res[-1].items():
        for tag, rr in r.items():
            print(" ", name, tag, json.dumps(rr))
json.dump(out, open(sys.argv[2], "w"), indent=1)
np.savez_compressed(sys.argv[2].replace(".json", ".npz"), **{k.replace(":", "_"): v for k, v in raw.items()})
