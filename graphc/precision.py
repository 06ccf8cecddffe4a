"""Precision policies: what a step computes in, and what always stays float32.

A :class:`Precision` is a name plus the dtypes of each kind of tensor a training or
inference step holds. Only ``compute`` (activations, GEMM/attention inputs, the
residual stream, the KV cache) varies between policies; master weights, Adam state,
layer-norm statistics, softmax and the loss are float32 in every policy, as llm.c and
every mixed-precision recipe keep them (rounding them to bf16 loses the small updates,
the variance, and the log-sum-exp that training depends on).

The graph rewrite that realises a policy is a pass (``passes/precision.py``), chosen by
``optimize(..., precision=name)``; runtimes and backends read the dtypes from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphc.errors import GraphcError

FLOAT32, BFLOAT16 = "float32", "bfloat16"


@dataclass(frozen=True)
class Precision:
    """Dtypes (numpy/ONNX names) of each kind of tensor under one precision policy."""

    name: str
    compute: str                       # activations, GEMM/attention operands, KV cache
    master: str = FLOAT32              # the parameters the optimizer updates
    optimizer_state: str = FLOAT32     # AdamW m and v
    norm_stats: str = FLOAT32          # layer-norm mean and 1/std
    softmax: str = FLOAT32             # attention softmax and the loss's softmax
    loss: str = FLOAT32                # the loss and its log-sum-exp
    grads: str = FLOAT32               # parameter gradients as the graph outputs them

    @property
    def mixed(self) -> bool:
        """True when compute is narrower than the master weights (a cast pass is needed)."""
        return self.compute != self.master


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", compute=FLOAT32),
    "bf16": Precision("bf16", compute=BFLOAT16),
}


def get_precision(name: str | Precision) -> Precision:
    """The policy called ``name`` (a :class:`Precision` passes through), or a one-line error."""
    if isinstance(name, Precision):
        return name
    if name not in PRECISIONS:
        raise GraphcError(name, f"unknown precision (known: {', '.join(PRECISIONS)})", "--precision")
    return PRECISIONS[name]
