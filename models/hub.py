"""Pretrained GPT-2 from the Hugging Face Hub, fetched into (and read from) the Hub's own cache.

``--model gpt2`` means OpenAI's weights, as it does for transformers and llm.c. A name
(:data:`PRETRAINED`), a Hub id (``openai-community/gpt2``) or ``hf:ORG/NAME[@REVISION]`` is
resolved to a folder holding ``config.json`` + ``model.safetensors`` (safetensors only: a
pickle is code, not weights):

* **cache first, no request**: the Hugging Face cache (``$HF_HUB_CACHE``, default
  ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``) is read as huggingface_hub lays it out
  (``models--ORG--NAME/refs/REV`` -> ``snapshots/COMMIT/FILE`` -> ``blobs/ETAG``), so files
  that transformers or ``hf download`` fetched are used as they are;
* **else download** through huggingface_hub's client (``HF_ENDPOINT``, ``HF_TOKEN``,
  ``HF_HUB_OFFLINE`` and its progress bar): a HEAD on ``/{repo}/resolve/{rev}/{file}`` gives
  the commit (``X-Repo-Commit``), the content hash (``X-Linked-Etag`` = sha256 for LFS files,
  ``ETag`` = git blob sha1 otherwise) and the size (``X-Linked-Size``); the body goes to
  ``blobs/ETAG.incomplete``, which a later run resumes with an HTTP Range request;
* **verified before it is cached**: size and hash must match the Hub's metadata, and
  ``config.json`` must describe GPT-2, before anything is renamed into ``blobs/`` and linked
  from ``snapshots/``; ``refs/REV`` is written last. A failed or refused download leaves no
  entry behind (a truncated one keeps only its ``.incomplete`` part, to resume from).

huggingface_hub's ``hf_hub_download`` is not used for the body because it moves a file into
the cache before a caller could check its hash, and it drops partial downloads on failure.
A name that means "pretrained" never falls back to random weights: failures are one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

from graphc.errors import GraphcError
from graphc.models.hf import read_gpt2_config

PRETRAINED: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
"""Names that mean OpenAI's pretrained GPT-2, and their Hub repositories."""

LEGACY_IDS = {repo: name for name, repo in PRETRAINED.items()}
"""transformers' ``from_pretrained("gpt2")`` caches under the pre-2024 id ``gpt2``: also looked up."""

CONFIG, WEIGHTS = "config.json", "model.safetensors"
FILES = (CONFIG, WEIGHTS)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = {".bin", ".safetensors", ".json", ".onnx", ".pt", ".pth", ".txt"}
UNREACHABLE = ("not in the local cache and the Hub is unreachable (HF_HUB_OFFLINE=1 or no network); "
               "pass a local model.safetensors folder or an llm.c .bin")


@dataclasses.dataclass(frozen=True)
class HubRef:
    """A model on the Hub: what the user typed (for messages), the repo and the revision."""

    spec: str
    repo_id: str
    revision: str = "main"

    @property
    def cache_ids(self) -> tuple[str, ...]:
        legacy = LEGACY_IDS.get(self.repo_id)
        return (self.repo_id, legacy) if legacy else (self.repo_id,)


def parse_hub_spec(spec: str) -> HubRef | None:
    """The Hub model ``spec`` names, or None when it names none (a file, a random-init size).

    ``gpt2``..``gpt2-xl``; ``hf:ORG/NAME[@REV]`` (any repo); a bare ``ORG/NAME[@REV]`` unless it
    looks like a file path (one slash, no file suffix such as ``.bin``).
    """
    text = str(spec)
    if text.lower() in PRETRAINED:
        return HubRef(text, PRETRAINED[text.lower()])
    explicit = text.startswith("hf:")
    repo, _, revision = text.removeprefix("hf:").partition("@")
    if not _REPO_ID.match(repo) or (revision == "" and "@" in text):
        if explicit:
            raise GraphcError(text, "expected hf:ORG/NAME or hf:ORG/NAME@REVISION", "--model")
        return None
    if not explicit and ("/" not in repo or Path(repo).suffix.lower() in _FILE_SUFFIXES):
        return None
    return HubRef(text, PRETRAINED.get(repo.lower(), repo), revision or "main")


# ----------------------------------------------------------------------------- the cache
def cache_root() -> Path:
    """huggingface_hub's cache folder (``HF_HUB_CACHE`` / ``HF_HOME``), read when called."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def cached_snapshot(ref: HubRef, cache: Path | None = None) -> Path | None:
    """The cached snapshot folder holding both :data:`FILES` at ``ref.revision``, or None (no request)."""
    from huggingface_hub import try_to_load_from_cache

    cache = cache or cache_root()
    for repo_id in ref.cache_ids:
        found = [try_to_load_from_cache(repo_id, name, cache_dir=cache, revision=ref.revision) for name in FILES]
        if all(isinstance(p, str) for p in found):
            return Path(found[0]).parent
    return None


def _storage(cache: Path, repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=repo_id, repo_type="model")


# ----------------------------------------------------------------------------- download
@dataclasses.dataclass
class _Remote:
    """One file as the Hub describes it (HEAD on resolve), and where its body goes."""

    storage: Path
    name: str
    commit: str
    etag: str
    size: int | None
    url: str

    @property
    def blob(self) -> Path:
        return self.storage / "blobs" / self.etag

    @property
    def partial(self) -> Path:
        return self.blob.with_name(self.blob.name + ".incomplete")


def fetch(ref: HubRef, cache: Path | None = None) -> Path:
    """The snapshot folder for ``ref``: from the cache, else downloaded, verified and cached."""
    from huggingface_hub import constants

    cache = cache or cache_root()
    found = cached_snapshot(ref, cache)
    if found is not None:
        return found
    if constants.is_offline_mode():
        raise GraphcError(ref.spec, UNREACHABLE, "--model")
    storage = _storage(cache, ref.repo_id)
    config = _head(ref, CONFIG, ref.revision, storage)
    _download(ref, config)
    try:  # refuse a non-GPT-2 repo before fetching its weights
        read_gpt2_config(config.blob if config.blob.exists() else config.partial)
    except GraphcError as e:
        config.partial.unlink(missing_ok=True)
        raise GraphcError(ref.spec, f"{CONFIG}: {e.message}", "--model") from None
    weights = _head(ref, WEIGHTS, config.commit, storage)  # pinned to the config's commit
    _download(ref, weights)
    for remote in (config, weights):
        _commit(remote)
    if ref.revision != config.commit:
        from graphc.fileio import atomic_write

        with atomic_write(storage / "refs" / ref.revision, "w") as f:
            f.write(config.commit)
    return storage / "snapshots" / config.commit


def _head(ref: HubRef, name: str, revision: str, storage: Path) -> _Remote:
    """The Hub's metadata for one file, or a one-line error saying what went wrong."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub import errors as hub

    url = hf_hub_url(ref.repo_id, name, revision=revision)
    where = f"{ref.repo_id}@{ref.revision}"
    try:
        meta = get_hf_file_metadata(url)
    except (httpx2.TransportError, hub.OfflineModeIsEnabled):
        raise GraphcError(ref.spec, UNREACHABLE, "--model") from None
    except hub.GatedRepoError:
        raise GraphcError(ref.spec, f"{ref.repo_id} is gated: accept its terms on the Hub and set HF_TOKEN",
                          "--model") from None
    except hub.RepositoryNotFoundError:
        raise GraphcError(ref.spec, f"no model {ref.repo_id} on the Hub (a private one needs HF_TOKEN)",
                          "--model") from None
    except hub.RevisionNotFoundError:
        raise GraphcError(ref.spec, f"{ref.repo_id} has no revision {ref.revision!r}", "--model") from None
    except hub.RemoteEntryNotFoundError:
        hint = (" (graphc reads safetensors only; transformers' save_pretrained writes it)" if name == WEIGHTS
                else " (not a transformers model repository)")
        raise GraphcError(ref.spec, f"{where} has no {name}{hint}", "--model") from None
    except hub.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise GraphcError(ref.spec, f"the Hub answered HTTP {status} for {name} of {where}", "--model") from None
    if not meta.commit_hash or not meta.etag:
        raise GraphcError(ref.spec, f"{url} answered without X-Repo-Commit/ETag: is HF_ENDPOINT a Hugging Face Hub?",
                          "--model")
    return _Remote(storage, name, meta.commit_hash, meta.etag, meta.size, meta.location)


def _download(ref: HubRef, remote: _Remote) -> None:
    """Bring ``remote`` to ``remote.partial`` (resuming what is there) and verify it; no-op if the blob exists."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    if remote.blob.exists():
        return
    remote.blob.parent.mkdir(parents=True, exist_ok=True)
    lock = remote.storage.parent / ".locks" / remote.storage.name  # where huggingface_hub locks the same blob
    lock.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers()
    if urlparse(remote.url).netloc != urlparse(constants.ENDPOINT).netloc:
        headers.pop("authorization", None)  # a signed CDN url: the token stays on the Hub
    with WeakFileLock(lock / f"{remote.etag}.lock"):
        if remote.blob.exists():
            return
        have = remote.partial.stat().st_size if remote.partial.exists() else 0
        if remote.size is not None and have > remote.size:
            remote.partial.unlink()
            have = 0
        size = f"{remote.size / 1e6:.1f} MB" if remote.size is not None else "size unknown"
        resume = f", resuming at {have / 1e6:.1f} MB" if have else ""
        print(f"downloading {remote.name} of {ref.repo_id}@{ref.revision} ({size}{resume}) into {remote.storage}",
              file=sys.stderr)
        try:
            with open(remote.partial, "ab") as f:
                http_get(remote.url, f, resume_size=have, headers=headers, expected_size=remote.size,
                         displayed_filename=remote.name)
        except (httpx2.TransportError, OSError) as e:
            got = remote.partial.stat().st_size if remote.partial.exists() else 0
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GraphcError(ref.spec, f"download of {remote.name} stopped at {got} of {remote.size} bytes "
                              f"({reason}); nothing was cached, run again to resume", "--model") from None
        problem = _verify(remote)
        if problem:
            remote.partial.unlink()
            raise GraphcError(ref.spec, f"downloaded {remote.name} is corrupt ({problem}); it was deleted, "
                              "not cached", "--model")


def _verify(remote: _Remote) -> str | None:
    """Why ``remote.partial`` is not the file the Hub described (size, then content hash), or None."""
    size = remote.partial.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"{size} bytes, the Hub says {remote.size}"
    if re.fullmatch(r"[0-9a-f]{64}", remote.etag):  # an LFS file: the etag is its sha256
        h = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", remote.etag):  # a git file: the etag is its git blob sha1
        h = hashlib.sha1(b"blob %d\0" % size)
    else:
        return None  # no content hash offered; the size was checked
    with open(remote.partial, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return None if h.hexdigest() == remote.etag else f"hash {h.hexdigest()}, the Hub says {remote.etag}"


def _commit(remote: _Remote) -> None:
    """Rename the verified part into ``blobs/`` and link it from ``snapshots/COMMIT/`` (both atomic)."""
    if not remote.blob.exists():
        os.replace(remote.partial, remote.blob)
    pointer = remote.storage / "snapshots" / remote.commit / remote.name
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(remote.blob, pointer.parent), tmp)
    os.replace(tmp, pointer)


__all__ = ["PRETRAINED", "HubRef", "cache_root", "cached_snapshot", "fetch", "parse_hub_spec"]
