"""Writing the body of a ``graphc`` local function: nodes in primitive ONNX ops.

Numeric attributes (scale, epsilon, is_causal) are function attributes the body reads
through ``ref_attr_name``; constants in bodies are ``CastLike``'d to an input's type so
the same function serves fp32 and bf16.
"""

from __future__ import annotations

import onnx
from onnx import helper

from graphc import OPSET
from graphc.ir.builder import GRAPHC_DOMAIN


class Body:
    """Emit the nodes of a function body with short unique value names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._k = 0

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, **attrs):
        if isinstance(outputs, int):
            names = [f"_t{self._k + i}" for i in range(outputs)]
            self._k += outputs
        else:
            names = list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if len(names) == 1 else names

    def ref(self, attr_type: int, value_attr: str, ref: str) -> str:
        """A Constant whose value is the calling node's attribute ``ref``."""
        out = f"_t{self._k}"
        self._k += 1
        n = helper.make_node("Constant", [], [out])
        n.attribute.append(onnx.AttributeProto(name=value_attr, ref_attr_name=ref, type=attr_type))
        self.nodes.append(n)
        return out

    def f(self, value: float, like: str) -> str:
        """A float scalar constant in the dtype of ``like``."""
        return self.op("CastLike", self.op("Constant", value_float=float(value)), like)

    def ints(self, *values: int) -> str:
        return self.op("Constant", value_ints=list(values))

    def int0(self, value: int) -> str:
        return self.op("Constant", value_int=int(value))

    def transpose_last2(self, x: str) -> str:
        return self.op("Transpose", x, perm=[0, 1, 3, 2])

    def function(self, name: str, inputs: list[str], outputs: list[str], attributes: list[str] = (),
                 doc: str = "") -> onnx.FunctionProto:
        """The ``graphc.<name>`` local function with this body."""
        fn = helper.make_function(GRAPHC_DOMAIN, name, inputs, outputs, self.nodes,
                                  [helper.make_opsetid("", OPSET)], attributes=list(attributes))
        fn.doc_string = doc
        return fn
