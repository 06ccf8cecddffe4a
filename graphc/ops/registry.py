"""The definition of a graphc op, and the table of them.

An :class:`OpDef` gathers everything graphc knows about one fused op in one place:

* ``domain``, ``name``: the op as it appears in a graph (``("", "Attention")``,
  ``("graphc", "AttentionGrad")``);
* ``function``: a factory of the ONNX local function whose body is the reference math
  (``graphc`` ops), or None for a standard ONNX op; onnxruntime runs a graph by inlining
  the body, a backend with a kernel matches ``(domain, name)`` instead;
* ``shape``: its rule in the symbolic shape engine (:mod:`graphc.ir.shapes`), registered
  in :data:`graphc.ir.shapes.SHAPE_RULES` by :func:`define`;
* ``vjp``: its rule for reverse-mode autodiff (``rule(ctx, node, grads)``, see
  :mod:`graphc.passes.autodiff.registry`), None for an op that is not differentiated;
* ``inplace``: ``{output index: input index}`` pairs the memory planner may alias: the
  output may be written over that input when the input dies at this node (row-local ops
  whose rows are read completely before the row of the output is written, as llm.c's
  kernels do);
* ``report_key``: its name in the pass manager's and ``graphc compile``'s fused counts;
* ``lowerings``: each backend's lowering of it, registered by the backend with
  :func:`register_lowering` (the table a backend's ``supports`` looks up).

Ops are defined by family in :mod:`graphc.ops.attention`, ``layernorm``, ``gelu`` and
``cross_entropy``; a second definition of the same op is an error, never a silent override.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import onnx
from onnx import helper

from graphc.ir.builder import GRAPHC_DOMAIN
from graphc.ir.shapes import ShapeRule, shape_rule
from graphc.ir.table import add_unique

Key = tuple[str, str]


@dataclass(frozen=True)
class OpDef:
    domain: str
    name: str
    report_key: str
    shape: ShapeRule
    vjp: Callable | None = None
    function: Callable[[], onnx.FunctionProto] | None = None
    inplace: Mapping[int, int] = field(default_factory=dict)

    @property
    def key(self) -> Key:
        return (self.domain, self.name)

    @property
    def lowerings(self) -> dict[str, Any]:
        """Backend name -> that backend's lowering of this op."""
        return {backend: table[self.key] for backend, table in LOWERINGS.items() if self.key in table}


OPS: dict[Key, OpDef] = {}
LOWERINGS: dict[str, dict[Key, Any]] = {}   # backend -> (domain, op_type) -> lowering


def define(op: OpDef) -> OpDef:
    """Add ``op`` to :data:`OPS` and its shape rule to the shape engine."""
    add_unique(OPS, op.key, op, "a definition")
    shape_rule(op.name, domain=op.domain)(op.shape)
    return op


def op_def(domain: str, op_type: str) -> OpDef | None:
    """The definition of an op, or None for an op graphc does not define."""
    return OPS.get((domain or "", op_type))


def register_lowering(backend: str, domain: str, op_type: str) -> Callable:
    """Decorator for a backend's lowering of ``(domain, op_type)``: ``@register_lowering(
    "cuda", "graphc", "LayerNormGrad")``. Any op may be lowered (MatMul as well as the fused
    ops); a second lowering of the same op for the same backend is an error."""

    def register(lowering):
        add_unique(LOWERINGS.setdefault(backend, {}), (domain or "", op_type), lowering,
                   f"a {backend} lowering")
        return lowering

    return register


def lowerings(backend: str) -> dict[Key, Any]:
    """A backend's lowering table, keyed by ``(domain, op_type)`` (empty if none)."""
    return LOWERINGS.get(backend, {})


def lowering_table(backend: str) -> dict[Key, Any]:
    """The (live) table a backend registers its lowerings into and looks them up in: the
    backend's module keeps it as its own ``LOWER``/``OPS`` and fills it with
    :func:`register_lowering`, so every backend's lowerings live in this one registry."""
    return LOWERINGS.setdefault(backend, {})


# ----------------------------------------------------------------------------- report keys
def report_keys() -> list[str]:
    """Every fused op's report key, in definition order (forward, then its backward)."""
    return [op.report_key for op in OPS.values()]


def count_fused(model_or_nodes) -> dict[str, int]:
    """How many fused ops of each kind a graph holds (every key present)."""
    nodes = model_or_nodes.graph.node if isinstance(model_or_nodes, onnx.ModelProto) else model_or_nodes
    counts = dict.fromkeys(report_keys(), 0)
    for n in nodes:
        op = OPS.get((n.domain or "", n.op_type))
        if op is not None:
            counts[op.report_key] += 1
    return counts


# ----------------------------------------------------------------------------- local functions
_FUNCTIONS: dict[str, onnx.FunctionProto] = {}


def function(name: str) -> onnx.FunctionProto:
    """The local function defining ``graphc.<name>`` (a fresh copy)."""
    if name not in _FUNCTIONS:
        _FUNCTIONS[name] = OPS[(GRAPHC_DOMAIN, name)].function()
    fn = onnx.FunctionProto()
    fn.CopyFrom(_FUNCTIONS[name])
    return fn


def ensure_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the definitions of every ``graphc`` op the graph uses (in place; returned)."""
    have = {(f.domain, f.name) for f in model.functions}
    used = {n.op_type for n in model.graph.node if n.domain == GRAPHC_DOMAIN}
    for name in sorted(used):
        op = OPS.get((GRAPHC_DOMAIN, name))
        if (GRAPHC_DOMAIN, name) not in have and op is not None and op.function is not None:
            model.functions.append(function(name))
    if used and not any(o.domain == GRAPHC_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(GRAPHC_DOMAIN, 1))
    return model


def make_node(op_type: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    """A node calling ``graphc.<op_type>``."""
    return helper.make_node(op_type, inputs, outputs, domain=GRAPHC_DOMAIN, **attrs)


# ----------------------------------------------------------------------------- for VJP rules
def emit(ctx, op_type: str, inputs: list[str], n_outputs: int, **attrs):
    """Emit ``graphc.<op_type>`` into the training graph from a VJP rule (its function is
    added to the model; its output shapes come from its shape rule)."""
    ctx.b.add_function(function(op_type))
    return ctx.b.op(op_type, *inputs, domain=GRAPHC_DOMAIN, outputs=n_outputs, name=op_type, **attrs)


def is_float32(ctx, value: str) -> bool:
    """float32 (or of unknown type): what the fused backward ops are written for."""
    return ctx.dtype(value) in (onnx.TensorProto.FLOAT, onnx.TensorProto.UNDEFINED)
