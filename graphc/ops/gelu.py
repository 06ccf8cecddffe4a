"""GELU: the standard ``Gelu`` op (opset 20, ``approximate="tanh"``) forward,
``graphc.GeluGrad`` backward.

**Bias + GELU stays Gemm(bias) + Gelu**, no ``BiasGelu`` op: the bias already lives in
Gemm's C input, cuBLASLt has a GELU(+bias) epilogue that a CUDA lowering can select by
matching Gemm -> Gelu, and TensorRT fuses Gemm + pointwise Gelu itself; a custom function
would hide the GEMM from TensorRT's parser. Exact (erf) GELU and other dtypes are
differentiated by the primitive rule.
"""

from __future__ import annotations

import math

import onnx

from graphc.ir.builder import GRAPHC_DOMAIN
from graphc.ir.node import attr
from graphc.ir.shapes import same_shape
from graphc.ops.body import Body
from graphc.ops.registry import OpDef, define, emit, is_float32

GELU_A = 0.044715                   # tanh GELU: u = GELU_S * (x + GELU_A * x^3)
GELU_S = math.sqrt(2.0 / math.pi)


def gelu_vjp(ctx, node, grads):
    """``graphc.GeluGrad`` for float32 tanh GELU; exact GELU and other dtypes go to the
    primitive rule (``rules_elementwise.gelu``)."""
    x = node.input[0]
    if attr(node, "approximate", "none") != "tanh" or not is_float32(ctx, x):
        from graphc.passes.autodiff.rules_elementwise import gelu   # graphc.ops does not import autodiff

        return gelu(ctx, node, grads)
    if grads[0] is None:
        return [None]
    return [emit(ctx, "GeluGrad", [grads[0], x], 1)]


def gelu_grad_shape(s, n) -> None:
    """dX shaped and typed like X (input 1)."""
    n.outs[0] = list(n.S[1]) if n.S[1] is not None else None
    n.dts[0] = s.dtype.get(n.ins[1])


def gelu_grad_fn() -> onnx.FunctionProto:
    """Backward of tanh-GELU y = 0.5 x (1 + tanh(u)), u = s (x + a x^3):
    dX = dY * (0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 a x^2)), t = tanh(u)."""
    b = Body()
    x2 = b.op("Mul", "X", "X")
    u = b.op("Mul", b.op("Add", "X", b.op("Mul", b.op("Mul", x2, "X"), b.f(GELU_A, "X"))), b.f(GELU_S, "X"))
    t = b.op("Tanh", u)
    half = b.f(0.5, "X")
    one = b.f(1.0, "X")
    left = b.op("Mul", half, b.op("Add", one, t))
    du = b.op("Mul", b.f(GELU_S, "X"), b.op("Add", one, b.op("Mul", b.f(3 * GELU_A, "X"), x2)))
    right = b.op("Mul", b.op("Mul", b.op("Mul", half, "X"), b.op("Sub", one, b.op("Mul", t, t))), du)
    b.op("Mul", "dY", b.op("Add", left, right), outputs=["dX"])
    return b.function("GeluGrad", ["dY", "X"], ["dX"], doc=gelu_grad_fn.__doc__)


# Gelu is elementwise: its output may overwrite its input
GELU = define(OpDef("", "Gelu", "gelu", shape=same_shape, vjp=gelu_vjp, inplace={0: 0}))
# dX may overwrite dY
GELU_GRAD = define(OpDef(GRAPHC_DOMAIN, "GeluGrad", "gelu_backward", shape=gelu_grad_shape,
                         function=gelu_grad_fn, inplace={0: 0}))
