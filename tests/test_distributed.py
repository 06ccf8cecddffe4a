"""Data-parallel process logic on the CPU: ranks from launchers' variables, the TCP
rendezvous, and ``--gpus``'s supervision of workers (fake workers: small Python scripts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from graphc.errors import GraphcError
from graphc.runtime import distributed as D


def test_ranks_from_torchrun_variables():
    r = D.ranks_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0",
                          "MASTER_PORT": "1234"})
    assert r == D.Ranks(3, 8, 1, "node0", 1234, "torchrun")


def test_ranks_from_mpirun_variables():
    r = D.ranks_from_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                          "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert r == D.Ranks(1, 2, 1, "127.0.0.1", D.DEFAULT_PORT, "mpirun")
    assert D.ranks_from_env({"PMI_RANK": "0", "PMI_SIZE": "4"}).world == 4
    assert D.ranks_from_env({}) is None


def test_bad_rank_variables_are_one_line_errors():
    with pytest.raises(GraphcError, match="outside the world size"):
        D.ranks_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(GraphcError, match="non-integer"):
        D.ranks_from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_rendezvous_hands_rank0_payload_to_every_rank():
    port, world = D.free_port(), 4
    got, errors = {}, []

    def rank(r):
        try:
            ranks = D.Ranks(r, world, r, "127.0.0.1", port, "torchrun")
            got[r] = D.rendezvous(ranks, (lambda: b"unique-id-" + bytes(range(100))) if r == 0 else None, 20)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in reversed(range(world))]  # peers first
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert got == {r: b"unique-id-" + bytes(range(100)) for r in range(world)}


def test_rendezvous_times_out_with_the_missing_ranks():
    ranks = D.Ranks(0, 3, 0, "127.0.0.1", D.free_port(), "torchrun")
    with pytest.raises(GraphcError, match=r"ranks \[1, 2\] did not reach rank 0"):
        D.rendezvous(ranks, lambda: b"x", timeout=1.0)
    peer = D.Ranks(1, 2, 1, "127.0.0.1", D.free_port(), "torchrun")
    with pytest.raises(GraphcError, match="could not reach rank 0"):
        D.rendezvous(peer, None, timeout=1.0)


def test_worker_env_sets_torchrun_variables_and_keeps_nvls_off():
    env = D.worker_env({"PATH": "/bin"}, 1, 2, 4321)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("1", "2", "1", "4321")
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["PATH"] == "/bin"


def fake_worker(tmp_path, body: str) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text("import os, sys, time\nrank = int(os.environ['RANK'])\n" + body)
    return [sys.executable, str(script)]


def test_supervise_waits_for_every_worker(tmp_path):
    cmd = fake_worker(tmp_path, f"open(r'{tmp_path}/done-%d' % rank, 'w').write(os.environ['WORLD_SIZE'])\n")
    assert D.supervise(cmd, 3, log=lambda line: None) == 0
    assert sorted(p.read_text() for p in tmp_path.glob("done-*")) == ["3", "3", "3"]


def test_a_failing_rank_stops_the_others_within_seconds(tmp_path):
    # rank 1 fails at once; rank 0 would sleep for a minute, ignoring SIGTERM (as a rank blocked
    # in a collective does): the supervisor must kill it after the grace period
    cmd = fake_worker(tmp_path, "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                "if rank == 1:\n    sys.exit(3)\n"
                                f"time.sleep(60)\nopen(r'{tmp_path}/finished', 'w')\n")
    lines = []
    t0 = time.monotonic()
    code = D.supervise(cmd, 2, grace=1.0, log=lines.append)
    assert time.monotonic() - t0 < 10
    assert code == 3
    assert lines == ["error: graphc train: --gpus: rank 1 exited with status 3; stopped the other 1 rank"]
    assert not (tmp_path / "finished").exists()


def test_a_killed_rank_is_reported_by_its_signal(tmp_path):
    cmd = fake_worker(tmp_path, "if rank == 0:\n    os.kill(os.getpid(), 9)\ntime.sleep(60)\n")
    lines = []
    assert D.supervise(cmd, 2, grace=1.0, log=lines.append) == 1
    assert lines == ["error: graphc train: --gpus: rank 0 exited with signal 9; stopped the other 1 rank"]


def test_ctrl_c_stops_every_worker(tmp_path):
    """The supervisor as a real process: SIGINT to it (workers are in their own session)
    stops all workers, exit 130."""
    body = f"open(r'{tmp_path}/pid-%d' % rank, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    cmd = fake_worker(tmp_path, body)
    sup = subprocess.Popen([sys.executable, "-c", "import sys; from graphc.runtime import distributed as D; "
                            f"sys.exit(D.supervise({cmd!r}, 2, grace=1.0))"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while len(list(tmp_path.glob("pid-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int(p.read_text()) for p in tmp_path.glob("pid-*") if p.read_text()]
    assert len(pids) == 2
    sup.send_signal(signal.SIGINT)
    assert sup.wait(15) == 130
    assert "stopped all 2 ranks" in sup.stderr.read()
    for pid in pids:
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by init) counts as stopped
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_gpus_needs_the_cuda_backend(tmp_path, capsys):
    from graphc.cli.main import main

    code = main(["train", "--model", "L2H2C32", "--train-data", str(tmp_path / "x.bin"), "--steps", "1",
                 "--gpus", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == ("error: graphc train: --gpus: data-parallel training needs --backend cuda (NCCL); "
                           "onnxruntime runs on one device")


def test_zero_needs_several_gpus(tmp_path, capsys):
    from graphc.cli.main import main

    code = main(["train", "--model", "L2H2C32", "--train-data", str(tmp_path / "x.bin"), "--steps", "1",
                 "--backend", "cuda", "--zero", "1"])
    assert code == 2
    assert "ZeRO-1 shards the optimizer state across GPUs" in capsys.readouterr().err


def test_launcher_world_size_must_agree_with_gpus(tmp_path, capsys, monkeypatch):
    from graphc.cli.main import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = main(["train", "--model", "L2H2C32", "--train-data", str(tmp_path / "x.bin"), "--steps", "1",
                 "--backend", "cuda", "--gpus", "2"])
    assert code == 2
    assert "--gpus: 2 disagrees with the world size 4 that" in capsys.readouterr().err


def test_gpus_checks_the_backend_once_before_any_worker_starts(tmp_path, capsys, monkeypatch):
    """No GPU here: one line from the launcher, not one per worker plus the supervisor's."""
    from graphc.cli.main import main
    from graphc.runtime import distributed

    def no_workers(*a, **k):
        raise AssertionError("workers were started")

    monkeypatch.setattr(distributed, "supervise", no_workers)
    monkeypatch.setattr("graphc.backends.cuda.CudaBackend.available",
                        classmethod(lambda cls: (False, "no CUDA driver")), raising=False)
    code = main(["train", "--model", "L2H2C32", "--train-data", str(tmp_path / "x.bin"), "--steps", "1",
                 "--backend", "cuda", "--gpus", "2"])
    assert code == 2
    assert capsys.readouterr().err == "error: cuda: --backend: backend is not available here: no CUDA driver\n"
