"""Node helpers shared by passes: attribute access and subgraph reads."""

from __future__ import annotations

import onnx
from onnx import helper


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` (strings decoded to ``str``), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def attrs(node: onnx.NodeProto) -> dict:
    """Every attribute of ``node`` by name (raw values, as onnx.helper returns them)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


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
