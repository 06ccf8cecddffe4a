"""Backends: a registry from name to a lazily imported :class:`~graphc.backends.base.Backend`.

Backends whose libraries may be missing (TensorRT, CUDA) are imported only when asked
for, so ``graphc`` works on a CPU-only machine with just onnxruntime.
"""

from __future__ import annotations

import importlib

from graphc.errors import GraphcError

REGISTRY = {
    "onnxruntime": "graphc.backends.onnxruntime:OnnxRuntimeBackend",
    "reference": "graphc.backends.reference:ReferenceBackend",   # float64 numpy interpreter
    "tensorrt": "graphc.backends.tensorrt:TensorRTBackend",
    "cuda": "graphc.backends.cuda:CudaBackend",
}


def get_backend_class(name: str):
    """The backend class for ``name`` (importable, not necessarily usable here)."""
    if name not in REGISTRY:
        raise GraphcError(name, f"unknown backend (known: {', '.join(REGISTRY)})", "--backend")
    module, cls = REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise GraphcError(name, f"backend is not available here: {e}", "--backend") from None


def get_backend(name: str):
    """The backend class for ``name``, or a one-line error saying why it cannot be used here."""
    backend = get_backend_class(name)
    ok, why = backend.available()
    if not ok:
        raise GraphcError(name, f"backend is not available here: {why}", "--backend")
    return backend
