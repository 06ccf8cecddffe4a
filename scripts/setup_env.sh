#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install graphc into it.
# Usage: source scripts/setup_env.sh [extras]   e.g. "plot" or "test,plot"
# Sourcing it changes no shell options (no `set -e` leaks into your shell); on failure it
# returns 1 and prints the install log.
_graphc_setup() {
    local ROOT PY extras stamp log
    ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    PY="${PYTHON:-python3}"
    if [ ! -x "$ROOT/.venv/bin/python" ]; then
        "$PY" -m venv "$ROOT/.venv" || { echo "could not create $ROOT/.venv with $PY" >&2; return 1; }
    fi
    # shellcheck disable=SC1091
    . "$ROOT/.venv/bin/activate" || return 1
    extras="${1:-plot}"
    stamp="$ROOT/.venv/.graphc-installed-$(echo "$extras" | tr ',' '-')"
    if [ -z "${1:-}" ]; then
        # no extras asked for: any earlier install that includes plot will do (test.sh's does)
        local s
        for s in "$ROOT"/.venv/.graphc-installed-*plot*; do
            if [ -f "$s" ] && [ ! "$ROOT/pyproject.toml" -nt "$s" ]; then stamp="$s"; break; fi
        done
    fi
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        echo "setting up $ROOT/.venv (graphc[$extras]) ..." >&2
        log="$ROOT/.venv/install.log"
        if ! {
            python -m pip install --disable-pip-version-check --upgrade pip &&
            if [[ "$extras" == *test* ]]; then
                # The CPU build of PyTorch, pinned: an open range would pull the newest CUDA build (GBs).
                python -m pip install --disable-pip-version-check "torch==2.13.0"
            fi &&
            python -m pip install --disable-pip-version-check -e "$ROOT[$extras]"
        } >"$log" 2>&1; then
            cat "$log" >&2
            echo "setup failed; the log is $log" >&2
            return 1
        fi
        touch "$stamp"
    fi
    # Offline assets: use the shared copies beside the checkout when they exist.
    local SHARED="$ROOT/../shared/data"
    if [ -d "$SHARED/tiktoken_cache" ] && [ -z "${TIKTOKEN_CACHE_DIR:-}" ]; then
        export TIKTOKEN_CACHE_DIR="$SHARED/tiktoken_cache"
    fi
    if [ -f "$SHARED/tinyshakespeare.txt" ] && [ -z "${GRAPHC_DATA_DIR:-}" ]; then
        export GRAPHC_DATA_DIR="$SHARED"
    fi
}
_graphc_setup "$@"
_graphc_status=$?
unset -f _graphc_setup
# `return` when sourced (the usual way), `exit` when run as a script
return "$_graphc_status" 2>/dev/null || exit "$_graphc_status"
