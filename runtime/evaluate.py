"""Validation loss the way llm.c's trainers compute it.

The mean of the per-batch mean losses over the first ``n`` sequential batches of the data
(batch i = tokens [i*B*T, (i+1)*B*T] as inputs, the same span shifted by one as targets).
"""

from __future__ import annotations

import numpy as np

from graphc.data.shards import TokenLoader
from graphc.errors import GraphcError


def check_batches(loader: TokenLoader, n: int, where) -> None:
    available = loader.batches_per_epoch()
    if n > available:
        raise GraphcError(where, f"asked for {n} batches of B*T={loader.B * loader.T} tokens, "
                          f"but the data holds only {available}", "--batches")


def mean_loss(evaluator, loader: TokenLoader, n: int) -> float:
    """Reset ``loader`` and average the loss of ``evaluator`` (a
    :class:`~graphc.runtime.programs.Evaluator`) over its first ``n`` batches (float64 sum)."""
    loader.reset()
    total = 0.0
    for _ in range(n):
        inputs, targets = loader.next_batch()
        total += evaluator.loss(inputs, targets)
    return float(np.float32(total / n))
