"""Data-parallel training on two GPUs (``-m multigpu``; run on the lent nvidia-h200-x2).

The reference is the one-GPU run at twice the micro-batch (the same tokens per step, llm.c's
sharded loader): FP32 losses must agree loss for loss within 1e-4, with and without ZeRO-1;
BF16 within bf16 noise. Runs go through the real command line (``graphc train --gpus 2``),
torchrun-style variables and ``mpirun`` where the image has it.
Data: ``$GRAPHC_GPU_DATA`` (``tiny_shakespeare_{train,val}.bin``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.multigpu

MODEL = "L4H4C128"
STEP = re.compile(r"^step (\d+): train loss (\S+)")
VAL = re.compile(r"^val loss (\S+)")
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def data() -> Path:
    d = Path(os.environ.get("GRAPHC_GPU_DATA", "/nonexistent"))
    if not (d / "tiny_shakespeare_train.bin").exists():
        pytest.skip("no token shards: set GRAPHC_GPU_DATA")
    return d


def train_args(B, steps=20, precision="fp32", *extra):
    d = data()
    return ["train", "--model", MODEL, "--train-data", str(d / "tiny_shakespeare_train.bin"),
            "--val-data", str(d / "tiny_shakespeare_val.bin"), "-b", str(B), "-t", "64", "--steps", str(steps),
            "--val-every", "10", "--backend", "cuda", "--precision", precision, *extra]


def graphc(args, env=None, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "graphc", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **ENV, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(stdout: str) -> tuple[dict, list]:
    steps = {int(m[1]): float(m[2]) for m in map(STEP.match, stdout.splitlines()) if m}
    vals = [float(m[1]) for m in map(VAL.match, stdout.splitlines()) if m]
    return steps, vals


@pytest.fixture(scope="module")
def one_gpu():
    """Reference runs on one GPU at micro-batch 4 (fp32 and bf16)."""
    return {p: losses(graphc(train_args(4, precision=p)).stdout) for p in ("fp32", "bf16")}


@pytest.mark.parametrize("zero", ["0", "1"])
def test_fp32_two_gpus_match_one_gpu_at_double_batch(one_gpu, zero):
    r = graphc(train_args(2, 20, "fp32", "--gpus", "2", "--zero", zero))
    steps, vals = losses(r.stdout)
    ref_steps, ref_vals = one_gpu["fp32"]
    assert sorted(steps) == list(range(20)) and len(vals) == len(ref_vals) == 3
    diff = max(abs(steps[s] - ref_steps[s]) for s in steps)
    print(f"\nzero {zero}: max |loss(2 GPUs, B2) - loss(1 GPU, B4)| over 20 steps = {diff:.2e}")
    assert diff < 1e-4
    assert max(abs(a - b) for a, b in zip(vals, ref_vals)) < 1e-4
    # the loss lines are printed once (rank 0), in the one-GPU format
    assert len([line for line in r.stdout.splitlines() if line.startswith("step ")]) == 20


def test_bf16_two_gpus_track_one_gpu(one_gpu):
    steps, _ = losses(graphc(train_args(2, 20, "bf16", "--gpus", "2")).stdout)
    ref, fp32 = one_gpu["bf16"][0], one_gpu["fp32"][0]
    diff = max(abs(steps[s] - ref[s]) for s in ref)
    noise = max(abs(fp32[s] - ref[s]) for s in ref)  # how far bf16 itself is from fp32
    print(f"\nbf16: 2 GPUs vs 1 GPU max diff {diff:.2e}; bf16 vs fp32 on one GPU {noise:.2e}")
    assert diff < max(noise, 1e-2) and diff < 3e-2


def test_torchrun_variables_without_gpus_flag(one_gpu):
    """Two processes started by hand with torchrun's variables (what a multi-node launcher
    gives): the same losses as ``--gpus 2`` / one GPU at B4."""
    port = str(29600 + os.getpid() % 1000)
    procs = []
    for rank in range(2):
        env = {**os.environ, **ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "graphc", *train_args(2, 20)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    steps, _ = losses(outs[0][0])
    assert outs[1][0].strip() == ""  # rank 1 prints nothing
    assert max(abs(steps[s] - one_gpu["fp32"][0][s]) for s in steps) < 1e-4


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun on this image")
def test_mpirun(one_gpu):
    r = subprocess.run(["mpirun", "--allow-run-as-root", "-np", "2", "-x", "NCCL_NVLS_ENABLE=0",
                        sys.executable, "-m", "graphc", *train_args(2, 20)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps, _ = losses(r.stdout)
    assert max(abs(steps[s] - one_gpu["fp32"][0][s]) for s in steps) < 1e-4


def worker_pids(supervisor: int) -> dict[int, int]:
    """rank -> pid of the supervisor's worker processes (from /proc)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != supervisor:
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = int(stat.parent.name)
    return out


@pytest.mark.parametrize("zero", ["0", "1"])
def test_killed_rank_stops_the_job_and_resume_continues_bit_for_bit(tmp_path, zero):
    out = tmp_path / "run"
    args = train_args(2, 400, "fp32", "--gpus", "2", "--zero", zero, "--out", str(out), "--checkpoint-every",
                      "20", "--val-every", "0")
    sup = subprocess.Popen([sys.executable, "-m", "graphc", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, **ENV})
    lines = []
    for line in sup.stdout:
        lines.append(line)
        if line.startswith("step 50:"):
            break
    pids = worker_pids(sup.pid)
    assert set(pids) == {0, 1}
    os.kill(pids[1], 9)
    t0 = time.monotonic()
    rest, err = sup.communicate(timeout=60)
    stopped_after = time.monotonic() - t0
    lines += rest.splitlines(keepends=True)
    assert sup.returncode != 0
    assert "error: graphc train: --gpus: rank 1 exited with signal 9" in err
    print(f"\njob stopped {stopped_after:.1f} s after rank 1 was killed")
    assert stopped_after < 15
    killed, _ = losses("".join(lines))
    assert max(killed) < 399
    r = graphc(args + ["--resume"])
    resumed, _ = losses(r.stdout)
    first = min(resumed)
    # continues from the last checkpoint (possibly written just before the kill)
    assert first % 20 == 0 and first <= max(killed) + 1 and sorted(resumed) == list(range(first, 400))
    # bit for bit: the killed run where it overlaps, an uninterrupted run everywhere
    assert all(resumed[s] == killed[s] for s in resumed if s in killed)
    whole, _ = losses(graphc([a for a in args if a not in ("--out", str(out))]).stdout)
    assert all(resumed[s] == whole[s] for s in resumed) and all(killed[s] == whole[s] for s in killed)


def test_resume_on_another_gpu_count_is_refused(tmp_path):
    out = tmp_path / "run"
    graphc(train_args(2, 4, "fp32", "--gpus", "2", "--out", str(out), "--val-every", "0"))
    r = subprocess.run([sys.executable, "-m", "graphc", *train_args(4, 8, "fp32", "--out", str(out), "--resume",
                                                                     "--val-every", "0")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    assert r.returncode == 2
    assert "written by a run on 2 GPU(s); resume it on as many (--gpus 2)" in r.stderr
