"""A per-user download cache for small public assets (datasets, tokenizer files).

Assets are fetched once into ``$XDG_CACHE_HOME/graphc`` (default ``~/.cache/graphc``) and
reused, so only the first run needs the network. Downloads are written atomically: an
interrupted download never leaves a partial file that a later run would mistake for the
real one. Offline, the failure is one line that says where to put the file by hand.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from graphc.errors import GraphcError
from graphc.fileio import atomic_write


def cache_dir() -> Path:
    """graphc's cache directory, following the XDG base-directory convention."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphc"


def cached_download(url: str, filename: str, *, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Path of ``filename`` in the cache, downloading it from ``url`` first if absent.

    With ``sha256`` the download is verified before it is put in place (and a cached file
    that fails the check is fetched again), so a captive portal's HTML page or a truncated
    transfer cannot pose as the asset.
    """
    path = cache_dir() / filename
    if path.is_file():
        if sha256 is None or _sha256(path) == sha256:
            return path
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_write(path) as f:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
            if sha256 is not None and h.hexdigest() != sha256:
                # Raised inside the atomic write, so the bad download never reaches ``path``.
                raise _HashMismatch(h.hexdigest())
    except _HashMismatch as e:
        raise GraphcError(url, f"downloaded file has sha256 {e.args[0]}, expected {sha256}; not cached", "download") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise GraphcError(url, f"download failed ({reason}); if offline, place the file at {path} yourself", "download") from None
    return path


class _HashMismatch(Exception):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["cache_dir", "cached_download"]
