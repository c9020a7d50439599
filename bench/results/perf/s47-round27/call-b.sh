#!/bin/bash
# Session 47, call b: call a's stamps, which did not run (stamps.py's path), and a timeline of
# main's and the try's 1M step (the try's stamps build is slower with its stamps off).
source "$(dirname "$0")/lease.sh" wb
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main try
cd $ROOT/.devbuild/try
PYTHONPATH=$PWD timeout 150 python $ROOT/.devbuild/stamps.py \
  1048576:bound:0,1048576:bound:1,1048576:mean:0,1048576:mean:1 $W/stamps.json > $W/stamps.log 2>&1
echo "stamps at $((SECONDS-T0)) s"; grep -E "^==|score last|score all" $W/stamps.log | cut -c1-300
for tree in main try main try; do
  (cd $ROOT/.devbuild/$tree && PYTHONPATH=$PWD timeout 60 python bench/timeline_step.py --overlap 1 \
    --lengths 1048576 --out $W/t-$tree > $W/t-$tree.log 2>&1)
  echo "timeline $tree at $((SECONDS-T0)) s"; tail -8 $W/t-$tree.log
done
