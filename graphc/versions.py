"""The runtime versions graphc needs, checked before a command runs.

graphc builds opset-24 graphs: onnxruntime loads them from 1.24 on, and generation's
in-place KV cache (``TensorScatter``) runs from 1.25; onnx's opset-24 schemas, checker and
shape inference come with 1.19. An older install fails deep inside a library with a
traceback; this check names the package and the version instead. ``pyproject.toml``
declares the same minimums.
"""

from __future__ import annotations

import re
from importlib import metadata

from graphc.errors import GraphcError

MINIMUM = {
    "onnx": (1, 19),          # opset 24 schemas, checker, shape inference
    "onnxruntime": (1, 25),   # opset 24 models (1.24), TensorScatter for the KV cache (1.25)
}


def parse(version: str) -> tuple[int, ...]:
    """``"1.25.0rc1"`` -> ``(1, 25, 0)``: the leading numeric parts."""
    parts = []
    for piece in version.split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):
            break
    return tuple(parts)


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        # onnxruntime ships under other distribution names too (onnxruntime-gpu, -openvino ...)
        for dist in metadata.distributions():
            name = (dist.metadata["Name"] or "").lower()
            if name.startswith(package + "-") or name.startswith(package + "_"):
                return dist.version
        return None


def check_versions(minimum: dict[str, tuple[int, ...]] = MINIMUM) -> None:
    """Raise a one-line error naming the first package that is missing or too old."""
    for package, need in minimum.items():
        have = installed(package)
        wanted = ".".join(map(str, need))
        if have is None:
            raise GraphcError(package, f"not installed; graphc needs {package} >= {wanted}", "version")
        if parse(have) < need:
            raise GraphcError(package, f"version {have} is too old; graphc needs {package} >= {wanted} "
                              f"(pip install -U '{package}>={wanted}')", "version")
