#!/bin/bash
# Round thirty-one's call a (bench/NOTES.md): on an H200 only, main's whole bench_attn run (for
# README's table, bench/results/cuda-h200.json and docs/design.md 5.3; its kernels are
# 8405647's), then, unless SUITE=0, main's whole GPU suite, memcheck and racecheck of
# bench/memcheck_decode.py. On an H100 it stops after nvidia-smi: these kernels' H100 whole run
# is bench/results/perf/s48-round28/d-whole-*. Call c was `SUITE=0 bash call-a.sh`, for the
# device time left after call b (which ran the suite on an H100).
source "$(dirname "$0")/lease.sh" wa
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
grep -q H200 $W/env.txt || { echo "not an H200: $(tail -1 $W/env.txt)"; exit 0; }
build_trees new
whole_run new
[ "${SUITE:-1}" = 0 ] || suite_run new 270
