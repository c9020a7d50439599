#!/bin/bash
# Session 48, call a: branch wgrp (the local window's key tiles W per decode split behind the
# fused top-k; the sink and selected tiles stay one per split) against main. One build of wgrp,
# W chosen by REATTENTION_WINDOW_TILES (0: main's plan). profile_step at 1M, order main w0 w4 w2
# w3 w3 w2 w4 w0 main; then the decode, attend and long GPU tests and memcheck at W=4.
source "$(dirname "$0")/lease.sh" wa
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main wgrp
i=0
for run in main:0 wgrp:0 wgrp:4 wgrp:2 wgrp:3 wgrp:3 wgrp:2 wgrp:4 wgrp:0 main:0; do
  i=$((i+1)); tree=${run%:*}; wt=${run#*:}
  (cd $ROOT/.devbuild/$tree && REATTENTION_WINDOW_TILES=$wt PYTHONPATH=$PWD timeout 60 python bench/profile_step.py \
    --backends cuda --reps bound,mean --lengths 1048576 --out $W/p-$i-$tree$wt > $W/p-$i-$tree$wt.log 2>&1)
  echo "p $i $tree W=$wt at $((SECONDS-T0)) s: $(grep 'graph:' $W/p-$i-$tree$wt.log | sed 's/.*N=\([0-9]*\) cuda decode (\(.*\)), graph: \([0-9.]*\) us.*/\1 \2 \3/' | tr '\n' ' ')"
done
cd $ROOT/.devbuild/wgrp
export REATTENTION_WINDOW_TILES=4
( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
echo "memcheck at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY' $W/memcheck.log)" | tee -a $W/env.txt
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 200 python -m pytest \
  tests/test_cuda.py tests/test_paged.py tests/test_hf_graph.py -q -n 14 -p no:cacheprovider \
  -k "long or two_tile or attend or graph or decode" > $W/pytest-w4.txt 2>&1
echo "tests at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-w4.txt | tail -1)" | tee -a $W/env.txt
grep -E "^FAILED|Error" $W/pytest-w4.txt | head -20
