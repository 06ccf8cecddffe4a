"""Shape inference as a pass: refresh every value's dtype and shape annotation.

Stale ``value_info`` (left by rewrites) is dropped first, then ONNX shape inference runs
in strict mode with data propagation (so Shape -> Slice -> Concat -> Reshape chains keep
their symbolic dims). The graph's nodes are unchanged, so the pass reports
``changed=False``; the fusion passes read the annotations (ranks, the symbolic sequence
length of the attention scores).
"""

from __future__ import annotations

import onnx

from graphc.passes.verify import infer_shapes


class ShapeInference:
    name = "shape_inference"

    def __init__(self):
        self.stats: dict[str, int] = {}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        out = infer_shapes(model)
        self.stats = {"annotated_values": len(out.graph.value_info)}
        return out, False


def shape_inference() -> ShapeInference:
    return ShapeInference()
