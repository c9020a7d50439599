#!/bin/bash
# Round thirty's call c (bench/NOTES.md): one whole bench_attn run of main (its kernels are
# 8405647's: nothing under csrc changed since), for README's table if the card is an H200.
source "$(dirname "$0")/lease.sh" wc
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
grep -q H200 $W/env.txt || { echo "not an H200: $(tail -1 $W/env.txt); an H100 whole run of these kernels is already bench/results/perf/s48-round28/d-whole-*"; exit 0; }
build_trees new
cd $ROOT/.devbuild/new
REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 90 python bench/bench_attn.py --backends cuda --out $W/whole-new > $W/whole-new.log 2>&1
echo "whole new at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole-new.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
