"""torch.library.opcheck on the compiled ops (schema, fake kernel, autograd registration)."""
import pytest
import torch

import reattention
from reattention import ops

from conftest import device_for, require


def op_args(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 64, generator=g).to(device, dtype)
    k = torch.randn(1, 2, 400, 64, generator=g).to(device, dtype)
    v = torch.randn(1, 2, 400, 64, generator=g).to(device, dtype)
    lens = torch.tensor([390], dtype=torch.int32, device=device)
    inv = reattention.default_inv_freq(64, device=device)
    return q, k, v, lens, inv


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_opcheck(backend):
    dev = device_for(backend)
    dtype = torch.float32 if backend == "cpu" else torch.bfloat16
    q, k, v, lens, inv = op_args(dev, dtype)
    require(backend, q)
    reps = torch.zeros(ops.reps_shape(k, 8, 16, "bound"), dtype=dtype, device=dev)
    torch.library.opcheck(torch.ops.reattention.chunk_reps.default,
                          (k, lens, reps, 8, 16, "bound", 0))
    idx = torch.ops.reattention.select_chunks(q, k, None, lens, 8, 32, 16, 4, "max", 2)
    torch.library.opcheck(torch.ops.reattention.select_chunks.default,
                          (q, k, None, lens, 8, 32, 16, 4, "max", 2))
    torch.library.opcheck(torch.ops.reattention.gather_attention.default,
                          (q, k, v, lens, idx, inv, 8, 32, 16, 2, 0.125, 1.0, "half", "compact"))
    attend_args = (q, k, v, None, lens, inv, 8, 32, 16, 4, "max", 2, 0.125, 1.0, "half",
                   "compact")
    torch.library.opcheck(torch.ops.reattention.attend.default, attend_args)
    out, lse, got = torch.ops.reattention.attend(*attend_args)  # the two ops in turn
    want, want_lse = torch.ops.reattention.gather_attention(
        q, k, v, lens, idx, inv, 8, 32, 16, 2, 0.125, 1.0, "half", "compact")
    torch.testing.assert_close(got, idx, rtol=0, atol=0)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
