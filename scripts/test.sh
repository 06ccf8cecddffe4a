#!/usr/bin/env bash
# Run graphc's test suite (default: everything but slow/GPU/TensorRT tests).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" "test,plot"
cd "$ROOT"
exec python -m pytest -q -rs "$@"
