#!/bin/bash
# Round thirty-one's call a (bench/NOTES.md): on an H200 only, main's whole bench_attn run (for
# README's table, bench/results/cuda-h200.json and docs/design.md 5.3; its kernels are
# 8405647's), then main's whole GPU suite, memcheck and racecheck of bench/memcheck_decode.py.
# On an H100 it stops after nvidia-smi: these kernels' H100 whole run is
# bench/results/perf/s48-round28/d-whole-*.
source "$(dirname "$0")/lease.sh" wa
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
grep -q H200 $W/env.txt || { echo "not an H200: $(tail -1 $W/env.txt)"; exit 0; }
build_trees new
cd $ROOT/.devbuild/new
REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 90 python bench/bench_attn.py --backends cuda --out $W/whole-new > $W/whole-new.log 2>&1
echo "whole new at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole-new.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 270 python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all.txt 2>&1
echo "suite at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all.txt | tail -1)" | tee -a $W/env.txt
( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
( PYTHONPATH=$PWD timeout 80 compute-sanitizer --tool racecheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/racecheck.log
echo "sanitizers at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY\|RACECHECK SUMMARY' $W/memcheck.log $W/racecheck.log | tr '\n' ' ')" | tee -a $W/env.txt
