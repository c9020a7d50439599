#!/bin/bash
# Session 46, call c: branch `beside` (prop: mean's fused scoring at three CTAs per SM with the
# carveout at its most, beside the overlapped attention) against main, and the try tree at two
# CTAs per SM (c2: REATTENTION_TRY_CAP=2, bound and mean), profile_step graph replays at 512K and
# 1M in the order main prop c2 c2 prop main; then prop's whole suite, memcheck and racecheck of
# bench/memcheck_decode.py (with an added mean case, meant to fuse; at 2 kv heads it did not,
# see bench/NOTES.md "Round twenty-six") and one whole bench_attn run.
source "$(dirname "$0")/lease.sh" wc
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main try prop
i=0
for v in main prop c2 c2 prop main; do
  i=$((i+1)); t=try; E=X_=0
  case $v in main) t=main ;; prop) t=prop ;; c2) E=REATTENTION_TRY_CAP=2 ;; esac
  (cd $ROOT/.devbuild/$t && env $E PYTHONPATH=$PWD timeout 60 python bench/profile_step.py \
    --out $W/p-$i-$v --backends cuda --reps bound,mean --lengths 524288,1048576 > $W/p-$i-$v.log 2>&1)
  echo "run $i $v at $((SECONDS-T0)) s: $(grep -E '^N=' $W/p-$i-$v.log | sed 's/ cuda decode / /;s/, kernels.*//' | tr '\n' ' ')"
done
cd $ROOT/.devbuild/prop
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 240 python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all.txt 2>&1
echo "suite at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all.txt | tail -1)" | tee -a $W/env.txt
( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
( PYTHONPATH=$PWD timeout 80 compute-sanitizer --tool racecheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/racecheck.log
echo "sanitizers at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY\|RACECHECK SUMMARY\|done' $W/memcheck.log $W/racecheck.log | tr '\n' ' ')" | tee -a $W/env.txt
REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 70 python bench/bench_attn.py --backends cuda --out $W/whole > $W/whole.log 2>&1
echo "whole at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
