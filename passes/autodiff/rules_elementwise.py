"""VJP rules of elementwise ops (with numpy broadcasting).

Notation: ``y = f(x, ...)`` is the forward node, ``g = dL/dy`` the incoming gradient; each
rule returns ``dL/dx`` for every input. Broadcast inputs get their gradient summed back
to their own shape by the driver's one helper, ``ctx.reduce_to_shape``.
"""

from __future__ import annotations

import math

from graphc.ops.gelu import GELU_A, GELU_S
from graphc.passes.autodiff.registry import vjp


def _unbroadcast(ctx, g, x):
    return ctx.reduce_to_shape(g, x) if ctx.needs(x) else None


@vjp("Add")
def add(ctx, node, grads):
    """y = a + b:  da = g,  db = g  (summed over broadcast axes)."""
    g = grads[0]
    return [_unbroadcast(ctx, g, x) for x in node.input]


@vjp("Sum")
def sum_(ctx, node, grads):
    """y = x1 + x2 + ...:  dxi = g  (summed over broadcast axes)."""
    g = grads[0]
    return [_unbroadcast(ctx, g, x) for x in node.input]


@vjp("Sub")
def sub(ctx, node, grads):
    """y = a - b:  da = g,  db = -g."""
    g = grads[0]
    a, b = node.input
    gb = ctx.b.Neg(ctx.reduce_to_shape(g, b)) if ctx.needs(b) else None
    return [_unbroadcast(ctx, g, a), gb]


@vjp("Mul")
def mul(ctx, node, grads):
    """y = a * b:  da = g * b,  db = g * a;  y = x * x:  dx = 2 g x."""
    g = grads[0]
    a, b = node.input
    y = node.output[0]
    B = ctx.b
    if a == b:
        return [B.Mul(B.Mul(ctx.unexpanded(g, a, y), a), ctx.scalar(2.0, a)), None]
    ga = ctx.reduce_to_shape(B.Mul(ctx.unexpanded(g, b, y), b), a) if ctx.needs(a) else None
    gb = ctx.reduce_to_shape(B.Mul(ctx.unexpanded(g, a, y), a), b) if ctx.needs(b) else None
    return [ga, gb]


@vjp("Div")
def div(ctx, node, grads):
    """y = a / b:  da = g / b,  db = -g * a / b^2 = -(g * y) / b."""
    g = grads[0]
    a, b = node.input
    y = node.output[0]
    ga = ctx.reduce_to_shape(ctx.b.Div(ctx.unexpanded(g, b, y), b), a) if ctx.needs(a) else None
    gb = ctx.b.Neg(ctx.reduce_to_shape(ctx.b.Div(ctx.b.Mul(g, y), b), b)) if ctx.needs(b) else None
    return [ga, gb]


@vjp("Neg")
def neg(ctx, node, grads):
    """y = -x:  dx = -g."""
    return [ctx.b.Neg(grads[0])]


@vjp("Identity")
def identity(ctx, node, grads):
    """y = x:  dx = g."""
    return [grads[0]]


@vjp("Cast")
def cast(ctx, node, grads):
    """y = cast(x):  dx = cast(g) back to x's dtype (none for integer x)."""
    x = node.input[0]
    if not ctx.is_float(x):
        return [None]
    g = grads[0]
    return [g if ctx.dtype(g) == ctx.dtype(x) else ctx.b.Cast(g, to=ctx.dtype(x))]


@vjp("Pow")
def pow_(ctx, node, grads):
    """y = a ** b:  da = g * b * a ** (b - 1),  db = g * y * log(a).

    A constant exponent is folded: b = 2 gives da = g * 2a, b = 1 gives da = g.
    """
    g = grads[0]
    a, b = node.input
    y = node.output[0]
    B = ctx.b
    ga = gb = None
    if ctx.needs(a):
        c = ctx.const_value(b)
        if c is not None and c.size == 1:
            c = float(c.reshape(()))
            if c == 0.0:
                da = None                                   # a ** 0 is constant
            elif c == 1.0:
                da = g
            elif c == 2.0:
                da = B.Mul(g, B.Mul(a, ctx.scalar(2.0, a)))
            else:
                da = B.Mul(g, B.Mul(B.Pow(a, ctx.scalar(c - 1.0, a)), ctx.scalar(c, a)))
        else:
            bb = b if ctx.dtype(b) == ctx.dtype(a) else B.Cast(b, to=ctx.dtype(a))
            da = B.Mul(g, B.Mul(bb, B.Pow(a, B.Sub(bb, ctx.scalar(1.0, a)))))
        ga = ctx.reduce_to_shape(da, a) if da is not None else None
    if ctx.needs(b):
        gb = ctx.reduce_to_shape(B.Mul(B.Mul(g, y), B.Log(a)), b)
    return [ga, gb]


@vjp("Sqrt")
def sqrt(ctx, node, grads):
    """y = sqrt(x):  dx = g / (2 y)."""
    y = node.output[0]
    return [ctx.b.Div(ctx.b.Mul(grads[0], ctx.scalar(0.5, y)), y)]


@vjp("Reciprocal")
def reciprocal(ctx, node, grads):
    """y = 1 / x:  dx = -g * y^2."""
    y = node.output[0]
    return [ctx.b.Neg(ctx.b.Mul(grads[0], ctx.b.Mul(y, y)))]


@vjp("Exp")
def exp(ctx, node, grads):
    """y = exp(x):  dx = g * y."""
    return [ctx.b.Mul(grads[0], node.output[0])]


@vjp("Log")
def log(ctx, node, grads):
    """y = log(x):  dx = g / x."""
    return [ctx.b.Div(grads[0], node.input[0])]


@vjp("Tanh")
def tanh(ctx, node, grads):
    """y = tanh(x):  dx = g * (1 - y^2)."""
    y = node.output[0]
    B = ctx.b
    return [B.Mul(grads[0], B.Sub(ctx.scalar(1.0, y), B.Mul(y, y)))]


@vjp("Sigmoid")
def sigmoid(ctx, node, grads):
    """y = 1 / (1 + exp(-x)):  dx = g * y * (1 - y)."""
    y = node.output[0]
    B = ctx.b
    return [B.Mul(grads[0], B.Mul(y, B.Sub(ctx.scalar(1.0, y), y)))]


@vjp("Erf")
def erf(ctx, node, grads):
    """y = erf(x):  dx = g * 2/sqrt(pi) * exp(-x^2)."""
    x = node.input[0]
    B = ctx.b
    return [B.Mul(grads[0], B.Mul(B.Exp(B.Neg(B.Mul(x, x))), ctx.scalar(2.0 / math.sqrt(math.pi), x)))]


@vjp("Relu")
def relu(ctx, node, grads):
    """y = max(x, 0):  dx = g where x > 0, else 0."""
    x = node.input[0]
    B = ctx.b
    zero = ctx.scalar(0.0, x)
    return [B.Where(B.Greater(x, zero), grads[0], zero)]


@vjp("Abs")
def abs_(ctx, node, grads):
    """y = |x|:  dx = g * sign(x)."""
    return [ctx.b.Mul(grads[0], ctx.b.Sign(node.input[0]))]


def gelu(ctx, node, grads):
    """Gelu, both forms, in primitive ops (not registered: Gelu's rule is that of its
    definition in graphc/ops/gelu.py, which calls this one for the forms GeluGrad does not
    cover).

    ``approximate="none"``: y = x Phi(x), dy/dx = Phi(x) + x phi(x) with
    Phi(x) = (1 + erf(x / sqrt 2)) / 2 and phi(x) = exp(-x^2 / 2) / sqrt(2 pi).

    ``approximate="tanh"``: y = x/2 (1 + t), t = tanh(u), u = k (x + c x^3),
    dy/dx = (1 + t)/2 + x/2 (1 - t^2) k (1 + 3 c x^2), k = sqrt(2/pi), c = 0.044715.
    """
    x = node.input[0]
    g = grads[0]
    B = ctx.b
    s = lambda v: ctx.scalar(v, x)  # noqa: E731
    x2 = B.Mul(x, x)
    if ctx.attr(node, "approximate", "none") == "tanh":
        u = B.Mul(x, B.Add(s(GELU_S), B.Mul(x2, s(GELU_S * GELU_A))))        # k (x + c x^3)
        t = B.Tanh(u)
        du = B.Add(s(GELU_S), B.Mul(x2, s(3.0 * GELU_S * GELU_A)))            # k (1 + 3 c x^2)
        half_x = B.Mul(x, s(0.5))
        d = B.Add(B.Mul(B.Add(t, s(1.0)), s(0.5)),
                  B.Mul(B.Mul(half_x, B.Sub(s(1.0), B.Mul(t, t))), du))
    else:
        cdf = B.Mul(B.Add(B.Erf(B.Mul(x, s(1.0 / math.sqrt(2.0)))), s(1.0)), s(0.5))
        pdf = B.Mul(B.Exp(B.Mul(x2, s(-0.5))), s(1.0 / math.sqrt(2.0 * math.pi)))
        d = B.Add(cdf, B.Mul(x, pdf))
    return [B.Mul(g, d)]


@vjp("Where")
def where(ctx, node, grads):
    """y = cond ? a : b:  da = cond ? g : 0,  db = cond ? 0 : g;  cond gets none."""
    cond, a, b = node.input
    g = grads[0]
    B = ctx.b
    out = [None, None, None]
    if ctx.needs(a):
        out[1] = ctx.reduce_to_shape(B.Where(cond, g, ctx.scalar(0.0, a)), a)
    if ctx.needs(b):
        out[2] = ctx.reduce_to_shape(B.Where(cond, ctx.scalar(0.0, b), g), b)
    return out

