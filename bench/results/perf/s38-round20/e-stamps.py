"""Round twenty, call e (throwaway, run from the repository root as c10_stamps.py): per-CTA
%globaltimer stamps of one graph-replayed decode step. Needs the build of e-stamps.patch, whose
kernels write their stamps to the int64 buffer at the device address REATTENTION_STAMPS."""
import json, os, sys
import numpy as np
import torch
sys.path.insert(0, "bench")
import reattention
from bench_attn import B, CHUNK, D, DTYPE, HQ, LOCAL, QB, SINK, TOPK, make_cache

buf = torch.zeros(32768, dtype=torch.int64, device="cuda")
os.environ["REATTENTION_STAMPS"] = str(buf.data_ptr())
reattention.set_device_checks(False)
inv = reattention.default_inv_freq(D, device="cuda")
out = {}
SLOTS = {"score": (0, [0, 1, 2, 3, 4, 5, 6]), "attn": (4096, [0, 7, 2, 3, 4]),
         "merge": (12288, [0, 1, 2]), "topk": (28672, [0, 1, 2])}
for n, rep in [(int(x.split(":")[0]), x.split(":")[1]) for x in sys.argv[1].split(",")]:
    k, v = make_cache(n)
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
        t0 = s[0:4096:8][s[0:4096:8] > 0].min()
        rec = {}
        for name, (base, slots) in SLOTS.items():
            blk = s[base:base + 4096 * 8 if name == "attn" else base + 4096].reshape(-1, 8)
            blk = blk[blk[:, 0] > 0]
            if len(blk) == 0:
                continue
            rec[name] = {"ctas": int(len(blk))}
            for sl in slots:
                col = blk[:, sl]
                col = col[col > 0]
                if len(col):
                    rel = (col - t0) / 1e3
                    rec[name][f"s{sl}"] = [round(float(np.percentile(rel, p)), 2) for p in (0, 50, 100)] + [int(len(col))]
            if name == "attn":
                sel = blk[:, 7] > 0
                for tag, m in (("window", ~sel), ("selected", sel)):
                    bb = blk[m]
                    if len(bb):
                        rec[name][tag] = {f"s{sl}": [round(float(np.percentile((bb[:, sl][bb[:, sl] > 0] - t0) / 1e3, p)), 2) for p in (0, 50, 100)] for sl in [0, 7, 2, 3, 4] if (bb[:, sl] > 0).any()}
                        rec[name][tag]["ctas"] = int(len(bb))
        res.append(rec)
    out[f"{n}:{rep}"] = res
    print(f"== N={n} rep={rep} (us from the first scoring CTA's entry; p0 / p50 / p100, count)")
    for name, r in res[-1].items():
        print(" ", name, json.dumps(r))
    del k, v, reps
    torch.cuda.empty_cache()
json.dump(out, open(os.environ.get("STAMPS_OUT", "stamps.json"), "w"), indent=1)
