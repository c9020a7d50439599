#!/bin/bash
# Session 48, call c: the scoring ring's stages for 256-element columns. Trees: main (4
# buffers), st3 (3 buffers for 256-element columns, 2b545f6), st2 (2 buffers), st3m (3 buffers
# for 128-element columns too: mean at D 128). profile_step at 128K and 1M, order main st3 st2
# st3m st3m st2 st3 main; then st3's checks (memcheck, racecheck, the whole suite) and one whole
# bench_attn run of st3.
source "$(dirname "$0")/lease.sh" wc
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main st3 st2 st3m
i=0
for tree in main st3 st2 st3m st3m st2 st3 main; do
  i=$((i+1))
  (cd $ROOT/.devbuild/$tree && PYTHONPATH=$PWD timeout 60 python bench/profile_step.py \
    --backends cuda --reps bound,mean --lengths 131072,1048576 --out $W/p-$i-$tree > $W/p-$i-$tree.log 2>&1)
  echo "p $i $tree at $((SECONDS-T0)) s: $(grep 'graph:' $W/p-$i-$tree.log | sed 's/.*N=\([0-9]*\) cuda decode (\(.*\)), graph: \([0-9.]*\) us.*/\1 \2 \3/' | tr '\n' ' ')"
done
cd $ROOT/.devbuild/st3
( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
( PYTHONPATH=$PWD timeout 80 compute-sanitizer --tool racecheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/racecheck.log
echo "sanitizers at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY\|RACECHECK SUMMARY' $W/memcheck.log $W/racecheck.log | tr '\n' ' ')" | tee -a $W/env.txt
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 230 python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all.txt 2>&1
echo "suite at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all.txt | tail -1)" | tee -a $W/env.txt
grep -E "^FAILED" $W/pytest-all.txt | head
REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 60 python bench/bench_attn.py --backends cuda --out $W/whole > $W/whole.log 2>&1
echo "whole at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
