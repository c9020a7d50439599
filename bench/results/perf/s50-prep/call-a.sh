#!/bin/bash
# Prepared with round twenty-nine (bench/NOTES.md), when no device came, for the next lease, an
# H200 if one comes. Two tries on the 1M step's selection tail against main, each a branch:
#   rd: `rowdone` (7835954): behind the fused top-k, attend's CTAs of selected chunks wait for
#       their own row's selection (a counter per row in the selection's workspace), not for the
#       whole scoring grid; rd0 is the same build with REATTENTION_ROW_WAIT=0 (the grid wait);
#   lf: `lastfast` (d12f4df, on rowdone): also, the scoring CTA that arrives last in a row
#       selects at once, its own range's keys taken from shared memory, without ranking and
#       publishing them first.
# profile_step at 128K and 1M in the order new rd lf rd0 rd0 lf rd new (lease.sh's profile_ab);
# then each branch's memcheck of bench/memcheck_decode.py and its selection and attend GPU
# tests; then one whole bench_attn run of main (README's table if the card is an H200). The
# winner's whole suite and whole run are the next call's. Trees: .devbuild/new, .devbuild/rd, .devbuild/lf (git archive
# of main, rowdone and lastfast, each without bench/results: the carry's 64 MiB); copy
# bench/results/perf/s41-prep/lease.sh and this script into .devbuild and run
# `bash .devbuild/call-a.sh` with carry [".devbuild"] (~8 min).
source "$(dirname "$0")/lease.sh" wa
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees new rd lf
profile_ab 131072,1048576 new rd lf rd:REATTENTION_ROW_WAIT=0 rd:REATTENTION_ROW_WAIT=0 lf rd new
for t in rd lf; do
  cd $ROOT/.devbuild/$t
  ( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck-$t.log
  echo "memcheck $t at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY' $W/memcheck-$t.log)" | tee -a $W/env.txt
  OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 100 python -m pytest \
    tests/test_select_chunks.py tests/test_ties.py tests/test_cuda.py tests/test_paged.py tests/test_hf_graph.py \
    -q -n 14 -p no:cacheprovider -k "cuda or attend or long or graph" > $W/pytest-$t.txt 2>&1
  echo "tests $t at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-$t.txt | tail -1)" | tee -a $W/env.txt
  grep -E "^FAILED" $W/pytest-$t.txt | head
done
cd $ROOT/.devbuild/new
REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 60 python bench/bench_attn.py --backends cuda --out $W/whole-new > $W/whole-new.log 2>&1
echo "whole new at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole-new.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
