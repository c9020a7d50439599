"""``python -m reattention``: backend report, a parity check, then the needle demo.

    python -m reattention               # backends + parity + needle demo on the CPU
    python -m reattention --check       # backends + parity only
    python -m reattention --device cuda --max-len 1048576 --plot needle.png
Every flag other than --check is passed to the needle demo (reattention.needle.main).
"""
from __future__ import annotations

import math
import sys

import torch

from . import ops, reattention_attn, reference
from .testing import Case, make_inputs, max_err


def report_backends() -> None:
    print(f"reattention | torch {torch.__version__} | CUDA device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for name, why in ops.available_backends().items():
        print(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")


def parity_check() -> bool:
    """Each usable backend against the float32 reference on one small decode+prefill case."""
    case = Case(1, 8, 2, 17, 2000, 64, 16, 128, 32, 8, 8)
    ok = True
    for name, why in ops.available_backends().items():
        if why is not None or name == "reference":
            continue
        dev = "cuda" if name in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if name == "cuda" else torch.float32
        q, k, v, lens, inv = make_inputs(case, dtype, dev)
        kw = dict(sink=case.sink, local=case.local, chunk=case.chunk, topk=case.topk,
                  query_block=case.query_block, rep="max", inv_freq=inv)
        out = reattention_attn(q, k, v, lens, backend=name, **kw)
        ref, _, _ = reference.reattention_attn_ref(
            q.cpu().float(), k.cpu().float(), v.cpu().float(), None, inv.cpu(),
            scale=1 / math.sqrt(case.d), **{x: y for x, y in kw.items() if x != "inv_freq"})
        err = max_err(out.cpu().float(), ref)
        good = err < (2e-2 if dtype == torch.bfloat16 else 1e-4)
        ok &= good
        print(f"  parity {name:<8} {str(dtype):<15} max|out - ref| = {err:.2e} "
              f"{'ok' if good else 'MISMATCH'}")
    return ok


def main(argv: list[str]) -> int:
    report_backends()
    ok = parity_check()
    if "--check" in argv:
        return 0 if ok else 1
    from . import needle
    return needle.main(argv) or (0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
