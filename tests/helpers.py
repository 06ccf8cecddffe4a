"""Helpers shared by tests: relative error and small random batches."""

from __future__ import annotations

import numpy as np


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN never passes)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    denom = np.linalg.norm(e)
    return float(np.linalg.norm(a - e) / (denom if denom > 0 else 1.0))


def random_batch(cfg, B: int, T: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)
    targets = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)
    return tokens, targets
