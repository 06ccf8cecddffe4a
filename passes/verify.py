"""The graph verifier the pass manager runs after every pass.

Checks, in order (the first group needs no shape inference):

1. *single assignment*: every value is defined once (graph input, initializer, or the
   output of exactly one node); an initializer may share its name with a graph input
   (an overridable default), nothing else may collide;
2. *no dangling values, topological order*: every node input is a graph input, an
   initializer, or the output of an *earlier* node; every graph output is defined;
3. *types and shapes*: after ONNX shape inference (strict, with data propagation) every
   node output has a known element type, a known rank and every dim either static or
   symbolic (a ``dim_param``, such as ``B``, ``T`` or inference's ``unk__3``);
4. ``onnx.checker.check_model(full_check=True)``.

A failure raises :class:`VerificationError` naming the pass after which it happened
and listing the problems (the first few of each kind).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto


class VerificationError(RuntimeError):
    """The graph a pass produced is broken; ``pass_name`` says which pass broke it."""

    def __init__(self, pass_name: str | None, problems: list[str]):
        self.pass_name = pass_name
        self.problems = problems
        where = f"after pass {pass_name!r}" if pass_name else "graph"
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        super().__init__(f"{where}: invalid graph:\n  " + "\n  ".join(shown))


def _node_label(i: int, n: onnx.NodeProto) -> str:
    return f"node {i} {n.op_type}{(' ' + repr(n.name)) if n.name else ''}"


def structural_problems(graph: onnx.GraphProto) -> list[str]:
    """Single assignment, dangling values and topological order (no inference needed)."""
    problems: list[str] = []
    inputs = [v.name for v in graph.input]
    inits = [t.name for t in graph.initializer]
    defined: dict[str, str] = {}
    for name in inputs:
        if name in defined:
            problems.append(f"graph input {name!r} is declared twice")
        defined[name] = "graph input"
    for name in inits:
        if name in defined and defined[name] != "graph input":
            problems.append(f"initializer {name!r} is declared twice")
        defined.setdefault(name, "initializer")
    producers: dict[str, int] = {}
    for i, n in enumerate(graph.node):
        for o in n.output:
            if not o:
                continue
            if o in defined or o in producers:
                first = defined.get(o) or _node_label(producers[o], graph.node[producers[o]])
                problems.append(f"single assignment: {o!r} is written by {_node_label(i, n)} and by {first}")
            producers.setdefault(o, i)
    available = set(defined)
    for i, n in enumerate(graph.node):
        for v in n.input:
            if not v or v in available:
                continue
            if v in producers:
                problems.append(f"topological order: {_node_label(i, n)} reads {v!r} before "
                                f"{_node_label(producers[v], graph.node[producers[v]])} writes it")
            else:
                problems.append(f"dangling value: {_node_label(i, n)} reads {v!r}, which nothing defines")
        available.update(o for o in n.output if o)
    for v in graph.output:
        if v.name not in available and v.name not in producers:
            problems.append(f"graph output {v.name!r} is not defined")
    return problems


def strip_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without intermediate value_info (stale after a rewrite)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    return m


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fresh ONNX shape inference (strict, data propagation) on a copy of ``model``."""
    return onnx.shape_inference.infer_shapes(strip_value_info(model), check_type=True, strict_mode=True,
                                             data_prop=True)


def type_problems(model: onnx.ModelProto) -> list[str]:
    """Every node output has a known dtype and shape (dims static or symbolic) after inference."""
    g = model.graph
    known = {v.name: v for v in [*g.value_info, *g.output, *g.input]}
    problems = []
    for i, n in enumerate(g.node):
        for o in n.output:
            if not o:
                continue
            v = known.get(o)
            if v is None or not v.type.HasField("tensor_type"):
                problems.append(f"no type for {o!r} ({_node_label(i, n)})")
                continue
            t = v.type.tensor_type
            if t.elem_type == TensorProto.UNDEFINED:
                problems.append(f"unknown dtype of {o!r} ({_node_label(i, n)})")
            if not t.HasField("shape"):
                problems.append(f"unknown rank of {o!r} ({_node_label(i, n)})")
            elif any(not d.HasField("dim_value") and not d.HasField("dim_param") for d in t.shape.dim):
                problems.append(f"unknown dim in the shape of {o!r} ({_node_label(i, n)})")
    return problems


def verify(model: onnx.ModelProto, pass_name: str | None = None, *, full_check: bool = True) -> onnx.ModelProto:
    """Check ``model``; return it with fresh inferred shapes; raise VerificationError."""
    problems = structural_problems(model.graph)
    if problems:
        raise VerificationError(pass_name, problems)
    try:
        inferred = infer_shapes(model)
    except Exception as e:  # onnx raises InferenceError / ValidationError / ...
        raise VerificationError(pass_name, [f"shape inference failed: {e}"]) from e
    problems = type_problems(inferred)
    if problems:
        raise VerificationError(pass_name, problems)
    if full_check:
        try:
            onnx.checker.check_model(inferred, full_check=True)
        except Exception as e:
            raise VerificationError(pass_name, [f"onnx.checker: {e}"]) from e
    return inferred

