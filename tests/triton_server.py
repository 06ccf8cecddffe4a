"""The real NVIDIA Triton server, as ``nvidia-pytriton`` ships it, for tests on loopback.

pytriton's wheel bundles ``tritonserver`` (``pytriton/tritonserver/bin``), the Python backend
(``backends/python/libtriton_python.so`` + ``triton_python_backend_utils.py``) and one backend
stub per Python version (``python_backend_stubs/3.X/triton_python_backend_stub``); pytriton
itself copies the stub of its own Python into the backend folder and puts its environment's
``bin`` first on ``PATH`` before it starts the server. :class:`TritonServer` does the same
with a folder of links. The stub embeds CPython: it links ``libpython3.X.so`` (found through
``LD_LIBRARY_PATH``: the environment's base interpreter's ``LIBDIR``) and takes ``sys.prefix``
from the first ``python3`` on ``PATH``, a venv included (its ``pyvenv.cfg``), so the model
imports what that venv has. ``PYTHONPATH`` is *not* honoured there (the stub initialises an
isolated interpreter).

pytriton pins ``numpy<2`` (and tritonclient), which the test environment does not, so the
server and the client run from their own virtual environment: :func:`triton_python` creates
it once under ``$GRAPHC_TEST_ENVS`` (default ``~/.cache/graphc/test-envs/triton``) with
pytriton and graphc's own dependencies, and :func:`install_graphc` installs this checkout
into it (a wheel, no dependencies) on every session, so the server runs the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENVS = Path(os.environ.get("GRAPHC_TEST_ENVS", Path.home() / ".cache" / "graphc" / "test-envs"))
PYTRITON = "nvidia-pytriton==0.7.0"
VENV_PACK = "venv-pack==0.2.0"   # packs the environment for EXECUTION_ENV_PATH


def requirements() -> list[str]:
    """pytriton (with tritonclient), venv-pack and graphc's runtime dependencies (from pyproject.toml)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [PYTRITON, VENV_PACK, *project["dependencies"]]


def pack_environment(python: Path, archive: Path) -> Path:
    """The environment (graphc installed) as a relocatable venv-pack archive, for ``EXECUTION_ENV_PATH``."""
    done = subprocess.run([str(python), "-m", "venv_pack", "-p", str(python.parent.parent), "-o", str(archive), "-q"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        pytest.fail(f"venv-pack failed:\n{done.stderr[-3000:]}")
    return archive


def triton_python() -> Path:
    """The interpreter of the Triton environment, created on first use (a few minutes) and reused."""
    reqs = requirements()
    folder = ENVS / "triton"
    python = folder / "bin" / "python"
    stamp = folder / f".installed-{hashlib.sha256(json.dumps(reqs).encode()).hexdigest()[:12]}"
    if not stamp.exists():
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode:
            pytest.fail(f"could not create the Triton environment {folder}:\n{done.stderr[-3000:]}")
        stamp.touch()
    return python


def install_graphc(python: Path, tmp: Path) -> None:
    """This checkout, as a wheel, into the environment (no dependencies: they are there)."""
    wheels = tmp / "wheel"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)]
    install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
               "--force-reinstall"]
    for cmd in (build, lambda: install + [str(w) for w in wheels.glob("graphc-*.whl")]):
        done = subprocess.run(cmd() if callable(cmd) else cmd, capture_output=True, text=True, timeout=600)
        if done.returncode:
            pytest.fail(f"installing graphc into the Triton environment failed:\n{done.stderr[-3000:]}")


def env_info(python: Path) -> dict:
    """Where pytriton's server lives in the environment, and the interpreter's version and LIBDIR."""
    code = ("import json, pathlib, sys, sysconfig, pytriton; "
            "print(json.dumps({'pytriton': str(pathlib.Path(pytriton.__file__).parent), "
            "'version': f'{sys.version_info[0]}.{sys.version_info[1]}', "
            "'libdir': sysconfig.get_config_var('LIBDIR')}))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """``tritonserver --model-repository REPO`` on 127.0.0.1 (HTTP, gRPC, metrics on free ports),
    loading the named models only; :meth:`stop` ends it (SIGTERM, then SIGKILL).

    The environment's ``bin`` goes first on ``PATH`` (pytriton's way), unless ``path`` is given:
    a model with a packed environment gets a ``PATH`` with no graphc on it."""

    def __init__(self, python: Path, repo: Path, models: list[str], workdir: Path, path: str | None = None):
        info = env_info(python)
        dist = Path(info["pytriton"]) / "tritonserver"
        backend = workdir / "backends" / "python"
        backend.mkdir(parents=True)
        for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
            (backend / f).symlink_to(dist / "backends" / "python" / f)
        (backend / "triton_python_backend_stub").symlink_to(
            dist / "python_backend_stubs" / info["version"] / "triton_python_backend_stub")
        self.http, self.grpc, metrics = free_port(), free_port(), free_port()
        env = dict(os.environ, PATH=path or f"{python.parent}:{os.environ['PATH']}",
                   LD_LIBRARY_PATH=":".join(filter(None, [info["libdir"], os.environ.get("LD_LIBRARY_PATH")])))
        for name in ("PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(name, None)
        self.log_path = workdir / "tritonserver.log"
        self.log = open(self.log_path, "wb")
        cmd = [str(dist / "bin" / "tritonserver"), "--model-repository", str(repo),
               "--backend-directory", str(workdir / "backends"), "--model-control-mode", "explicit",
               *[a for m in models for a in ("--load-model", m)],
               "--http-address", "127.0.0.1", "--http-port", str(self.http),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc),
               "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics),
               "--exit-timeout-secs", "5", "--log-verbose", "1"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
        self.models = models

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until every model answers ready; fails with the server's log when it exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if all(self._ready(m) for m in self.models):
                return
            time.sleep(0.5)
        pytest.fail(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def _ready(self, model: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/models/{model}/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


CLIENT = r'''
"""Send requests to a decoupled model over one gRPC stream, concurrently; print what came back."""
import json, os, queue, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

url, model = sys.argv[1], sys.argv[2]
requests = json.load(sys.stdin)
DTYPES = {"text_input": np.object_, "input_ids": np.int32, "max_tokens": np.int32, "temperature": np.float32,
          "top_k": np.int32, "top_p": np.float32, "seed": np.uint64}
client = grpcclient.InferenceServerClient(url)
results = queue.Queue()
client.start_stream(callback=lambda result, error: results.put((result, error)))
for i, fields in enumerate(requests):
    inputs = []
    for name, value in fields.items():
        array = np.array([value.encode()] if name == "text_input" else np.ravel(value), dtype=DTYPES[name])
        inputs.append(grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype)))
        inputs[-1].set_data_from_numpy(array)
    client.async_stream_infer(model, inputs, request_id=str(i), enable_empty_final_response=True)
out = [{"ids": [], "texts": [], "responses": 0, "errors": [], "final": False} for _ in requests]
while not all(o["final"] for o in out):
    try:
        result, error = results.get(timeout=120)
    except queue.Empty:        # fail now, with what came (the stream's thread would keep the process alive)
        print(json.dumps(out), flush=True)
        print("no response for 120 s", file=sys.stderr, flush=True)
        os._exit(3)
    if error is not None:      # an error response carries no id here: it is the only request in flight
        pending = [o for o in out if not o["final"]]
        pending[0]["errors"].append(str(error))
        pending[0]["final"] = True     # the error response carries the final flag
        continue
    response = result.get_response()
    o = out[int(response.id)]
    if response.parameters["triton_final_response"].bool_param:
        o["final"] = True
    if response.outputs:
        o["responses"] += 1
        o["ids"] += result.as_numpy("output_ids").tolist()
        o["texts"] += [t.decode() for t in result.as_numpy("text_output")]
client.stop_stream()
print(json.dumps(out), flush=True)
os._exit(0)    # grpc's stream thread can keep the interpreter from exiting after stop_stream()
'''


def stream_requests(python: Path, server: TritonServer, model: str, requests: list[dict]) -> list[dict]:
    """Run :data:`CLIENT` in the Triton environment: per request, the ids, texts, number of
    responses, errors and whether the final flag came."""
    done = subprocess.run([str(python), "-c", CLIENT, f"127.0.0.1:{server.grpc}", model],
                          input=json.dumps(requests), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-2000:] + done.stderr[-3000:] + "\n--- server log ---\n"
                                  + server.log_tail(20000))
    return json.loads(done.stdout.strip().splitlines()[-1])
