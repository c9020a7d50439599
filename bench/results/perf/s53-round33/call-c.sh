#!/bin/bash
# Round thirty-three's call c (bench/NOTES.md), on an H200 only, main's tree (.devbuild/new, set
# up as in round thirty-one's call-a.sh, at 4b9ae4c): README's whole-model rows of the 1B
# shape at 32K and 128K with main's kernels (they were 44bea6b's), then the 8B shape at 32K
# (1a5edef's). On an H100 it stops after nvidia-smi.
source "$(dirname "$0")/lease.sh" wc
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
grep -q H200 $W/env.txt || { echo "not an H200: $(tail -1 $W/env.txt)"; exit 0; }
build_trees new
cd $ROOT/.devbuild/new && export PYTHONPATH=$PWD REATTENTION_COMMIT=$(cat COMMIT)
timeout 150 python bench/bench_model.py --models 1b --lengths 32768,131072 --steps 32 \
  --out $W/model-1b > $W/model-1b.log 2>&1
echo "1b at $((SECONDS-T0)) s (rc $?)"
grep '^{' $W/model-1b.log
timeout 150 python bench/bench_model.py --models 8b --lengths 32768 --steps 16 \
  --out $W/model-8b > $W/model-8b.log 2>&1
echo "8b at $((SECONDS-T0)) s (rc $?)"
grep '^{' $W/model-8b.log
