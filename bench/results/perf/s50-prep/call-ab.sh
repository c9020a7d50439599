#!/bin/bash
# Calls a and b in one, for a session whose device time is short (each refused start costs 1-3
# min of it): the A/B of call-a.sh (profile_step at 128K and 1M, new rd lf rd:ROW_WAIT=0 x2 lf rd
# new), then the winner picked from it by rule, and the winner's checks and whole run (call-b's):
# memcheck, the whole suite with every backend required, one whole bench_attn run. The rule: the
# branch (rd or lf) with the lowest mean of its two 1M `bound` steps wins if that mean is at least
# 0.3 us under new's and its 128K `bound` mean is not 0.3 us over new's; with no winner the whole
# run is main's (new), for README's table, and no suite runs. ~8-9 min. It ran in session 50
# (bench/results/perf/s50-round30/call-ab.sh, as it ran, with the glob before this fix).
source "$(dirname "$0")/lease.sh" wab
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees new rd lf
profile_ab 131072,1048576 new rd lf rd:REATTENTION_ROW_WAIT=0 rd:REATTENTION_ROW_WAIT=0 lf rd new
win=$(python - "$W" <<'PY'
import glob, json, re, statistics, sys
steps = {}
for f in glob.glob(sys.argv[1] + "/p-*/profile_step*.json"):  # profile_step writes a folder per run
    label = re.match(r".*/p-\d+-([^/]*)/profile_step[^/]*\.json", f).group(1)
    for r in json.load(open(f))["rows"]:
        if r["what"] == "decode (bound), graph":
            steps.setdefault((label, r["n"]), []).append(r["us"])
m = {k: statistics.mean(v) for k, v in steps.items()}
for k in sorted(m):
    print(f"{k[0]} N={k[1]} bound mean {m[k]:.2f} us of {steps[k]}", file=sys.stderr)
best = min(("rd", "lf"), key=lambda t: m[(t, 1048576)])
gain = m[("new", 1048576)] - m[(best, 1048576)]
cost = m[(best, 131072)] - m[("new", 131072)]
print(best if gain >= 0.3 and cost < 0.3 else "new")
PY
)
echo "winner: $win at $((SECONDS-T0)) s" | tee -a $W/env.txt
cd $ROOT/.devbuild/$win
if [ "$win" != new ]; then
  ( PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 ) > $W/memcheck-$win.log
  echo "memcheck $win at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY' $W/memcheck-$win.log)" | tee -a $W/env.txt
  OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton timeout -s INT 200 python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all-$win.txt 2>&1
  echo "suite $win at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all-$win.txt | tail -1)" | tee -a $W/env.txt
  grep -E "^FAILED" $W/pytest-all-$win.txt | head
  gzip -f $W/pytest-all-$win.txt
fi
REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 60 python bench/bench_attn.py --backends cuda --out $W/whole-$win > $W/whole-$win.log 2>&1
echo "whole $win at $((SECONDS-T0)) s"
grep -E '^\| (decode|select|prefill|chunked)' $W/whole-$win.log | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
