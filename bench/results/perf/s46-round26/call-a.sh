#!/bin/bash
# Session 46, call a: three decode-selection knobs at 1M against main, profile_step graph
# replays (bound and mean), in the order main r1 r2 c3 m1 c4 c4 m1 c3 r2 r1 main. Trees:
# .devbuild/main (main's HEAD) and .devbuild/try (branch try-rows: main + the knobs, off by
# default):
#  r1: REATTENTION_TRY_ROWS=1, the scoring's query rows loaded before its ring copies at every
#      length (main does so only when the copies are the whole range: 32K, 128K);
#  r2: REATTENTION_TRY_ROWS=2, the rows loaded and staged before any ring copy goes out;
#  c3, c4: REATTENTION_TRY_CAP=3 or 4, the fused scoring at that many CTAs per SM (where that is
#      at most what the occupancy gives: mean only) with the carveout at its most, so the
#      window attention's CTAs fit beside it;
#  m1: REATTENTION_TRY_M=1, the fused top-k's last CTA takes the row's M from its tile instead
#      of loading the length again after its arrival.
# Then `off` (the try tree, knobs off) once. About 400 s with the builds.
source "$(dirname "$0")/lease.sh" wa
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees main try
i=0
for v in main r1 r2 c3 m1 c4 c4 m1 c3 r2 r1 main off; do
  i=$((i+1)); t=try; E=X_=0
  [ $((SECONDS-T0)) -gt 545 ] && { echo "stopped before run $i"; break; }
  case $v in
    main) t=main ;; r1) E=REATTENTION_TRY_ROWS=1 ;; r2) E=REATTENTION_TRY_ROWS=2 ;;
    c3) E=REATTENTION_TRY_CAP=3 ;; c4) E=REATTENTION_TRY_CAP=4 ;; m1) E=REATTENTION_TRY_M=1 ;;
  esac
  (cd $ROOT/.devbuild/$t && env $E PYTHONPATH=$PWD timeout 60 python bench/profile_step.py \
    --out $W/p-$i-$v --backends cuda --reps bound,mean --lengths 1048576 > $W/p-$i-$v.log 2>&1)
  echo "run $i $v at $((SECONDS-T0)) s: $(grep -E '^N=' $W/p-$i-$v.log | sed 's/N=1048576 cuda decode //' | tr '\n' ' ')"
  grep -E 'chunk_scores|gather_att' $W/p-$i-$v.log | awk '{print "   ", $1, $2, substr($0, index($0,"kernels::")+9, 30)}'
done
echo "done at $((SECONDS-T0)) s"
