#!/bin/bash
# Session 47, call f: branch gbound (group_bound with four independent counts) against main:
# profile_step at 1M in the order main gb gb main, the selection's GPU tests, memcheck.
source "$(dirname "$0")/lease.sh" wf
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main gb
i=0
for tree in main gb gb main; do
  i=$((i+1))
  (cd $ROOT/.devbuild/$tree && PYTHONPATH=$PWD timeout 40 python bench/profile_step.py \
    --backends cuda --reps bound,mean --lengths 1048576 --out $W/p-$i-$tree > $W/p-$i-$tree.log 2>&1)
  echo "p $i $tree at $((SECONDS-T0)) s: $(grep 'graph:' $W/p-$i-$tree.log | sed 's/.*N=\([0-9]*\) cuda decode (\(.*\)), graph: \([0-9.]*\) us.*/\1 \2 \3/' | tr '\n' ' ')"
done
cd $ROOT/.devbuild/gb
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 90 python -m pytest -q -n 14 -p no:cacheprovider \
  tests/test_select_chunks.py tests/test_ties.py tests/test_cuda.py -k "cuda or attend" > $W/pytest-sel.txt 2>&1
echo "tests at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-sel.txt | tail -1)" | tee -a $W/env.txt
( PYTHONPATH=$PWD timeout 45 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
echo "memcheck at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY' $W/memcheck.log)" | tee -a $W/env.txt
