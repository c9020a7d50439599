#!/bin/bash
# call 3: timelines of main and dec-div at 128K and 1M, overlap on and off (a b b a)
T0=$SECONDS
cd "$(dirname "$0")"
W=/tmp/w; mkdir -p $W
trap 'tar czf $OUT/r.tgz -C $W .' EXIT
export CMAKE_BUILD_PARALLEL_LEVEL=16 REATTENTION_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
for v in main div; do
  (cd $v && python setup.py build_ext --inplace > $W/build-$v.log 2>&1) || { tail -30 $W/build-$v.log; exit 1; }
  echo "built $v at $((SECONDS-T0)) s"
done
i=0
for v in main div div main; do
  i=$((i+1)); [ $((SECONDS-T0)) -gt 480 ] && { echo "stopped before run $i"; break; }
  (cd $v && PYTHONPATH=$PWD timeout 150 python bench/timeline_step.py --out $W/t-$i-$v --lengths 131072,1048576 --overlap 0,1 > $W/timeline-$v-$i.log 2>&1)
  echo "run $i $v at $((SECONDS-T0)) s:"; cat $W/timeline-$v-$i.log | grep -v "^#"
done
