"""``reference``: a float64 numpy interpreter of graphc's ONNX graphs, the second backend.

It proves the backend seam (a backend is an op table plus ``prepare``/``run``) and is the
accuracy reference where onnxruntime is not one: onnxruntime has no float64 ``Erf``
kernel and computes float64 ``Attention`` in float32 inside, so finite-difference
gradient tests of those ops need this interpreter. Every floating-point input,
initializer and constant is upcast to float64 and all arithmetic stays in float64;
outputs come back in the graph's declared dtype, or in float64 with
``ReferenceBackend(keep_float64=True)``.

Standard ops run from :data:`~graphc.backends.reference_ops.OPS`; a node calling one of
the model's local functions (graphc's fused ops: ``graphc.CrossEntropy``,
``AttentionGrad``, ``LayerNormGrad``, ``GeluGrad``, ...) runs the function's *body*
with the node's attributes bound (``ref_attr_name``), because the body is the op's
definition. It is slow (a Python loop over nodes) and meant for tests and
``graphc compare``, not for training.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphc.backends.base import Backend, Executable, Feed
from graphc.backends.buffer import host_array
from graphc.backends.reference_ops import OPS, as_float
from graphc.errors import GraphcError
from graphc.ir.builder import GRAPHC_DOMAIN, np_dtype

Functions = dict[tuple[str, str], onnx.FunctionProto]


class ReferenceBackend(Backend):
    name = "reference"

    @classmethod
    def supports(cls, op_type: str, domain: str = "") -> bool:
        # graphc's fused ops are local functions: their bodies run op by op from the table
        return (domain or "", op_type) in OPS or domain == GRAPHC_DOMAIN

    def __init__(self, keep_float64: bool = False):
        self.keep_float64 = keep_float64

    def prepare(self, model: onnx.ModelProto) -> "ReferenceExecutable":
        functions = {(f.domain, f.name): f for f in model.functions}
        missing = unsupported_nodes(model.graph.node, functions)
        if missing:
            raise GraphcError(model.graph.name or "model", f"the reference backend cannot run {missing[0]}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}", "node")
        return ReferenceExecutable(model, functions, self.keep_float64)


def unsupported_nodes(nodes, functions: Functions, seen: frozenset = frozenset()) -> list[str]:
    """Labels of the nodes (in function bodies too) that neither the table nor a local function covers."""
    missing = []
    for n in nodes:
        key = (n.domain or "", n.op_type)
        if key in functions:
            if key not in seen:
                missing += unsupported_nodes(functions[key].node, functions, seen | {key})
        elif key not in OPS:
            missing.append(f"node {n.name!r} ({n.domain + '.' if n.domain else ''}{n.op_type})")
    return missing


class ReferenceExecutable(Executable):
    def __init__(self, model: onnx.ModelProto, functions: Functions, keep_float64: bool):
        g = model.graph
        self.graph = g
        self.functions = functions
        self.keep_float64 = keep_float64
        self.initializers = {t.name: as_float(numpy_helper.to_array(t)) for t in g.initializer}
        self.input_names = [v.name for v in g.input]
        self.output_names = [v.name for v in g.output]
        # outputs without a declared type come back as computed (float64 for floats)
        self.output_dtypes = {v.name: np_dtype(v.type.tensor_type.elem_type) for v in g.output
                              if v.type.tensor_type.elem_type}
        self._bound: dict[str, np.ndarray] = {}
        self._dead = dead_after(g)

    def bind(self, feeds: Mapping[str, Feed]) -> None:
        # borrowed, not copied: in-place updates (the optimizer's) are seen by the next run
        self._bound.update({k: host_array(v) for k, v in feeds.items() if k in self.input_names})

    def run(self, feeds: Mapping[str, Feed], outputs: Mapping[str, Feed] | None = None,
            ) -> dict[str, np.ndarray]:
        feeds = {k: host_array(v) for k, v in feeds.items()}
        outputs = {k: host_array(v) for k, v in (outputs or {}).items()}
        values = dict(self.initializers)
        for name in self.input_names:
            arr = feeds.get(name, self._bound.get(name))
            if arr is None:
                if name in values:
                    continue  # an initializer is the input's default
                raise GraphcError(name, "no value fed for this graph input", "feeds")
            values[name] = as_float(arr)
        run_nodes(self.graph.node, values, self.functions, dead=self._dead)
        results = {}
        for name in self.output_names:
            value = values[name]
            if not self.keep_float64 and name in self.output_dtypes:
                value = np.asarray(value).astype(self.output_dtypes[name])
            if outputs and name in outputs:
                np.copyto(outputs[name], value, casting="unsafe")
                value = outputs[name]
            results[name] = np.asarray(value)
        return results


def dead_after(graph: onnx.GraphProto) -> list[list[str]]:
    """For each node, the values no later node reads (graph outputs excepted): freeing them
    keeps a d12 training step's float64 activations to what is live, not all of them."""
    last: dict[str, int] = {}
    for i, n in enumerate(graph.node):
        for v in n.input:
            last[v] = i
        for v in n.output:
            last.setdefault(v, i)   # written and never read: free at once
    keep = {o.name for o in graph.output}
    dead: list[list[str]] = [[] for _ in graph.node]
    for v, i in last.items():
        if v and v not in keep:
            dead[i].append(v)
    return dead


def run_nodes(nodes, values: dict[str, np.ndarray], functions: Functions,
              attr_scope: Mapping[str, onnx.AttributeProto] | None = None,
              dead: list[list[str]] | None = None) -> None:
    """Evaluate ``nodes`` in order, reading and writing ``values``; ``attr_scope`` binds
    the ``ref_attr_name`` attributes of a function body to the calling node's attributes;
    ``dead[i]`` lists the values to drop after node ``i``."""
    for i, node in enumerate(nodes):
        inputs = [values[name] if name else None for name in node.input]
        while inputs and inputs[-1] is None:
            inputs.pop()  # trailing optional inputs omitted
        attrs = bound_attributes(node, attr_scope)
        key = (node.domain or "", node.op_type)
        if key in functions:
            outs = call_function(functions[key], inputs, attrs, functions)
        else:
            try:
                outs = OPS[key]({k: _decode(helper.get_attribute_value(a)) for k, a in attrs.items()}, *inputs)
            except Exception as e:
                raise RuntimeError(f"reference backend: node {node.name!r} ({node.op_type}) failed: {e}") from e
        outs = outs if isinstance(outs, tuple) else (outs,)
        for name, value in zip(node.output, outs):
            if name:
                values[name] = np.asarray(value)
        for name in dead[i] if dead else ():
            values.pop(name, None)


def bound_attributes(node: onnx.NodeProto, scope: Mapping[str, onnx.AttributeProto] | None,
                     ) -> dict[str, onnx.AttributeProto]:
    """The node's attributes, each ``ref_attr_name`` one replaced by the caller's value
    (left out when the caller does not set it, as ONNX specifies)."""
    out = {}
    for a in node.attribute:
        if a.ref_attr_name:
            if scope and a.ref_attr_name in scope:
                bound = onnx.AttributeProto()
                bound.CopyFrom(scope[a.ref_attr_name])
                bound.name = a.name
                out[a.name] = bound
        else:
            out[a.name] = a
    return out


def call_function(fn: onnx.FunctionProto, inputs: list, attrs: dict[str, onnx.AttributeProto],
                  functions: Functions) -> tuple:
    """Run a local function's body on ``inputs`` with the call's attributes (defaults from the
    function's ``attribute_proto``)."""
    scope = {a.name: a for a in fn.attribute_proto}
    scope.update(attrs)
    values = {name: value for name, value in zip(fn.input, inputs) if value is not None}
    run_nodes(fn.node, values, functions, scope)
    return tuple(values[name] for name in fn.output)


def _decode(value):
    return value.decode() if isinstance(value, bytes) else value
