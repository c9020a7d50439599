#!/bin/bash
# Next lease, call b, right after call a (its trees stay built while the box is warm): the rep8
# branch, the decode selection on the bound reps' 8-bit companion (select_chunks_q8.cuh), never
# run on a GPU before. Trees: .devbuild/main (call a's) and .devbuild/rep8. Prepare as call a,
# then: mkdir -p .devbuild/rep8; git archive rep8 | tar x -C .devbuild/rep8;
# git rev-parse --short rep8 > .devbuild/rep8/COMMIT; cp the rep8 branch's
# bench/results/perf/s41-prep/lease.sh (its quick_ab also echoes the bound8 rows) and
# bench/results/perf/s44-prep/call-b.sh into .devbuild (three trees: ~45 MB of the 64 MiB a
# call may carry). About 400 s with main built; with call a's ~480 s and a start, ~1000 s of
# the session's 1800, leaving one call for a fix or rep8's whole bench_attn run.
# Order: correctness first (the 8-bit tests, memcheck, racecheck), then bench_attn --quick at
# 128K and 1M in the order main rep8 rep8 main (rep8's runs add the cuda(bound8) and cuda(mean8)
# rows), the branch's plain paths under the CUDA tests, and profile_step's kernels of bound,
# bound8, mean and mean8 at 1M.
source "$(dirname "$0")/lease.sh" wb
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main rep8
cd $ROOT/.devbuild/rep8
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 150 \
  python -m pytest tests/test_reps_q.py -q -n 8 -p no:cacheprovider -x > $W/pytest-q8.txt 2>&1
echo "q8 tests at $((SECONDS-T0)) s: $(grep -E 'passed|failed|error' $W/pytest-q8.txt | tail -1)" \
  | tee -a $W/env.txt
( PYTHONPATH=$PWD timeout 60 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
( PYTHONPATH=$PWD timeout 90 compute-sanitizer --tool racecheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/racecheck.log
echo "sanitizers at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY\|RACECHECK SUMMARY\|companion' $W/memcheck.log $W/racecheck.log | tr '\n' ' ')" | tee -a $W/env.txt
quick_ab 131072,1048576 main rep8 rep8 main
cd $ROOT/.devbuild/rep8
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 150 \
  python -m pytest tests/test_cuda.py tests/test_ties.py tests/test_select_chunks.py -q -n 14 \
  -p no:cacheprovider -k "attend or long or ties or identical or graph or select" > $W/pytest-plain.txt 2>&1
echo "plain paths at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-plain.txt | tail -1)" | tee -a $W/env.txt
PYTHONPATH=$PWD timeout 90 python bench/profile_step.py --backends cuda --reps bound,bound8,mean,mean8 \
  --lengths 1048576 --out $W/prof > $W/prof.log 2>&1
grep -E 'N=|chunk_scores|merge|gather|topk' $W/prof.log | head -20
echo "done at $((SECONDS-T0)) s"
# rep8's whole bench_attn run (README's table if rep8 lands), only when the 8-bit tests passed
if grep -qE ' passed' $W/pytest-q8.txt && ! grep -qE 'failed|error' $W/pytest-q8.txt; then
  cd $ROOT/.devbuild/rep8
  REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 80 python bench/bench_attn.py --backends cuda --out $W/whole > $W/whole.log 2>&1
  echo "whole at $((SECONDS-T0)) s"
  grep -E '^\| (decode|select|prefill|chunked)' $W/whole.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
fi
