#!/usr/bin/env bash
# The GPU checks of the fused kernels and of the studio's GPU speed, in parts that each fit a ten-minute run:
#   benches/gpu_check.sh OUT tiny   the test files that hold CUDA tests (every verdict, no -x), the kernel bench
#                                   (fused projection and region GroupNorm against the base GEMM and GroupNorm) and
#                                   `studio bench gpu` on studio-tiny (generation batch 1/16/128, composition,
#                                   training s/step)
#   benches/gpu_check.sh OUT sd1    `studio bench gpu` generation and composition on a random-weight SD1.5-architecture
#                                   base at 512x512 (the regional bar at a published size)
#   benches/gpu_check.sh OUT suite  the whole test suite with the GPU visible (it must pass there too), on 8 pytest
#                                   workers when pytest-xdist is installed
# Each part writes its logs and reports under OUT (tests.log, kernel.log, bench-*.log, gpu/, gpu-sd1/) and keeps
# going past a failed step; read OUT/gpu*/gpu-bench.md even when the exit status is 1. Needs torch with CUDA and
# the project's packages importable (`pip install -e .`, or PYTHONPATH with the repository root); pytest runs
# without the project's addopts, so an older pytest-xdist (or none) does not stop it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benches/gpu_check.sh OUT tiny|sd1|suite}
part=${2:-tiny}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 STUDIO_LIBRARY=${STUDIO_LIBRARY:-$(mktemp -d)}
status=0
step() {  # step SECONDS LOG COMMAND...: run with a time limit, log to OUT/LOG, remember a failure
  local limit=$1 log=$2; shift 2
  echo "== $* (at most ${limit} s)" | tee -a "$out/$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/$log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "== exit status $rc" | tee -a "$out/$log"; status=1; }
}

"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
  || exit 2
case "$part" in
  tiny)
    # the files that hold CUDA tests, whole: their CPU tests also run with a GPU visible
    step 200 tests.log "$py" -m pytest -o addopts=-ra -q -p no:cacheprovider tests/lora_kernels tests/test_cuda_graphs.py \
      tests/test_mixed.py tests/trainers/test_graphs.py tests/trainers/test_loop.py tests/benches/test_bench_gpu.py \
      tests/composers/test_lora_composer.py
    step 90 kernel.log "$py" -m lora_kernels.bench --out "$out/kernel"
    step 270 bench-tiny.log "$py" -m studio bench gpu --runs 5 --train-steps 60 --out "$out/gpu"
    ;;
  sd1)
    step 540 bench-sd1.log "$py" -m studio bench gpu --architecture sd1 --batch 1 --runs 3 --jobs 4 --train-steps 0 \
      --out "$out/gpu-sd1"
    ;;
  suite)
    workers=$("$py" -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
    step 540 suite.log "$py" -m pytest -o addopts=-ra -q -p no:cacheprovider $workers tests
    ;;
  *)
    echo "unknown part '$part': tiny, sd1 or suite" >&2
    exit 2
    ;;
esac
exit $status
