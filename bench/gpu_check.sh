#!/usr/bin/env bash
# The GPU check, run by the device tool from the repository root on a CUDA machine:
#   bash bench/gpu_check.sh [tests|bench|all|quick|before|paged]      (default all)
# Installs the checkout (no build isolation: such machines have no registry), runs the whole
# test suite with every GPU backend required, then the benchmarks. Logs and JSON go to $OUT
# (default bench/results/local). The device tool copies the working tree but its .git may be
# an older one, so name the commit from here: REATTENTION_COMMIT=<hash> bash bench/gpu_check.sh
set -euo pipefail
what=${1:-all}
repo=$(pwd)
out=${OUT:-$repo/bench/results/local}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 REATTENTION_COMMIT=${REATTENTION_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -5
echo "install: $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
par=$(python3 -c "import xdist" 2>/dev/null && echo "-n 14" || true)
# 14 workers of 16 CPU threads each on 16 cores: the CPU reference checks then crawl (four tie
# tests of test_cuda.py ran past 400 s); one thread per worker keeps them at seconds.
[ -n "$par" ] && export OMP_NUM_THREADS=1
if [ "$what" = quick ]; then
  # What commits 7febbb6 to f63ede6 changed (bench/NOTES.md, "Commits 7febbb6 to f63ede6"): the
  # grouped context-parallel path (NCCL, one rank per GPU), the launchers' strided lengths, the
  # Triton token clamp, then the CP benchmark and the decode profile. About 3 minutes.
  (cd /tmp && REATTENTION_REQUIRE=cpu,cuda,triton python3 -m pytest -q -p no:cacheprovider $par \
     "$repo/tests/test_distributed.py" "$repo/tests/test_cuda.py" "$repo/tests/test_triton_gpu.py" \
     "$repo/tests/test_gather_attention.py" -k "nccl or strided or malformed or graph or triton_gpu" \
     2>&1 | tee "$out/pytest-quick.log" | tail -15)
  (cd /tmp && python3 "$repo/bench/bench_cp.py" --lengths 1048576 --reps bound --iters 5 \
     --out "$out/cp-h200x1.json" 2>&1 | tail -8)
  (cd /tmp && python3 "$repo/bench/profile_step.py" --out "$out" 2>&1 | tail -40)
  echo "quick: $(( $(date +%s) - t0 )) s"
fi
if [ "$what" = paged ]; then
  # Paged and tiered caches (docs/design.md section 3.7): their GPU tests, the offload and paged
  # benchmarks at 1M, then the needle far past the GPU: 4M tokens (8192x the trained length)
  # with the tiered cache and with the all-GPU one, 20 prompts each, peak GPU memory recorded.
  # About 12 minutes; split it across calls when the device time is short.
  (cd /tmp && REATTENTION_REQUIRE=cpu,cuda,triton python3 -m pytest -q -p no:cacheprovider $par \
     "$repo/tests/test_paged.py" "$repo/tests/test_offload.py" -k "gpu or cuda or triton" \
     2>&1 | tee "$out/pytest-paged.log" | tail -5)
  (cd /tmp && python3 "$repo/bench/bench_offload.py" --out "$out" 2>&1 | tail -8)
  (cd /tmp && python3 "$repo/bench/bench_attn.py" --out "$out" --lengths 1048576 --quick --paged \
     2>&1 | tail -30)
  for mode in cpu none; do
    off=$([ "$mode" = cpu ] && echo "--offload cpu" || true)
    (cd /tmp && python3 -m reattention --device cuda --lengths 4194304 --depths 5 --samples 4 \
       --batch 4 --methods reattention-bound $off --no-plot --json "$out/needle-4m-$mode.json" \
       2>&1 | tail -4)
  done
  echo "paged: $(( $(date +%s) - t0 )) s"
fi
if [ "$what" = before ]; then
  # The same benchmark at an earlier commit, for before/after figures: that commit's source
  # (git archive COMMIT) unpacked in .devbuild/old, installed beside this one in /tmp/old.
  python3 -m pip install --no-build-isolation --no-deps -q --target /tmp/old .devbuild/old 2>&1 | tail -5
  old=$(cat .devbuild/old/COMMIT 2>/dev/null || echo unknown)
  (cd /tmp && PYTHONPATH=/tmp/old REATTENTION_COMMIT=$old python3 "$repo/.devbuild/old/bench/bench_attn.py" \
     --lengths 1048576 --out "$out/before" 2>&1 | tee "$out/bench-before.log" | tail -20)
  echo "before: $(( $(date +%s) - t0 )) s"
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  # Run from /tmp so the installed package, not the source tree, is imported. The suite took
  # over 240 s on 14 xdist workers on the H200 box, so use them where pytest-xdist exists.
  (cd /tmp && REATTENTION_REQUIRE=cpu,cuda,triton python3 -m pytest "$repo/tests" -q $par --maxfail=30 \
     -p no:cacheprovider -o junit_family=xunit2 --junitxml="$out/pytest.xml" 2>&1 \
     | tee "$out/pytest.log" | tail -25)
  echo "tests: $(( $(date +%s) - t0 )) s"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  (cd /tmp && python3 "$repo/bench/bench_attn.py" --out "$out" 2>&1 | tee "$out/bench.log" | tail -40)
  echo "bench: $(( $(date +%s) - t0 )) s"
fi
