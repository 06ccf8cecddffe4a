"""Attention: the standard ONNX ``Attention`` op (opset 23+) forward, ``graphc.AttentionGrad``
backward.

The fusion (``passes/fusions/attention.py``) emits ``Attention(Q, K, V)`` with 4-D
Q [B, H, Tq, D], K, V [B, H, Tk, D], ``is_causal`` and ``scale``. Its gradient is one
``graphc.AttentionGrad(dY, Q, K, V, Y) -> dQ, dK, dV``.

**AttentionGrad recomputes the softmax** from Q and K instead of taking saved
probabilities: ONNX ``Attention`` (and TensorRT) only expose Y, the probabilities are a
[B, H, T, T] tensor (805 MB per layer for GPT-2 124M at B=16, T=1024, 9.7 GB for 12 layers
if kept for the backward), and recomputation is exactly what FlashAttention and cuDNN's
fused SDPA backward do. It takes the forward output Y as well, for the FlashAttention
identity rowsum(dP * P) = rowsum(dY * Y) (cuDNN's backward wants O too).
"""

from __future__ import annotations

import math

import onnx
from onnx import TensorProto

from graphc.ir.builder import GRAPHC_DOMAIN
from graphc.ir.node import attr
from graphc.ops.body import Body
from graphc.ops.registry import OpDef, define, emit, is_float32


def attention_shape(s, n) -> None:
    """Y [B, H, Tq, Dv] (and qk_matmul_output [B, H, Tq, Tk]) for the 4-D form."""
    q, k, v = n.S[0], n.S[1], n.S[2]
    if q is not None and k is not None and v is not None and len(q) == 4 and len(v) == 4:
        n.outs[0] = [q[0], q[1], q[2], v[3]]
        if len(n.outs) > 3:
            n.outs[3] = [q[0], q[1], q[2], k[2]]


def _not_fused(ctx, node, grads) -> str | None:
    """Why AttentionGrad does not cover this node (None: it does)."""
    if not is_float32(ctx, node.input[0]):
        return "not float32"
    if any(i for i in node.input[3:]):
        return "attention mask / past key-value inputs"
    if any(g is not None for g in grads[1:]):
        return "gradient into present_key/present_value/qk_matmul_output"
    if attr(node, "q_num_heads") or attr(node, "kv_num_heads"):
        return "3-D attention (q_num_heads); graphc fuses the 4-D form"
    if attr(node, "softcap", 0.0):
        return "softcap"
    return None


def _scale(ctx, node) -> float | None:
    """The softmax scale: the attribute, else 1/sqrt(D) when the head size D is static."""
    scale = attr(node, "scale")
    if scale is None:
        shape = ctx.shape(node.input[0])
        if not shape or not isinstance(shape[-1], int):
            return None
        scale = 1.0 / math.sqrt(shape[-1])
    return float(scale)


def attention_vjp(ctx, node, grads):
    """``graphc.AttentionGrad`` for the float32 4-D form the fusion emits; every other form
    (a mask, past inputs, 3-D, softcap, other dtypes, an unknown scale) goes to the
    primitive rule (``rules_attention.attention``), which raises, naming the node, where it
    has no answer."""
    if _not_fused(ctx, node, grads) is None:
        if grads[0] is None:
            return [None, None, None]
        scale = _scale(ctx, node)
        if scale is not None:
            q, k, v = node.input[:3]
            return list(emit(ctx, "AttentionGrad", [grads[0], q, k, v, node.output[0]], 3,
                             scale=scale, is_causal=int(attr(node, "is_causal", 0))))
    from graphc.passes.autodiff.rules_attention import attention   # graphc.ops does not import autodiff

    return attention(ctx, node, grads)


def attention_grad_shape(s, n) -> None:
    """dQ, dK, dV shaped (and typed) like Q, K, V (inputs 1, 2, 3)."""
    for k in range(3):
        src = n.ins[1 + k]
        n.outs[k] = list(n.S[1 + k]) if n.S[1 + k] is not None else None
        n.dts[k] = s.dtype.get(src)


def attention_grad_fn() -> onnx.FunctionProto:
    """Backward of Y = softmax(mask(scale * Q K^T)) V with Q [B,H,Tq,D], K,V [B,H,Tk,D].

    P recomputed; dV = P^T dY; dP = dY V^T; dS = P * (dP - rowsum(dY * Y));
    dQ = scale * dS K; dK = scale * dS^T Q. The causal mask (attribute is_causal) is
    ONNX Attention's upper-left one: query i sees key j iff j <= i.
    """
    b = Body()
    scale = b.op("CastLike", b.ref(onnx.AttributeProto.FLOAT, "value_float", "scale"), "Q")
    s = b.op("Mul", b.op("MatMul", "Q", b.transpose_last2("K")), scale)            # [B,H,Tq,Tk]
    tq = b.op("Squeeze", b.op("Shape", "Q", start=-2, end=-1), b.ints(0))
    tk = b.op("Squeeze", b.op("Shape", "K", start=-2, end=-1), b.ints(0))
    q_pos = b.op("Unsqueeze", b.op("Range", b.int0(0), tq, b.int0(1)), b.ints(1))  # [Tq, 1]
    k_pos = b.op("Unsqueeze", b.op("Range", b.int0(0), tk, b.int0(1)), b.ints(0))  # [1, Tk]
    causal = b.op("Cast", b.ref(onnx.AttributeProto.INT, "value_int", "is_causal"), to=TensorProto.BOOL)
    keep = b.op("Or", b.op("LessOrEqual", k_pos, q_pos), b.op("Not", causal))        # [Tq, Tk]
    s = b.op("Where", keep, s, b.f(float("-inf"), "Q"))
    p = b.op("Softmax", s, axis=-1)
    b.op("MatMul", b.transpose_last2(p), "dY", outputs=["dV"])                       # [B,H,Tk,D]
    dp = b.op("MatMul", "dY", b.transpose_last2("V"))                                # [B,H,Tq,Tk]
    dsum = b.op("ReduceSum", b.op("Mul", "dY", "Y"), b.ints(-1), keepdims=1)         # [B,H,Tq,1]
    ds = b.op("Mul", p, b.op("Sub", dp, dsum))
    b.op("Mul", b.op("MatMul", ds, "K"), scale, outputs=["dQ"])
    b.op("Mul", b.op("MatMul", b.transpose_last2(ds), "Q"), scale, outputs=["dK"])
    return b.function("AttentionGrad", ["dY", "Q", "K", "V", "Y"], ["dQ", "dK", "dV"],
                      attributes=["scale", "is_causal"], doc=attention_grad_fn.__doc__)


ATTENTION = define(OpDef("", "Attention", "attention", shape=attention_shape, vjp=attention_vjp))
ATTENTION_GRAD = define(OpDef(GRAPHC_DOMAIN, "AttentionGrad", "attention_backward", shape=attention_grad_shape,
                              function=attention_grad_fn))
