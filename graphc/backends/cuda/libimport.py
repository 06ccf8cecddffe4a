"""Importing the optional GPU libraries with one clear line when one is missing.

The CUDA backend's library wrappers (``gemm``: nvmath-python's cuBLASLt bindings,
``attention``: cudnn-frontend) import their library only when a plan is built, so that
``graphc`` imports, and its plans' layout math is testable, on a CPU-only machine.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from graphc.errors import GraphcError


def import_gpu_library(module: str, distribution: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or a one-line :class:`GraphcError` saying what
    to install (``pip install 'graphc[gpu]'`` brings every GPU library)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise GraphcError(
            "cuda backend", f"{distribution} is not installed (pip install 'graphc[gpu]'): {e}", purpose
        ) from None
