#!/bin/bash
# Prepared in session 49 (no device came) for the next lease, an H200 if one comes: branch
# `rowdone` (56c3c4b: behind the fused top-k, attend's CTAs of selected chunks wait for their
# own row's selection through a counter in the selection's workspace, not for the whole grid)
# against main, profile_step at 128K and 1M in the order new rd rd0 rd0 rd new (rd0: the
# branch with REATTENTION_ROW_WAIT=0, the grid-wide wait, which is main's wait with the
# branch's code); then the branch's checks (memcheck of bench/memcheck_decode.py, the whole
# suite) and one whole bench_attn run of each tree (main's is README's table if the card is an
# H200). Trees: .devbuild/new (git archive main) and .devbuild/rd (git archive rowdone), each
# without bench/results (the carry's 64 MiB); copy bench/results/perf/s41-prep/lease.sh and this
# script into .devbuild and run `bash .devbuild/call-a.sh` with carry [".devbuild"] (~8 min).
source "$(dirname "$0")/lease.sh" wb
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees new rd
i=0
for v in new rd rd0 rd0 rd new; do
  i=$((i+1)); t=${v%0}; rw=1; [ "$v" = rd0 ] && rw=0
  (cd $ROOT/.devbuild/$t && REATTENTION_ROW_WAIT=$rw PYTHONPATH=$PWD timeout 60 python bench/profile_step.py \
    --backends cuda --reps bound,mean --lengths 131072,1048576 --out $W/p-$i-$v > $W/p-$i-$v.log 2>&1)
  echo "p $i $v at $((SECONDS-T0)) s: $(grep 'graph:' $W/p-$i-$v.log \
    | sed 's/.*N=\([0-9]*\) cuda decode (\(.*\)), graph: \([0-9.]*\) us.*/\1 \2 \3/' | tr '\n' ' ')"
  # A branch that hangs or fails ends the call here, with its log in r.tgz.
  grep -q 'graph:' $W/p-$i-$v.log || { echo "p $i $v failed:"; tail -20 $W/p-$i-$v.log; exit 1; }
done
cd $ROOT/.devbuild/rd
( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
echo "memcheck at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY' $W/memcheck.log)" | tee -a $W/env.txt
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 230 python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all.txt 2>&1
echo "suite at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all.txt | tail -1)" | tee -a $W/env.txt
grep -E "^FAILED" $W/pytest-all.txt | head
gzip $W/pytest-all.txt
for t in new rd; do
  cd $ROOT/.devbuild/$t
  REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 60 python bench/bench_attn.py --backends cuda --out $W/whole-$t > $W/whole-$t.log 2>&1
  echo "whole $t at $((SECONDS-T0)) s"
  grep -E '^\| (decode|select|prefill|chunked)' $W/whole-$t.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
done
