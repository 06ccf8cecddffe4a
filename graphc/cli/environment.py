"""Environment variables graphc reads, checked before a command runs (a registry: one row each).

A bad value (``GRAPHC_THREADS=abc``) is one line naming the variable, not a traceback from
deep inside the backend that reads it.
"""

from __future__ import annotations

import os
from typing import Callable

from graphc.errors import GraphcError


def _threads(name: str, value: str) -> None:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise GraphcError(f"${name}", f"must be a whole number of threads >= 0 (0 = all cores), got {value!r}",
                          "environment")


def _dump_dir(name: str, value: str) -> None:
    from graphc.outputs import check_output_dir

    if value:
        check_output_dir(value, f"${name}")


ENVIRONMENT: dict[str, Callable[[str, str], None]] = {
    "GRAPHC_THREADS": _threads,
    "GRAPHC_DUMP_DIR": _dump_dir,
}


def check_environment(environ=os.environ) -> None:
    for name, check in ENVIRONMENT.items():
        if name in environ:
            check(name, environ[name])
