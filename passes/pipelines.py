"""Named pipelines: which passes run, in which order, for each target.

Two registries, no if-chains:

* :data:`PASSES`: pass name -> factory ``(options) -> pass`` (a fresh pass per run, so
  the stats of one run never leak into another);
* :data:`PIPELINES`: pipeline name -> list of pass names. Keys are a mode (``infer``,
  ``train``) or ``mode:backend`` for a backend-specific variant; :func:`pipeline_for`
  falls back from ``mode:backend`` to ``mode``.

``train`` starts from the *forward* graph with its loss and differentiates inside the
pipeline, after the forward fusions: the VJP rules of the fused ops
(their definitions in ``graphc/ops/``) then emit the fused backward ops directly, which is
simpler and more robust than recognising the backward of every primitive afterwards.
``train_graph`` is for a graph that is already differentiated (its outputs include
``grad.*``): ``fuse_backward`` proves its gradients are the plain autodiff of its forward
part and re-derives them from the fused forward (see ``passes/fusions/backward.py``).

:func:`optimize` is the entry point the runner and ``graphc compile`` call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import onnx
from onnx import TensorProto

from graphc.passes.constant_fold import ConstantFold
from graphc.passes.cse import CommonSubexpressionElimination
from graphc.passes.dce import DeadCodeElimination
from graphc.passes.fold_transpose import FoldTranspose
from graphc.passes.fusions.attention import fuse_attention
from graphc.passes.fusions.backward import FuseBackward
from graphc.passes.fusions.cross_entropy import fuse_cross_entropy
from graphc.passes.fusions.gelu import fuse_gelu
from graphc.passes.fusions.layernorm import fuse_layernorm
from graphc.passes.fusions.masked_attention import fuse_masked_attention
from graphc.passes.manager import Pass, PassManager, Report
from graphc.passes.precision import EmulateBF16, PrecisionBF16
from graphc.passes.recompute import Recompute
from graphc.passes.remove_identity import RemoveIdentity
from graphc.passes.shape_inference import ShapeInference

GRAD_PREFIX = "grad."
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


@dataclass
class Options:
    """What pass factories may need: the loss and the parameters to differentiate."""

    loss: str = "loss"
    wrt: list[str] | None = None      # None: every floating-point graph input
    master_params: bool = True        # precision_bf16: parameters stay float32 inputs (training)
    extra: dict = field(default_factory=dict)


class Differentiate:
    """The autodiff driver as a pass: forward graph with a loss -> training graph with
    ``grad.<param>`` outputs (and the loss)."""

    name = "autodiff"

    def __init__(self, loss: str = "loss", wrt: list[str] | None = None):
        self.loss, self.wrt = loss, wrt
        self.stats: dict[str, int] = {}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        from graphc.passes.autodiff import differentiate
        from graphc.ops import ensure_functions

        if any(o.name.startswith(GRAD_PREFIX) for o in model.graph.output):
            return model, False   # already a training graph
        wrt = self.wrt if self.wrt is not None else float_inputs(model)
        out = ensure_functions(differentiate(model, self.loss, wrt))
        self.stats = {"wrt": len(wrt)}
        return out, True


def float_inputs(model: onnx.ModelProto) -> list[str]:
    return [v.name for v in model.graph.input if v.type.tensor_type.elem_type in FLOAT_TYPES]


PASSES: dict[str, Callable[[Options], Pass]] = {
    "shape_inference": lambda o: ShapeInference(),
    "remove_identity": lambda o: RemoveIdentity(),
    "constant_fold": lambda o: ConstantFold(),
    "cse": lambda o: CommonSubexpressionElimination(),
    "dce": lambda o: DeadCodeElimination(),
    "fold_transpose": lambda o: FoldTranspose(),
    "fuse_layernorm": lambda o: fuse_layernorm(),
    "fuse_gelu": lambda o: fuse_gelu(),
    "fuse_attention": lambda o: fuse_attention(),
    "fuse_masked_attention": lambda o: fuse_masked_attention(),
    "fuse_cross_entropy": lambda o: fuse_cross_entropy(),
    "autodiff": lambda o: Differentiate(o.loss, o.wrt),
    "fuse_backward": lambda o: FuseBackward(o.loss),
    "precision_bf16": lambda o: PrecisionBF16(set(o.wrt) if o.wrt is not None else None, o.master_params),
    "emulate_bf16": lambda o: EmulateBF16(),
    "recompute": lambda o: Recompute(o.loss),
}

CLEANUP = ["remove_identity", "constant_fold", "cse", "dce"]
FORWARD_FUSIONS = ["fuse_layernorm", "fuse_gelu", "fuse_attention", "fuse_cross_entropy"]

PIPELINES: dict[str, list[str]] = {
    # forward graphs (logits and/or loss): clean, fuse, clean again
    "infer": ["shape_inference", *CLEANUP, *FORWARD_FUSIONS, "fold_transpose", "cse", "dce"],
    # forward graph with a loss -> fuse -> differentiate (fused VJPs) -> clean the backward
    "train": ["shape_inference", *CLEANUP, *FORWARD_FUSIONS, "dce", "autodiff", "fold_transpose", *CLEANUP],
    # an already differentiated graph: re-derive a fused backward (fusions/backward.py),
    # then whatever forward-only patterns are left (an extra logits output, say)
    "train_graph": ["shape_inference", "fuse_backward", *CLEANUP, *FORWARD_FUSIONS, "fold_transpose", *CLEANUP],
}
# TensorRT: the standard ops of the infer pipeline, plus attention under a KV-cache mask
# fused to Attention(attn_mask) (the decode graph's), which TensorRT maps to IAttention.
PIPELINES["infer:tensorrt"] = ["shape_inference", *CLEANUP, *FORWARD_FUSIONS, "fuse_masked_attention",
                               "fold_transpose", "cse", "dce"]


# The passes a precision appends to a pipeline (after the fusions and the cleanup).
# ``<precision>:<backend>`` overrides ``<precision>`` for a backend: onnxruntime's CPU
# has no bf16 kernels, so it runs the bf16 graph's float32 emulation instead.
PRECISION_PASSES: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ["precision_bf16"],
    "bf16:onnxruntime": ["precision_bf16", "emulate_bf16"],
}
REFERENCE_BACKEND = "onnxruntime"
"""The backend ``backend=None`` means: the CPU reference executor."""


def precision_passes(precision: str, backend: str | None = None, *, emulate: bool | None = None) -> list[str]:
    """The pass names ``precision`` adds for ``backend`` (None: the CPU reference).

    ``emulate=False`` leaves the emulation out whatever the backend (``graphc compile``
    and ``export`` show the bf16 graph itself); ``True`` asks for it on any backend.
    """
    from graphc.precision import get_precision

    name = get_precision(precision).name
    names = list(PRECISION_PASSES.get(f"{name}:{backend or REFERENCE_BACKEND}", PRECISION_PASSES[name]))
    if emulate is False:
        names = [n for n in names if n != "emulate_bf16"]
    elif emulate and names and "emulate_bf16" not in names:
        names.append("emulate_bf16")
    return names


def pipeline_for(mode: str, backend: str | None = None) -> tuple[str, list[str]]:
    for key in ([f"{mode}:{backend}"] if backend else []) + [mode]:
        if key in PIPELINES:
            return key, list(PIPELINES[key])
    raise KeyError(f"no pipeline for mode {mode!r} (known: {', '.join(sorted(PIPELINES))})")


def make_passes(names: list[str], options: Options | None = None) -> list[Pass]:
    options = options or Options()
    return [PASSES[n](options) for n in names]


def is_training_graph(model: onnx.ModelProto) -> bool:
    return any(o.name.startswith(GRAD_PREFIX) for o in model.graph.output)


def legalize(model: onnx.ModelProto, backend: str) -> onnx.ModelProto:
    """Check that ``backend`` can run every node of ``model``; a one-line error naming the
    first node it cannot, before anything runs. Returns the model unchanged."""
    from graphc.backends import get_backend_class
    from graphc.errors import GraphcError

    missing = get_backend_class(backend).unsupported(model)
    if missing:
        n = missing[0]
        op = f"{n.domain}.{n.op_type}" if n.domain else n.op_type
        more = f" (and {len(missing) - 1} more nodes)" if len(missing) > 1 else ""
        raise GraphcError(backend, f"cannot run op {op} (node {n.name!r}){more}", "--backend")
    return model


def optimize(model: onnx.ModelProto, mode: str = "infer", *, backend: str | None = None,
             loss: str = "loss", wrt: list[str] | None = None, dump_dir: str | os.PathLike | None = None,
             verify: bool = True, precision: str = "fp32", emulate: bool | None = None,
             recompute: bool = False) -> tuple[onnx.ModelProto, Report]:
    """Optimise a graph for ``mode`` (``infer`` or ``train``); returns (model, report).

    ``train`` takes the forward graph with its ``loss`` output and returns the training
    graph (``loss`` and ``grad.<p>`` for every ``p`` in ``wrt``, default every
    floating-point graph input); given a graph that is already differentiated it runs
    the ``train_graph`` pipeline instead. ``dump_dir`` (or ``$GRAPHC_DUMP_DIR``) dumps
    the graph after every pass. ``precision`` (``fp32``, ``bf16``; see
    :mod:`graphc.precision`) appends its passes after the fusions: ``bf16`` rewrites the
    graph to BF16 mixed precision (float32 master parameters when training), followed,
    for onnxruntime (``backend`` None or ``"onnxruntime"``), by its float32 emulation
    (``emulate`` overrides: see :func:`precision_passes`). ``recompute`` (training)
    appends :mod:`graphc.passes.recompute` after the cleanup, before the precision passes.
    """
    if mode == "train" and is_training_graph(model):
        mode = "train_graph"
    name, names = pipeline_for(mode, backend)
    if recompute and mode.startswith("train"):
        names, name = names + ["recompute"], f"{name}+recompute"
    extra = precision_passes(precision, backend, emulate=emulate)
    if extra:
        names, name = names + extra, f"{name}+{precision}"
    passes = make_passes(names, Options(loss=loss, wrt=wrt, master_params=mode.startswith("train")))
    optimized, report = PassManager(passes, name=name, verify=verify, dump_dir=dump_dir).run(model)
    if backend is not None:
        legalize(optimized, backend)
    return optimized, report
