#!/usr/bin/env bash
# One device call on nvidia-h200-x2: install the carried wheels (nccl4py, nvmath, cuDNN frontend)
# and graphc, print the topology, run the multigpu tests, then bench/gpu_multi.py.
# Run from a staged copy of the repo with data/ (tiny_shakespeare_{train,val}.bin), with $OUT set.
set -o pipefail
REPO=$PWD
export PYTHONUNBUFFERED=1 GRAPHC_GPU_DATA=$PWD/data GRAPHC_KERNEL_CACHE=/tmp/graphc-kernels
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source bench/device_env.sh || exit 1
nvidia-smi topo -m 2>&1 | head -5 | tee $OUT/topo.log
python3 -c "import nccl.core, nccl.bindings.nccl as b; print('nccl4py', nccl.core.__version__, 'NCCL', b.get_version())" 2>&1 | tee -a $OUT/topo.log
which mpirun | tee -a $OUT/topo.log
cd /tmp && rm -rf /tmp/gtests && cp -r "$REPO/tests" /tmp/gtests && cp "$REPO/pyproject.toml" /tmp/
if [ -z "${SKIP_BENCH:-}" ] && [ -n "${BENCH_FIRST:-}" ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 "$REPO/bench/gpu_multi.py" ${BENCH_ARGS:-} 2>&1 | tee $OUT/multi_bench.log
fi
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -p no:cacheprovider -m multigpu -q -s -rA ${TESTS:-gtests/test_multigpu.py} 2>&1 | tee $OUT/multigpu_tests.log
fi
if [ -z "${SKIP_BENCH:-}" ] && [ -z "${BENCH_FIRST:-}" ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 "$REPO/bench/gpu_multi.py" ${BENCH_ARGS:-} 2>&1 | tee $OUT/multi_bench.log
fi
