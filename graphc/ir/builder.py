"""A small builder for ONNX graphs.

Models and passes emit nodes through :class:`GraphBuilder` instead of calling
``onnx.helper`` directly, so that every value gets a unique name, every constant becomes an
initializer with a readable name, and the result is one opset (:data:`graphc.OPSET`)
everywhere. Values are plain strings (ONNX value names); the builder never hides the
ONNX model from you: :meth:`GraphBuilder.model` returns an ordinary ``onnx.ModelProto``.

Ops are emitted either as ``b.op("MatMul", a, w)`` or with the sugar ``b.MatMul(a, w)``;
attributes are keyword arguments; ``outputs=k`` asks for ``k`` outputs.

The builder can also *extend* an existing graph (``GraphBuilder.wrap(graph)``): the
autodiff and fusion passes use it to append nodes to a graph they were handed.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphc import OPSET

GRAPHC_DOMAIN = "graphc"
"""Domain of graphc's own local functions (fused ops whose body is the reference math)."""

DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "float64": TensorProto.DOUBLE,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "bool": TensorProto.BOOL,
    "uint16": TensorProto.UINT16,
    "uint8": TensorProto.UINT8,
}


def onnx_dtype(dtype) -> int:
    """ONNX element type for a numpy dtype, a dtype name, or an ONNX enum value."""
    if isinstance(dtype, int):
        return dtype
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return DTYPES[name]


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


Dim = int | str | None


class GraphBuilder:
    """Emit an ONNX graph node by node with unique names.

    ``shapes`` records the shape (ints for static dims, strings for symbolic ones) and
    element type of each value the builder creates, so model code can stay explicit about
    what flows where without running shape inference after every node.
    """

    def __init__(self, name: str = "graph", opset: int = OPSET):
        self.name = name
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.functions: dict[tuple[str, str], onnx.FunctionProto] = {}
        self.extra_opsets: dict[str, int] = {}
        self._used: set[str] = set()
        self._counters: dict[str, itertools.count] = {}
        self._node_names: set[str] = set()
        self._node_counters: dict[str, itertools.count] = {}
        self._const_cache: dict[tuple, str] = {}
        self._scope: list[str] = []

    # ---------------------------------------------------------------- names
    def fresh(self, hint: str) -> str:
        """A value name not used yet in this graph, derived from ``hint`` (and the scope)."""
        return self._fresh(hint, self._used, self._counters)

    def fresh_node(self, hint: str) -> str:
        """A node name (node names live in their own namespace)."""
        return self._fresh(hint, self._node_names, self._node_counters)

    def _fresh(self, hint: str, used: set[str], counters: dict) -> str:
        base = "/".join([*self._scope, hint]) if self._scope else hint
        if base not in used:
            used.add(base)
            return base
        counter = counters.setdefault(base, itertools.count(1))
        while True:
            candidate = f"{base}_{next(counter)}"
            if candidate not in used:
                used.add(candidate)
                return candidate

    def reserve(self, names: Iterable[str]) -> None:
        self._used.update(names)

    class _Scope:
        def __init__(self, builder: "GraphBuilder", name: str):
            self.builder, self.name = builder, name

        def __enter__(self):
            self.builder._scope.append(self.name)

        def __exit__(self, *exc):
            self.builder._scope.pop()

    def scope(self, name: str) -> "GraphBuilder._Scope":
        """Prefix the names of nodes and values emitted inside ``with b.scope("h3"):``."""
        return GraphBuilder._Scope(self, name)

    # ---------------------------------------------------------------- graph IO
    def input(self, name: str, dtype, shape: Sequence[Dim] | None) -> str:
        if name in self._used:
            raise ValueError(f"graph input name {name!r} is already used")
        self._used.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), shape))
        return name

    def output(self, value: str, name: str | None = None, dtype=None, shape: Sequence[Dim] | None = None) -> str:
        """Mark ``value`` as a graph output, renaming it through an Identity if asked."""
        if name is not None and name != value:
            if name in self._used:
                raise ValueError(f"graph output name {name!r} is already used")
            self._used.add(name)
            self.nodes.append(helper.make_node("Identity", [value], [name], name=self.fresh_node(f"{name}_out")))
            value = name
        elem = onnx_dtype(dtype) if dtype is not None else TensorProto.UNDEFINED
        if elem == TensorProto.UNDEFINED:
            self.outputs.append(helper.make_empty_tensor_value_info(value))
        else:
            self.outputs.append(helper.make_tensor_value_info(value, elem, shape))
        return value

    # ---------------------------------------------------------------- constants
    def const(self, value, hint: str = "const", dtype=None) -> str:
        """A constant as an initializer; identical small constants are shared."""
        arr = np.asarray(value, dtype=dtype)
        key = None
        if arr.size <= 16:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._const_cache:
                return self._const_cache[key]
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        if key is not None:
            self._const_cache[key] = name
        return name

    def i64(self, *values: int, hint: str = "c") -> str:
        """A 1-D int64 constant: shapes, axes, starts/ends."""
        return self.const(np.array(values, dtype=np.int64), hint)

    def scalar(self, value: float, dtype=np.float32, hint: str = "c") -> str:
        return self.const(np.array(value, dtype=dtype), hint)

    # ---------------------------------------------------------------- nodes
    def op(self, op_type: str, *inputs: str | None, outputs: int | Sequence[str] = 1,
           domain: str = "", name: str | None = None, **attrs) -> str | list[str]:
        """Emit one node; returns its output name, or a list when it has several."""
        hint = name or op_type.lower()
        if isinstance(outputs, int):
            out_names = [self.fresh(f"{hint}_out" if outputs == 1 else f"{hint}_out{i}") for i in range(outputs)]
        else:
            out_names = list(outputs)
            self._used.update(out_names)
        node = helper.make_node(
            op_type,
            ["" if i is None else i for i in inputs],
            out_names,
            name=self.fresh_node(hint),
            domain=domain or None,
            **{k: v for k, v in attrs.items() if v is not None},
        )
        self.nodes.append(node)
        return out_names[0] if isinstance(outputs, int) and outputs == 1 else out_names

    def __getattr__(self, op_type: str):
        # b.MatMul(a, b) == b.op("MatMul", a, b): ONNX op types are capitalised.
        if op_type[:1].isupper():
            return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)
        raise AttributeError(op_type)

    # ---------------------------------------------------------------- functions
    def add_function(self, fn: onnx.FunctionProto) -> None:
        """Register a local function (a fused op with its reference body)."""
        self.functions[(fn.domain, fn.name)] = fn
        self.extra_opsets.setdefault(fn.domain, 1)

    # ---------------------------------------------------------------- result
    def graph(self) -> onnx.GraphProto:
        return helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, self.initializers, value_info=self.value_info
        )

    def model(self, producer: str = "graphc", infer_shapes: bool = True) -> onnx.ModelProto:
        opsets = [helper.make_opsetid("", self.opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in sorted(self.extra_opsets.items())]
        model = helper.make_model(self.graph(), opset_imports=opsets, producer_name=producer,
                                  functions=list(self.functions.values()))
        model.ir_version = min(model.ir_version, 10)
        if infer_shapes:
            model = infer(model)
        return model

    @classmethod
    def wrap(cls, graph: onnx.GraphProto, opset: int = OPSET) -> "GraphBuilder":
        """A builder that appends to an existing graph (nodes, IO and initializers kept)."""
        b = cls(graph.name, opset)
        b.nodes = list(graph.node)
        b.inputs = list(graph.input)
        b.outputs = list(graph.output)
        b.initializers = list(graph.initializer)
        b.value_info = list(graph.value_info)
        b.reserve(all_names(graph))
        b._node_names.update(n.name for n in graph.node if n.name)
        return b


def all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {v.name for v in graph.output}
    names |= {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    names.discard("")
    return names


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (strict, with data propagation for Shape/Reshape chains).

    Models past protobuf's 2 GB limit cannot be serialised, so inference is skipped for
    them; graphc keeps weights out of graphs (parameters are graph inputs) so this only
    happens for exported models with embedded weights.
    """
    if model.ByteSize() > 1_800_000_000:
        return model
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
