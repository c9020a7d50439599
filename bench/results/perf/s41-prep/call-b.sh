#!/bin/bash
# Next lease, call b: the decode step's A/B, main / tps2 switched off / tps2 with two tiles per
# split, in the order main off tps2 tps2 off main (each a whole profile_step process).
T0=$SECONDS
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=/tmp/wb; mkdir -p $W
trap 'tar czf $OUT/r.tgz -C $W .' EXIT
export PYTHONUNBUFFERED=1
export REATTENTION_COMMIT=$(cat $ROOT/.devbuild/COMMIT)  # the tree: .devbuild has no .git of its own
# The box keeps call a's in-place builds while it stays warm (and .devbuild is not carried
# again); otherwise build here.
export REATTENTION_CUDA_ARCHS=90a
for t in main tps2; do
  ls $ROOT/.devbuild/$t/reattention/_C_cuda*.so > /dev/null 2>&1 && continue
  (cd $ROOT/.devbuild/$t && CMAKE_BUILD_PARALLEL_LEVEL=16 python setup.py build_ext --inplace > $W/build-$t.log 2>&1) || { tail -30 $W/build-$t.log; exit 1; }
  echo "built $t at $((SECONDS-T0)) s"
done
i=0
for v in main off tps2 tps2 off main; do
  i=$((i+1))
  tree=$ROOT/.devbuild/$([ $v = main ] && echo main || echo tps2)
  tps=$([ $v = tps2 ] && echo 2 || echo "")
  (cd $tree && env ${tps:+REATTENTION_DECODE_TPS=$tps} REATTENTION_COMMIT=$REATTENTION_COMMIT$([ $v = main ] || echo +tps2.patch) PYTHONPATH=$PWD timeout 80 python bench/profile_step.py --out $W/p-$i-$v --backends cuda --reps bound,mean > $W/decode-$i-$v.log 2>&1)
  echo "run $i $v at $((SECONDS-T0)) s:"; grep -E '^N=' $W/decode-$i-$v.log | sed 's/, kernels.*//'
done
