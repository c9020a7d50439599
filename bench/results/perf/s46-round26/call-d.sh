#!/bin/bash
# Session 46, call d: main with memcheck_decode's fused mean case, memcheck and racecheck.
source "$(dirname "$0")/lease.sh" wd
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main
cd $ROOT/.devbuild/main
( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
( PYTHONPATH=$PWD timeout 80 compute-sanitizer --tool racecheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/racecheck.log
echo "sanitizers at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY\|RACECHECK SUMMARY\|done' $W/memcheck.log $W/racecheck.log | tr '\n' ' ')" | tee -a $W/env.txt
# Which kernels the mean case launches (fused: no topk_kernel after chunk_scores_kernel).
PYTHONPATH=$PWD python - > $W/kernels.txt 2>&1 <<'PY'
import torch, reattention
from torch.profiler import profile, ProfilerActivity
hq, hkv, d, n = 32, 8, 128, 300000
k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16)
lens = torch.tensor([n - 77], dtype=torch.int32, device="cuda")
for rep in ("mean", "bound"):
    kw = dict(sink=64, local=4096, chunk=64, topk=32, rep=rep)
    reattention.reattention_attn(q, k, v, lens, backend="cuda", **kw); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        reattention.reattention_attn(q, k, v, lens, backend="cuda", **kw); torch.cuda.synchronize()
    print(rep, sorted({e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}))
PY
cat $W/kernels.txt | tail -3
