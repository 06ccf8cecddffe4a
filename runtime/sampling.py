"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

Vectorised numpy over a batch of rows (one per sequence), applied in the usual order

    temperature -> top-k -> top-p -> sample

* ``temperature == 0`` is greedy decoding: ``argmax`` (the first maximum on ties), no
  randomness consumed;
* ``top_k`` keeps exactly the k most likely tokens (``0`` or ``None``: off);
* ``top_p`` keeps the smallest set of most likely tokens whose probability (after
  temperature and top-k) reaches ``p`` (``1.0``: off); the most likely token is always kept;
* sampling draws one uniform number per row from a ``numpy.random.Generator`` and inverts
  the row's cumulative distribution; a token with zero probability can never be drawn.

A :class:`Sampler` owns its seeded Generator, so a run is reproducible: the same seed, the
same logits and the same call sequence give the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphc.errors import GraphcError


def check_settings(temperature: float, top_k: int | None, top_p: float) -> None:
    """One-line errors for settings that make no sense."""
    if not np.isfinite(temperature) or temperature < 0:
        raise GraphcError(None, f"temperature must be >= 0 (0 = greedy), got {temperature}", "--temperature")
    if top_k is not None and top_k < 0:
        raise GraphcError(None, f"top-k must be >= 0 (0 = off), got {top_k}", "--top-k")
    if not (0.0 < top_p <= 1.0):
        raise GraphcError(None, f"top-p must be in (0, 1] (1 = off), got {top_p}", "--top-p")


def greedy(logits: np.ndarray) -> np.ndarray:
    """argmax per row: int64 [B]."""
    return np.argmax(logits, axis=-1).astype(np.int64)


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)  # exp(-inf) = 0: masked tokens get exactly zero probability
    return e / np.sum(e, axis=-1, keepdims=True)


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """bool [B, V]: True for exactly the k largest entries of each row (k >= V: all)."""
    B, V = logits.shape
    if k <= 0 or k >= V:
        return np.ones((B, V), dtype=bool)
    idx = np.argpartition(-logits, k - 1, axis=-1)[:, :k]   # the k largest, any order
    mask = np.zeros((B, V), dtype=bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


def top_p_mask(probs: np.ndarray, p: float) -> np.ndarray:
    """bool [B, V]: the smallest most-likely set whose total probability reaches ``p``.

    Tokens are taken in order of decreasing probability while the mass *before* them is
    below ``p``, so the first (most likely) token is always kept.
    """
    if p >= 1.0:
        return probs > 0
    order = np.argsort(-probs, axis=-1, kind="stable")               # [B, V]
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    before = np.cumsum(sorted_p, axis=-1) - sorted_p                  # mass of strictly more likely tokens
    keep_sorted = (before < p) & (sorted_p > 0)
    keep_sorted[:, 0] = True
    mask = np.zeros_like(keep_sorted)
    np.put_along_axis(mask, order, keep_sorted, axis=-1)
    return mask


def probabilities(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float = 1.0) -> np.ndarray:
    """The distribution sampling draws from: float64 [B, V], rows summing to 1.

    ``temperature`` must be > 0 here (0 means greedy, which has no distribution).
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    x = x / temperature
    if top_k:
        x = np.where(top_k_mask(x, int(top_k)), x, -np.inf)
    probs = _softmax(x)
    if top_p < 1.0:
        probs = np.where(top_p_mask(probs, top_p), probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample_from(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of ``probs`` [B, V] by inverting the CDF: int64 [B]."""
    cdf = np.cumsum(probs, axis=-1)
    total = cdf[:, -1]
    r = rng.random(probs.shape[0]) * total
    r = np.minimum(r, np.nextafter(total, 0))        # r < total, so some cdf entry exceeds it
    # the first index whose cdf exceeds r; a zero-probability token never starts a step
    return np.argmax(cdf > r[:, None], axis=-1).astype(np.int64)


def sample(logits: np.ndarray, rng: np.random.Generator | None, temperature: float = 1.0,
           top_k: int | None = None, top_p: float = 1.0) -> np.ndarray:
    """The next token of each row of ``logits`` [B, V] (or [V]): int64 [B]."""
    logits = np.asarray(logits)
    if logits.ndim == 1:
        logits = logits[None]
    if temperature == 0:
        return greedy(logits)
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs a numpy Generator")
    return sample_from(probabilities(logits, temperature, top_k, top_p), rng)


@dataclass
class Sampler:
    """Sampling settings plus the seeded Generator: ``sampler(logits [B, V]) -> ids [B]``."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = 0
    _rng: np.random.Generator | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        check_settings(self.temperature, self.top_k, self.top_p)

    @property
    def rng(self) -> np.random.Generator:
        """The seeded Generator, made on first use: a greedy sampler never needs one, and
        making it costs ~10 us (per request, on the server's event loop)."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def for_sequence(self, index: int) -> "Sampler":
        """The same settings with sequence ``index``'s own random stream (seed + index), so that
        each sequence of a batch samples independently of the others (and of the batch)."""
        seed = None if self.seed is None else self.seed + index
        return Sampler(self.temperature, self.top_k, self.top_p, seed)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return sample(logits, self.rng, self.temperature, self.top_k, self.top_p)
