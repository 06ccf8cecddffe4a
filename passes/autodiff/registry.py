"""The table from ONNX op type to its vector-Jacobian product rule.

As in JAX, each primitive's derivative is one small function registered beside its
family (``rules_elementwise``, ``rules_matmul``, ...). The driver looks rules up here; an
op with no rule is a loud error naming the node, never a silent zero.

A rule has the signature ``rule(ctx, node, grads) -> list[str | None]``:

* ``ctx``: the driver's :class:`~graphc.passes.autodiff.driver.GradContext` (a
  :class:`~graphc.ir.builder.GraphBuilder` appending to the training graph as ``ctx.b``,
  shape/dtype queries, the shared broadcast-reduction helper),
* ``node``: the forward node (its inputs and outputs are values of the training graph,
  so a rule may reuse any forward value),
* ``grads``: one gradient value name per node output, ``None`` where no gradient flows,

and returns one gradient per node input (``None`` for inputs that need none or are not
differentiable, such as indices and shapes).

One rule per op: a second registration for the same ``(domain, op_type)`` raises, so no
import order decides which rule wins. graphc's fused ops (Attention, LayerNormalization,
Gelu, graphc.CrossEntropy) bring their rules from their definitions in :mod:`graphc.ops`;
those rules choose between the fused backward op and the primitive decomposition
themselves.
"""

from __future__ import annotations

from typing import Callable, Protocol

import onnx

from graphc.ir.table import add_unique


class Rule(Protocol):
    def __call__(self, ctx, node: onnx.NodeProto, grads: list[str | None]) -> list[str | None]: ...


VJP: dict[tuple[str, str], Rule] = {}


def vjp(*op_types: str, domain: str = "") -> Callable[[Rule], Rule]:
    """Register a rule for one or more op types (``@vjp("Add", "Sub")``)."""

    def register(rule: Rule) -> Rule:
        for op_type in op_types:
            add_unique(VJP, (domain, op_type), rule, "a VJP rule")
        return rule

    return register


def lookup(node: onnx.NodeProto) -> Rule:
    key = (node.domain or "", node.op_type)
    if key not in VJP:
        where = f"{node.domain}." if node.domain else ""
        raise NotImplementedError(
            f"no gradient rule for op {where}{node.op_type} (node {node.name!r}, outputs {list(node.output)})")
    return VJP[key]
