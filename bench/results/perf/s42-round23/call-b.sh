#!/bin/bash
# Next lease, call b: the decode step's A/B, main / tps2 switched off / tps2 with two tiles per
# split, in the order main off tps2 tps2 off main (each a whole profile_step process).
source "$(dirname "$0")/lease.sh" wb
build_trees main tps2
i=0
for v in main off tps2 tps2 off main; do
  i=$((i+1))
  tree=$ROOT/.devbuild/$([ $v = main ] && echo main || echo tps2)
  tps=$([ $v = tps2 ] && echo 2 || echo "")
  (cd $tree && env ${tps:+REATTENTION_DECODE_TPS=$tps} REATTENTION_COMMIT=$REATTENTION_COMMIT$([ $v = main ] || echo +tps2.patch) PYTHONPATH=$PWD timeout 80 python bench/profile_step.py --out $W/p-$i-$v --backends cuda --reps bound,mean > $W/decode-$i-$v.log 2>&1)
  echo "run $i $v at $((SECONDS-T0)) s:"; grep -E '^N=' $W/decode-$i-$v.log | sed 's/, kernels.*//'
done
