#!/usr/bin/env bash
# Run graphc's test suite (default: everything but slow and GPU-run tests; TensorRT engines
# are built for real: the [tensorrt] extra installs TensorRT for RTX, which needs no GPU).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" "test,plot,tensorrt,gpu"   # gpu: cuBLASLt/cuDNN bindings, whose plan tests need no GPU
export GRAPHC_REQUIRE_TENSORRT=1   # a missing TensorRT builder fails the engine tests instead of skipping them
cd "$ROOT"
exec python -m pytest -q -rs "$@"
