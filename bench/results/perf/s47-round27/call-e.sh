#!/bin/bash
# Session 47, call e: call c again, asked for on an H200 (an H100 came): finer stamps (the
# per-CTA ranking's parts, the attention's prologue and first V tile, each CTA's SM) of the 1M
# and 128K steps, knobs off.
source "$(dirname "$0")/lease.sh" we
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees try
cd $ROOT/.devbuild/try
PYTHONPATH=$PWD timeout 150 python $ROOT/.devbuild/stamps.py \
  1048576:bound:0,1048576:mean:0,131072:bound:0 $W/stamps.json > $W/stamps.log 2>&1
echo "stamps at $((SECONDS-T0)) s"; grep -E "^==" $W/stamps.log
