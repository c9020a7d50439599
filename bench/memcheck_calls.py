"""Small calls of the prefill-side CUDA kernels, to run under compute-sanitizer.

The many-rows attention (sm80 or sm_90a kernel, whichever the device picks) and the scoring
GEMM (bound and exact `max` selection), bf16 and fp16, head dims 64 and 128 (--head-dims: on
an H200, 256 runs the sm80 many-rows attention, which the sm_90a one does not cover), compact
positions with half-style RoPE and original positions with interleaved RoPE. Shapes are small
so that the sanitizer finishes in seconds; several key tiles, ragged query blocks and split keys
occur.

With --select-only it runs only the many-row selections (`select_chunks` with bound, max and
mean reps: the warp-specialized scoring kernel and top-k), which racecheck gets through in well
under a minute where the whole script takes several. With --attn-only it runs only the
attention (`gather_attention` on the CUDA backend, the pre-pass and the many-rows kernel) over
chunks that the reference backend selects, so racecheck sees the attention's shared memory alone.

Usage: compute-sanitizer --tool memcheck python bench/memcheck_calls.py
       [--select-only | --attn-only] [--head-dims 64,128]
"""
import argparse

import torch

import reattention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--select-only", action="store_true",
                    help="only the many-row selections (bound, max, mean)")
    ap.add_argument("--attn-only", action="store_true",
                    help="only the attention, over chunks the reference backend selects")
    ap.add_argument("--head-dims", default="64,128",
                    help="comma-separated head dims (default 64,128)")
    a = ap.parse_args()
    try:
        dims = [int(x) for x in a.head_dims.split(",")]
    except ValueError:
        raise SystemExit(f"--head-dims must be comma-separated integers, got {a.head_dims!r}")
    if not torch.cuda.is_available():
        raise SystemExit("memcheck_calls.py needs a CUDA device")
    torch.manual_seed(0)
    n, lq, hq, hkv = 9000, 300, 8, 2
    lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    for dtype in (torch.bfloat16, torch.float16):
        for d in dims:
            k = torch.randn(1, hkv, n, d, device="cuda", dtype=dtype)
            v = torch.randn_like(k)
            q = torch.randn(1, hq, lq, d, device="cuda", dtype=dtype)
            if a.select_only:
                for rep in ("bound", "max", "mean"):
                    reps = None if rep == "max" else reattention.chunk_reps(
                        k, lens, sink=16, chunk=32, rep=rep)
                    reattention.select_chunks(q, k, lens, reps=reps, sink=16, local=512,
                                              chunk=32, topk=8, query_block=64, rep=rep,
                                              backend="cuda")
                continue
            if a.attn_only:
                reps = reattention.chunk_reps(k, lens, sink=16, chunk=32, rep="bound")
                idx = reattention.select_chunks(q, k, lens, reps=reps, sink=16, local=512,
                                                chunk=32, topk=8, query_block=64, rep="bound",
                                                backend="reference")
                inv = reattention.default_inv_freq(d, device="cuda")
                for pos, style in (("compact", "half"), ("original", "interleaved")):
                    reattention.gather_attention(
                        q, k, v, idx, lens, inv_freq=inv, sink=16, local=512, chunk=32,
                        query_block=64, backend="cuda", positions=pos, rope_style=style)
                continue
            for rep in ("bound", "max"):
                for pos, style in (("compact", "half"), ("original", "interleaved")):
                    reattention.reattention_attn(
                        q, k, v, lens, sink=16, local=512, chunk=32, topk=8, query_block=64,
                        rep=rep, backend="cuda", positions=pos, rope_style=style)
    torch.cuda.synchronize()
    print("memcheck_calls: done")


if __name__ == "__main__":
    main()
