#!/usr/bin/env bash
# One device call: install the carried wheels and graphc, run the GPU tests, then the benchmark.
# Run from a staged copy of the repo (see README "Testing": the GPU tests), with $OUT set.
set -o pipefail
REPO=$PWD
export PYTHONUNBUFFERED=1 GRAPHC_GPU_DATA=$PWD/data GRAPHC_KERNEL_CACHE=/tmp/graphc-kernels
source bench/device_env.sh || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
cd /tmp && rm -rf /tmp/gtests && cp -r "$REPO/tests" /tmp/gtests && cp "$REPO/pyproject.toml" /tmp/ && cd /tmp
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -p no:cacheprovider -m gpu -q -s -rA gtests/test_cuda_gpu.py ${TESTS:-} 2>&1 | tee $OUT/tests.log
for prec in fp32 bf16; do
  timeout 60 python3 -m graphc train --model L4H4C128 --train-data "$REPO/data/tiny_shakespeare_train.bin" \
    --val-data "$REPO/data/tiny_shakespeare_val.bin" -b 4 -t 64 --steps 20 --val-every 10 --backend cuda \
    --precision $prec --out /tmp/run-$prec 2>&1 | tee $OUT/cli-$prec.log | grep -E "val loss|step (0|19):|error"
done
timeout ${BENCH_TIMEOUT:-240} python3 "$REPO/bench/gpu_train.py" ${BENCH_ARGS:-} 2>&1 | tee $OUT/bench.log
