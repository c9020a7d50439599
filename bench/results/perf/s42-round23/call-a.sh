#!/bin/bash
# Next lease, call a: build HEAD (.devbuild/main) and tps2 (.devbuild/tps2); HEAD's whole suite;
# tps2's decode tests and memcheck with two key tiles per split. Results in $OUT/r.tgz.
source "$(dirname "$0")/lease.sh" wa
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main tps2
cd $ROOT/.devbuild/main
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 300 python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all.txt 2>&1
echo "HEAD suite at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all.txt | tail -1)" | tee -a $W/env.txt
cd $ROOT/.devbuild/tps2
export REATTENTION_DECODE_TPS=2
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 150 python -m pytest tests/test_cuda.py tests/test_gather_attention.py tests/test_paged.py -q -n 14 -p no:cacheprovider -k "attend or graph or decode or attention" > $W/pytest-tps2.txt 2>&1
echo "tps2 tests at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-tps2.txt | tail -1)" | tee -a $W/env.txt
( PYTHONPATH=$PWD timeout 90 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -15 ) > $W/memcheck-tps2.log
echo "tps2 memcheck at $((SECONDS-T0)) s: $(grep -i 'ERROR SUMMARY' $W/memcheck-tps2.log)" | tee -a $W/env.txt
