#!/bin/bash
# Round twenty-four, call e: the tiles per split as a template parameter of the one-stage
# decode kernels (.devbuild/x: one kernel for one tile per split, one for two) against
# af7d4f8's kernels (.devbuild/tmpl): bench_attn --quick at 128K and 1M in the order tmpl x x
# tmpl; then x's memcheck and the tests of every path that runs the decode kernel (what the
# lease had left, ~300 s, did not allow the whole suite).
source "$(dirname "$0")/lease.sh" we
build_trees tmpl x
quick_ab 131072,1048576 tmpl x x tmpl
cd $ROOT/.devbuild/x
( PYTHONPATH=$PWD timeout 40 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck-x.log
echo "memcheck x at $((SECONDS-T0)) s: $(grep -i 'ERROR SUMMARY' $W/memcheck-x.log)"
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 120 python -m pytest tests/test_cuda.py tests/test_gather_attention.py tests/test_paged.py tests/test_offload.py tests/test_hf_graph.py tests/test_cache.py -q -n 14 -p no:cacheprovider > $W/pytest-x.txt 2>&1
echo "tests x at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-x.txt | tail -1)"
