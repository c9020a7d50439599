#!/bin/bash
# Session 48, call d: st3c (3 scoring buffers only on long rows of reps with 16 KB tiles; its
# kernels equal main's and st3's SASS, instantiation by instantiation) against main at 1M, order
# main st3c st3c main; then st3c's checks (memcheck, the whole suite) and one whole bench_attn
# run of st3c.
source "$(dirname "$0")/lease.sh" wd
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main st3c
i=0
for tree in main st3c st3c main; do
  i=$((i+1))
  (cd $ROOT/.devbuild/$tree && PYTHONPATH=$PWD timeout 60 python bench/profile_step.py \
    --backends cuda --reps bound,mean --lengths 1048576 --out $W/p-$i-$tree > $W/p-$i-$tree.log 2>&1)
  echo "p $i $tree at $((SECONDS-T0)) s: $(grep 'graph:' $W/p-$i-$tree.log | sed 's/.*N=\([0-9]*\) cuda decode (\(.*\)), graph: \([0-9.]*\) us.*/\1 \2 \3/' | tr '\n' ' ')"
done
cd $ROOT/.devbuild/st3c
( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
echo "memcheck at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY' $W/memcheck.log)" | tee -a $W/env.txt
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 230 python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all.txt 2>&1
echo "suite at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all.txt | tail -1)" | tee -a $W/env.txt
grep -E "^FAILED" $W/pytest-all.txt | head
REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 60 python bench/bench_attn.py --backends cuda --out $W/whole > $W/whole.log 2>&1
echo "whole at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
