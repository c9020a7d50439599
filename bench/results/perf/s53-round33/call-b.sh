#!/bin/bash
# Round thirty-three's call b (bench/NOTES.md), on an H200 only, main's tree (.devbuild/new, set
# up as in round thirty-one's call-a.sh): a second whole bench_attn run, for the spread of the
# record run of call a (round thirty-one's call-a.sh as it stands); then README's paged and tiered
# table again at 1M with main's kernels (it was 0c6d14a's): `bench_attn.py --quick --paged` with
# both GPU backends, and `bench_offload.py`. On an H100 it stops after nvidia-smi.
source "$(dirname "$0")/lease.sh" wb
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
grep -q H200 $W/env.txt || { echo "not an H200: $(tail -1 $W/env.txt)"; exit 0; }
build_trees new
whole_run new
cd $ROOT/.devbuild/new && export PYTHONPATH=$PWD REATTENTION_COMMIT=$(cat COMMIT)
timeout 300 python bench/bench_attn.py --backends cuda,triton --quick --paged --lengths 1048576 \
  --out $W/paged > $W/paged.log 2>&1
echo "paged at $((SECONDS-T0)) s (rc $?)"
grep -E '^\| (decode|select|prefill)' $W/paged.log | grep -E 'cuda|triton'
timeout 200 python bench/bench_offload.py --n 1048576 --out $W/paged > $W/offload.log 2>&1
echo "offload at $((SECONDS-T0)) s (rc $?)"
tail -25 $W/offload.log
