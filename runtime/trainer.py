"""The compiled training runner: drives a backend's train-step program over the data.

One step is: next batch from the loader (llm.c's order; ``grad_accum`` micro-batches), then
one call of the backend's :class:`~graphc.runtime.programs.TrainStep` (forward, backward,
optional clip, AdamW, all on the backend's device), which returns the loss. The step is
submitted and waited for separately, and the next step's batch is read in between, so on
a GPU the host prepares it while the device runs (checkpoints keep the loader's position
before that read, so resuming stays bit for bit). The runner never touches the backend's
buffers: parameters and optimizer state come back to the host only for a checkpoint or a
sample (:meth:`TrainStep.read_params`), and validation runs the backend's
:class:`~graphc.runtime.programs.Evaluator`, which shares the step's parameters.

The printed lines are a contract other tools parse (see the README):

* ``val loss X.XXXXXX`` before step s when s % val_every == 0, and once after the last step;
* ``step S: train loss X.XXXXXX (took M.M ms)`` after each step.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from graphc.backends import get_backend
from graphc.data.shards import TokenLoader
from graphc.errors import GraphcError
from graphc.models.params import Params
from graphc.runtime import checkpoint
from graphc.runtime.evaluate import mean_loss
from graphc.runtime.optimizer import AdamWConfig
from graphc.runtime.programs import TrainSpec
from graphc.runtime.schedule import SCHEDULES
from graphc.runtime.trainlog import TrainLog


@dataclasses.dataclass
class TrainConfig:
    B: int = 4
    T: int = 64
    steps: int = 40
    adamw: AdamWConfig = dataclasses.field(default_factory=AdamWConfig)
    schedule: str = "cosine"
    warmup: int = 0
    lr_final_frac: float = 1.0
    decay_matrices_only: bool = False
    val_every: int = 10
    val_batches: int = 5
    sample_every: int = 0
    sample_tokens: int = 64
    seed: int = 0
    shuffle: bool = False
    checkpoint_every: int = 0
    backend: str = "onnxruntime"
    precision: str = "fp32"
    opt: bool = True
    zero: int = 0                      # ZeRO stage for data-parallel runs (0 or 1)
    grad_accum: int = 1                # micro-batches per step (--total-batch-size / (B*T))
    recompute: bool = False            # recompute GELU / layer-norm outputs in backward

    @property
    def tokens_per_step(self) -> int:
        return self.grad_accum * self.B * self.T

    def resumable(self) -> dict:
        """The settings a resumed run must share with the original for bit-for-bit results."""
        keep = ("B", "T", "steps", "schedule", "warmup", "lr_final_frac", "decay_matrices_only", "shuffle", "seed",
                "precision", "grad_accum", "zero")
        return {k: getattr(self, k) for k in keep} | {"adamw": dataclasses.asdict(self.adamw)}


class Trainer:
    def __init__(self, params: Params, train_data: str, val_data: str | None, config: TrainConfig,
                 out: Path | None = None, emit: Callable[[str], None] | None = None,
                 sampler: Callable[[Params, int], str] | None = None, parallel=None):
        self.params, self.config, self.out = params, config, out
        # data parallel (graphc.runtime.distributed.DataParallel): rank 0 alone prints and writes
        self.parallel = parallel
        self.rank, self.world = (parallel.rank, parallel.world) if parallel is not None else (0, 1)
        self.emit = emit or (lambda line: print(line, flush=True))
        if self.rank != 0:
            self.emit = lambda line: None
        self.sampler = sampler
        cfg = params.cfg
        if config.T > cfg.max_seq_len:
            raise GraphcError(None, f"sequence length {config.T} exceeds the model's maximum {cfg.max_seq_len}", "-t")
        # llm.c's sharded loader: each rank reads its B rows of every global batch of world * B
        self.train_loader = TokenLoader(train_data, config.B, config.T, shuffle=config.shuffle, seed=config.seed,
                                        vocab_size=cfg.vocab_size, process_rank=self.rank,
                                        num_processes=self.world)
        # validation runs on rank 0 over every rank's rows (the one-GPU val loss at world * B)
        self.val_loaders = ([TokenLoader(val_data, config.B, config.T, vocab_size=cfg.vocab_size, process_rank=r,
                                         num_processes=self.world) for r in range(self.world)]
                            if val_data and self.rank == 0 else [])
        self.val_loader = self.val_loaders[0] if self.val_loaders else None
        if self.val_loader is not None and config.val_batches > self.val_loader.batches_per_epoch():
            raise GraphcError(val_data, f"--val-batches {config.val_batches} exceeds the "
                              f"{self.val_loader.batches_per_epoch()} batches in the val data", "--val-batches")

        backend = get_backend(config.backend)()
        t_setup = time.perf_counter()
        if parallel is not None:
            parallel.connect(backend)
        device_params = backend.upload_params(params)
        self.program = backend.train_step(device_params, TrainSpec(
            B=config.B, T=config.T, precision=config.precision, adamw=config.adamw,
            decay_matrices_only=config.decay_matrices_only, opt=config.opt, grad_accum=config.grad_accum,
            recompute=config.recompute, parallel=parallel))
        if self.rank == 0:
            report_setup(self.program, time.perf_counter() - t_setup)
        self.evaluator = (backend.evaluator(device_params, config.B, config.T, precision=config.precision,
                                            opt=config.opt) if self.val_loader else None)
        self.schedule = SCHEDULES[config.schedule](config.adamw.lr, config.steps, config.warmup,
                                                   config.lr_final_frac)
        self.step = 0
        self.prefetched = None          # the next step's batch, read while the device ran the last
        self.loader_state = None        # the loader's state before that read (what a checkpoint keeps)
        self.log = TrainLog()
        self.stop_requested = False

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        if self.out is None:
            raise GraphcError(None, "needs --out DIR holding the run to continue", "--resume")
        params, m, v, state = checkpoint.load(self.out)
        if params.cfg != self.params.cfg:
            raise GraphcError(self.out, f"checkpoint model ({params.cfg.describe()}) differs from --model "
                              f"({self.params.cfg.describe()})", "--resume")
        if state.get("gpus", 1) != self.world:
            raise GraphcError(self.out, f"the checkpoint was written by a run on {state.get('gpus', 1)} GPU(s); "
                              f"resume it on as many (--gpus {state.get('gpus', 1)}): the data order and the "
                              "optimizer shards depend on the count", "--resume")
        diffs = checkpoint.settings_differ(state.get("config", {}), self.config.resumable())
        if diffs:
            raise GraphcError(self.out, f"settings differ from the interrupted run: {', '.join(diffs)} "
                              "(resume needs the same ones to continue bit for bit)", "--resume")
        self.program.write_params(params.flat)
        self.program.load_optimizer_state({"m": m, "v": v})
        # every rank's loader is at rank 0's position (they advance together); only the rank differs
        loader = state["loader"]
        self.train_loader.restore({**loader, "config": {**loader["config"], "process_rank": self.rank}})
        self.prefetched = None
        self.step = int(state["step"])
        self.log = TrainLog(state.get("log", []))

    def save(self) -> None:
        if self.out is None:
            return
        sharded = self.parallel is not None and self.parallel.zero > 0
        if self.rank != 0 and not sharded:
            return
        opt_state = self.program.optimizer_state()  # with ZeRO-1 a collective: every rank takes part
        params = self.program.read_params()
        if self.rank != 0:
            return
        # the loader's position after the last step taken (not after the prefetched batch)
        loader = self.loader_state if self.prefetched is not None else self.train_loader.state()
        state = {"loader": loader, "config": self.config.resumable(), "log": self.log.rows, "gpus": self.world}
        checkpoint.save(self.out, self.step, Params(self.params.cfg, params),
                        opt_state["m"], opt_state["v"], state)
        self.log.write(self.out)

    # ------------------------------------------------------------------ steps
    def validate(self, step: int) -> float | None:
        if self.val_loader is None:
            return None
        losses = [mean_loss(self.evaluator, loader, self.config.val_batches) for loader in self.val_loaders]
        loss = sum(losses) / len(losses)
        self.emit(f"val loss {loss:.6f}")
        self.log.add("val", step, loss)
        return loss

    def sample(self, step: int) -> None:
        if self.sampler is not None and self.rank == 0:
            weights = self.program.params.to_host()
            self.emit(f"generating:\n---\n{self.sampler(weights, self.config.seed + step)}\n---")

    def train_step(self) -> float:
        t0 = time.perf_counter()
        inputs, targets = self.prefetched or self.next_batches()
        self.prefetched = None
        lr = self.schedule(self.step)
        self.program.submit(inputs, targets, t=self.step + 1, lr=lr)
        if self.step + 1 < self.config.steps:  # the next batch is read while the device runs this step
            self.loader_state = self.train_loader.state()
            self.prefetched = self.next_batches()
        loss = self.program.wait().loss
        require_finite_loss(loss, self.step, self.out if self.rank == 0 else None)   # before anything is saved
        ms = (time.perf_counter() - t0) * 1000
        self.emit(f"step {self.step}: train loss {loss:.6f} (took {ms:.1f} ms)")
        self.log.add("train", self.step, loss, lr, ms)
        self.step += 1
        return ms

    def next_batches(self) -> tuple[np.ndarray, np.ndarray]:
        """One step's micro-batches, ``[grad_accum, B, T]`` tokens and targets (loader order)."""
        batches = [self.train_loader.next_batch() for _ in range(self.config.grad_accum)]
        return np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])

    def run(self, stop_after: int | None = None) -> TrainLog:
        """Train until ``config.steps`` (or after step ``stop_after``, as if interrupted)."""
        c = self.config
        progress = Progress(c.steps, c.tokens_per_step * self.world, self.step, quiet=self.rank != 0)
        emit, self.emit = self.emit, progress.clearing(self.emit)
        try:
            return self._run(progress, stop_after)
        finally:
            self.emit = emit

    def _run(self, progress: "Progress", stop_after: int | None) -> TrainLog:
        c = self.config
        while self.step < c.steps:
            s = self.step
            if c.val_every > 0 and s % c.val_every == 0:
                self.validate(s)
            if c.sample_every > 0 and s > 0 and s % c.sample_every == 0:
                self.sample(s)
            ms = self.train_step()
            progress.update(self.step, ms)  # steps completed so far
            done = self.step == c.steps
            if done or (c.checkpoint_every > 0 and self.step % c.checkpoint_every == 0):
                self.save()
            if not done and (self.stop_requested or (stop_after is not None and s >= stop_after)):
                self.save()
                progress.close()
                return self.log
        progress.close()
        self.validate(self.step)
        if c.sample_every > 0:
            self.sample(self.step)
        if self.out is not None and self.rank == 0:
            self.log.write(self.out)
        return self.log


def require_finite_loss(loss: float, step: int, out: Path | None) -> None:
    """Stop before a non-finite loss reaches the weights, and leave ``--resume`` a checkpoint
    whose weights gave a finite loss (:func:`checkpoint.retract`)."""
    if np.isfinite(loss):
        return
    kept = ""
    if out is not None:
        good = checkpoint.retract(out, step)
        diverged = out / f"ckpt-{step:06d}"
        if good is not None:
            kept = f"; the last good checkpoint is {good} (--resume starts there)"
        elif diverged.is_dir():
            kept = f"; no checkpoint of this run gives a finite loss ({diverged} holds the weights that gave it)"
    raise GraphcError(out or "train", f"the loss became {loss} at step {step}; training stopped{kept} "
                      "(try a lower --lr or --grad-clip 1)", "loss")


def report_setup(program, seconds: float) -> None:
    """The time to the first step, on stderr (stdout's lines are a contract), for a program
    that reports its phases (the CUDA step: lowering, kernels and plans, graph capture)."""
    phases = getattr(program, "setup_seconds", None)
    if not phases:
        return
    detail = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
    sys.stderr.write(f"train step ready after {seconds:.1f} s ({detail})\n")
    sys.stderr.flush()


class Progress:
    """Progress on stderr: steps, tokens/s and ETA.

    On a terminal one line is redrawn every step; otherwise (a log file, CI) a line is
    written about every tenth of the run, so logs show the rate without a line per step.
    """

    def __init__(self, total: int, tokens_per_step: int, start: int, quiet: bool = False):
        self.total, self.tokens, self.start, self.quiet = total, tokens_per_step, start, quiet
        self.tty = sys.stderr.isatty()
        self.every = max(1, (total - start) // 10)
        self.ms: list[float] = []

    def update(self, step: int, ms: float) -> None:
        self.ms.append(ms)
        if self.quiet:
            return
        if not self.tty and (step - self.start) % self.every and step != self.total:
            return
        recent = self.ms[-20:]
        per_step = sum(recent) / len(recent) / 1000
        eta = int(per_step * (self.total - step))
        line = (f"[{step}/{self.total}] {self.tokens / per_step:,.0f} tok/s, "
                f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        sys.stderr.write(f"\r{line}   " if self.tty else f"progress: {line}\n")
        sys.stderr.flush()

    def clearing(self, emit: Callable[[str], None]) -> Callable[[str], None]:
        """``emit`` that first erases the progress line on a terminal (else they run together)."""
        if not self.tty:
            return emit

        def emit_clear(line: str) -> None:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            emit(line)

        return emit_clear

    def close(self) -> None:
        if self.tty and self.ms and not self.quiet:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
