"""The loss: ``graphc.CrossEntropy(Z, T) -> loss`` forward, ``graphc.CrossEntropyGrad`` backward.

A local function (TensorRT has no SoftmaxCrossEntropyLoss, and the ONNX op's
ignore_index/weights are not needed); its gradient is (softmax(z) - onehot(t)) * dloss / N,
recomputing softmax from the logits, which stay alive for the backward anyway.
"""

from __future__ import annotations

import onnx

from graphc.ir.builder import GRAPHC_DOMAIN
from graphc.ops.body import Body
from graphc.ops.registry import OpDef, define, emit


def cross_entropy_shape(s, n) -> None:
    """A scalar in the logits' type."""
    n.outs[0], n.dts[0] = [], s.dtype.get(n.ins[0])


def cross_entropy_vjp(ctx, node, grads):
    """dZ = ``graphc.CrossEntropyGrad(dloss, Z, T)``; the targets get no gradient."""
    dloss = grads[0]
    if dloss is None:
        return [None, None]
    z, t = node.input
    return [emit(ctx, "CrossEntropyGrad", [dloss, z, t], 1), None]


def cross_entropy_grad_shape(s, n) -> None:
    """dZ shaped and typed like Z (input 1)."""
    n.outs[0] = list(n.S[1]) if n.S[1] is not None else None
    n.dts[0] = s.dtype.get(n.ins[1])


def cross_entropy_fn() -> onnx.FunctionProto:
    """loss = -mean_i log_softmax(Z_i)[t_i]; Z [..., V], T int64 [..., 1] -> loss []."""
    b = Body()
    logp = b.op("LogSoftmax", "Z", axis=-1)
    picked = b.op("GatherElements", logp, "T", axis=-1)
    b.op("Neg", b.op("ReduceMean", picked, keepdims=0), outputs=["loss"])
    return b.function("CrossEntropy", ["Z", "T"], ["loss"], doc=cross_entropy_fn.__doc__)


def cross_entropy_grad_fn() -> onnx.FunctionProto:
    """dZ = (softmax(Z) - onehot(T)) * dloss / N, N = number of positions (elements of T)."""
    b = Body()
    p = b.op("Softmax", "Z", axis=-1)
    vocab = b.op("Squeeze", b.op("Shape", "Z", start=-1), b.ints(0))            # scalar V
    classes = b.op("Range", b.int0(0), vocab, b.int0(1))                         # [V]
    onehot = b.op("CastLike", b.op("Equal", classes, "T"), "Z")                  # [..., V]
    count = b.op("CastLike", b.op("ReduceProd", b.op("Shape", "T"), keepdims=0), "Z")
    g = b.op("Div", "dloss", count)
    b.op("Mul", b.op("Sub", p, onehot), g, outputs=["dZ"])
    return b.function("CrossEntropyGrad", ["dloss", "Z", "T"], ["dZ"], doc=cross_entropy_grad_fn.__doc__)


CROSS_ENTROPY = define(OpDef(GRAPHC_DOMAIN, "CrossEntropy", "cross_entropy", shape=cross_entropy_shape,
                             vjp=cross_entropy_vjp, function=cross_entropy_fn))
# dlogits may overwrite the logits (row-local: each row of Z is read completely first)
CROSS_ENTROPY_GRAD = define(OpDef(GRAPHC_DOMAIN, "CrossEntropyGrad", "cross_entropy_backward",
                                  shape=cross_entropy_grad_shape, function=cross_entropy_grad_fn,
                                  inplace={0: 1}))
