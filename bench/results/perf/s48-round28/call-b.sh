#!/bin/bash
# Session 48, call b: branch st3 (bound's 256-element scoring columns through 3 buffers, the
# scoring's carveout at its most: one attention CTA beside three scoring CTAs per SM) against
# main, and branch qfirst (session 47's 7f9b827, the waiting CTAs' Q rows first: measured on an
# H100 only). profile_step at 128K and 1M, order main st3 c0 qf qf c0 st3 main (c0: st3 with
# the carveout left alone, REATTENTION_ST3_CARVE=0); then st3's selection and attend GPU tests
# and memcheck.
source "$(dirname "$0")/lease.sh" wb
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main st3 qf
i=0
for run in main:1 st3:1 st3:0 qf:1 qf:1 st3:0 st3:1 main:1; do
  i=$((i+1)); tree=${run%:*}; cv=${run#*:}
  (cd $ROOT/.devbuild/$tree && REATTENTION_ST3_CARVE=$cv PYTHONPATH=$PWD timeout 60 python bench/profile_step.py \
    --backends cuda --reps bound,mean --lengths 131072,1048576 --out $W/p-$i-$tree$cv > $W/p-$i-$tree$cv.log 2>&1)
  echo "p $i $tree carve=$cv at $((SECONDS-T0)) s: $(grep 'graph:' $W/p-$i-$tree$cv.log | sed 's/.*N=\([0-9]*\) cuda decode (\(.*\)), graph: \([0-9.]*\) us.*/\1 \2 \3/' | tr '\n' ' ')"
done
cd $ROOT/.devbuild/st3
( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
echo "memcheck at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY' $W/memcheck.log)" | tee -a $W/env.txt
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 150 python -m pytest \
  tests/test_select_chunks.py tests/test_ties.py tests/test_cuda.py -q -n 14 -p no:cacheprovider \
  -k "cuda or attend or long" > $W/pytest-sel.txt 2>&1
echo "tests at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-sel.txt | tail -1)" | tee -a $W/env.txt
grep -E "^FAILED" $W/pytest-sel.txt | head -20
