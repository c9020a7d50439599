#!/bin/bash
# Round thirty-one's call b (bench/NOTES.md): branch kvpair (two kv heads per decode CTA) on
# whatever card comes. profile_step at 128K and 1M first, in the order off on on off off on (off:
# REATTENTION_HEAD_PAIRS=0, main's one-head kernel in the same build), then the GPU tests of the
# pair kernel (pairs against one head per CTA, bit for bit, and against the reference), memcheck
# of bench/memcheck_decode.py (its GQA 4 D 128 calls take the pair kernel), then with the
# winner's setting a whole bench_attn run (on an H200) and the whole suite in the time left.
source "$(dirname "$0")/lease.sh" wb
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees kp
cd $ROOT/.devbuild/kp
off=kp:REATTENTION_HEAD_PAIRS=0
profile_ab 131072,1048576 $off kp kp $off $off kp
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda timeout -s INT 100 python -m pytest -q -n 8 -p no:cacheprovider \
  tests/test_cuda.py -k "head_pairs" > $W/pytest-pairs.txt 2>&1
echo "pair tests at $((SECONDS-T0)) s: $(grep -E 'passed|failed|error' $W/pytest-pairs.txt | tail -1)" | tee -a $W/env.txt
grep -q " failed\|error" $W/pytest-pairs.txt && { grep -E "^FAILED|Error|assert" $W/pytest-pairs.txt | head -30; }
( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck.log
echo "memcheck at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY' $W/memcheck.log)" | tee -a $W/env.txt
# The winner by round thirty's rule: pairs (on) if their mean 1M `bound` step is at least 0.3 us
# under off's and their 128K one not 0.3 us over; the whole run (on an H200) and the suite run
# with the winner's setting (off: main's kernels).
win=$(python - "$W" <<'PY'
import glob, json, re, statistics, sys
steps = {}
for f in glob.glob(sys.argv[1] + "/p-*/profile_step-*.json"):
    label = "off" if "HEAD_PAIRS" in f else "on"
    for r in json.load(open(f))["rows"]:
        if r["what"] == "decode (bound), graph":
            steps.setdefault((label, r["n"]), []).append(r["us"])
m = {k: statistics.mean(v) for k, v in steps.items()}
for k in sorted(m):
    print(f"{k[0]} N={k[1]} bound mean {m[k]:.2f} us of {steps[k]}", file=sys.stderr)
gain = m[("off", 1048576)] - m[("on", 1048576)]
cost = m[("on", 131072)] - m[("off", 131072)]
print(1 if gain >= 0.3 and cost < 0.3 else 0)
PY
)
echo "pairs winner: ${win:-none} at $((SECONDS-T0)) s" | tee -a $W/env.txt
export REATTENTION_HEAD_PAIRS=${win:-0}
if grep -q H200 $W/env.txt; then
  REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 90 python bench/bench_attn.py \
    --backends cuda --out $W/whole-pairs$REATTENTION_HEAD_PAIRS > $W/whole.log 2>&1
  echo "whole pairs=$REATTENTION_HEAD_PAIRS at $((SECONDS-T0)) s"
  grep -E '^\| decode' $W/whole.log | grep -E 'cuda\(bound|cuda\(mean'
fi
left=$((${END:-520} - SECONDS + T0))  # END: the seconds this call may run
[ $left -gt 60 ] || exit 0
OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT $left python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all.txt 2>&1
echo "suite pairs=$REATTENTION_HEAD_PAIRS (${left} s allowed) at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all.txt | tail -1)" | tee -a $W/env.txt
