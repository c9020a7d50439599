#!/bin/bash
# Next lease, call c (after call a built .devbuild/main): the needle grids of README's "Needle in
# a haystack" again under contract v2 (they were measured under v1, with 240-query prefill
# calls): 1x..128x, all methods, 11 depths x 20 prompts; then 1M tokens with bound reps; then
# README's Hugging Face prefill row (bench/hf_prefill.py, 128K tokens), also last run under v1.
source "$(dirname "$0")/lease.sh" wc
build_trees main
cd $ROOT/.devbuild/main
plot() { python -c "import matplotlib" 2>/dev/null && echo "--plot $W/$1.png" || echo "--no-plot"; }
PYTHONPATH=$PWD timeout 240 python -m reattention --device cuda --max-len 65536 --depths 11 \
  --samples 20 --batch 44 --dense-max-len 65536 --json $W/needle-full.json $(plot needle-full) \
  > $W/needle-full.log 2>&1
echo "grid rc $? at $((SECONDS-T0)) s"; tail -12 $W/needle-full.log
PYTHONPATH=$PWD timeout 330 python -m reattention --device cuda --lengths 1048576 --depths 11 \
  --samples 20 --batch 44 --methods reattention-bound --json $W/needle-1m.json $(plot needle-1m) \
  > $W/needle-1m.log 2>&1
echo "1M rc $? at $((SECONDS-T0)) s"; tail -6 $W/needle-1m.log
PYTHONPATH=$PWD timeout 150 python bench/hf_prefill.py --n 131072 --out $W/hf_prefill.json \
  > $W/hf_prefill.log 2>&1
echo "hf_prefill rc $? at $((SECONDS-T0)) s"; tail -3 $W/hf_prefill.log
