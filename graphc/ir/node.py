"""Node helpers shared by passes: attribute access, constant values and subgraph reads."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` (strings decoded to ``str``), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def axis_index(axis: int, rank: int) -> int:
    """ONNX's ``axis`` as an index into a shape of ``rank`` dims (negative ones count from the end)."""
    return axis + rank if axis < 0 else axis


def attrs(node: onnx.NodeProto) -> dict:
    """Every attribute of ``node`` by name (raw values, as onnx.helper returns them)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node as a numpy array; None for a sparse or string value
    or one that refers to a function attribute (``ref_attr_name``, inside function bodies)."""
    for a in node.attribute:
        if a.ref_attr_name:
            continue
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), np.int64)
    return None


def with_inputs_renamed(node: onnx.NodeProto, rename: dict[str, str]) -> onnx.NodeProto:
    """A copy of ``node`` reading ``rename[x]`` wherever it read ``x``."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    for k, x in enumerate(out.input):
        if x in rename:
            out.input[k] = rename[x]
    return out


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every value name read inside the subgraphs of an If/Loop/Scan node (recursively).

    Passes that reason about liveness (DCE, autodiff's pruning) must count these as reads
    of the outer graph's values, though they do not appear in ``node.input``.
    """
    reads: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sg in graphs:
            for n in sg.node:
                reads.update(i for i in n.input if i)
                reads |= subgraph_reads(n)
    return reads


def with_graph(model: onnx.ModelProto, *, nodes=None, initializers=None, value_info=None,
               functions=None) -> onnx.ModelProto:
    """A copy of ``model`` with the given parts of its graph replaced (the rest kept).

    Passes return new models rather than mutating the one they were given, so the pass
    manager can dump and compare every stage.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for field, items in ((out.graph.node, nodes), (out.graph.initializer, initializers),
                         (out.graph.value_info, value_info), (out.functions, functions)):
        if items is not None:
            items = list(items)
            del field[:]
            field.extend(items)
    return out
