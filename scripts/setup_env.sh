#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install graphc into it.
# Usage: source scripts/setup_env.sh [extras]   e.g. "plot" or "test,plot"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    "$PY" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
extras="${1:-plot}"
stamp="$ROOT/.venv/.graphc-installed-$(echo "$extras" | tr ',' '-')"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "setting up $ROOT/.venv (graphc[$extras]) ..." >&2
    log="$ROOT/.venv/install.log"
    {
        python -m pip install --disable-pip-version-check --upgrade pip
        if [[ "$extras" == *test* ]]; then
            # The CPU build of PyTorch, pinned: an open range would pull the newest CUDA build (GBs).
            python -m pip install --disable-pip-version-check "torch==2.13.0"
        fi
        python -m pip install --disable-pip-version-check -e "$ROOT[$extras]"
    } >"$log" 2>&1 || { cat "$log" >&2; echo "setup failed; the log is $log" >&2; exit 1; }
    touch "$stamp"
fi
# Offline assets: use the shared copies beside the checkout when they exist.
SHARED="$ROOT/../shared/data"
if [ -d "$SHARED/tiktoken_cache" ] && [ -z "${TIKTOKEN_CACHE_DIR:-}" ]; then
    export TIKTOKEN_CACHE_DIR="$SHARED/tiktoken_cache"
fi
if [ -f "$SHARED/tinyshakespeare.txt" ] && [ -z "${GRAPHC_DATA_DIR:-}" ]; then
    export GRAPHC_DATA_DIR="$SHARED"
fi
