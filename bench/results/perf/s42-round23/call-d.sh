#!/bin/bash
# Call d (written after call b): a whole bench_attn run at HEAD for bench/results; then the
# decode rows of bench_attn (the sustained figures of README's table) at 32K and 128K, main
# against tps2 kept to caches of at most 256K tokens, in the order main tps2 tps2 main.
source "$(dirname "$0")/lease.sh" wd
build_trees main tps2
cd $ROOT/.devbuild/main
PYTHONPATH=$PWD timeout 150 python bench/bench_attn.py --backends cuda --out $W/whole > $W/whole.log 2>&1
echo "whole run rc $? at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa \|' | head -30
i=0
for v in main tps2 tps2 main; do
  i=$((i+1))
  (cd $ROOT/.devbuild/$v && env $([ $v = tps2 ] && echo REATTENTION_DECODE_TPS=2 REATTENTION_DECODE_TPS_MAX_NMAX=262144 REATTENTION_COMMIT=$REATTENTION_COMMIT+tps2.patch) \
    PYTHONPATH=$PWD timeout 90 python bench/bench_attn.py --backends cuda --quick --lengths 32768,131072 --out $W/q-$i-$v > $W/q-$i-$v.log 2>&1)
  echo "quick $i $v at $((SECONDS-T0)) s:"; grep -E '^\| decode' $W/q-$i-$v.log | grep -E 'sdpa|cuda\((bound|mean)\)'
done
