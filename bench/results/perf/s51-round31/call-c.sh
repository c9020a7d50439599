#!/bin/bash
# Round thirty-one's call c (bench/NOTES.md): call a without the suite (which call b ran on an
# H100), for the device time left: on an H200 only, main's whole bench_attn run for README's
# table, bench/results/cuda-h200.json and docs/design.md 5.3 (its kernels are 8405647's).
source "$(dirname "$0")/lease.sh" wc
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
grep -q H200 $W/env.txt || { echo "not an H200: $(tail -1 $W/env.txt)"; exit 0; }
build_trees new
cd $ROOT/.devbuild/new
REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 90 python bench/bench_attn.py --backends cuda --out $W/whole-new > $W/whole-new.log 2>&1
echo "whole new at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole-new.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
