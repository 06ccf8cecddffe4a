#!/usr/bin/env bash
# One device call for GPU decode: wheels + graphc, the decode GPU tests, the decode benchmark,
# then the serving load test on the CUDA backend (greedy, with the raw batched decode beside it).
# Run from a staged copy of the repo with $OUT set; data/gpt2 holds OpenAI's vocab.bpe + encoder.json.
set -o pipefail
REPO=$PWD
export PYTHONUNBUFFERED=1 GRAPHC_KERNEL_CACHE=/tmp/graphc-kernels GRAPHC_TOKENIZER_DIR=$PWD/data/gpt2
# fresh folders of this run's own: a warm machine may hold another checkout's install (pip
# --target keeps what is there) and tests
TESTS=$(mktemp -d /tmp/gtests-XXXX)
source bench/device_env.sh || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
cp -r "$REPO/tests/." $TESTS/ && cd $TESTS
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -p no:cacheprovider -m gpu -q -s -rA test_cuda_decode.py \
  2>&1 | tee $OUT/tests.log | tail -25
timeout ${BENCH_TIMEOUT:-150} python3 "$REPO/bench/gpu_decode.py" ${BENCH_ARGS:-} 2>&1 | tee $OUT/bench.log
[ -n "${SERVE:-1}" ] && timeout ${SERVE_TIMEOUT:-150} python3 "$REPO/bench/serve_load.py" --backend cuda \
  --precision bf16 --concurrency ${CONCURRENCY:-1,32} --raw --level-timeout 60 2>&1 | tee $OUT/serve.log
