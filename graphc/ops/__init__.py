"""graphc's fused ops, one definition each (see :mod:`graphc.ops.registry` for what a
definition holds).

Forward fusions emit *standard* ops wherever ONNX has one, so that every backend
(onnxruntime; TensorRT's parser; graphc's CUDA lowering) recognises them by name; the
backward ops, and the loss, which ONNX does not have, are ``graphc`` local functions whose
body is the reference decomposition:

=================  =============================================  =====================
family             forward                                        backward (local fn)
=================  =============================================  =====================
``attention``      ``Attention`` (opset 23+, is_causal, scale)    ``graphc.AttentionGrad``
``layernorm``      ``LayerNormalization`` (axis -1, epsilon)      ``graphc.LayerNormGrad``
``gelu``           ``Gelu`` (approximate="tanh", opset 20+)       ``graphc.GeluGrad``
``cross_entropy``  ``graphc.CrossEntropy`` (mean NLL of logits)   ``graphc.CrossEntropyGrad``
=================  =============================================  =====================

The training pipeline fuses the forward graph first and differentiates the fused graph, so
each fused op's VJP rule emits the fused backward op directly. The fused backward ops cover
float32 graphs in the forms the fusions emit; every other form (other dtypes, an attention
mask or past inputs, 3-D attention, a layer norm over other axes, exact GELU) is handed to
the primitive rule of the same op in ``passes/autodiff``, explicitly, from the op's one VJP
rule: ``graphc grad`` on an arbitrary model is never worse for the fused rules, and where no
rule has an answer it raises, naming the node.
"""

from graphc.ops.registry import (  # noqa: F401 - the public interface
    LOWERINGS, OPS, OpDef, count_fused, ensure_functions, function, lowerings, make_node, op_def,
    register_lowering, lowering_table, report_keys,
)
from graphc.ops import attention, layernorm, gelu, cross_entropy  # noqa: E402,F401 - define the ops, in report order

FUSED_KEYS = report_keys()
"""Every fused op's report key: attention, attention_backward, layernorm, ... (8 keys)."""
