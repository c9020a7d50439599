"""Eager median of the 4096-query bound prefill call at 512K tokens, head dims 64 and 128.

The A/B timing behind the sm_90a many-rows attention's per-head-dim schedule (bench/NOTES.md,
"Round seven"): bf16, B 1, Hq 32, Hkv 8, sink 64, local 4096, chunk 64, topk 32, query_block
128, bound reps computed once outside the timing; 3 warm-up calls, then the median of 15
CUDA-event timings of `reattention_attn` (selection and attention).

Usage: python bench/time_prefill_dims.py
"""
import torch

import reattention


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("time_prefill_dims.py needs a CUDA device")
    reattention.set_device_checks(False)
    n, lq, hq, hkv = 524288, 4096, 32, 8
    for d in (64, 128):
        g = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        q = torch.randn(1, hq, lq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        lens = torch.full((1,), n, dtype=torch.int32, device="cuda")
        inv = reattention.default_inv_freq(d, device="cuda")
        reps = reattention.chunk_reps(k, lens, sink=64, chunk=64, rep="bound")

        def call():
            return reattention.reattention_attn(q, k, v, lens, sink=64, local=4096, chunk=64,
                                                topk=32, query_block=128, rep="bound", reps=reps,
                                                inv_freq=inv, backend="cuda")

        for _ in range(3):
            call()
        times = []
        for _ in range(15):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            call()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        times.sort()
        print(f"D {d} 512K 4096-query call: {times[len(times) // 2]:.3f} ms", flush=True)
        del k, v, reps
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
