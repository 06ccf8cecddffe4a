"""Small file helpers shared by every reader and writer.

Outputs are written atomically (a temporary file in the same directory, fsynced, then
``os.replace``) so that an interrupted or failed write never leaves a half-written
checkpoint or clobbers a good one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from graphc.errors import GraphcError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get normal permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = os.fspath(path)  # a failed write names the file it was for
        raise


def staging_dir(parent: str | os.PathLike, name: str) -> Path:
    """A fresh hidden folder in ``parent`` to build the output ``name`` in, renamed into place
    when complete (:func:`remove_leftovers` finds it if killed). Its mode is what ``mkdir`` would give:
    ``mkdtemp``'s 0700 would reach the renamed result, and a server running as another user
    (Triton's) could not read it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_exact(f: BinaryIO, nbytes: int, where, field: str) -> bytes:
    """Read exactly ``nbytes`` or raise a clear 'truncated' error naming the field."""
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise GraphcError(where, f"file is truncated: expected {nbytes} bytes, found {len(data)}", field)
    return data


def read_array(f: BinaryIO, dtype, count: int, where, field: str) -> np.ndarray:
    """Read ``count`` items of ``dtype`` (little-endian) or raise a 'truncated' error."""
    dtype = np.dtype(dtype)
    return np.frombuffer(read_exact(f, dtype.itemsize * count, where, field), dtype=dtype, count=count).copy()


def open_input(path: str | os.PathLike, what: str) -> BinaryIO:
    """Open a file for reading, turning a missing file into a one-line error."""
    path = Path(path)
    if not path.exists():
        raise GraphcError(path, "not found", what)
    if path.is_dir():
        raise GraphcError(path, "is a directory, expected a file", what)
    return open(path, "rb")


TEMPORARY_GLOB = ".*.tmp"
"""What :func:`atomic_write` and the checkpoint writer leave behind when they are killed."""


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of killed writes in ``folder`` and its checkpoint folders.

    A SIGKILL during a write leaves ``.NAME.XXXX.tmp`` (never a half-written NAME); the next
    run in the same folder removes them so they do not pile up.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for sub in [folder, *sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        for leftover in sub.glob(TEMPORARY_GLOB):
            removed.append(_remove(leftover))
    return removed


def remove_leftovers_of(*paths: str | os.PathLike) -> list[Path]:
    """Remove what killed writes of exactly these outputs left beside them (``.NAME.XXXX.tmp``).

    Unlike :func:`remove_leftovers` this touches only names graphc's writers give these
    outputs, so it is safe in any folder (a home directory, say)."""
    import glob

    removed = []
    for path in map(Path, paths):
        if not path.parent.is_dir():
            continue
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            removed.append(_remove(leftover))
    return removed


def _remove(leftover: Path) -> Path:
    """Delete a leftover temporary (a file, or a checkpoint folder); returns it."""
    import shutil

    if leftover.is_dir() and not leftover.is_symlink():
        shutil.rmtree(leftover, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    return leftover
