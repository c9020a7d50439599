#!/bin/bash
# Session 47, call d: branch qfirst (a CTA that waits for the selection rotates its Q rows
# during the wait) against main: profile_step at 128K and 1M in the order main qf qf main,
# memcheck and racecheck of the decode step, the whole suite, one whole bench_attn run.
source "$(dirname "$0")/lease.sh" wd
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main qf
i=0
for tree in main qf qf main; do
  i=$((i+1))
  (cd $ROOT/.devbuild/$tree && PYTHONPATH=$PWD timeout 60 python bench/profile_step.py \
    --backends cuda --reps bound,mean --lengths 131072,1048576 --out $W/p-$i-$tree > $W/p-$i-$tree.log 2>&1)
  echo "p $i $tree at $((SECONDS-T0)) s: $(grep 'graph:' $W/p-$i-$tree.log | sed 's/.*N=\([0-9]*\) cuda decode (\(.*\)), graph: \([0-9.]*\) us.*/\1 \2 \3/' | tr '\n' ' ')"
done
cd $ROOT/.devbuild/qf
( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
( PYTHONPATH=$PWD timeout 80 compute-sanitizer --tool racecheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/racecheck.log
echo "sanitizers at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY\|RACECHECK SUMMARY' $W/memcheck.log $W/racecheck.log | tr '\n' ' ')" | tee -a $W/env.txt
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 270 python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all.txt 2>&1
echo "suite at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all.txt | tail -1)" | tee -a $W/env.txt
REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 60 python bench/bench_attn.py --backends cuda --out $W/whole > $W/whole.log 2>&1
echo "whole at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
