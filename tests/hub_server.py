"""A Hugging Face Hub-shaped HTTP server on 127.0.0.1, for tests that must not reach the internet.

It answers what huggingface_hub's client asks when it downloads a file, as the Hub does:

* ``HEAD|GET /{repo}/resolve/{revision}/{file}``: for a git file, 200 with ``ETag`` = the git
  blob sha1, ``Content-Length`` and ``X-Repo-Commit``; for an LFS file, a 302 to a CDN on a
  second port (another origin, so the client does not follow it on HEAD and must not send the
  token there) with ``X-Linked-Etag`` = sha256, ``X-Linked-Size`` and ``X-Repo-Commit``;
  errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``);
* ``GET /cdn/{sha256}`` on the CDN: the LFS body, honouring ``Range: bytes=N-`` (206);
* ``GET /api/agent-harnesses``: the registry huggingface_hub fetches (at most daily) to name
  the caller in its User-Agent; an empty one here.

``faults[filename]`` makes the CDN misbehave for that file: ``"truncate"`` (a consistent but
short body), ``"corrupt"`` (right size, one byte flipped), ``"drop"`` (the first GET announces
the full length and closes halfway). Every request is recorded in ``requests``.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]
    branches: tuple[str, ...] = ("main",)


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    cdn_url: str = ""

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Serve ``files`` as ``repo_id`` at branch ``main``; returns the commit sha."""
        commit = hashlib.sha1(repo_id.encode() + b"".join(files[k] for k in sorted(files))).hexdigest()
        self.repos[repo_id] = Repo(commit, dict(files))
        return commit

    def blob(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for data in repo.files.values():
                if hashlib.sha256(data).hexdigest() == sha256:
                    return data
        return None

    def file_requests(self) -> list[Request]:
        """Requests for repository files (resolve, CDN), without the client's /api/ housekeeping."""
        return [r for r in self.requests if not r.path.startswith("/api/")]


def _handler(hub: FakeHub, role: str):
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a stuck client cannot hold a server thread forever

        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            hub.requests.append(Request(role, self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            if role == "cdn":
                return self._cdn(body)
            if self.path == "/api/agent-harnesses":
                return self._reply(200, b'{"standardEnvVars": [], "harnesses": {}}',
                                   {"Content-Type": "application/json"}, body)
            m = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", self.path)
            if not m:
                return self._error(404, "RepoNotFound")
            repo_id, revision, filename = unquote(m[1]), unquote(m[2]), unquote(m[3])
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound")
            if revision not in repo.branches and revision != repo.commit:
                return self._error(404, "RevisionNotFound")
            data = repo.files.get(filename)
            if data is None:
                return self._error(404, "EntryNotFound", {"X-Repo-Commit": repo.commit})
            if filename.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                return self._reply(302, b"", {
                    "X-Repo-Commit": repo.commit, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_sha1(sha.encode())}"', "Location": f"{hub.cdn_url}/cdn/{sha}",
                }, body)
            self._reply(200, data, {"X-Repo-Commit": repo.commit, "ETag": f'"{git_blob_sha1(data)}"'}, body)

        def _cdn(self, body: bool):
            sha = self.path.removeprefix("/cdn/")
            data = hub.blob(sha)
            if data is None:
                return self._reply(404, b"", {}, body)
            name = next(n for r in hub.repos.values() for n, d in r.files.items() if d is data)
            fault = hub.faults.get(name)
            if fault == "corrupt":
                i = len(data) // 2
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
            start = 0
            rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if rng:
                start = int(rng[1])
            part = data[start:]
            if fault == "truncate":
                part = part[: len(part) // 2]
            headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if rng else {}
            if fault == "drop" and body:
                hub.faults.pop(name)  # drop once: the client's Range retry then succeeds
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                self.wfile.write(part[: len(part) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self._reply(206 if rng else 200, part, headers, body)

        def _error(self, status: int, code: str, extra: dict | None = None):
            self._reply(status, b"", {"X-Error-Code": code, **(extra or {})}, True)

        def _reply(self, status: int, data: bytes, headers: dict, body: bool):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body and data:
                self.wfile.write(data)

    return Handler


@contextlib.contextmanager
def serve_hub():
    """Start a :class:`FakeHub` (Hub + CDN, loopback only) and stop it on exit."""
    hub = FakeHub()
    servers = {role: ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, role)) for role in ("hub", "cdn")}
    threads = []
    for server in servers.values():
        server.daemon_threads = True
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        t.start()
        threads.append(t)
    hub.url = "http://127.0.0.1:%d" % servers["hub"].server_address[1]
    hub.cdn_url = "http://127.0.0.1:%d" % servers["cdn"].server_address[1]
    try:
        yield hub
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()
        for t in threads:
            t.join(timeout=5)
