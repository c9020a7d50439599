#!/bin/bash
# Round twenty-four, call b: the whole suite on the change (.devbuild/new), built again if the
# box went back since call a.
source "$(dirname "$0")/lease.sh" wb
build_trees new
cd $ROOT/.devbuild/new
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 420 python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all.txt 2>&1
echo "suite at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all.txt | tail -1)" | tee -a $W/env.txt
grep -E '^FAILED|^ERROR' $W/pytest-all.txt | head -20
