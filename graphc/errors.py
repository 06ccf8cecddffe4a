"""User-facing errors.

Every problem caused by the user's input (a file with the wrong magic, a truncated shard, a
token id outside the vocabulary, a sequence longer than the model allows) is raised as a
:class:`GraphcError`. The CLI prints it as one line, ``error: <where>: <what>``, and exits
with status 2, without a traceback. Bugs in graphc itself stay ordinary exceptions.
"""

from __future__ import annotations

import os


class GraphcError(Exception):
    """An error in the user's input, reported as one line naming the file and the field."""

    def __init__(self, where: str | os.PathLike | None, message: str, field: str | None = None):
        self.where = os.fspath(where) if where is not None else None
        self.field = field
        self.message = message
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [p for p in (self.where, self.field) if p]
        prefix = ": ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


def require(condition: bool, where, message: str, field: str | None = None) -> None:
    """Raise :class:`GraphcError` unless ``condition`` holds."""
    if not condition:
        raise GraphcError(where, message, field)
