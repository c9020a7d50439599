# Sourced with a work folder's name by call-a.sh to call-c.sh here (and by round twenty-three's
# call-d.sh, bench/results/perf/s42-round23/): what every call sets up. Results go to /tmp/$1, tarred into $OUT/r.tgz on exit (only 8 files come back).
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
