"""Programs: the units the runtime drives, each owning its state on one backend.

A *program* is built once for a model, a backend and fixed settings, and then called many
times; it keeps everything it needs (parameters, gradients, optimizer state, activations,
compiled graphs) on the backend's device, and hands back only what the caller asks for:

==================  ===========================================================  ==========
program             one call                                                     returns
==================  ===========================================================  ==========
:class:`TrainStep`  forward, backward, optional global-norm clip, AdamW update   loss, norm
:class:`Evaluator`  forward with loss on one batch                               loss
``Decoder``         (``runtime/decode.py``) add a prompt / step every live       token ids
                    sequence once / remove a finished one
==================  ===========================================================  ==========

Backends build them (:meth:`graphc.backends.base.Backend.train_step` and friends). The
generic versions here (:class:`GraphTrainStep`, :class:`GraphEvaluator`) run the optimised
ONNX graphs through :meth:`~graphc.backends.base.Backend.prepare` and update the weights
with the numpy AdamW of :mod:`graphc.runtime.optimizer`: that is what onnxruntime (and any
backend whose buffers live in host memory) uses. A GPU backend returns its own TrainStep
that replays the whole step as one CUDA graph.

Two seams for data-parallel training are part of the contract:

* :attr:`TrainStep.grad_hooks`: callables invoked with each :class:`GradBucket` as soon as
  that bucket's gradients are final (the last layer's first, as backward produces them), so
  an all-reduce can overlap the rest of the backward. The generic step runs the whole graph
  at once, so its buckets are all final together; it still calls the hooks bucket by bucket,
  in backward order, before clipping and the update.
* the optimizer updates a *shard* of the flat buffers (:class:`graphc.runtime.optimizer.AdamW`
  ``shard=``), so optimizer state can be partitioned across ranks (ZeRO-1).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable

import numpy as np
import onnx

from graphc.backends.buffer import Buffer
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.models.params import Params, param_specs
from graphc.runtime.optimizer import AdamW, AdamWConfig


# ============================================================================ graphs
def optimize(model: onnx.ModelProto, mode: str, *, backend: str | None = None,
             precision: str = "fp32", recompute: bool = False) -> onnx.ModelProto:
    """The optimisation pipeline for ``mode`` on ``backend`` (legalised for it)."""
    from graphc.passes.pipelines import optimize as run_pipeline

    optimized, _report = run_pipeline(model, mode, backend=backend, precision=precision, recompute=recompute)
    return optimized


def forward_graph(cfg: GPT2Config, *, loss: bool, logits: bool, opt: bool = True, backend: str | None = None,
                  precision: str = "fp32") -> onnx.ModelProto:
    model = build_forward(cfg, loss=loss, logits=logits)
    return compile_graph(model, "infer", opt=opt, backend=backend, precision=precision)


def training_graph(cfg: GPT2Config, *, opt: bool = True, backend: str | None = None,
                   precision: str = "fp32", recompute: bool = False) -> onnx.ModelProto:
    """Forward with loss + backward: outputs ``loss`` and ``grad.<param>`` for every param.

    ``recompute`` runs :mod:`graphc.passes.recompute` after the cleanup: backward reads
    recomputed GELU / layer-norm outputs, so the forward ones die early."""
    forward = build_forward(cfg, loss=True, logits=False)
    if opt or precision != "fp32" or recompute:
        return optimize(forward, "train", backend=backend, precision=precision,
                        recompute=recompute)  # differentiates after fusing
    from graphc.passes.autodiff import differentiate

    model = differentiate(forward, "loss", [s.name for s in param_specs(cfg)], keep_outputs=False)
    return compile_graph(model, "train", opt=False, backend=backend)


def compile_graph(model: onnx.ModelProto, mode: str, *, opt: bool = True, backend: str | None = None,
                  precision: str = "fp32") -> onnx.ModelProto:
    """``model`` optimised for ``mode`` (or, with ``opt=False``, only legalised) for ``backend``."""
    if opt or precision != "fp32":
        return optimize(model, mode, backend=backend, precision=precision)
    if backend is not None:
        from graphc.passes.pipelines import legalize

        legalize(model, backend)
    return model


# ============================================================================ parameters
class DeviceParams:
    """A model's flat float32 parameter buffer on a backend's device (llm.c's layout).

    ``view(name)`` is the named parameter as a buffer sharing that memory, which is how
    programs bind parameters to graphs: one allocation, no per-tensor copies.
    """

    def __init__(self, cfg: GPT2Config, flat: Buffer):
        self.cfg = cfg
        self.flat = flat
        self.specs = param_specs(cfg)

    def view(self, name: str) -> Buffer:
        s = next(s for s in self.specs if s.name == name)
        return self.flat.view(s.offset, s.shape)

    def views(self) -> dict[str, Buffer]:
        return {s.name: self.flat.view(s.offset, s.shape) for s in self.specs}

    def to_host(self) -> Params:
        """The parameters as host :class:`Params` (a copy from a device; a view on the CPU)."""
        return Params(self.cfg, self.flat.to_numpy())


# ============================================================================ training
@dataclasses.dataclass
class TrainSpec:
    """What a compiled train step must know up front."""

    B: int
    T: int
    precision: str = "fp32"            # a name in graphc.precision.PRECISIONS
    adamw: AdamWConfig = dataclasses.field(default_factory=AdamWConfig)
    decay_matrices_only: bool = False
    opt: bool = True                   # run the optimisation pipeline (False: the plain autodiff graph)
    parallel: object = None            # graphc.runtime.distributed.DataParallel (connected), or None
    grad_accum: int = 1                # micro-batches of [B, T] per optimizer step (llm.c's grad_accum_steps)
    recompute: bool = False            # recompute GELU / layer-norm outputs in backward (passes/recompute.py)


@dataclasses.dataclass
class StepResult:
    loss: float
    grad_norm: float | None = None     # the global gradient norm, when clipping


@dataclasses.dataclass(frozen=True)
class GradBucket:
    """Parameters whose gradients become final together (a layer), as ranges of the flat buffer."""

    index: int                         # 0 = the first to be ready
    names: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]  # (offset, size) in elements


def grad_buckets(cfg: GPT2Config) -> list[GradBucket]:
    """GPT-2's buckets in the order backward finishes them: final layer norm, layers L-1..0,
    then the embeddings (wte's gradient is final only after the embedding's scatter-add)."""
    groups: dict[str, list] = {}
    for s in param_specs(cfg):
        key = "embed" if s.tensor in ("wte", "wpe") else ("final" if s.layer is None else f"h{s.layer}")
        groups.setdefault(key, []).append(s)
    order = ["final"] + [f"h{layer}" for layer in reversed(range(cfg.n_layer))] + ["embed"]
    return [GradBucket(i, tuple(s.name for s in groups[k]), tuple((s.offset, s.size) for s in groups[k]))
            for i, k in enumerate(order)]


def micro_batches(a: np.ndarray, spec: TrainSpec) -> np.ndarray:
    """``a`` as ``[grad_accum, B, T]`` int64 (a ``[B, T]`` batch is accepted when grad_accum is 1)."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[None]
    if a.shape != (spec.grad_accum, spec.B, spec.T):
        raise ValueError(f"expected micro-batches of shape {(spec.grad_accum, spec.B, spec.T)}, got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


def mean_loss_of(losses) -> float:
    """The step's loss: the mean of the micro-batch losses, in float64, in order (every backend alike)."""
    total = 0.0
    for x in losses:
        total += float(x)
    return total / len(losses)


def decay_mask(cfg: GPT2Config, matrices_only: bool) -> np.ndarray | None:
    """float32 {0, 1} per parameter element: which elements weight decay applies to (None: all)."""
    if not matrices_only:
        return None
    params = Params(cfg)
    mask = np.zeros_like(params.flat)
    for s in params.specs:
        if s.is_matrix:
            mask[s.offset:s.offset + s.size] = 1.0
    return mask


class TrainStep(abc.ABC):
    """One optimizer step of a compiled training program; owns params, grads and optimizer state."""

    params: DeviceParams
    grad_hooks: list[Callable[[GradBucket], None]]
    setup_seconds: dict[str, float] | None = None   # what building it took, by phase (the time to the first step)

    @abc.abstractmethod
    def run(self, tokens: np.ndarray, targets: np.ndarray, *, t: int, lr: float) -> StepResult:
        """Forward, backward, clip, AdamW (``t`` is the 1-based step of AdamW's bias correction).

        With ``spec.grad_accum`` = k > 1, ``tokens`` and ``targets`` are ``[k, B, T]`` (see
        :func:`micro_batches`): the gradient is the mean of the k micro-batch gradients
        (each scaled by 1/k as it is added, llm.c's order), the loss the mean of their losses."""

    def submit(self, tokens: np.ndarray, targets: np.ndarray, *, t: int, lr: float) -> None:
        """Start a step; :meth:`wait` returns its result. Between the two the host is free to
        prepare the next batch while the device works (the trainer does). This default runs
        the step right here (host backends have nothing to overlap with)."""
        self._pending = self.run(tokens, targets, t=t, lr=lr)

    def wait(self) -> StepResult:
        """The result of the step :meth:`submit` started."""
        result, self._pending = self._pending, None
        return result

    def read_params(self) -> np.ndarray:
        """The flat float32 parameters, llm.c's layout, as a host copy."""
        return np.array(self.params.flat.to_numpy(), dtype=np.float32, copy=True)

    def write_params(self, flat: np.ndarray) -> None:
        self.params.flat.copy_from_numpy(np.asarray(flat, dtype=np.float32))

    @abc.abstractmethod
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW's ``m`` and ``v`` (float32, flat) as host copies, for a checkpoint."""

    @abc.abstractmethod
    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None: ...


class GraphTrainStep(TrainStep):
    """The generic train step: the training graph on ``backend.prepare``, AdamW in numpy.

    Gradients are written by the backend straight into one flat buffer of the parameters'
    layout (each ``grad.<param>`` output bound to its view), and the numpy optimizer updates
    the parameter buffer the graph reads in place, so nothing is copied per step. It needs
    buffers the host can address (``device == "cpu"``).
    """

    def __init__(self, backend, params: DeviceParams, spec: TrainSpec, *, shard: tuple[int, int] | None = None):
        from graphc.passes.autodiff import grad_name

        if params.flat.device != "cpu":
            raise ValueError(f"{type(self).__name__} updates weights on the host; {backend.name} keeps them "
                             f"on {params.flat.device}")
        self.backend, self.params, self.spec = backend, params, spec
        cfg = params.cfg
        n = params.flat.size
        # ``grads`` is the step's gradient (what hooks, clipping and AdamW read); with
        # accumulation the graph writes each micro-batch's gradient into ``micro_grads`` and
        # the step adds it, scaled by 1/k, into ``grads``
        self.grads = backend.alloc((n,), np.float32)
        self.micro_grads = backend.alloc((n,), np.float32) if spec.grad_accum > 1 else self.grads
        self.grad_outputs = {grad_name(s.name): self.micro_grads.view(s.offset, s.shape) for s in params.specs}
        self.program = backend.prepare(training_graph(cfg, opt=spec.opt, backend=backend.name,
                                                      precision=spec.precision, recompute=spec.recompute))
        self.program.bind(params.views())
        self.optimizer = AdamW(n, spec.adamw, decay_mask(cfg, spec.decay_matrices_only), shard=shard)
        self.buckets = grad_buckets(cfg)
        self.grad_hooks = []

    def run(self, tokens: np.ndarray, targets: np.ndarray, *, t: int, lr: float) -> StepResult:
        k = self.spec.grad_accum
        tokens, targets = micro_batches(tokens, self.spec), micro_batches(targets, self.spec)
        losses = []
        for i in range(k):
            out = self.program.run({"tokens": tokens[i], "targets": targets[i]}, outputs=self.grad_outputs)
            losses.append(float(out["loss"]))
            if k > 1:
                accumulate(self.grads.to_numpy(), self.micro_grads.to_numpy(), np.float32(1.0 / k), first=i == 0)
        for bucket in self.buckets if self.grad_hooks else ():
            for hook in self.grad_hooks:
                hook(bucket)
        norm = self.optimizer.step(self.params.flat.to_numpy(), self.grads.to_numpy(), t, lr)
        return StepResult(mean_loss_of(losses), norm if self.spec.adamw.grad_clip > 0 else None)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.optimizer.state().items()}

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        self.optimizer.load_state(state)


def accumulate(acc: np.ndarray, grad: np.ndarray, scale: np.float32, *, first: bool) -> None:
    """``acc = (0 if first else acc) + grad * scale`` in float32, two roundings (the CUDA
    kernel ``kernels.accumulate`` does the same, so both backends sum alike)."""
    scaled = np.multiply(grad, scale, dtype=np.float32)
    if first:
        acc[...] = scaled
    else:
        np.add(acc, scaled, out=acc)


# ============================================================================ evaluation
class Evaluator(abc.ABC):
    """Mean loss of one batch with the parameters it shares with its train step."""

    @abc.abstractmethod
    def loss(self, tokens: np.ndarray, targets: np.ndarray) -> float: ...


class GraphEvaluator(Evaluator):
    def __init__(self, backend, params: DeviceParams, B: int, T: int, *, precision: str = "fp32", opt: bool = True):
        self.program = backend.prepare(forward_graph(params.cfg, loss=True, logits=False, opt=opt,
                                                     backend=backend.name, precision=precision))
        self.program.bind(params.views())

    def loss(self, tokens: np.ndarray, targets: np.ndarray) -> float:
        return float(self.program.run({"tokens": tokens, "targets": targets})["loss"])
