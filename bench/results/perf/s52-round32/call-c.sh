#!/bin/bash
# Round thirty-two's call c (bench/NOTES.md): branch seedfirst (tree sf: the decode kernel's
# rotary seeds taken before its K rows land) against main (tree new) on whatever card comes:
# profile_step at 128K and 1M, graph replays, one process per run, order new sf sf new new sf;
# then bitwise.py (decode outputs of sf against new's, bit for bit) and memcheck of
# bench/memcheck_decode.py on sf. sf wins if its mean 1M `bound` step is at least 0.3 us under
# new's and its 128K one not 0.3 us over; then the CUDA decode tests of sf run in the time left
# (END, default 330 s from the start). On an H200, the winner's whole bench_attn run.
source "$(dirname "$0")/lease.sh" wc
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $W/env.txt
build_trees new sf
profile_ab 131072,1048576 new sf sf new new sf
(cd $ROOT/.devbuild/new && PYTHONPATH=$PWD timeout 60 python $ROOT/.devbuild/bitwise.py save $W/new.pt) > $W/bitwise.txt 2>&1
(cd $ROOT/.devbuild/sf && PYTHONPATH=$PWD timeout 60 python $ROOT/.devbuild/bitwise.py compare $W/new.pt) >> $W/bitwise.txt 2>&1
rm -f $W/new.pt
echo "bitwise at $((SECONDS-T0)) s: $(tail -1 $W/bitwise.txt)" | tee -a $W/env.txt
(cd $ROOT/.devbuild/sf && PYTHONPATH=$PWD timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8) > $W/memcheck.log
echo "memcheck at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY' $W/memcheck.log)" | tee -a $W/env.txt
win=$(python - "$W" <<'PY'
import glob, json, statistics, sys
steps = {}
for f in glob.glob(sys.argv[1] + "/p-*/profile_step-*.json"):
    label = "sf" if "-sf/" in f else "new"
    for r in json.load(open(f))["rows"]:
        if r["what"] == "decode (bound), graph":
            steps.setdefault((label, r["n"]), []).append(r["us"])
m = {k: statistics.mean(v) for k, v in steps.items()}
for k in sorted(m):
    print(f"{k[0]} N={k[1]} bound mean {m[k]:.2f} us of {steps[k]}", file=sys.stderr)
gain = m[("new", 1048576)] - m[("sf", 1048576)]
cost = m[("sf", 131072)] - m[("new", 131072)]
print("sf" if gain >= 0.3 and cost < 0.3 else "new")
PY
)
echo "winner: ${win:-none} at $((SECONDS-T0)) s" | tee -a $W/env.txt
grep -q H200 $W/env.txt && whole_run ${win:-new}
[ "$win" = sf ] || exit 0
left=$((${END:-330} - SECONDS + T0))
[ $left -gt 40 ] || exit 0
(cd $ROOT/.devbuild/sf && OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda timeout -s INT $left \
  python -m pytest -q -n 14 -p no:cacheprovider tests/test_cuda.py tests/test_gather_attention.py > $W/pytest-sf.txt 2>&1)
echo "sf tests (${left} s allowed) at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-sf.txt | tail -1)" | tee -a $W/env.txt
