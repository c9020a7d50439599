#!/bin/bash
# Round twenty-four, call a: build the base tree (.devbuild/base, 74677b0) and the change
# (.devbuild/new, two key tiles per split below 4096 middle chunks); bench_attn's decode rows
# at 32K, 128K, 256K and 1M in the order base new new base; compute-sanitizer memcheck and
# racecheck of bench/memcheck_decode.py on the change.
source "$(dirname "$0")/lease.sh" wa
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees base new
quick_ab 32768,131072,262144,1048576 base new new base
cd $ROOT/.devbuild/new
( PYTHONPATH=$PWD timeout 90 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
echo "memcheck at $((SECONDS-T0)) s: $(grep -i 'ERROR SUMMARY' $W/memcheck.log)" | tee -a $W/env.txt
( PYTHONPATH=$PWD timeout 100 compute-sanitizer --tool racecheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/racecheck.log
echo "racecheck at $((SECONDS-T0)) s: $(grep -i 'ERROR SUMMARY\|hazard' $W/racecheck.log | tail -2)" | tee -a $W/env.txt
