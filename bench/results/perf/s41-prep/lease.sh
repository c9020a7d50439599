# Sourced with a work folder's name by call-a.sh to call-c.sh here (and by round twenty-three's
# call-d.sh and round twenty-four's calls, bench/results/perf/s42-round23/ and s43-round24/):
# what every call sets up. Results go to /tmp/$1, tarred into $OUT/r.tgz on exit (only 8 files come back).
T0=$SECONDS
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
W=/tmp/$1; mkdir -p $W
trap 'tar czf $OUT/r.tgz -C $W .' EXIT
export REATTENTION_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
export REATTENTION_COMMIT=$(cat $ROOT/.devbuild/COMMIT)  # the tree: .devbuild has no .git of its own

# Builds each named tree of .devbuild in place, side by side, unless its CUDA library is there:
# the box keeps call a's builds while it stays warm and .devbuild is not carried again.
build_trees() {
  local t jobs=$((16 / $#))
  for t in "$@"; do
    ls $ROOT/.devbuild/$t/reattention/_C_cuda*.so > /dev/null 2>&1 && continue
    (cd $ROOT/.devbuild/$t && CMAKE_BUILD_PARALLEL_LEVEL=$jobs python setup.py build_ext --inplace \
      > $W/build-$t.log 2>&1) &
  done
  wait
  for t in "$@"; do
    ls $ROOT/.devbuild/$t/reattention/_C_cuda*.so > /dev/null 2>&1 \
      || { echo "build $t failed"; tail -30 $W/build-$t.log; exit 1; }
  done
  echo "built at $((SECONDS-T0)) s" | tee -a $W/env.txt
}

# bench_attn --quick over the lengths $1 (comma-separated) in each tree named after it, in that
# order (an a b b a order is the caller's), each run labelled with its tree's COMMIT file; the
# decode rows of cuda(bound) and cuda(mean) are echoed. Results: $W/q-<i>-<tree>*.
quick_ab() {
  local lengths=$1 v i=0
  shift
  for v in "$@"; do
    i=$((i+1))
    (cd $ROOT/.devbuild/$v && REATTENTION_COMMIT=$(cat $ROOT/.devbuild/$v/COMMIT) PYTHONPATH=$PWD \
      timeout 90 python bench/bench_attn.py --backends cuda --quick --lengths $lengths \
      --out $W/q-$i-$v > $W/q-$i-$v.log 2>&1)
    echo "quick $i $v at $((SECONDS-T0)) s:"
    grep -E '^\| decode' $W/q-$i-$v.log | grep -E 'sdpa|cuda\((bound|mean)\)'
  done
}

# profile_step (graph replays, bound and mean) over the lengths $1 in each tree named after it,
# in that order, the step times echoed one line per run: the A/B loop of the calls of rounds
# twenty-seven and twenty-eight, which spelled it out. A name may carry one environment
# setting for its run, tree:VAR=value (the same build with a switch, e.g.
# rd:REATTENTION_ROW_WAIT=0). A run without a step time (a tree that fails or hangs) ends the
# call, with its log in r.tgz. Results: $W/p-<i>-<name, ':' and '=' as '-'>*.
profile_ab() {
  local lengths=$1 v i=0 tree setting label
  shift
  for v in "$@"; do
    i=$((i+1)); tree=${v%%:*}; setting=; label=${v//[:=]/-}
    [ "$tree" != "$v" ] && setting=${v#*:}
    (cd $ROOT/.devbuild/$tree && env $setting PYTHONPATH=$PWD timeout 60 python bench/profile_step.py \
      --backends cuda --reps bound,mean --lengths $lengths --out $W/p-$i-$label > $W/p-$i-$label.log 2>&1)
    echo "p $i $v at $((SECONDS-T0)) s: $(grep 'graph:' $W/p-$i-$label.log \
      | sed 's/.*N=\([0-9]*\) cuda decode (\(.*\)), graph: \([0-9.]*\) us.*/\1 \2 \3/' | tr '\n' ' ')"
    grep -q 'graph:' $W/p-$i-$label.log || { echo "p $i $v failed:"; tail -20 $W/p-$i-$label.log; exit 1; }
  done
}

# One whole bench_attn run (every row, the baselines in the same process) of the tree $1, labelled
# with its COMMIT file, into $W/whole-$1*, its cuda rows and SDPA's echoed (round thirty-one's
# call a; rounds twenty-six to thirty spelled it out).
whole_run() {
  (cd $ROOT/.devbuild/$1 && REATTENTION_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD timeout 90 python \
    bench/bench_attn.py --backends cuda --out $W/whole-$1 > $W/whole-$1.log 2>&1)
  echo "whole $1 at $((SECONDS-T0)) s"
  grep -E '^\| (decode|select|prefill|chunked)' $W/whole-$1.log \
    | grep -E 'cuda\(bound|cuda\(mean|cuda\(max\)|sdpa'
}

# The whole suite of the tree $1 with every backend required, for at most $2 seconds (SIGINT, so
# pytest still prints its summary), into $W/pytest-all.txt; then memcheck and racecheck of
# bench/memcheck_decode.py (round thirty-one's call a; rounds twenty-four to twenty-seven spelled
# it out).
suite_run() {
  (cd $ROOT/.devbuild/$1 && OMP_NUM_THREADS=1 PYTHONPATH=$PWD REATTENTION_REQUIRE=cpu,cuda,triton \
    timeout -s INT $2 python -m pytest tests -q -n 14 -p no:cacheprovider > $W/pytest-all.txt 2>&1)
  echo "suite $1 at $((SECONDS-T0)) s: $(grep -E 'passed|failed' $W/pytest-all.txt | tail -1)" \
    | tee -a $W/env.txt
  (cd $ROOT/.devbuild/$1 && export PYTHONPATH=$PWD
   timeout 50 compute-sanitizer --tool memcheck python bench/memcheck_decode.py 2>&1 | tail -8 > $W/memcheck.log
   timeout 80 compute-sanitizer --tool racecheck python bench/memcheck_decode.py 2>&1 | tail -8 > $W/racecheck.log)
  echo "sanitizers at $((SECONDS-T0)) s: $(grep -ih 'ERROR SUMMARY\|RACECHECK SUMMARY' \
    $W/memcheck.log $W/racecheck.log | tr '\n' ' ')" | tee -a $W/env.txt
}
