#!/bin/bash
# Session 47, call a: main's fused-mean sanitizer check (s46's call d), then the try branch
# (try-atom): per-CTA stamps of the 1M step and two knobs of the fused top-k's global words
# (1: read the group words, then red.max only the ones below this range's maxima, no returned
# value; 2: each row's arrival counter on its own 128-byte line), A/B against main.
# As it ran, the stamps line named $ROOT/stamps.py (not there: nothing ran; call b ran them), and
# the profile_step echo cut each row at its first comma, so the rows came back only in the logs.
source "$(dirname "$0")/lease.sh" wa
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main try
cd $ROOT/.devbuild/main
( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
( PYTHONPATH=$PWD timeout 80 compute-sanitizer --tool racecheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/racecheck.log
echo "sanitizers at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY\|RACECHECK SUMMARY\|done' $W/memcheck.log $W/racecheck.log | tr '\n' ' ')" | tee -a $W/env.txt
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
tail -2 $W/kernels.txt
# A/B: main k0 k1 k2 k3 k3 k2 k1 k0 main (profile_step, graph replays, 1M).
i=0
for v in main:0 try:0 try:1 try:2 try:3 try:3 try:2 try:1 try:0 main:0; do
  i=$((i+1)); tree=${v%:*}; kn=${v#*:}
  (cd $ROOT/.devbuild/$tree && REATTENTION_KNOBS=$kn PYTHONPATH=$PWD timeout 60 python bench/profile_step.py \
    --backends cuda --reps bound,mean --lengths 1048576 --out $W/p-$i-$tree$kn > $W/p-$i-$tree$kn.log 2>&1)
  echo "p $i $tree k$kn at $((SECONDS-T0)) s: $(grep 'graph:' $W/p-$i-$tree$kn.log | cut -d, -f1 | tr '\n' ' ')"
done
cd $ROOT/.devbuild/try
PYTHONPATH=$PWD timeout 120 python $ROOT/.devbuild/stamps.py \
  1048576:bound:0,1048576:bound:3,1048576:bound:1,1048576:mean:0,1048576:mean:3,1048576:mean:1 \
  $W/stamps.json > $W/stamps.log 2>&1
echo "stamps at $((SECONDS-T0)) s"; grep -E "^==|score last|score all" $W/stamps.log | cut -c1-400
