"""Learning-rate schedules: a registry from name to ``lr(step) -> float``.

``cosine`` is llm.c's (``llmc/schedulers.h``): linear warmup over ``warmup`` steps to the
peak, then cosine decay to ``final_frac * peak`` at the last step. With ``warmup=0`` and
``final_frac=1`` it is constant, which is why it is the default.
"""

from __future__ import annotations

import math
from typing import Callable

Schedule = Callable[[int], float]


def constant(lr: float, steps: int, warmup: int = 0, final_frac: float = 1.0) -> Schedule:
    return lambda step: lr


def cosine(lr: float, steps: int, warmup: int = 0, final_frac: float = 1.0) -> Schedule:
    min_lr = lr * final_frac

    def at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        if steps <= warmup:
            return lr
        ratio = (step - warmup) / (steps - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    return at


SCHEDULES: dict[str, Callable[..., Schedule]] = {"constant": constant, "cosine": cosine}
