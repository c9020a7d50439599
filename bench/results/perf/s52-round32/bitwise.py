"""Round thirty-two's check of seedfirst: decode outputs of the tree it runs in, saved (save)
or compared bit for bit with a saved file (compare). Decode calls over the shapes whose kernels
the change touches (fast RoPE: compact positions, R/2 a multiple of 8, units a power of two):
D 64, 128, 256, bf16 and fp16, half and interleaved styles, rope_scale 1 and 0.7, one and two
key tiles per split, the fused top-k (300K tokens) and a partial last tile (n_keys not a
multiple of 64), plus Lq 2 and 3 blocks of the few-rows kernel.

Usage: python bitwise.py save FILE | python bitwise.py compare FILE
"""
import sys

import torch

import reattention


def cases():
    for d, dt, style, scale, n, lq, rep in (
            (128, torch.bfloat16, "half", 1.0, 20000, 1, "bound"),
            (128, torch.bfloat16, "half", 1.0, 300000, 1, "bound"),
            (128, torch.bfloat16, "interleaved", 0.7, 150000, 1, "mean"),
            (128, torch.float16, "half", 0.7, 20011, 1, "bound"),
            (64, torch.bfloat16, "half", 1.0, 50000, 1, "bound"),
            (256, torch.bfloat16, "interleaved", 1.0, 40000, 1, "bound"),
            (128, torch.bfloat16, "half", 1.0, 30000, 3, "bound"),
            (128, torch.float16, "half", 1.0, 9000, 2, "max")):
        g = torch.Generator(device="cuda").manual_seed(n + d + lq)
        k = torch.randn(1, 8, n, d, device="cuda", dtype=dt, generator=g)
        v = torch.randn(1, 8, n, d, device="cuda", dtype=dt, generator=g)
        q = torch.randn(1, 32, lq, d, device="cuda", dtype=dt, generator=g)
        lens = torch.tensor([n - 77], dtype=torch.int32, device="cuda")
        yield (d, str(dt), style, scale, n, lq, rep), reattention.reattention_attn(
            q, k, v, lens, sink=64, local=4096, chunk=64, topk=32, rep=rep, rope_style=style,
            rope_scale=scale, backend="cuda")


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    outs = {str(key): out.cpu() for key, out in cases()}
    if mode == "save":
        torch.save(outs, path)
        print(f"saved {len(outs)} outputs")
        return
    ref = torch.load(path)
    bad = [key for key in outs if not torch.equal(outs[key], ref[key])]
    for key in bad:
        print("differs:", key, (outs[key].float() - ref[key].float()).abs().max().item())
    print(f"bitwise: {len(outs) - len(bad)} of {len(outs)} equal")


if __name__ == "__main__":
    main()
