#!/usr/bin/env bash
# Sourced by every device-run script (bench/gpu_*run.sh): installs the carried wheels (.whl/)
# and this checkout into a *fresh* folder and puts it on PYTHONPATH, with a fresh kernel cache.
# Fresh, because a warm device machine can still hold another run's /tmp/site, and pip
# --target does not replace what is there: a reused folder silently runs stale code.
SITE=$(mktemp -d /tmp/site-XXXX)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || return 1
python3 -m pip install -q --no-deps --no-index --no-build-isolation --target "$SITE" . || return 1
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 GRAPHC_KERNEL_CACHE=$(mktemp -d /tmp/graphc-kernels-XXXX)
