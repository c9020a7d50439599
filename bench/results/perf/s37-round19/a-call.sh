#!/bin/bash
# call 1: build main (90a), sanitizers of the decode step, then the whole suite with timestamps
T0=$SECONDS
cd "$(dirname "$0")/.."
git log -1 --format=%H > $OUT/commit.txt 2>/dev/null || true
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/env.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/env.txt
export CMAKE_BUILD_PARALLEL_LEVEL=16 REATTENTION_CUDA_ARCHS=90a
( time python -m pip install --no-build-isolation --no-deps -e . ) > $OUT/build.log 2>&1 || { tail -50 $OUT/build.log; exit 1; }
echo "build done at $((SECONDS-T0)) s" | tee -a $OUT/env.txt
( timeout 90 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -15 ) > $OUT/sanitizers.log
echo "memcheck done at $((SECONDS-T0)) s" | tee -a $OUT/env.txt
( timeout 90 compute-sanitizer --tool racecheck python bench/memcheck_decode.py 2>&1 | tail -15 ) >> $OUT/sanitizers.log
echo "racecheck done at $((SECONDS-T0)) s" | tee -a $OUT/env.txt
LEFT=$((575 - (SECONDS-T0)))
echo "suite limit $LEFT s" | tee -a $OUT/env.txt
export OMP_NUM_THREADS=1 REATTENTION_REQUIRE=cpu,cuda,triton PYTHONUNBUFFERED=1
timeout -s INT $LEFT python -m pytest tests -q -n 14 -v --durations=40 -p no:cacheprovider 2>&1 \
  | python -u -c "
import sys,time
t0=time.time()
for l in sys.stdin: sys.stdout.write(f'{time.time()-t0:7.1f} {l}'); sys.stdout.flush()
" > $OUT/pytest-all.txt
echo "suite ended at $((SECONDS-T0)) s" | tee -a $OUT/env.txt
tail -5 $OUT/pytest-all.txt; cat $OUT/sanitizers.log | grep -i "error summary\|hazard\|ERROR SUMMARY\|RACECHECK SUMMARY"
