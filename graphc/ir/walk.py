"""Graph walking helpers shared by passes."""

from __future__ import annotations

import onnx


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
