#!/bin/bash
# Round twenty-four, call c: the K/V stage count as a template parameter of the decode kernel
# (.devbuild/tmpl: a one-stage transposed kernel with no two-stage code) against 438d624
# (.devbuild/new: kv_stages read at run time): bench_attn's decode rows at 32K, 128K, 256K and
# 1M in the order new tmpl tmpl new; then tmpl's decode, attention and graph tests, memcheck.
source "$(dirname "$0")/lease.sh" wc
build_trees new tmpl
quick_ab 32768,131072,262144,1048576 new tmpl tmpl new
cd $ROOT/.devbuild/tmpl
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 150 python -m pytest tests/test_cuda.py tests/test_gather_attention.py tests/test_paged.py -q -n 14 -p no:cacheprovider -k "attend or graph or decode or attention or long" > $W/pytest-tmpl.txt 2>&1
echo "tmpl tests at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-tmpl.txt | tail -1)" | tee -a $W/env.txt
( PYTHONPATH=$PWD timeout 90 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
echo "memcheck at $((SECONDS-T0)) s: $(grep -i 'ERROR SUMMARY' $W/memcheck.log)" | tee -a $W/env.txt
