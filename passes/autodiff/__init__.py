"""Reverse-mode automatic differentiation over the ONNX IR.

``differentiate(model, loss, wrt)`` returns a training model whose outputs are the loss
(and the original outputs) followed by ``grad.<w>`` for every ``w`` in ``wrt``; see
:mod:`graphc.passes.autodiff.driver`. Rules live beside their op family
(``rules_elementwise``, ``rules_matmul``, ``rules_reductions``, ``rules_shape``,
``rules_normalization``, ``rules_softmax``, ``rules_attention``) and register themselves
in :mod:`graphc.passes.autodiff.registry` on import.
"""

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

__all__ = ["differentiate", "grad_name", "GradContext", "VJP", "lookup", "vjp"]

# The fused ops' VJP rules (Attention, LayerNormalization, Gelu, graphc.CrossEntropy) emit the
# fused backward ops (graphc.*Grad local functions, passes/fusions/ops.py). Imported last, so
# for those op types they take precedence over the primitive decompositions above.
from graphc.passes.autodiff import rules_fused  # noqa: E402,F401
