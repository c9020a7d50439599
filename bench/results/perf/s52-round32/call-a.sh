#!/bin/bash
# Round thirty-two's call (bench/NOTES.md). On an H200, unless PROBE=1: main's whole bench_attn
# run and whole GPU suite with memcheck and racecheck of bench/memcheck_decode.py (round
# thirty-one's call a, for README's table, bench/results/cuda-h200.json and docs/design.md 5.3).
# Otherwise (an H100, or PROBE=1): the timing probe nokrot.patch (tree nk, main with the decode
# kernel's K rotation skipped: wrong numbers, timing only) against main (tree new), profile_step at
# 128K and 1M, graph replays, one process per run, in the order new nk nk new new nk.
source "$(dirname "$0")/lease.sh" wa
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
if grep -q H200 $W/env.txt && [ "${PROBE:-0}" = 0 ]; then
  build_trees new
  whole_run new
  suite_run new 270
else
  build_trees new nk
  profile_ab 131072,1048576 new nk nk new new nk
fi
