"""Decode calls (one query per sequence) of the CUDA kernels, to run under compute-sanitizer.

The few-rows attention at GQA 4 (the O^T variant, one K/V stage, two key tiles per split below
4096 middle chunks) and at GQA 4 with D 256, over caches long enough for ~50-100 splits merged
by merge_splits_kernel, with bound selection; a cache of ~2,300 middle chunks, whose top-k
(topk_short_kernel) is launched early, beside the scoring kernel; and a cache of ~4,600 middle
chunks (one key tile per split), whose selection fuses the top-k into the scoring kernel
(fused_topk: counters, group words and the last CTA's selection), with bound reps at 2 kv
heads and with mean reps at 8 (vectors of 128 elements, five scoring CTAs per SM on an H100 or
H200: at 2 kv heads their 145 chunk ranges would bring more candidates than the fused top-k
takes, and the plain top-k would run).
The first case is also checked against the reference on the CPU (its largest difference is
printed). Shapes are small so that the sanitizer finishes in seconds.

Usage: compute-sanitizer --tool memcheck python bench/memcheck_decode.py
"""
import torch

import reattention


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("memcheck_decode.py needs a CUDA device")
    torch.manual_seed(0)
    for hq, hkv, d, n, local, check, rep in ((32, 8, 128, 20000, 4096, True, "bound"),
                                             (8, 2, 256, 40000, 20000, False, "bound"),
                                             (8, 2, 128, 150000, 4096, False, "bound"),
                                             (8, 2, 128, 300000, 4096, False, "bound"),
                                             (32, 8, 128, 300000, 4096, False, "mean")):
        k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        lens = torch.tensor([n - 77], dtype=torch.int32, device="cuda")
        kw = dict(sink=64, local=local, chunk=64, topk=32, rep=rep)
        out = reattention.reattention_attn(q, k, v, lens, backend="cuda", **kw)
        if check:
            ref = reattention.reattention_attn(q.cpu(), k.cpu(), v.cpu(), lens.cpu(),
                                               backend="reference", **kw)
            print(f"D {d}: largest difference to the reference "
                  f"{(out.float().cpu() - ref.float()).abs().max().item():.2e}")
    torch.cuda.synchronize()
    print("memcheck_decode: done")


if __name__ == "__main__":
    main()
