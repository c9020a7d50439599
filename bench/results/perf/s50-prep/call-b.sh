#!/bin/bash
# Call b of the next lease, after call a's A/B: `bash .devbuild/call-b.sh <tree>` with <tree> the
# winner (rd or lf; .devbuild/new is main). Main against it at 1M again (new t t new), then the
# winner's memcheck, its whole suite with every backend required, and one whole bench_attn run of
# it: what landing it needs (README's table, bench/results/cuda-h200.json). The box is fresh
# after call a (it goes back when idle), so both trees are built again (~1 min). ~6-7 min.
source "$(dirname "$0")/lease.sh" wb
t=${1:?usage: call-b.sh <tree>}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees new $t
profile_ab 1048576 new $t $t new
cd $ROOT/.devbuild/$t
( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
echo "memcheck at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY' $W/memcheck.log)" | tee -a $W/env.txt
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 230 python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all.txt 2>&1
echo "suite at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all.txt | tail -1)" | tee -a $W/env.txt
grep -E "^FAILED" $W/pytest-all.txt | head
gzip -f $W/pytest-all.txt
REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 60 python bench/bench_attn.py --backends cuda --out $W/whole > $W/whole.log 2>&1
echo "whole at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
