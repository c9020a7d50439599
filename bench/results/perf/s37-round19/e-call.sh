#!/bin/bash
# call 4: the streamed merge (flg) against main: profile_step a b b a, timelines, memcheck, whole suite on flg
T0=$SECONDS
cd "$(dirname "$0")"
W=/tmp/w4; mkdir -p $W
trap 'tar czf $OUT/r.tgz -C $W .' EXIT
export CMAKE_BUILD_PARALLEL_LEVEL=16 REATTENTION_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
for v in main flg; do
  (cd $v && rm -rf build && python setup.py build_ext --inplace > $W/build-$v.log 2>&1) || { tail -30 $W/build-$v.log; exit 1; }
  echo "built $v at $((SECONDS-T0)) s"
done
(cd flg && PYTHONPATH=$PWD timeout 60 python -m pytest tests/test_cuda.py -q -x -k "attend" -p no:cacheprovider > $W/pytest-attend-flg.txt 2>&1); tail -2 $W/pytest-attend-flg.txt
echo "attend tests at $((SECONDS-T0)) s"
i=0
for v in main flg flg main; do
  i=$((i+1))
  (cd $v && PYTHONPATH=$PWD timeout 60 python bench/profile_step.py --out $W/p-$i-$v --backends cuda --reps bound > $W/decode-$v-$i.log 2>&1)
  echo "run $i $v at $((SECONDS-T0)) s:"; grep -E "^N=|merge_splits" $W/decode-$v-$i.log | cut -c1-90
done
i=0
for v in main flg; do
  i=$((i+1))
  (cd $v && PYTHONPATH=$PWD timeout 60 python bench/timeline_step.py --out $W/t-$i-$v --lengths 131072,1048576 --overlap 1 > $W/timeline-$v-$i.log 2>&1)
  echo "timeline $i $v:"; grep -v "^#\|Warn\|warn" $W/timeline-$v-$i.log
done
(cd flg && PYTHONPATH=$PWD timeout 60 compute-sanitizer --tool memcheck python bench/memcheck_decode.py > $W/memcheck-flg.log 2>&1); tail -2 $W/memcheck-flg.log
echo "memcheck at $((SECONDS-T0)) s"
LEFT=$((570 - (SECONDS-T0)))
(cd flg && OMP_NUM_THREADS=1 REATTENTION_REQUIRE=cpu,cuda,triton PYTHONPATH=$PWD timeout -s INT $LEFT python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all-flg.txt 2>&1); tail -3 $W/pytest-all-flg.txt
echo "suite ended at $((SECONDS-T0)) s"
