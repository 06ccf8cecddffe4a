"""Reverse-mode automatic differentiation over the ONNX IR.

``differentiate(model, loss, wrt)`` returns a training model whose outputs are the loss
(and the original outputs) followed by ``grad.<w>`` for every ``w`` in ``wrt``; see
:mod:`graphc.passes.autodiff.driver`. Rules live beside their op family
(``rules_elementwise``, ``rules_matmul``, ``rules_reductions``, ``rules_shape``,
``rules_normalization``, ``rules_softmax``, ``rules_attention``) and register themselves
in :mod:`graphc.passes.autodiff.registry` on import. graphc's fused ops (:mod:`graphc.ops`)
register the rule of their definition; it emits the fused backward op, or calls the
primitive decomposition (``rules_attention.attention``, ``rules_normalization.layer_norm``,
``rules_elementwise.gelu``) for the forms the fused op does not cover.
"""

from graphc import ops
from graphc.passes.autodiff import (  # noqa: F401 - importing registers the rules
    rules_attention,
    rules_elementwise,
    rules_matmul,
    rules_normalization,
    rules_reductions,
    rules_shape,
    rules_softmax,
)
from graphc.passes.autodiff.driver import GradContext, differentiate, grad_name
from graphc.passes.autodiff.registry import VJP, lookup, vjp

for _op in ops.OPS.values():
    if _op.vjp is not None:
        vjp(_op.name, domain=_op.domain)(_op.vjp)
del _op

__all__ = ["differentiate", "grad_name", "GradContext", "VJP", "lookup", "vjp"]
