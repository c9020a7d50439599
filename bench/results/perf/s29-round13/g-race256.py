"""racecheck of the sm80 many-rows attention at D 256 on a smaller shape than memcheck_calls
(its D 256 pass ran past 240 s under racecheck): bf16, one position mode per process."""
import sys
import torch
import reattention
pos, style = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
n, lq, hq, hkv, d = 4000, 130, 8, 2, 256
lens = torch.tensor([n], dtype=torch.int32, device="cuda")
k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
q = torch.randn(1, hq, lq, d, device="cuda", dtype=torch.bfloat16)
reps = reattention.chunk_reps(k, lens, sink=16, chunk=32, rep="bound")
idx = reattention.select_chunks(q, k, lens, reps=reps, sink=16, local=512, chunk=32, topk=8,
                                query_block=64, rep="bound", backend="reference")
inv = reattention.default_inv_freq(d, device="cuda")
out = reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv, sink=16, local=512,
                                   chunk=32, query_block=64, backend="cuda", positions=pos,
                                   rope_style=style)
ref = reattention.gather_attention(q, k, v, idx, lens, inv_freq=inv, sink=16, local=512,
                                   chunk=32, query_block=64, backend="reference", positions=pos,
                                   rope_style=style)
torch.cuda.synchronize()
print("race256", pos, style, "max abs diff vs reference", (out.float() - ref.float()).abs().max().item())
