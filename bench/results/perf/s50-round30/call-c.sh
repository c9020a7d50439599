#!/bin/bash
# Round thirty's call c (bench/NOTES.md): one whole bench_attn run of main (its kernels are
# 8405647's: nothing under csrc changed since), for README's table if the card is an H200. It
# never ran (five refusals); its whole run, spelled out here then, is lease.sh's whole_run.
source "$(dirname "$0")/lease.sh" wc
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
grep -q H200 $W/env.txt || { echo "not an H200: $(tail -1 $W/env.txt); an H100 whole run of these kernels is already bench/results/perf/s48-round28/d-whole-*"; exit 0; }
build_trees new
whole_run new
