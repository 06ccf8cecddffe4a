"""Data-parallel processes: who am I (ranks from the launcher), meeting the others
(a TCP rendezvous that hands rank 0's NCCL id to every rank), and ``--gpus N``'s launcher
that starts one worker per GPU and supervises them.

Ranks come from the environment of whichever launcher started the process, so multi-node
runs need no graphc-specific launcher:

=================  ==============================================================
launcher           variables read
=================  ==============================================================
``graphc --gpus``  torchrun's: ``RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT``
torchrun / SLURM   the same (set by torchrun, or by the user's batch script)
``mpirun`` (Open   ``OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK`` (MPICH/Hydra:
MPI, MPICH)        ``PMI_RANK / PMI_SIZE / MPI_LOCALRANKID``); ``MASTER_ADDR`` /
                   ``MASTER_PORT`` where set, else 127.0.0.1:29500 (one host)
=================  ==============================================================

Supervision (``graphc train --gpus N``): workers run in their own session, so a Ctrl-C
reaches only the supervisor, which then stops every worker; the first worker to exit with
an error makes the supervisor stop the others (SIGTERM, SIGKILL after a grace period: a
rank blocked in a collective whose peer died cannot run Python signal handlers) and exit
with that worker's status. Resume from the last checkpoint with ``--resume``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Callable

from graphc.errors import GraphcError

# NCCL's NVLink multicast (NVLS) stays off on the lent machines (see the device README).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DEFAULT_PORT = 29500
MAGIC = b"graphc-rdzv1"


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    addr: str
    port: int
    launcher: str


# (launcher, rank, world, local rank) variable names, first match wins
LAUNCHERS = [
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpirun", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
]


def ranks_from_env(env=None) -> Ranks | None:
    """This process's place in a data-parallel job, or None when no launcher set one."""
    env = os.environ if env is None else env
    for launcher, rank_var, world_var, local_var in LAUNCHERS:
        if rank_var in env and world_var in env:
            try:
                rank, world = int(env[rank_var]), int(env[world_var])
                local = int(env.get(local_var, rank))
                port = int(env.get("MASTER_PORT", DEFAULT_PORT))
            except ValueError as e:
                raise GraphcError(launcher, f"non-integer rank variable ({e})", rank_var) from None
            if not 0 <= rank < world:
                raise GraphcError(launcher, f"rank {rank} is outside the world size {world}", rank_var)
            return Ranks(rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), port, launcher)
    return None


@dataclasses.dataclass
class DataParallel:
    """What a train step needs to join a data-parallel job: its ranks, the ZeRO stage
    (0: every rank keeps the whole AdamW state; 1: state sharded, llm.c's ZeRO-1), whether
    gradient all-reduces overlap backward, and the backend's communicator once connected."""

    ranks: Ranks
    zero: int = 0
    overlap: bool = True
    comm: object = None
    comm_stream: object = None         # the backend's second stream for overlapped collectives

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world(self) -> int:
        return self.ranks.world

    def connect(self, backend, timeout: float = 120.0) -> None:
        """Rank 0 makes the backend's communicator id; the rendezvous shares it; every rank joins."""
        if not hasattr(backend, "communicator"):
            raise GraphcError(None, f"data-parallel training needs the CUDA backend (NCCL); "
                              f"--backend {backend.name} runs on one device", "--gpus")
        uid = rendezvous(self.ranks, backend.communicator_id if self.rank == 0 else None, timeout)
        self.comm = backend.communicator(self.rank, self.world, uid)


# ============================================================================ rendezvous
def rendezvous(ranks: Ranks, payload: Callable[[], bytes] | None, timeout: float = 120.0) -> bytes:
    """Rank 0 calls ``payload()`` and sends the bytes to every other rank over TCP
    (``MASTER_ADDR:MASTER_PORT``); every rank returns them. Each rank also sends its rank
    number, so a duplicate or missing rank is an error rather than a hang."""
    if ranks.world == 1:
        return payload() if payload is not None else b""
    deadline = time.monotonic() + timeout
    if ranks.rank == 0:
        data = payload()
        with socket.create_server(("", ranks.port), reuse_port=False) as server:
            server.settimeout(1.0)
            seen: set[int] = set()
            while len(seen) < ranks.world - 1:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, ranks.world)) - seen)
                    raise GraphcError("rendezvous", f"ranks {missing} did not reach rank 0 on port {ranks.port} "
                                      f"within {timeout:.0f} s", "MASTER_PORT")
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                with conn:
                    conn.settimeout(10.0)
                    magic, rank = struct.unpack("!12sI", _recv(conn, 16))
                    if magic != MAGIC or not 0 < rank < ranks.world or rank in seen:
                        raise GraphcError("rendezvous", f"unexpected peer (rank {rank}) on port {ranks.port}",
                                          "MASTER_PORT")
                    seen.add(rank)
                    conn.sendall(struct.pack("!Q", len(data)) + data)
        return data
    while True:
        try:
            with socket.create_connection((ranks.addr, ranks.port), timeout=5.0) as conn:
                conn.sendall(struct.pack("!12sI", MAGIC, ranks.rank))
                size, = struct.unpack("!Q", _recv(conn, 8))
                return _recv(conn, size)
        except OSError:
            if time.monotonic() > deadline:
                raise GraphcError("rendezvous", f"rank {ranks.rank} could not reach rank 0 at "
                                  f"{ranks.addr}:{ranks.port} within {timeout:.0f} s", "MASTER_ADDR") from None
            time.sleep(0.2)


def _recv(conn: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(n - got)
        if not chunk:
            raise OSError("rendezvous peer closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ============================================================================ launcher
def worker_env(base: dict, rank: int, world: int, port: int) -> dict:
    """The environment of worker ``rank`` of ``world`` on this host (torchrun's variables)."""
    env = dict(base)
    env.update(NCCL_ENV)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    return env


def supervise(command: list[str], world: int, *, env: dict | None = None, grace: float = 3.0,
              poll: float = 0.05, log=None) -> int:
    """Run ``command`` as ``world`` workers (ranks 0..world-1) and wait for all of them.

    Returns 0 when every worker succeeds; otherwise the status of the first worker that
    failed, after stopping the rest. Ctrl-C (SIGINT) or SIGTERM stops every worker (130)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    base = dict(os.environ if env is None else env)
    port = free_port()
    procs = [subprocess.Popen(command, env=worker_env(base, r, world, port), start_new_session=True)
             for r in range(world)]
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            if stop["signal"] is not None:
                _stop_all(procs, grace)
                log(f"stopped all {world} ranks; resume with --resume from the last checkpoint")
                return 130
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                _stop_all(procs, grace)
                why = f"signal {-code}" if code < 0 else f"status {code}"
                log(f"error: graphc train: --gpus: rank {rank} exited with {why}; stopped the other "
                    f"{world - 1} rank{'s' if world > 2 else ''}")
                return code if code > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop_all(procs, grace)


def _stop_all(procs: list, grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
