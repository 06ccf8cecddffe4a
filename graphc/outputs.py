"""Output locations, checked before any work starts.

A command that would train for an hour and then fail to write its checkpoint has lost the
hour. So every command checks each place it will write (``--out``, ``--weights-only``,
``--dump``, ``$GRAPHC_DUMP_DIR``) first: the path must not sit under a regular file, its
nearest existing folder must accept a new file (a probe file is created and removed, which
finds read-only file systems and permissions even for root), and where the size of the
output is known, the file system must have room for it.

Write-time failures that no check can foresee (the disk fills up meanwhile) surface as an
``OSError``; the CLI prints those as one line too (:func:`graphc.cli.main.main`), and the
atomic writers of :mod:`graphc.fileio` leave the previous file intact.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from graphc.errors import GraphcError


def _nearest_existing(path: Path, flag: str) -> Path:
    """The closest ancestor of ``path`` that exists; a regular file on the way is an error."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                if parent == path:
                    return parent
                raise GraphcError(path, f"cannot be created: {parent} is a file, not a directory", flag)
            return parent
        if parent.is_symlink():
            raise GraphcError(path, f"cannot be created: {parent} is a broken symbolic link", flag)
    return Path(".")


def _probe(folder: Path, target: Path, flag: str) -> None:
    """Create and remove a file in ``folder``: the one test that is true for root and read-only mounts."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".graphc-probe-", dir=folder)
    except OSError as e:
        raise GraphcError(target, f"cannot write in {folder}: {e.strerror}", flag) from None
    os.close(fd)
    os.unlink(tmp)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _room(folder: Path, target: Path, needed: int | None, flag: str) -> None:
    if not needed:
        return
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise GraphcError(target, f"needs about {human_bytes(needed)} but {folder} has {human_bytes(free)} free",
                          flag)


def check_output_file(path: str | os.PathLike, flag: str, needed: int | None = None) -> Path:
    """``path`` can be written as a file (created with its folders, or replaced)."""
    path = Path(path)
    if path.is_dir():
        raise GraphcError(path, "is a directory; expected a file name", flag)
    if path.name in ("", ".", ".."):
        raise GraphcError(path, "is not a file name", flag)
    folder = _nearest_existing(path.parent, flag)
    if not folder.is_dir():
        raise GraphcError(path, f"cannot be created: {folder} is a file, not a directory", flag)
    _probe(folder, path, flag)
    _room(folder, path, needed, flag)
    return path


def check_output_dir(path: str | os.PathLike, flag: str, needed: int | None = None) -> Path:
    """``path`` is (or can be created as) a folder that accepts new files."""
    path = Path(path)
    folder = _nearest_existing(path, flag)
    if not folder.is_dir():
        raise GraphcError(path, "exists and is not a directory", flag)
    _probe(folder, path, flag)
    _room(folder, path, needed, flag)
    return path


def os_error_line(e: OSError) -> GraphcError:
    """An ``OSError`` met while reading or writing, as a one-line user error."""
    where = e.filename if e.filename is not None else None
    reason = e.strerror or str(e) or type(e).__name__
    hint = {errno.ENOSPC: "; the previous outputs are kept", errno.EDQUOT: "; the previous outputs are kept"}
    return GraphcError(where, f"{reason}{hint.get(e.errno, '')}")
