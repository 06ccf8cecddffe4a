"""VJP rules of the fused forward ops: they emit the fused backward ops directly.

The training pipeline fuses the forward graph first and differentiates the fused graph,
so each fused op's gradient is one fused node (a ``graphc`` local function whose body is
the reference math, see ``passes/fusions/ops.py``) instead of a dozen primitives that a
later pass would have to recognise again:

=========================================  ==============================================
forward                                    backward
=========================================  ==============================================
``Attention(Q, K, V)`` (4-D, no mask/past)  ``graphc.AttentionGrad(dY, Q, K, V, Y)`` -> dQ, dK, dV
``LayerNormalization(X, W[, B])``          ``graphc.LayerNormGrad(dY, X, W)`` -> dX, dW, dB
``Gelu(X, approximate="tanh")``            ``graphc.GeluGrad(dY, X)`` -> dX
``Gelu(X)`` (erf)                          primitives: dY * (Phi(x) + x phi(x))
``graphc.CrossEntropy(Z, T)``              ``graphc.CrossEntropyGrad(dloss, Z, T)`` -> dZ
=========================================  ==============================================

The fused backward ops cover float32 graphs in the forms the fusion passes emit. Every
other form (other dtypes, an attention mask or past inputs, 3-D attention, a layer norm
over other axes, exact GELU, gradients into LayerNormalization's Mean/InvStdDev) is handed
to the general primitive rule of the same op (``rules_attention``, ``rules_normalization``,
``rules_elementwise``), so ``graphc grad`` on an arbitrary model is never worse for the
fused rules being registered; where that rule has no answer either it raises, naming the
node: never a silent wrong gradient.
"""

from __future__ import annotations

import math

import onnx
from onnx import TensorProto

from graphc.ir.builder import GRAPHC_DOMAIN
from graphc.ir.node import attr
from graphc.passes.autodiff import rules_attention, rules_elementwise, rules_normalization
from graphc.passes.autodiff.registry import vjp
from graphc.passes.fusions.ops import function


class _NotCovered(Exception):
    """The node is outside what the fused backward op implements: use the general rule."""


def _float32(ctx, value: str) -> bool:
    dtype = getattr(ctx, "dtype", None)
    return dtype is None or dtype(value) in (TensorProto.FLOAT, TensorProto.UNDEFINED)


def _fused_or(general):
    """Try the fused rule; when it does not cover the node, run ``general`` instead."""

    def decorate(fused_rule):
        def rule(ctx, node, grads):
            try:
                return fused_rule(ctx, node, grads)
            except _NotCovered:
                return general(ctx, node, grads)

        rule.__doc__ = fused_rule.__doc__
        rule.__name__ = fused_rule.__name__
        return rule

    return decorate


def _unsupported(node: onnx.NodeProto, why: str) -> _NotCovered:
    return _NotCovered(f"{node.op_type} node {node.name!r}: {why}")


def _fused(ctx, op_type: str, inputs: list[str], like: list[str], **attrs):
    """Emit ``graphc.<op_type>``; output k has the dtype and shape of value ``like[k]``.

    The driver's symbolic shape propagation does not look inside local functions, so the
    rule states the (exact) output types: every fused backward op returns gradients
    shaped like the forward inputs they belong to.
    """
    ctx.b.add_function(function(op_type))
    outs = ctx.b.op(op_type, *inputs, domain=GRAPHC_DOMAIN, outputs=len(like), name=op_type, **attrs)
    outs = [outs] if isinstance(outs, str) else list(outs)
    shapes = getattr(ctx, "shapes", None)
    if shapes is not None:
        for o, ref in zip(outs, like):
            dims, dt = ctx.shape(ref), ctx.dtype(ref)     # syncs the new node first
            shapes.shape[o] = list(dims) if dims is not None else None
            shapes.dtype[o] = dt
    return outs[0] if len(outs) == 1 else outs


def _static_last_dim(ctx, value: str):
    shape_of = getattr(ctx, "shape", None)
    if shape_of is None:
        return None
    try:
        shp = shape_of(value)
    except Exception:
        return None
    return shp[-1] if shp and isinstance(shp[-1], int) else None


@vjp("Attention")
@_fused_or(rules_attention.attention)
def attention_vjp(ctx, node, grads):
    dy = grads[0]
    if not _float32(ctx, node.input[0]):
        raise _unsupported(node, "not float32")
    extra = [i for i in node.input[3:] if i]
    if extra:
        raise _unsupported(node, "attention mask / past key-value inputs")
    if any(g is not None for g in grads[1:]):
        raise _unsupported(node, "gradient into present_key/present_value/qk_matmul_output")
    if attr(node, "q_num_heads") or attr(node, "kv_num_heads"):
        raise _unsupported(node, "3-D attention (q_num_heads); graphc fuses the 4-D form")
    if attr(node, "softcap", 0.0):
        raise _unsupported(node, "softcap")
    if dy is None:
        return [None, None, None]
    q, k, v = node.input[:3]
    scale = attr(node, "scale")
    if scale is None:
        d = _static_last_dim(ctx, q)
        if d is None:
            raise _unsupported(node, "no scale attribute and the head size is not static")
        scale = 1.0 / math.sqrt(d)
    dq, dk, dv = _fused(ctx, "AttentionGrad", [dy, q, k, v, node.output[0]], [q, k, v],
                        scale=float(scale), is_causal=int(attr(node, "is_causal", 0)))
    return [dq, dk, dv]


@vjp("LayerNormalization")
@_fused_or(rules_normalization.layer_norm)
def layernorm_vjp(ctx, node, grads):
    if not _float32(ctx, node.input[0]):
        raise _unsupported(node, "not float32")
    if any(g is not None for g in grads[1:]):
        raise _unsupported(node, "gradient into the Mean/InvStdDev outputs")
    axis = attr(node, "axis", -1)
    if axis != -1:
        shape_of = getattr(ctx, "shape", None)
        rank = len(shape_of(node.input[0])) if shape_of is not None else None
        if rank is None or axis != rank - 1:
            raise _unsupported(node, f"normalisation over axis {axis}, graphc fuses the last axis only")
    dy = grads[0]
    if dy is None:
        return [None] * len(node.input)
    x, w = node.input[:2]
    dx, dw, db = _fused(ctx, "LayerNormGrad", [dy, x, w], [x, w, w], epsilon=float(attr(node, "epsilon", 1e-5)))
    has_bias = len(node.input) > 2 and bool(node.input[2])
    return [dx, dw, db] if has_bias else [dx, dw] + [None] * (len(node.input) - 2)


@vjp("Gelu")
@_fused_or(rules_elementwise.gelu)
def gelu_vjp(ctx, node, grads):
    dy = grads[0]
    x = node.input[0]
    approx = attr(node, "approximate", "none")
    if approx != "tanh" or not _float32(ctx, x):
        raise _unsupported(node, "exact GELU or not float32")
    if dy is None:
        return [None]
    return [_fused(ctx, "GeluGrad", [dy, x], [x])]


@vjp("CrossEntropy", domain=GRAPHC_DOMAIN)
def cross_entropy_vjp(ctx, node, grads):
    dloss = grads[0]
    if dloss is None:
        return [None, None]
    z, t = node.input
    return [_fused(ctx, "CrossEntropyGrad", [dloss, z, t], [z]), None]
