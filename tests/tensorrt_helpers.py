"""Shared by the TensorRT tests: is a TensorRT builder installed, and must it be?

CI (``scripts/test.sh``) installs the ``[tensorrt]`` extra and sets
``GRAPHC_REQUIRE_TENSORRT=1``: there a missing builder fails the engine tests instead of
skipping them, so the default run really builds engines.
"""

from __future__ import annotations

import os

import pytest


def require_builder():
    from graphc.backends.tensorrt.flavor import installed, load_flavor

    if not installed():
        if os.environ.get("GRAPHC_REQUIRE_TENSORRT") == "1":
            pytest.fail("GRAPHC_REQUIRE_TENSORRT=1 but no TensorRT builder is installed (pip install -e .[tensorrt])")
        pytest.skip("no TensorRT builder installed (pip install -e .[tensorrt])")
    return load_flavor("auto")
