#!/bin/bash
# Prepared in session 48 for the next lease, on an H200 (README's card): main's head (8405647's
# kernels: 3 scoring buffers on long rows) against 5591dc8's kernels (README's column) at 1M,
# order old new new old, then one whole bench_attn run of the head for README's table and
# docs/design.md 5.3. Trees: .devbuild/old (git archive e4e7392, the kernels of 5591dc8) and
# .devbuild/new (git archive main), each without bench/results (the carry's 64 MiB); copy
# bench/results/perf/s41-prep/lease.sh and this script into .devbuild and run
# `bash .devbuild/call-a.sh` with carry [".devbuild"].
source "$(dirname "$0")/lease.sh" wa
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees old new
profile_ab 131072,1048576 old new new old
cd $ROOT/.devbuild/new
REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 60 python bench/bench_attn.py --backends cuda --out $W/whole > $W/whole.log 2>&1
echo "whole at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
