#!/bin/bash
# call 5: window CTAs waiting at fused lengths (REATTENTION_WINDOW_WAIT=1), with and without dec-div
T0=$SECONDS
cd "$(dirname "$0")"
W=/tmp/w5; mkdir -p $W
trap 'tar czf $OUT/r.tgz -C $W .' EXIT
export CMAKE_BUILD_PARALLEL_LEVEL=16 REATTENTION_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
for v in ww dw; do
  (cd $v && rm -rf build && python setup.py build_ext --inplace > $W/build-$v.log 2>&1) || { tail -30 $W/build-$v.log; exit 1; }
  echo "built $v at $((SECONDS-T0)) s"
done
i=0
for c in ww:0 ww:1 dw:0 dw:1 dw:1 dw:0 ww:1 ww:0; do
  i=$((i+1)); v=${c%:*}; e=${c#*:}
  (cd $v && REATTENTION_WINDOW_WAIT=$e PYTHONPATH=$PWD timeout 60 python bench/profile_step.py --out $W/p-$i-$v$e --backends cuda --reps bound > $W/decode-$v$e-$i.log 2>&1)
  echo "run $i $v wait=$e at $((SECONDS-T0)) s:"; grep -E "^N=" $W/decode-$v$e-$i.log | cut -c1-90
done
for c in ww:0 ww:1 dw:1; do
  v=${c%:*}; e=${c#*:}
  (cd $v && REATTENTION_WINDOW_WAIT=$e PYTHONPATH=$PWD timeout 60 python bench/timeline_step.py --out $W/t-$v$e --lengths 1048576 --overlap 1 > $W/timeline-$v$e.log 2>&1)
  echo "timeline $v wait=$e:"; grep -v "^#\|Warn\|warn" $W/timeline-$v$e.log
done
