#!/bin/bash
# Next lease, call a: what ff0ab50 owes. Trees: .devbuild/main (HEAD, ff0ab50 or later: one
# tile per split on 74677b0's kernel, two tiles on the one-stage kernel) and .devbuild/tmpl
# (af7d4f8, whose whole run is README's table). bench_attn --quick at 32K, 128K, 256K and 1M in
# the order tmpl main main tmpl; then main's whole suite, memcheck and racecheck, and one whole
# bench_attn run (bench/results/cuda-h200.json if main's 1M row is back, see NOTES "Round
# twenty-four"). Prepare: rm -rf .devbuild; mkdir -p .devbuild/main .devbuild/tmpl;
# git archive HEAD | tar x -C .devbuild/main; git archive af7d4f8 | tar x -C .devbuild/tmpl;
# git rev-parse --short HEAD > .devbuild/main/COMMIT; echo af7d4f8 > .devbuild/tmpl/COMMIT;
# cp .devbuild/main/COMMIT .devbuild/; cp bench/results/perf/s41-prep/lease.sh
# bench/results/perf/s44-prep/call-a.sh .devbuild/; then run `bash .devbuild/call-a.sh`
# carrying .devbuild (about 480 s).
source "$(dirname "$0")/lease.sh" wa
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main tmpl
quick_ab 32768,131072,262144,1048576 tmpl main main tmpl
cd $ROOT/.devbuild/main
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 260 python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all.txt 2>&1
echo "suite at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all.txt | tail -1)" | tee -a $W/env.txt
( PYTHONPATH=$PWD timeout 40 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
( PYTHONPATH=$PWD timeout 60 compute-sanitizer --tool racecheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/racecheck.log
echo "sanitizers at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY\|RACECHECK SUMMARY' $W/memcheck.log $W/racecheck.log | tr '\n' ' ')" | tee -a $W/env.txt
REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 60 python bench/bench_attn.py --backends cuda --out $W/whole > $W/whole.log 2>&1
echo "whole at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
