"""How fast is one ReAttention layer against dense attention? (docs/design.md section 5)

Shapes: bf16, B=1, Hq=32, Hkv=8, D=128, sink 64, chunk 64, topk 32, local 4096.
Rows, each timed as the median of repeated CUDA-event timings in ONE run beside its baselines:
  decode   select + attend for one query at N in {32K, 128K, 1M}, per backend and rep mode,
           timed as CUDA-graph replays (how a decode step is deployed: no Python in the loop);
           baselines dense SDPA, FlexAttention on the same block mask (selection excluded,
           RoPE excluded), and the naive PyTorch composition (mean reps, topk, gather, RoPE, SDPA).
  select   exact ("max") selection for 128 queries over 1M keys.
  prefill  a 4096-query call at 1M (32 query blocks of 128), selection included (eager),
           against FlexAttention on the same block mask, dense SDPA over the whole cache, and
           dense SDPA over as many keys as one query block attends to at most (no selection):
           the attention floor a block should approach.
  chunked  a whole 1M-token prefill of one layer in 4096-token steps (selection included).
  paged    (--paged) the decode and prefill rows again on a paged copy of the same cache
           (page = chunk = 64 tokens, pages in a shuffled order), beside the contiguous rows.
Achieved TB/s counts the bytes a step must read; TFLOP/s counts 4*Lq*keys*D*Hq for attention.

Usage: python bench/bench_attn.py --out DIR [--backends cuda,triton] [--quick]
Writes DIR/<backend>-<gpu>.json (each with the baselines of the same run) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

import reattention
from provenance import commit_id  # this folder is on the path when a script runs from it
from reattention import ops

B, HQ, HKV, D = 1, 32, 8, 128
SINK, CHUNK, TOPK, LOCAL, QB = 64, 64, 32, 4096, 128
DTYPE = torch.bfloat16
E = 2  # bytes per element


def header() -> dict:
    import triton
    return dict(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                torch=torch.__version__, triton=triton.__version__, commit=commit_id(),
                python=sys.version.split()[0])


def gpu_tag() -> str:
    """The device name's last word, lower case (e.g. h200): the suffix of result files."""
    return torch.cuda.get_device_name().split()[-1].lower()


def save_json(out: str, stem: str, res: dict) -> str:
    """Write ``res`` to OUT/<stem>-<gpu_tag()>.json."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{stem}-{gpu_tag()}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return path


def bench(fn, graph: bool) -> float:
    """Median milliseconds over repeated CUDA-event timings (graph replays when asked)."""
    import triton.testing as tt
    fn()
    torch.cuda.synchronize()
    if graph:
        return tt.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return tt.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Measured device copy bandwidth in TB/s (read + write) on 2 GiB."""
    x = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), graph=False)
    return 2 * x.numel() * 2 / (ms * 1e-3) / 1e12


def make_cache(n: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=DTYPE, generator=g)
    v = torch.randn(B, HKV, n, D, device="cuda", dtype=DTYPE, generator=g)
    return k, v


def paged_copy(k: torch.Tensor, v: torch.Tensor, page: int = CHUNK, seed: int = 0):
    """(k pages, v pages, block_table) holding the tokens of k and v [B, Hkv, n, D] in
    pages of ``page`` tokens, the pages in a random order in the pool."""
    b, h, n, d = k.shape
    per = -(-n // page)
    g = torch.Generator(device="cuda").manual_seed(seed)
    perm = torch.randperm(b * per, device="cuda", generator=g)
    out = []
    for t in (k, v):
        t = torch.nn.functional.pad(t, (0, 0, 0, per * page - n))
        pages = t.view(b, h, per, page, d).permute(0, 2, 1, 3, 4).reshape(b * per, h, page, d)
        # Not empty_like: at B=1 the reshape above is a strided view, and a pool with its
        # strides would be copied whole by every call's .contiguous().
        pool = torch.empty(pages.shape, dtype=pages.dtype, device=pages.device)
        pool[perm] = pages
        out.append(pool)
    return out[0], out[1], perm.view(b, per).to(torch.int32)


def mid_chunks(n: int, lq: int) -> int:
    return reattention.layout.segments(n, lq, SINK, LOCAL, CHUNK)[2]


def scope(lq: int) -> int:
    """Keys a query block attends to at most (contract v2), whatever the call's Lq."""
    return reattention.layout.scope(SINK, LOCAL, CHUNK, TOPK, min(lq, QB))


def decode_bytes(n: int, rep: str) -> int:
    m = mid_chunks(n, 1)
    gathered = 2 * HKV * (SINK + TOPK * CHUNK + (n - (SINK + m * CHUNK))) * D * E
    per_rep = {"bound": 2 * D, "mean": D, "max": CHUNK * D}[rep]
    return gathered + HKV * m * per_rep * E + 2 * HQ * D * E


# --------------------------------------------------------------------------- baselines
def sdpa_dense(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def naive_decode(q, k, v, mean_reps, inv_freq, n):
    """Naive PyTorch: mean-rep scores, topk, gather, RoPE at compact positions, SDPA."""
    m = mid_chunks(n, 1)
    mid_end = SINK + m * CHUNK
    g = HQ // HKV
    qg = q.view(B, HKV, g, D).float()
    scores = torch.einsum("bhgd,bhmd->bhgm", qg, mean_reps[:, :, :m].float()).amax(2)
    top = scores.topk(TOPK, dim=-1).indices.sort(-1).values  # [B, HKV, TOPK]
    toks = (SINK + top[..., None] * CHUNK + torch.arange(CHUNK, device="cuda")).flatten(-2)
    idx = torch.cat([torch.arange(SINK, device="cuda").expand(B, HKV, SINK), toks,
                     torch.arange(mid_end, n, device="cuda").expand(B, HKV, n - mid_end)], -1)
    gi = idx[..., None].expand(-1, -1, -1, D)
    kk, vv = k.gather(2, gi), v.gather(2, gi)
    pos = torch.arange(idx.shape[-1], device="cuda")
    kr = reattention.rope.apply_rope(kk, pos, inv_freq).to(DTYPE)
    qr = reattention.rope.apply_rope(q, pos[-1:], inv_freq).to(DTYPE)
    return F.scaled_dot_product_attention(qr, kr, vv, enable_gqa=True)


def flex_setup(idx: torch.Tensor, n: int, lq: int):
    """A FlexAttention block mask equal to ReAttention's key set (original positions)."""
    from torch.nn.attention.flex_attention import BlockMask
    p0 = n - lq
    assert SINK % CHUNK == 0
    n_qb = -(-lq // QB)
    width = -(-n // CHUNK)  # one column per KV block of the cache (torch 2.11 sizes by it)
    full = torch.zeros(1, HQ, n_qb, width, dtype=torch.int32, device=idx.device)
    part = torch.zeros_like(full)
    n_full = torch.zeros(1, HQ, n_qb, dtype=torch.int32, device=idx.device)
    n_part = torch.zeros_like(n_full)
    dev = idx.device
    sink_blocks = torch.arange(SINK // CHUNK, device=dev)
    for beta, (s, e) in enumerate(reattention.layout.query_blocks(lq, QB)):
        sel = idx[0, :, beta].long() + SINK // CHUNK  # [HKV, TOPK] kv block ids
        mid_end = reattention.layout.block_segments(n, lq, s, e, SINK, LOCAL, CHUNK).mid_end
        q_lo, q_hi = p0 + s, p0 + e
        # Blocks wholly before the block's first query are fully visible; the rest are causal.
        local_full = torch.arange(mid_end // CHUNK, q_lo // CHUNK, device=dev)
        diag = torch.arange(q_lo // CHUNK, -(-q_hi // CHUNK), device=dev)
        rows = torch.cat([sink_blocks.expand(HKV, -1), sel, local_full.expand(HKV, -1)], 1)
        rows = rows.repeat_interleave(HQ // HKV, 0)
        full[0, :, beta, :rows.shape[1]] = rows.int()
        n_full[0, :, beta] = rows.shape[1]
        part[0, :, beta, :diag.numel()] = diag.int()
        n_part[0, :, beta] = diag.numel()

    # The mask_mod states the whole key set too (eager flex applies only the mask_mod); the
    # compiled kernel skips it on full blocks, so the lookup costs only on diagonal blocks.
    hits = torch.zeros(HQ, n_qb, width, dtype=torch.int32, device=dev)
    for t, c in ((full, n_full), (part, n_part)):
        valid = torch.arange(width, device=dev)[None, None, :] < c[0, :, :, None]
        hits.scatter_add_(2, t[0].long(), valid.int())  # padding entries add 0
    allowed = hits > 0

    def causal(b, h, q_idx, kv_idx):
        return allowed[h, q_idx // QB, kv_idx // CHUNK] & (kv_idx <= q_idx + p0)

    return BlockMask.from_kv_blocks(n_part, part, n_full, full,
                                    BLOCK_SIZE=(QB, CHUNK), mask_mod=causal,
                                    seq_lengths=(lq, n))


# --------------------------------------------------------------------------- rows
def run(backends: list[str], lengths: list[int], quick: bool, paged: bool = False) -> dict:
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    res = dict(header=header(), config=dict(B=B, Hq=HQ, Hkv=HKV, D=D, dtype="bf16", sink=SINK,
                                            chunk=CHUNK, topk=TOPK, local=LOCAL,
                                            query_block=QB), rows=[])
    bw = copy_bandwidth()
    res["copy_tbps"] = bw
    inv = reattention.default_inv_freq(D, device="cuda")
    reattention.set_device_checks(False)

    def row(**kw):
        res["rows"].append(kw)
        print(json.dumps(kw), flush=True)

    def timed_row(make_fn, graph, rate=lambda ms: {}, **kw):
        """Time make_fn() and record a row; a failure is recorded, not fatal."""
        try:
            ms = bench(make_fn(), graph)
        except Exception as e:  # noqa: BLE001 - a benchmark row reports any failure
            row(**kw, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            return None
        row(**kw, ms=ms, **rate(ms))
        return ms

    for n in lengths:
        k, v = make_cache(n)
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
        lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
        reps = {r: reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep=r)
                for r in ("bound", "mean")}
        sdpa_ms = timed_row(lambda: lambda: sdpa_dense(q, k, v), True,
                            lambda ms: dict(tbps=2 * HKV * n * D * E / ms / 1e9),
                            kind="decode", n=n, method="sdpa") or math.nan
        timed_row(lambda: lambda: naive_decode(q, k, v, reps["mean"], inv, n), False,
                  lambda ms: dict(speedup_vs_sdpa=sdpa_ms / ms), kind="decode", n=n,
                  method="naive_torch(mean)")
        for be in backends:
            for rep in ("bound", "mean", "max"):
                nb = decode_bytes(n, rep)
                timed_row(lambda be=be, rep=rep: lambda: reattention.reattention_attn(
                    q, k, v, lens, sink=SINK, local=LOCAL, chunk=CHUNK, topk=TOPK,
                    query_block=QB, rep=rep, reps=reps.get(rep), inv_freq=inv, backend=be),
                    True, lambda ms, nb=nb: dict(tbps=nb / ms / 1e9, bw_frac=nb / ms / 1e9 / bw,
                                                 speedup_vs_sdpa=sdpa_ms / ms),
                    kind="decode", n=n, method=f"{be}({rep})")
        if paged:
            kp, vp, table = paged_copy(k, v)
            for be in backends:
                for rep in ("bound", "max"):
                    nb = decode_bytes(n, rep)
                    timed_row(lambda be=be, rep=rep: lambda: reattention.reattention_attn(
                        q, kp, vp, lens, sink=SINK, local=LOCAL, chunk=CHUNK, topk=TOPK,
                        query_block=QB, rep=rep, reps=reps.get(rep), inv_freq=inv, backend=be,
                        block_table=table),
                        True, lambda ms, nb=nb: dict(tbps=nb / ms / 1e9,
                                                     bw_frac=nb / ms / 1e9 / bw,
                                                     speedup_vs_sdpa=sdpa_ms / ms),
                        kind="decode", n=n, method=f"{be}({rep}, paged {CHUNK})")
            del kp, vp, table
        if n == max(lengths):
            def flex_decode():
                idx = reattention.select_chunks(q, k, lens, reps=reps["bound"], sink=SINK,
                                                local=LOCAL, chunk=CHUNK, topk=TOPK,
                                                query_block=QB, rep="bound")
                bm = flex_setup(idx, n, 1)
                return lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)
            timed_row(flex_decode, False, lambda ms: dict(speedup_vs_sdpa=sdpa_ms / ms),
                      kind="decode", n=n, method="flex(block mask, no selection)")
        del k, v, reps
        torch.cuda.empty_cache()

    n, lq = max(lengths), 4096
    k, v = make_cache(n, seed=1)
    lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
    reps = reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep="bound")
    q = torch.randn(B, HQ, lq, D, device="cuda", dtype=DTYPE)
    q128 = q[:, :, -128:].contiguous()
    for be in backends:
        timed_row(lambda be=be: lambda: reattention.select_chunks(
            q128, k, lens, sink=SINK, local=LOCAL, chunk=CHUNK, topk=TOPK, query_block=128,
            rep="max", backend=be), False, lambda ms: dict(tbps=HKV * n * D * E / ms / 1e9),
            kind="select", n=n, lq=128, method=f"{be}(max)")
    flops = 4 * lq * scope(lq) * D * HQ  # upper bound of attended keys (causal tail halves)
    dense_ms = timed_row(lambda: lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                         False, lambda ms: dict(tflops=4 * lq * n * D * HQ / ms / 1e9),
                         kind="prefill", n=n, lq=lq, method="sdpa(dense, no causal tail)")
    ks, vs = k[:, :, :scope(lq)].contiguous(), v[:, :, :scope(lq)].contiguous()
    timed_row(lambda: lambda: F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True), False,
              lambda ms: dict(tflops=flops / ms / 1e9), kind="prefill", n=n, lq=lq,
              method=f"sdpa(dense over {scope(lq)} keys, no selection)")
    del ks, vs

    def flex_prefill():
        idx = reattention.select_chunks(q, k, lens, reps=reps, sink=SINK, local=LOCAL,
                                        chunk=CHUNK, topk=TOPK, query_block=QB, rep="bound")
        bm = flex_setup(idx, n, lq)
        return lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)
    flex_ms = timed_row(flex_prefill, False, lambda ms: dict(
        tflops=flops / ms / 1e9, speedup_vs_sdpa=dense_ms / ms if dense_ms else None),
        kind="prefill", n=n, lq=lq, method="flex(block mask, no selection)")
    for be in backends:
        for rep, r in (("bound", reps), ("max", None)):
            timed_row(lambda be=be, rep=rep, r=r: lambda: reattention.reattention_attn(
                q, k, v, lens, sink=SINK, local=LOCAL, chunk=CHUNK, topk=TOPK, query_block=QB,
                rep=rep, reps=r, inv_freq=inv, backend=be), False, lambda ms: dict(
                    tflops=flops / ms / 1e9, vs_flex=flex_ms / ms if flex_ms else None,
                    speedup_vs_sdpa=dense_ms / ms if dense_ms else None),
                kind="prefill", n=n, lq=lq, method=f"{be}({rep}, with selection)")
    if paged:
        kp, vp, table = paged_copy(k, v)
        for be in backends:
            timed_row(lambda be=be: lambda: reattention.reattention_attn(
                q, kp, vp, lens, sink=SINK, local=LOCAL, chunk=CHUNK, topk=TOPK, query_block=QB,
                rep="bound", reps=reps, inv_freq=inv, backend=be, block_table=table), False,
                lambda ms: dict(tflops=flops / ms / 1e9,
                                speedup_vs_sdpa=dense_ms / ms if dense_ms else None),
                kind="prefill", n=n, lq=lq, method=f"{be}(bound, with selection, paged {CHUNK})")
        del kp, vp, table
    del k, v, reps
    torch.cuda.empty_cache()

    if not quick:
        for be in backends:
            try:
                row(kind="chunked_prefill", n=n, method=f"{be}(bound)",
                    ms=chunked_prefill(n, 4096, be, inv))
            except Exception as e:  # noqa: BLE001
                row(kind="chunked_prefill", n=n, method=f"{be}(bound)",
                    error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    return res


def chunked_prefill(n: int, step: int, backend: str, inv) -> float:
    """Wall time (ms) of prefilling n tokens in blocks of ``step``: reps update + attention."""
    k, v = make_cache(n, seed=2)
    reps = reattention.ops.reps_shape(k, SINK, CHUNK, "bound")
    reps = k.new_zeros(reps)
    lens = torch.zeros(B, dtype=torch.int32, device="cuda")
    q = torch.randn(B, HQ, step, D, device="cuda", dtype=DTYPE)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    done = 0
    for t in range(step, n + 1, step):
        lens.fill_(t)
        reattention.chunk_reps(k, lens, sink=SINK, chunk=CHUNK, rep="bound", reps=reps,
                               start_chunk=max(0, done - SINK) // CHUNK, backend=backend)
        reattention.reattention_attn(q, k, v, lens, sink=SINK, local=LOCAL, chunk=CHUNK,
                                     topk=TOPK, query_block=QB, rep="bound", reps=reps,
                                     inv_freq=inv, backend=backend)
        done = t
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def table(res: dict) -> str:
    h = res["header"]
    lines = [f"# {h['gpu']} | CUDA {h['cuda']} | torch {h['torch']} | triton {h['triton']} | "
             f"commit {h['commit']} | copy {res['copy_tbps']:.2f} TB/s",
             "| kind | N | method | ms | TB/s or TFLOP/s | vs SDPA | vs Flex |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['n'] // 1024}K | {r['method']} | failed: "
                         f"{r['error'][:80]} | | | |")
            continue
        rate = (f"{r['tbps']:.2f} TB/s" if "tbps" in r else
                f"{r['tflops']:.0f} TFLOP/s" if "tflops" in r else "")
        n = f"{r['n'] // 1024}K"
        vs = f"{r['speedup_vs_sdpa']:.1f}x" if r.get("speedup_vs_sdpa") else ""
        fx = f"{r['vs_flex']:.2f}x" if r.get("vs_flex") else ""
        lines.append(f"| {r['kind']} | {n} | {r['method']} | {r['ms']:.4f} | {rate} | {vs} | {fx} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--backends", default=None, help="comma list; default: every usable one")
    p.add_argument("--lengths", default="32768,131072,1048576")
    p.add_argument("--quick", action="store_true", help="skip the 1M chunked prefill")
    p.add_argument("--paged", action="store_true",
                   help="also time the decode and prefill rows on a paged copy of the cache")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attn.py needs a CUDA device")
    usable = [b for b in ("cuda", "triton") if ops.available_backends()[b] is None]
    backends = a.backends.split(",") if a.backends else usable
    res = run(backends, [int(x) for x in a.lengths.split(",")], a.quick, a.paged)
    text = table(res)
    print(text)
    for be in backends or ["baselines"]:
        save_json(a.out, be, res)
    with open(os.path.join(a.out, f"attn-{gpu_tag()}.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
