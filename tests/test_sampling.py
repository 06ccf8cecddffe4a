"""Token sampling: greedy, temperature, top-k, top-p, seeded reproducibility (runtime/sampling.py)."""

import numpy as np
import pytest

from graphc.errors import GraphcError
from graphc.runtime.sampling import Sampler, probabilities, sample, top_k_mask, top_p_mask

V = 1000


def random_logits(B=8, V=V, seed=0):
    return np.random.default_rng(seed).standard_normal((B, V)).astype(np.float32) * 3


def test_greedy_is_argmax():
    logits = random_logits()
    assert np.array_equal(Sampler(temperature=0)(logits), np.argmax(logits, axis=-1))
    assert np.array_equal(sample(logits, None, temperature=0), np.argmax(logits, axis=-1))
    # greedy ignores top-k / top-p and consumes no randomness
    s = Sampler(temperature=0, top_k=5, top_p=0.5, seed=1)
    state = s.rng.bit_generator.state
    assert np.array_equal(s(logits), np.argmax(logits, axis=-1))
    assert s.rng.bit_generator.state == state


def test_one_row_logits_accepted():
    logits = random_logits(1)[0]
    assert Sampler(temperature=0)(logits).shape == (1,)


def test_seeded_sampling_is_reproducible():
    logits = random_logits()
    runs = []
    for _ in range(2):
        s = Sampler(temperature=0.9, top_k=50, top_p=0.9, seed=123)
        runs.append(np.stack([s(logits) for _ in range(20)]))
    assert np.array_equal(runs[0], runs[1])
    other = Sampler(temperature=0.9, top_k=50, top_p=0.9, seed=124)
    assert not np.array_equal(runs[0], np.stack([other(logits) for _ in range(20)]))


def test_top_k_never_leaves_the_top_k():
    rng = np.random.default_rng(1)
    base = rng.permutation(V).astype(np.float64) / 50          # distinct values, a clear top-k
    logits = np.tile(base, (4000, 1))                           # many draws in one vectorised call
    k = 7
    allowed = set(np.argsort(-base)[:k].tolist())
    draws = Sampler(temperature=5.0, top_k=k, seed=0)(logits)   # high temperature: flat within the set
    assert set(draws.tolist()) <= allowed
    assert set(draws.tolist()) == allowed                      # and every allowed token does occur
    assert top_k_mask(logits[:2], k).sum(axis=-1).tolist() == [k, k]


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([[0.05, 0.5, 0.1, 0.3, 0.05]])
    assert top_p_mask(probs, 0.5).nonzero()[1].tolist() == [1]          # 0.5 alone reaches 0.5
    assert top_p_mask(probs, 0.8).nonzero()[1].tolist() == [1, 3]       # 0.5 + 0.3 reaches 0.8
    assert top_p_mask(probs, 0.81).nonzero()[1].tolist() == [1, 2, 3]
    assert top_p_mask(probs, 1e-9).nonzero()[1].tolist() == [1]         # the top token is always kept


def test_top_p_never_leaves_the_nucleus_and_renormalises():
    p = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])
    logits = np.tile(np.log(p), (20000, 1))
    draws = Sampler(temperature=1.0, top_p=0.75, seed=7)(logits)
    assert set(draws.tolist()) == {0, 1, 2}                            # 0.4 + 0.25 + 0.15 >= 0.75
    freq = np.bincount(draws, minlength=len(p))[:3] / len(draws)
    np.testing.assert_allclose(freq, p[:3] / p[:3].sum(), atol=0.015)


def test_order_is_temperature_then_top_k_then_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.2]]))
    # top-p after temperature: a hot temperature flattens the distribution, so the nucleus grows
    assert (probabilities(logits, temperature=1.0, top_p=0.7) > 0).sum() == 2
    assert (probabilities(logits, temperature=100.0, top_p=0.7) > 0).sum() == 3
    # top-p on the top-k-renormalised distribution: [0.625, 0.375] -> both needed for 0.7
    assert (probabilities(logits, temperature=1.0, top_k=2, top_p=0.7) > 0).sum() == 2
    np.testing.assert_allclose(probabilities(logits, top_k=2)[0], [0.625, 0.375, 0.0])
    # temperature scales logits before softmax
    np.testing.assert_allclose(probabilities(logits, temperature=0.5)[0], np.array([25, 9, 4]) / 38)


def test_rows_are_sampled_independently():
    logits = np.full((3, 5), -np.inf)
    logits[0, 4] = logits[1, 0] = logits[2, 2] = 0.0          # one possible token per row
    assert Sampler(temperature=1.3, top_k=3, top_p=0.9, seed=0)(logits).tolist() == [4, 0, 2]


def test_zero_probability_tokens_are_never_drawn():
    logits = np.tile(np.array([0.0, -np.inf, 0.0, -np.inf, 3.0]), (5000, 1))
    draws = Sampler(temperature=1.0, seed=3)(logits)
    assert set(draws.tolist()) <= {0, 2, 4}
    assert Sampler(temperature=0.7, top_k=1, seed=3)(logits).tolist() == [4] * 5000


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(temperature=float("nan"))])
def test_bad_settings_are_one_line_errors(kwargs):
    with pytest.raises(GraphcError):
        Sampler(**kwargs)
