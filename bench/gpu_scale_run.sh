#!/usr/bin/env bash
# One device call for the trainer-at-scale features (issue 9): the gpu tests of
# tests/test_cuda_scale_gpu.py, then the CLI: two identical
# runs with --total-batch-size and --recompute, and validate --backend cuda. From a staged
# copy of the repo (README "Testing"), with $OUT set.
set -o pipefail
REPO=$PWD
export PYTHONUNBUFFERED=1 GRAPHC_GPU_DATA=$PWD/data GRAPHC_KERNEL_CACHE=/tmp/graphc-kernels
source bench/device_env.sh || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
rm -rf /tmp/gtests && cp -r "$REPO/tests" /tmp/gtests && cp "$REPO/pyproject.toml" /tmp/ && cd /tmp
timeout ${TEST_TIMEOUT:-330} python3 -m pytest -p no:cacheprovider -m gpu -q -s -rA gtests/test_cuda_scale_gpu.py 2>&1 | tee $OUT/tests.log
for run in a b; do
  timeout 60 python3 -m graphc train --model L4H4C128 --train-data "$REPO/data/tiny_shakespeare_train.bin" \
    --val-data "$REPO/data/tiny_shakespeare_val.bin" -b 4 -t 64 --total-batch-size 1024 --recompute --steps 12 \
    --val-every 6 --grad-clip 1 --backend cuda --precision bf16 --out /tmp/run-$run > $OUT/cli-$run.log 2> $OUT/cli-$run.err
  echo "run $run: exit $?"; grep -E "val loss|step (0|11):|error" $OUT/cli-$run.log; cat $OUT/cli-$run.err | head -5
done
diff <(sed 's/ (took.*//' $OUT/cli-a.log) <(sed 's/ (took.*//' $OUT/cli-b.log) && echo "two runs: identical losses"
cmp /tmp/run-a/model.bin /tmp/run-b/model.bin && echo "two runs: identical model.bin"
python3 -c "
from graphc.models.llmc import load_llmc
from graphc.runtime.evaluate import mean_loss
from graphc.backends import get_backend
from graphc.data.shards import TokenLoader
p = load_llmc('/tmp/run-a/model.bin'); b = get_backend('onnxruntime')()
ev = b.evaluator(b.upload_params(p), 4, 64)
print('checkpoint on onnxruntime: val loss %.6f' % mean_loss(ev, TokenLoader('$REPO/data/tiny_shakespeare_val.bin', 4, 64, vocab_size=50257), 5))
" 2>&1 | tail -2
timeout 60 python3 -m graphc train --model L4H4C128 --train-data "$REPO/data/tiny_shakespeare_train.bin" \
  -b 4 -t 64 --steps 1 --backend cuda --total-batch-size 100 2>&1 | tail -1
