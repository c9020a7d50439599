#!/bin/bash
# Round thirty-two's call b (bench/NOTES.md). On an H200: main's record run, exactly round
# thirty-one's call a (whole bench_attn run, whole GPU suite, memcheck and racecheck). Otherwise:
# two timing probes against main (tree new), profile_step at 128K and 1M, graph replays, one
# process per run, order new nkw nk nk nkw new: nk skips the decode kernel's K rotation
# (nokrot.patch), nkw skips it only in the local window's tiles (nokrot-window.patch). Both give
# wrong numbers; they are timing bounds.
source "$(dirname "$0")/lease.sh" wb
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
if grep -q H200 $W/env.txt; then
  build_trees new
  whole_run new
  suite_run new 270
else
  build_trees new nk nkw
  profile_ab 131072,1048576 new nkw nk nk nkw new
fi
