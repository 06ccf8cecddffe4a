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


def decode_alone(make_decoder, prompt, n: int, sampler) -> list[int]:
    """``n`` tokens of ``prompt`` decoded alone in a fresh decoder (``add``, then ``step``)."""
    dec = make_decoder()
    slot, first = dec.add(prompt, sampler)
    out = [first.token]
    while len(out) < n:
        out.append(dec.step()[slot].token)
    return out


def decode_submitted_while_running(dec, prompts, n: int, make_sampler) -> list[list[int]]:
    """``prompts[0]`` is added, then after each step the next prompt is submitted (its prefill
    runs beside the running rows); every sequence collects ``n`` tokens and leaves."""
    out, slot_of = {}, {}
    slot, first = dec.add(prompts[0], make_sampler(0))
    slot_of[slot], out[0] = 0, [first.token]
    waiting = list(range(1, len(prompts)))
    for _ in range(10 * n * len(prompts)):     # bounded: each step serves every live sequence
        if not slot_of and not waiting:
            break
        if waiting:
            i = waiting.pop(0)
            slot_of[dec.submit(prompts[i], make_sampler(i))], out[i] = i, []
        for slot, sampled in dec.step().items():
            i = slot_of[slot]
            out[i].append(sampled.token)
            if len(out[i]) == n:
                dec.remove(slot)
                del slot_of[slot]
    return [out[i] for i in range(len(prompts))]
