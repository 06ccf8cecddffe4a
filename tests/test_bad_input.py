"""Every bad input is one line, exit 2, no traceback, and loses nothing.

A table of cases, one row each: the command line, an optional setup that damages a copy of
the workspace, the environment, what the one line must say, and the files that must come
through unchanged. A new command joins by adding rows to :data:`CASES`.

The commands run in-process (``graphc.cli.main.main(argv)``) so that ~150 cases fit in the
default suite's time budget; signals and kills need a real process and sit at the end.

Placeholders in argv: ``{ws}`` is the shared read-only workspace (a tiny llm.c model,
Tiny Shakespeare shards, a finished two-checkpoint run, an ONNX model, a Hugging Face
folder), ``{tmp}`` the case's own folder (the current directory while it runs), where
setups copy what they damage.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.cli.main import main

MODEL = "L1H2C8"      # the tiny model of every case: 1 layer, 2 heads, 8 channels
RUN_ARGS = ["-b", "2", "-t", "8", "--steps", "2", "--checkpoint-every", "1"]


@dataclasses.dataclass
class Case:
    id: str
    argv: list[str]
    expect: str                                   # a substring of the error line
    setup: Callable[[Path, Path], None] | None = None   # (ws, tmp) -> None, may damage copies in tmp
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    keep: tuple[str, ...] = ()                    # paths (relative to tmp) that must not change
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


# ----------------------------------------------------------------------------- setups
def _polygraphy_file(path: Path, *, inputs: bool = False, iterations: int = 1) -> None:
    """A Polygraphy inputs file, or RunResults with ``iterations`` iterations of one runner."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json

    outputs = {"logits": np.zeros((1, 2), np.float32)}
    if inputs:
        save_json([outputs], str(path))
        return
    results = RunResults()
    results.add([outputs] * iterations, runner_name="trt-runner")
    results.save(str(path))


def copy(name: str, to: str | None = None):
    def setup(ws: Path, tmp: Path) -> None:
        src, dst = ws / name, tmp / (to or name)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return setup


def write(name: str, data: bytes | str):
    def setup(ws: Path, tmp: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def steps(*setups):
    def setup(ws: Path, tmp: Path) -> None:
        for s in setups:
            s(ws, tmp)
    return setup


def truncate(name: str, keep_bytes: int):
    def setup(ws: Path, tmp: Path) -> None:
        path = tmp / name
        path.write_bytes(path.read_bytes()[:keep_bytes])
    return setup


def flip(name: str, offset: int):
    def setup(ws: Path, tmp: Path) -> None:
        path = tmp / name
        data = bytearray(path.read_bytes())
        data[offset if offset >= 0 else len(data) + offset] ^= 0x40
        path.write_bytes(bytes(data))
    return setup


def remove(name: str):
    def setup(ws: Path, tmp: Path) -> None:
        path = tmp / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return setup


def edit_json(name: str, change: Callable[[object], object]):
    def setup(ws: Path, tmp: Path) -> None:
        path = tmp / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return setup


def llmc_header(name: str, index: int, value: int):
    def setup(ws: Path, tmp: Path) -> None:
        path = tmp / name
        data = bytearray(path.read_bytes())
        data[4 * index:4 * index + 4] = np.int32(value).tobytes()
        path.write_bytes(bytes(data))
    return setup


def fail_writes(code: int):
    """The disk fills up (or turns read-only) under graphc's atomic writers (fsync is the last
    step of every write, so the data went nowhere but a temporary file)."""
    def patch(mp: pytest.MonkeyPatch) -> None:
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        mp.setattr(os, "fsync", fsync)
    return patch


def refuse_probe(code: int):
    """A folder that refuses new files (a read-only file system: root is refused too)."""
    def patch(mp: pytest.MonkeyPatch) -> None:
        import graphc.outputs

        def mkstemp(*a, **k):
            raise OSError(code, os.strerror(code))
        mp.setattr(graphc.outputs.tempfile, "mkstemp", mkstemp)
    return patch


def too_old(package: str):
    def patch(mp: pytest.MonkeyPatch) -> None:
        import graphc.versions

        mp.setitem(graphc.versions.MINIMUM, package, (99, 0))
    return patch


RUN = copy("run")                       # a finished 2-step run with checkpoints at steps 1 and 2
CKPT = "run/ckpt-000002"
NO_SUMS = remove(f"{CKPT}/checksums.sha256")   # damage that only the field checks can find
KEEP_RUN = ("run/latest", "run/model.bin", "run/losses.tsv", f"{CKPT}/model.bin", f"{CKPT}/optimizer.npz",
            f"{CKPT}/state.json", "run/ckpt-000001/model.bin", "run/ckpt-000001/optimizer.npz")

EVAL = ["eval", "--data", "{ws}/val.bin", "-b", "2", "-t", "8", "--batches", "1", "--model"]
TRAIN = ["train", "--model", MODEL, "--train-data", "{ws}/train.bin", "--val-data", "{ws}/val.bin", *RUN_ARGS]
# later flags win: [*TRAIN, "--steps", "5"] trains 5 steps
RESUME = [*TRAIN, "--out", "run", "--resume"]
GEN = ["generate", "--model", "{ws}/model.bin", "--max-new-tokens", "2"]
GEN_LOCAL = ["generate", "--model", "model.bin", "--max-new-tokens", "2"]
EXPORT = ["export", "--model", "{ws}/model.bin"]
GRAD = ["grad", "{ws}/mlp.onnx", "--loss", "loss", "--wrt", "W1"]
PREPARE = ["prepare", "--input", "{ws}/text.txt"]
COMPILE = ["compile", "--model", MODEL, "--mode", "infer"]
VALIDATE = ["validate", "--model", "{ws}/model.bin", "--state"]
COMPARE = ["compare", "--model", MODEL, "--mode", "infer", "--backends"]
SERVE = ["serve", "--model", MODEL, "--port", "0"]          # every row fails before it listens
ENGINE = ["engine", "--model", MODEL, "--out", "e.plan"]

CASES: list[Case] = [
    # ------------------------------------------------------------------ the command line itself
    Case("no-command", [], "required: COMMAND"),
    Case("unknown-command", ["trian"], "invalid choice: 'trian'"),
    Case("missing-flags", ["train"], "required: --model, --train-data, --steps"),
    Case("unknown-flag", [*TRAIN, "--bogus"], "unrecognized arguments: --bogus"),
    Case("int-not-int", [*EVAL, "{ws}/model.bin", "-b", "x"], "-b: must be an integer, got 'x'"),
    Case("exclusive-prompts", [*GEN, "--prompt", "a", "--prompt-ids", "1"], "not allowed with argument"),
    Case("export-no-destination", EXPORT, "one of the arguments --out --weights-only --triton-repo is required"),
    Case("bad-choice-mode", ["compile", "--model", MODEL, "--mode", "fast"], "--mode: invalid choice: 'fast'"),
    Case("bad-backend", [*EVAL, "{ws}/model.bin", "--backend", "cuda9"], "--backend: invalid choice"),
    # ------------------------------------------------------------------ environment and versions
    Case("threads-abc", [*EVAL, "{ws}/model.bin"], "$GRAPHC_THREADS", env={"GRAPHC_THREADS": "abc"}),
    Case("threads-negative", [*EVAL, "{ws}/model.bin"], "got '-1'", env={"GRAPHC_THREADS": "-1"}),
    Case("threads-float", COMPILE, "got '1.5'", env={"GRAPHC_THREADS": "1.5"}),
    Case("dump-env-under-file", COMPILE, "$GRAPHC_DUMP_DIR: cannot be created", env={"GRAPHC_DUMP_DIR": "{ws}/text.txt/d"}),
    Case("onnxruntime-too-old", COMPILE, "onnxruntime: version: version", patch=too_old("onnxruntime")),
    Case("onnx-too-old", COMPILE, "graphc needs onnx >= 99.0", patch=too_old("onnx")),
    # ------------------------------------------------------------------ --model
    Case("model-missing", [*EVAL, "nothere.bin"], "no such file"),
    Case("model-unknown-size", [*EVAL, "d13"], "no such file, and not a pretrained name"),
    Case("model-zero-heads", [*EVAL, "L4H0C128"], "L4H0C128: --model: n_head must be positive"),
    Case("model-zero-layers", [*EVAL, "L0H4C128"], "L0H4C128: --model: n_layer must be positive"),
    Case("model-zero-channels", [*EVAL, "L1H1C0"], "n_embd must be positive"),
    Case("model-petabytes", [*EVAL, "L1H1C10000000"], "its weights need 4802.1 TB"),
    Case("model-indivisible", [*EVAL, "L4H3C128"], "L4H3C128: --model: n_embd 128 is not divisible by n_head 3"),
    Case("model-empty-bin", [*EVAL, "m.bin"], "not an llm.c model", setup=write("m.bin", b"")),
    Case("model-text-bin", [*EVAL, "m.bin"], "not an llm.c model", setup=write("m.bin", "a 32-byte text file, not a model\n")),
    Case("model-truncated", [*EVAL, "model.bin"], "file is truncated",
         setup=steps(copy("model.bin"), truncate("model.bin", 5000))),
    Case("model-header-only", [*EVAL, "model.bin"], "file is truncated",
         setup=steps(copy("model.bin"), truncate("model.bin", 1024))),
    Case("model-trailing-bytes", [*EVAL, "model.bin"], "bytes past the",
         setup=steps(copy("model.bin"), lambda ws, tmp: open(tmp / "model.bin", "ab").write(b"xx"))),
    Case("model-bad-version", [*EVAL, "model.bin"], "unknown version 7",
         setup=steps(copy("model.bin"), llmc_header("model.bin", 1, 7))),
    Case("model-negative-layers", [*EVAL, "model.bin"], "num_layers must be positive",
         setup=steps(copy("model.bin"), llmc_header("model.bin", 4, -3))),
    Case("model-heads-indivisible", [*EVAL, "model.bin"], "not divisible by heads",
         setup=steps(copy("model.bin"), llmc_header("model.bin", 5, 3))),
    Case("model-padded-vocab-small", [*EVAL, "model.bin"], "padded vocab",
         setup=steps(copy("model.bin"), llmc_header("model.bin", 7, 100))),
    Case("model-nan-weights", [*GEN_LOCAL, "--prompt-ids", "1"], "weights are not finite (NaN/inf), first in wte",
         setup=lambda ws, tmp: _nan_model(ws, tmp)),
    Case("model-is-a-folder", [*EVAL, "{ws}"], "not an llm.c .bin"),
    Case("model-safetensors-garbage", [*EVAL, "x.safetensors"], "x.safetensors", setup=write("x.safetensors", b"garbage")),
    Case("hf-folder-without-weights", [*EVAL, "hf"], "or a folder with model.safetensors",
         setup=steps(copy("hf"), remove("hf/model.safetensors"))),
    Case("hf-n-head-word", [*EVAL, "hf"], "config.json: n_head: must be an integer, got \"four\"",
         setup=steps(copy("hf"), edit_json("hf/config.json", lambda c: {**c, "n_head": "four"}))),
    Case("hf-n-head-zero", [*EVAL, "hf"], "n_head: must be positive",
         setup=steps(copy("hf"), edit_json("hf/config.json", lambda c: {**c, "n_head": 0}))),
    Case("hf-n-head-indivisible", [*EVAL, "hf"], "not divisible by n_head 3",
         setup=steps(copy("hf"), edit_json("hf/config.json", lambda c: {**c, "n_head": 3}))),
    Case("hf-config-list", [*EVAL, "hf"], "is a JSON list",
         setup=steps(copy("hf"), edit_json("hf/config.json", lambda c: [c]))),
    Case("hf-config-not-utf8", [*EVAL, "hf"], "config: unreadable (",
         setup=steps(copy("hf"), write("hf/config.json", b"\xff\xfe{"))),
    Case("hf-config-not-json", [*EVAL, "hf"], "config: unreadable (", setup=steps(copy("hf"), write("hf/config.json", "{"))),
    Case("hf-n-embd-mismatch", [*EVAL, "hf"], "n_embd 16 does not match",
         setup=steps(copy("hf"), edit_json("hf/config.json", lambda c: {**c, "n_embd": 16}))),
    Case("hf-layers-float", [*EVAL, "hf"], "n_layer: must be an integer, got 1.5",
         setup=steps(copy("hf"), edit_json("hf/config.json", lambda c: {**c, "n_layer": 1.5}))),
    Case("hf-activation", [*EVAL, "hf"], "not GPT-2's tanh GELU",
         setup=steps(copy("hf"), edit_json("hf/config.json", lambda c: {**c, "activation_function": "relu"}))),
    # ------------------------------------------------------------------ data
    Case("data-missing", ["eval", "--model", "{ws}/model.bin", "--data", "none.bin", "-b", "2", "-t", "8", "--batches", "1"], "none.bin"),
    Case("data-glob-empty", ["eval", "--model", "{ws}/model.bin", "--data", "none*.bin", "-b", "2", "-t", "8", "--batches", "1"], "no files"),
    Case("data-bad-magic", ["eval", "--model", "{ws}/model.bin", "--data", "{ws}/model.bin", "-b", "2", "-t", "8", "--batches", "1"], "magic"),
    Case("data-empty", ["eval", "--model", "{ws}/model.bin", "--data", "d.bin", "-b", "2", "-t", "8", "--batches", "1"], "d.bin", setup=write("d.bin", b"")),
    Case("data-truncated", ["eval", "--model", "{ws}/model.bin", "--data", "val.bin", "-b", "2", "-t", "8", "--batches", "1"], "val.bin",
         setup=steps(copy("val.bin"), truncate("val.bin", 2000))),
    Case("data-too-few-batches", ["eval", "--model", "{ws}/model.bin", "--data", "{ws}/val.bin", "-b", "2", "-t", "8", "--batches", "100000"], "--batches: asked for 100000 batches"),
    Case("t-too-long", [*EVAL, "{ws}/model.bin", "-t", "2048"], "error: graphc eval: -t: sequence length 2048 exceeds the model's maximum 1024"),
    Case("b-zero", [*EVAL, "{ws}/model.bin", "-b", "0"], "-b: must be >= 1, got 0"),
    Case("t-zero", [*EVAL, "{ws}/model.bin", "-t", "0"], "-t: must be >= 1"),
    Case("batches-zero", [*EVAL, "{ws}/model.bin", "--batches", "0"], "--batches: must be >= 1"),
    Case("train-data-missing", ["train", "--model", MODEL, "--train-data", "none.bin", "--steps", "1"], "none.bin"),
    Case("val-batches-too-many", [*TRAIN, "--val-batches", "100000"], "--val-batches"),
    # ------------------------------------------------------------------ training flags
    *[Case(f"train-{flag[2:]}-{value}", [*TRAIN, flag, value], f"{flag}: {want}")
      for flag, value, want in [
          ("--lr", "nan", "must be a finite number"), ("--lr", "inf", "must be a finite number"),
          ("--lr", "-1", "must be in (0"), ("--lr", "0", "must be in (0"), ("--lr", "abc", "must be a number"),
          ("--beta1", "2", "must be in [0, 1)"), ("--beta1", "1", "must be in [0, 1)"), ("--beta1", "-0.1", "must be in"),
          ("--beta2", "1.5", "must be in [0, 1)"), ("--beta2", "nan", "must be a finite number"),
          ("--eps", "-1", "must be in (0"), ("--eps", "0", "must be in (0"),
          ("--weight-decay", "-1", "must be in [0"), ("--weight-decay", "inf", "must be a finite number"),
          ("--grad-clip", "nan", "must be a finite number"), ("--grad-clip", "-1", "must be in [0"),
          ("--warmup", "-5", "must be >= 0"), ("--warmup", "1.5", "must be an integer"),
          ("--lr-final-frac", "nan", "must be a finite number"), ("--lr-final-frac", "2", "must be in [0, 1]"),
          ("--val-every", "-1", "must be >= 0"), ("--sample-every", "-2", "must be >= 0"),
          ("--checkpoint-every", "-1", "must be >= 0"), ("--steps", "0", "must be >= 1"),
          ("--seed", "-1", "must be >= 0"), ("--seed", str(2**32), "must be <= 4294967295"),
          ("--schedule", "linear", "invalid choice"), ("--val-batches", "0", "must be >= 1"),
      ]],
    Case("train-t-too-long", [*TRAIN, "-t", "2048"], "-t: sequence length 2048"),
    Case("resume-without-out", [*TRAIN, "--resume"], "--resume: needs --out DIR"),
    Case("resume-and-overwrite", [*TRAIN, "--out", "run", "--resume", "--overwrite"], "choose one", setup=RUN, keep=KEEP_RUN),
    # ------------------------------------------------------------------ training outputs
    Case("train-out-is-file", [*TRAIN, "--out", "{ws}/text.txt"], "exists and is not a directory"),
    Case("train-out-under-file", [*TRAIN, "--out", "{ws}/text.txt/run"], "is a file, not a directory"),
    Case("train-out-read-only", [*TRAIN, "--out", "new"], "Read-only file system", patch=refuse_probe(errno.EROFS)),
    Case("train-out-no-room", [*TRAIN, "--out", "new"], "needs about",
         patch=lambda mp: mp.setattr("graphc.outputs.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))),
    Case("train-replaces-run", [*TRAIN, "--out", "run"], "holds a training run already; continue it with --resume",
         setup=RUN, keep=KEEP_RUN),
    Case("train-disk-full-at-checkpoint", [*RESUME, "--steps", "3"],
         "No space left on device", setup=RUN, keep=KEEP_RUN, patch=fail_writes(errno.ENOSPC)),
    Case("train-read-only-at-checkpoint", [*RESUME, "--steps", "3"],
         "Read-only file system", setup=RUN, keep=KEEP_RUN, patch=fail_writes(errno.EROFS)),
    Case("train-loss-nan", [*TRAIN, "--steps", "5", "--lr", "1e30", "--out", "nan"],
         "the loss became nan at step 1; training stopped; no checkpoint of this run gives a finite loss ("),
    # ------------------------------------------------------------------ checkpoints (--resume)
    Case("resume-no-run", [*TRAIN, "--out", "empty", "--resume"], "missing 'latest'", setup=write("empty/x", "")),
    Case("resume-latest-empty", RESUME, "latest: --resume: is empty", setup=steps(RUN, write("run/latest", ""))),
    Case("resume-latest-garbage", RESUME, "not a checkpoint folder", setup=steps(RUN, write("run/latest", "../../etc\n"))),
    Case("resume-latest-dangling", RESUME, "names ckpt-000009, which does not exist",
         setup=steps(RUN, write("run/latest", "ckpt-000009\n"))),
    Case("resume-latest-binary", RESUME, "latest: --resume: unreadable", setup=steps(RUN, write("run/latest", b"\xff\xfe"))),
    Case("resume-optimizer-missing", RESUME, "optimizer.npz: --resume: checkpoint file missing",
         setup=steps(RUN, remove(f"{CKPT}/optimizer.npz"))),
    Case("resume-optimizer-truncated", RESUME, "checksum mismatch",
         setup=steps(RUN, truncate(f"{CKPT}/optimizer.npz", 1000))),
    Case("resume-optimizer-bitflip", RESUME, "the previous checkpoint run/ckpt-000001 is usable",
         setup=steps(RUN, flip(f"{CKPT}/optimizer.npz", 5000))),
    Case("resume-optimizer-truncated-unsummed", RESUME, "unreadable optimizer state",
         setup=steps(RUN, NO_SUMS, truncate(f"{CKPT}/optimizer.npz", 1000))),
    Case("resume-optimizer-empty-unsummed", RESUME, "unreadable optimizer state",
         setup=steps(RUN, NO_SUMS, write(f"{CKPT}/optimizer.npz", b""))),
    Case("resume-optimizer-header-flip-unsummed", RESUME, "optimizer.npz",
         setup=steps(RUN, NO_SUMS, flip(f"{CKPT}/optimizer.npz", 2))),
    Case("resume-optimizer-wrong-shape-unsummed", RESUME, "m is float32[3], the model needs float32",
         setup=steps(RUN, NO_SUMS, lambda ws, tmp: np.savez(tmp / CKPT / "optimizer.npz", m=np.zeros(3, np.float32),
                                                            v=np.zeros(3, np.float32)))),
    Case("resume-optimizer-nan-unsummed", RESUME, "holds non-finite values",
         setup=steps(RUN, NO_SUMS, lambda ws, tmp: _nan_optimizer(tmp / CKPT / "optimizer.npz"))),
    Case("resume-state-empty-object", RESUME, "state.json: step: missing",
         setup=steps(RUN, NO_SUMS, write(f"{CKPT}/state.json", "{}"))),
    Case("resume-state-list", RESUME, "is a JSON list, expected an object",
         setup=steps(RUN, NO_SUMS, write(f"{CKPT}/state.json", "[]"))),
    Case("resume-state-not-utf8", RESUME, "not UTF-8", setup=steps(RUN, NO_SUMS, write(f"{CKPT}/state.json", b"{\xff}"))),
    Case("resume-state-not-json", RESUME, "state.json: --resume: unreadable",
         setup=steps(RUN, NO_SUMS, write(f"{CKPT}/state.json", "{\"step\": "))),
    Case("resume-state-step-string", RESUME, "step: must be an integer >= 0, got \"x\"",
         setup=steps(RUN, NO_SUMS, edit_json(f"{CKPT}/state.json", lambda s: {**s, "step": "x"}))),
    Case("resume-state-step-mismatch", RESUME, "step: is 7 in folder ckpt-000002",
         setup=steps(RUN, NO_SUMS, edit_json(f"{CKPT}/state.json", lambda s: {**s, "step": 7}))),
    Case("resume-state-loader-list", RESUME, "loader: must be an object",
         setup=steps(RUN, NO_SUMS, edit_json(f"{CKPT}/state.json", lambda s: {**s, "loader": []}))),
    Case("resume-state-log-rows", RESUME, "log: must be a list of",
         setup=steps(RUN, NO_SUMS, edit_json(f"{CKPT}/state.json", lambda s: {**s, "log": [{"kind": "x"}]}))),
    Case("resume-state-bitflip", RESUME, "state.json: --resume: checksum mismatch",
         setup=steps(RUN, flip(f"{CKPT}/state.json", 3))),
    Case("resume-loader-mismatch", RESUME, "ckpt-000002/state.json: loader: saved for a different configuration",
         setup=steps(RUN, NO_SUMS, edit_json(f"{CKPT}/state.json",
                                             lambda s: {**s, "loader": {**s["loader"], "config": {"B": 99}}}))),
    Case("resume-loader-index", RESUME, "state.json: loader.sample_idx",
         setup=steps(RUN, NO_SUMS, edit_json(f"{CKPT}/state.json",
                                             lambda s: {**s, "loader": {**s["loader"], "sample_idx": -4}}))),
    Case("resume-model-truncated", RESUME, "checksum mismatch", setup=steps(RUN, truncate(f"{CKPT}/model.bin", 2000))),
    Case("resume-model-truncated-unsummed", RESUME, "file is truncated",
         setup=steps(RUN, NO_SUMS, truncate(f"{CKPT}/model.bin", 2000))),
    Case("resume-checksums-garbage", RESUME, "unreadable checksum list",
         setup=steps(RUN, write(f"{CKPT}/checksums.sha256", "nonsense\n"))),
    Case("resume-both-damaged", RESUME, "checksum mismatch",
         setup=steps(RUN, flip(f"{CKPT}/model.bin", 3000), flip("run/ckpt-000001/model.bin", 3000))),
    Case("resume-other-settings", [*RESUME, "--lr", "1e-3"], "settings differ from the interrupted run: adamw",
         setup=RUN, keep=KEEP_RUN),
    Case("resume-other-model", [*RESUME[:2], "L1H2C16", *RESUME[3:]], "differs from --model", setup=RUN, keep=KEEP_RUN),
    Case("resume-extend-cosine", [*RESUME, "--steps", "4", "--lr-final-frac", "0.1"],
         "steps (2 -> 4: its cosine schedule decays over --steps", setup=steps(RUN, NO_SUMS,
         edit_json(f"{CKPT}/state.json", lambda s: {**s, "config": {**s["config"], "lr_final_frac": 0.1}}))),
    # ------------------------------------------------------------------ generate
    Case("gen-empty-prompt", [*GEN, "--prompt", ""], "--prompt: prompt is empty"),
    Case("gen-ids-not-ints", [*GEN, "--prompt-ids", "1 x"], "'x' is not a token id"),
    Case("gen-id-outside-vocab", [*GEN, "--prompt-ids", "60000"], "60000"),
    Case("gen-id-negative", [*GEN, "--prompt-ids", "-5"], "-5"),
    Case("gen-max-new-negative", [*GEN, "--prompt-ids", "1", "--max-new-tokens", "-1"], "--max-new-tokens: must be >= 0"),
    Case("gen-temperature-negative", [*GEN, "--prompt-ids", "1", "--temperature", "-1"], "--temperature"),
    Case("gen-temperature-nan", [*GEN, "--prompt-ids", "1", "--temperature", "nan"], "--temperature"),
    Case("gen-top-p-zero", [*GEN, "--prompt-ids", "1", "--top-p", "0"], "--top-p"),
    Case("gen-top-p-two", [*GEN, "--prompt-ids", "1", "--top-p", "2"], "--top-p"),
    Case("gen-top-k-negative", [*GEN, "--prompt-ids", "1", "--top-k", "-1"], "--top-k: must be >= 0"),
    Case("gen-too-long", [*GEN, "--prompt-ids", " ".join(["1"] * 1024)], "1024"),
    Case("gen-seed-negative", [*GEN, "--prompt-ids", "1", "--seed", "-1"], "--seed: must be >= 0"),
    Case("gen-model-missing", ["generate", "--model", "none.bin", "--prompt-ids", "1"], "no such file"),
    # ------------------------------------------------------------------ export
    Case("export-out-is-dir", [*EXPORT, "--out", "{ws}"], "is a directory"),
    Case("export-bf16-opset-too-old", [*EXPORT, "--out", "m.onnx", "--precision", "bf16", "--opset", "18"],
         "--opset: cannot express graphc's opset-24 graph at opset 18 (No Previous Version of Attention exists); "
         "Attention exists from opset 23, Gelu exists from opset 20: use --opset 23 or newer"),
    Case("export-out-under-file", [*EXPORT, "--out", "{ws}/text.txt/m.onnx"], "is a file, not a directory"),
    Case("export-out-read-only", [*EXPORT, "--out", "m.onnx"], "Permission denied", patch=refuse_probe(errno.EACCES)),
    Case("export-weights-is-file", [*EXPORT, "--weights-only", "{ws}/text.txt"], "exists and is not a directory"),
    Case("export-weights-under-file", [*EXPORT, "--weights-only", "{ws}/text.txt/hf"], "is a file, not a directory"),
    Case("export-opset-low", [*EXPORT, "--out", "m.onnx", "--opset", "10"], "--opset"),
    Case("export-opset-high", [*EXPORT, "--out", "m.onnx", "--opset", "30"], "--opset"),
    Case("export-opset-word", [*EXPORT, "--out", "m.onnx", "--opset", "new"], "--opset: invalid"),
    Case("export-kv-weights-only", [*EXPORT, "--weights-only", "hf2", "--kv-cache"], "--kv-cache"),
    Case("export-genai-without-kv", [*EXPORT, "--out", "m.onnx", "--genai-config"], "--genai-config: onnxruntime-genai"),
    Case("export-primitive-weights-only", [*EXPORT, "--weights-only", "hf2", "--primitive-ops"], "--weights-only"),
    Case("export-disk-full", [*EXPORT, "--weights-only", "hf"], "No space left on device",
         setup=copy("hf"), keep=("hf/model.safetensors", "hf/config.json"), patch=fail_writes(errno.ENOSPC)),
    Case("export-onnx-disk-full", [*EXPORT, "--out", "m.onnx"], "m.onnx: No space left on device",
         setup=write("m.onnx", "previous"), keep=("m.onnx",), patch=fail_writes(errno.ENOSPC)),
    Case("export-model-missing", ["export", "--model", "none.bin", "--out", "m.onnx"], "no such file"),
    # ------------------------------------------------------------------ prepare
    Case("prepare-input-missing", ["prepare", "--input", "none.txt", "--out", "data"], "none.txt"),
    Case("prepare-input-dir", ["prepare", "--input", "{ws}", "--out", "data"], "input is not a file"),
    Case("prepare-out-under-file", [*PREPARE, "--out", "{ws}/text.txt/data"], "is a file, not a directory"),
    Case("prepare-out-is-file", [*PREPARE, "--out", "{ws}/text.txt"], "exists and is not a directory"),
    Case("prepare-out-read-only", [*PREPARE, "--out", "data"], "Read-only file system", patch=refuse_probe(errno.EROFS)),
    Case("prepare-disk-full", [*PREPARE, "--out", "data", "--val-tokens", "100"], "No space left on device", setup=write("data/gpt2_tokenizer.bin", "previous"),
         keep=("data/gpt2_tokenizer.bin",), patch=fail_writes(errno.ENOSPC)),
    Case("prepare-val-tokens-zero", [*PREPARE, "--val-tokens", "0"], "--val-tokens: must be >= 1"),
    Case("prepare-tokenizer-dir-missing", [*PREPARE, "--out", "data", "--tokenizer-dir", "none"], "none"),
    # ------------------------------------------------------------------ grad
    Case("grad-model-missing", ["grad", "none.onnx", "--loss", "loss", "--wrt", "W1", "--out", "t.onnx"], "model: not found"),
    Case("grad-model-text", ["grad", "{ws}/text.txt", "--loss", "loss", "--wrt", "W1", "--out", "t.onnx"], "ONNX model"),
    Case("grad-model-dir", ["grad", "{ws}", "--loss", "loss", "--wrt", "W1", "--out", "t.onnx"], "is a directory"),
    Case("grad-loss-unknown", ["grad", "{ws}/mlp.onnx", "--loss", "nope", "--wrt", "W1", "--out", "t.onnx"], "--loss"),
    Case("grad-wrt-unknown", ["grad", "{ws}/mlp.onnx", "--loss", "loss", "--wrt", "nope", "--out", "t.onnx"], "--wrt"),
    Case("grad-wrt-empty", ["grad", "{ws}/mlp.onnx", "--loss", "loss", "--wrt", ",", "--out", "t.onnx"], "no names given"),
    Case("grad-out-under-file", [*GRAD, "--out", "{ws}/text.txt/t.onnx"], "is a file, not a directory"),
    Case("grad-out-is-dir", [*GRAD, "--out", "{ws}"], "is a directory"),
    Case("grad-disk-full", [*GRAD, "--out", "t.onnx"], "t.onnx: No space left on device",
         setup=write("t.onnx", "previous"), keep=("t.onnx",), patch=fail_writes(errno.ENOSPC)),
    # ------------------------------------------------------------------ validate
    Case("validate-state-missing", [*VALIDATE, "none.bin"], "not found"),
    Case("validate-state-empty", [*VALIDATE, "s.bin"], "truncated", setup=write("s.bin", b"")),
    Case("validate-state-text", [*VALIDATE, "{ws}/text.txt"], "{ws}/text.txt"),
    Case("validate-model-missing", ["validate", "--model", "none.bin", "--state", "{ws}/text.txt"], "no such file"),
    Case("validate-backend-unusable-first", [*VALIDATE, "{ws}/text.txt", "--backend", "cuda"],
         "cuda: --backend: backend is not available here"),
    # ------------------------------------------------------------------ compile
    Case("compile-dump-under-file", [*COMPILE, "--dump", "{ws}/text.txt/d"], "--dump: cannot be created"),
    Case("compile-dump-is-file", [*COMPILE, "--dump", "{ws}/text.txt"], "exists and is not a directory"),
    Case("compile-dump-disk-full", [*COMPILE, "--dump", "d"], "error: d: No space left on device",
         patch=lambda mp: mp.setattr("graphc.passes.manager.listing", _no_space)),
    Case("compile-t-too-long", [*COMPILE, "-t", "4096"], "-t: sequence length 4096"),
    Case("compile-b-zero", [*COMPILE, "-b", "0"], "-b: must be >= 1"),
    # ------------------------------------------------------------------ compare
    Case("compare-one-backend", [*COMPARE, "onnxruntime"], "--backends: name at least two backends"),
    Case("compare-unknown-backend", [*COMPARE, "onnxruntime,onnxrt"], "onnxrt: --backends: unknown backend"),
    Case("compare-backend-unusable", [*COMPARE, "onnxruntime,reference"], "reference: --backends: backend is not "
         "available here: no GPU", patch=lambda mp: mp.setattr("graphc.backends.reference.ReferenceBackend.available",
                                                                classmethod(lambda cls: (False, "no GPU")))),
    Case("compare-backend-twice", [*COMPARE, "reference,reference"], "reference: --backends: backend named twice"),
    Case("compare-model-missing", ["compare", "--model", "none.bin", "--mode", "infer", "--backends",
                                   "onnxruntime,reference"], "no such file"),
    Case("compare-bad-mode", ["compare", "--model", MODEL, "--mode", "serve", "--backends", "onnxruntime,reference"],
         "invalid choice: 'serve'"),
    Case("compare-bad-precision", [*COMPARE, "onnxruntime,reference", "--precision", "fp8"], "invalid choice: 'fp8'"),
    Case("compare-t-too-long", [*COMPARE, "onnxruntime,reference", "-t", "4096"], "-t: sequence length 4096"),
    Case("compare-b-zero", [*COMPARE, "onnxruntime,reference", "-b", "0"], "-b: must be >= 1"),
    Case("compare-load-outputs-missing", [*COMPARE, "onnxruntime,reference", "--load-outputs", "none.json"],
         "none.json: --load-outputs: no such file"),
    Case("compare-load-outputs-not-json", [*COMPARE, "onnxruntime,reference", "--load-outputs", "{ws}/text.txt"],
         "text.txt: --load-outputs: not a JSON file"),
    Case("compare-load-outputs-other-json", [*COMPARE, "onnxruntime,reference", "--load-outputs", "x.json"],
         "x.json: --load-outputs: not Polygraphy inference results", setup=write("x.json", '{"steps": 3}')),
    Case("compare-load-outputs-inputs-file", [*COMPARE, "onnxruntime,reference", "--load-outputs", "in.json"],
         "in.json: --load-outputs: not Polygraphy inference results",
         setup=lambda ws, tmp: _polygraphy_file(tmp / "in.json", inputs=True)),
    Case("compare-load-outputs-two-iterations", [*COMPARE, "onnxruntime,reference", "--load-outputs", "r.json"],
         "r.json: --load-outputs: runner 'trt-runner' has 2 iterations",
         setup=lambda ws, tmp: _polygraphy_file(tmp / "r.json", iterations=2)),
    Case("compare-save-for-unknown", [*COMPARE, "onnxruntime,reference", "--save-for", "trt", "--save-model", "m.onnx"],
         "trt: --save-for: unknown backend"),
    Case("compare-save-for-alone", [*COMPARE, "onnxruntime,reference", "--save-for", "tensorrt"],
         "tensorrt: --save-for: says whose graph"),
    Case("compare-save-model-under-file", [*COMPARE, "onnxruntime,reference", "--save-model", "{ws}/text.txt/m.onnx"],
         "--save-model: cannot be created"),
    Case("compare-save-outputs-is-dir", [*COMPARE, "onnxruntime,reference", "--save-outputs", "{ws}"],
         "--save-outputs: is a directory"),
    # ------------------------------------------------------------------ serve
    Case("serve-port-out-of-range", ["serve", "--model", MODEL, "--port", "70000"], "--port: must be 0..65535"),
    Case("serve-host-unresolvable", [*SERVE, "--host", "999.1.1.1"], "999.1.1.1: --host: not an address to listen on"),
    Case("serve-host-not-here", [*SERVE, "--host", "192.0.2.1"], "192.0.2.1: --host: cannot listen here"),
    Case("serve-model-missing", ["serve", "--model", "none.bin", "--port", "0"], "none.bin: --model: no such file"),
    Case("serve-context-too-long", [*SERVE, "--context", "5000"], "--context: 5000 exceeds the model's maximum"),
    Case("serve-max-batch-zero", [*SERVE, "--max-batch", "0"], "--max-batch: must be >= 1"),
    Case("serve-max-queue-text", [*SERVE, "--max-queue", "many"], "--max-queue: must be an integer"),
    Case("serve-backend-unknown", [*SERVE, "--backend", "tpu"], "--backend: invalid choice: 'tpu'"),
    Case("serve-backend-unusable", [*SERVE, "--backend", "cuda"], "cuda: --backend: backend is not available here"),
    Case("serve-precision-unknown", [*SERVE, "--precision", "int8"], "--precision: invalid choice: 'int8'"),
    Case("serve-api-key-empty", [*SERVE, "--api-key", ""], "graphc serve: --api-key: must not be empty"),
    # ------------------------------------------------------------------ engine
    Case("engine-out-is-a-folder", ["engine", "--model", MODEL, "--out", "{ws}"], "--out"),
    Case("engine-max-seq-too-long", [*ENGINE, "--max-seq", "4096"], "--max-seq"),
    Case("engine-max-batch-zero", [*ENGINE, "--max-batch", "0"], "--max-batch: must be >= 1"),
    Case("engine-max-seq-one", [*ENGINE, "--max-seq", "1"], "error: graphc engine: --max-seq: must be >= 2, got 1"),
    Case("engine-out-onnx", ["engine", "--model", MODEL, "--out", "e.onnx"], "e.onnx: --out: names an ONNX model"),
    Case("engine-out-under-file", ["engine", "--model", MODEL, "--out", "{ws}/text.txt/e.plan"],
         "--out: cannot be created"),
    Case("engine-mode-unknown", [*ENGINE, "--mode", "serve"], "--mode: invalid choice: 'serve'"),
    Case("engine-precision-unknown", [*ENGINE, "--precision", "fp16"], "--precision: invalid choice: 'fp16'"),
    Case("engine-flavor-missing", [*ENGINE, "--trt-flavor", "tensorrt"], "--trt-flavor"),
    Case("engine-model-missing", ["engine", "--model", "none.bin", "--out", "e.plan"], "none.bin: --model"),
]


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _nan_model(ws: Path, tmp: Path) -> None:
    data = bytearray((ws / "model.bin").read_bytes())
    data[1024:1028] = np.float32(np.nan).tobytes()
    (tmp / "model.bin").write_bytes(bytes(data))


def _nan_optimizer(path: Path) -> None:
    with np.load(path) as z:
        m, v = z["m"].copy(), z["v"]
    m[0] = np.nan
    np.savez(path, m=m, v=v)


# ----------------------------------------------------------------------------- the workspace
def mlp_model() -> onnx.ModelProto:
    w1 = numpy_helper.from_array(np.ones((3, 2), np.float32), "W1")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("ReduceSum", ["h"], ["loss"], keepdims=0)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], [w1])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_shards):
    from graphc.models.init import random_init
    from graphc.models.config import named_config
    from graphc.models.hf import save_hf
    from graphc.models.llmc import save_llmc

    ws = tmp_path_factory.mktemp("ws")
    params = random_init(named_config(MODEL), 0)
    save_llmc(params, ws / "model.bin")
    save_hf(params, ws / "hf")
    shutil.copy(tiny_shards.train_path, ws / "train.bin")
    shutil.copy(tiny_shards.val_path, ws / "val.bin")
    (ws / "text.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 50)
    onnx.save(mlp_model(), str(ws / "mlp.onnx"))
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        argv = [a.replace("{ws}", str(ws)) for a in TRAIN] + ["--out", "run"]
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    assert [p.name for p in sorted((ws / "run").glob("ckpt-*"))] == ["ckpt-000001", "ckpt-000002"]
    return ws


def _fingerprint(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_table_is_big_enough():
    assert len(CASES) >= 100
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ws: Path, tmp_path: Path, monkeypatch, capsys):
    if case.setup:
        case.setup(ws, tmp_path)
    before = {k: _digest(tmp_path / k) for k in case.keep}
    shared = _fingerprint(ws)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.replace("{ws}", str(ws)))
    if case.patch:
        case.patch(monkeypatch)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()

    rc = main([a.replace("{ws}", str(ws)).replace("{tmp}", str(tmp_path)) for a in case.argv])

    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith("progress: ")]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "usage:" not in err
    assert case.expect.replace("{ws}", str(ws)) in lines[0], lines[0]
    monkeypatch.undo()
    assert {k: _digest(tmp_path / k) for k in case.keep} == before, "a prior output changed"
    assert _fingerprint(ws) == shared, "the shared workspace changed"


# ----------------------------------------------------------------------------- good paths the table relies on
def test_resume_extends_a_finished_run_with_a_constant_schedule(ws, tmp_path, monkeypatch, capsys):
    shutil.copytree(ws / "run", tmp_path / "run")
    (tmp_path / "run" / ".ckpt-000003.tmp").mkdir()                    # what a SIGKILL mid-checkpoint leaves
    (tmp_path / "run" / ".model.bin.abc123.tmp").write_bytes(b"half")
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{ws}", str(ws)) for a in RESUME] + ["--steps", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "step 2: train loss" in out and "step 1:" not in out
    assert not list((tmp_path / "run").glob(".*.tmp")), "leftovers of a killed write are cleaned"
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == ["ckpt-000002", "ckpt-000003"]


def test_overwrite_replaces_a_run(ws, tmp_path, monkeypatch):
    shutil.copytree(ws / "run", tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{ws}", str(ws)) for a in TRAIN] + ["--out", "run", "--overwrite", "--steps", "1"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "latest").read_text().strip() == "ckpt-000001"
    assert [p.name for p in (tmp_path / "run").glob("ckpt-*")] == ["ckpt-000001"]  # none of the old run


def test_progress_line_is_cleared_before_a_step_line_on_a_terminal(monkeypatch, capsys):
    from graphc.runtime.trainer import Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    progress = Progress(4, 16, 0)
    progress.update(1, 10.0)
    progress.clearing(lambda line: sys.stderr.write(line + "\n"))("step 1: train loss 1.0")
    err = capsys.readouterr().err
    assert err.startswith("\r[1/4]") and "\r\x1b[Kstep 1: train loss 1.0\n" in err


# ----------------------------------------------------------------------------- signals (real processes)
def _graphc(args, cwd, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "graphc", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (Linux: SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


def test_sigterm_before_the_training_loop_is_one_line(ws, tmp_path):
    """SIGTERM while graphc loads and builds (before the loop's own handler): 143 and one line."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to see when graphc handles SIGTERM")
    argv = [a.replace("{ws}", str(ws)) for a in TRAIN] + ["--steps", "400", "--out", "run"]
    proc = _graphc(argv, tmp_path)
    deadline = time.time() + 120
    while not _catches(proc.pid, signal.SIGTERM) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (143, 130), err     # 130: it reached the loop (checkpoint, then exit)
    lines = [l for l in err.splitlines() if not l.startswith("progress: ")]
    assert "Traceback" not in err
    if proc.returncode == 143:
        assert lines == ["terminated"], err
    else:
        assert lines == [] and "stopped after step" in out, (out, err)


def test_sigkill_during_training_loses_nothing(ws, tmp_path):
    """Kill -9 mid-run: the run resumes from its last checkpoint, which verifies."""
    argv = [a.replace("{ws}", str(ws)) for a in TRAIN] + ["--steps", "400", "--val-every", "0", "--out", "run"]
    proc = _graphc(argv, tmp_path)
    deadline = time.time() + 300   # a loaded machine is slow to get there
    while time.time() < deadline and proc.poll() is None and not (tmp_path / "run" / "ckpt-000003").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert (tmp_path / "run" / "latest").exists()
    from graphc.runtime import checkpoint

    checkpoint.load(tmp_path / "run")   # the newest complete checkpoint verifies


def test_export_removes_what_a_killed_export_left(ws, tmp_path, monkeypatch):
    """A SIGKILL mid-export leaves ``.m.onnx.XXXX.tmp``; the next export of m.onnx removes it,
    and nothing else that merely looks temporary."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".m.onnx.k1ll3d.tmp").mkdir()
    (tmp_path / ".other.abc.tmp").write_text("not graphc's")
    assert main(["export", "--model", str(ws / "model.bin"), "--out", "m.onnx"]) == 0
    assert not (tmp_path / ".m.onnx.k1ll3d.tmp").exists() and (tmp_path / ".other.abc.tmp").exists()


def test_serve_on_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import socket

    def no_model(*a, **k):
        raise AssertionError("the port is checked before the model loads")

    monkeypatch.setattr("graphc.models.load.load_model", no_model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rc = main(["serve", "--model", MODEL, "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: 127.0.0.1:{port}: --port: address already in use (another server? pick " \
                              "another --port, or 0 for a free one)\n", err
