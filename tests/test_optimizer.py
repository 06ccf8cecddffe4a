"""AdamW (llm.c's formula) and the LR schedules, against independent references."""

import math

import numpy as np
import pytest
import torch

from graphc.runtime.optimizer import CHUNK, AdamW, AdamWConfig
from graphc.runtime.schedule import SCHEDULES


def llmc_adamw(p, g, m, v, t, lr, b1, b2, eps, wd):
    """llm.c's gpt2_update, element by element semantics, in float64."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return p - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p), m, v


@pytest.mark.parametrize("workers", [1, 3])
def test_adamw_matches_llmc_formula(monkeypatch, workers):
    monkeypatch.setenv("GRAPHC_THREADS", str(workers))
    n = 2 * CHUNK + 123  # several chunks and a ragged tail
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(np.float32)
    cfg = AdamWConfig(lr=3e-3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    opt = AdamW(n, cfg)
    ref_p, ref_m, ref_v = p.astype(np.float64), np.zeros(n), np.zeros(n)
    for t in range(1, 4):
        g = rng.standard_normal(n).astype(np.float32)
        opt.step(p, g, t, cfg.lr)
        ref_p, ref_m, ref_v = llmc_adamw(ref_p, g.astype(np.float64), ref_m, ref_v, t, cfg.lr, 0.8, 0.95, 1e-6, 0.1)
    assert np.max(np.abs(p - ref_p)) < 1e-6
    assert np.max(np.abs(opt.m - ref_m)) < 1e-6 and np.max(np.abs(opt.v - ref_v)) < 1e-6


def test_adamw_matches_torch_with_matrix_only_decay_and_clipping():
    rng = np.random.default_rng(1)
    shapes = [(7, 5), (5,), (3, 4)]
    sizes = [int(np.prod(s)) for s in shapes]
    flat = rng.standard_normal(sum(sizes)).astype(np.float32)
    mask = np.concatenate([np.full(s, float(len(shape) == 2), np.float32) for s, shape in zip(sizes, shapes)])
    cfg = AdamWConfig(lr=1e-2, weight_decay=0.5, grad_clip=0.5)
    opt = AdamW(flat.size, cfg, decay_mask=mask)
    tparams = [torch.nn.Parameter(torch.tensor(a.reshape(s))) for a, s in
               zip(np.split(flat.copy(), np.cumsum(sizes)[:-1]), shapes)]
    torch_opt = torch.optim.AdamW([{"params": [tparams[0], tparams[2]], "weight_decay": 0.5},
                                   {"params": [tparams[1]], "weight_decay": 0.0}], lr=1e-2, eps=1e-8)
    for t in range(1, 4):
        g = rng.standard_normal(flat.size).astype(np.float32)
        for tp, gs in zip(tparams, np.split(g.copy(), np.cumsum(sizes)[:-1])):
            tp.grad = torch.tensor(gs.reshape(tp.shape))
        torch.nn.utils.clip_grad_norm_(tparams, 0.5)
        torch_opt.step()
        pre_clip = float(np.linalg.norm(g.astype(np.float64)))
        assert opt.step(flat, g, t, 1e-2) == pytest.approx(pre_clip, rel=1e-6)
    # torch's AdamW decays as p *= (1 - lr*wd) before the Adam step; llm.c adds lr*wd*p to the
    # update. Both are decoupled decay and agree to first order: compare within lr^2*wd.
    expected = np.concatenate([tp.detach().numpy().ravel() for tp in tparams])
    assert np.max(np.abs(flat - expected)) < 1e-4


def test_clipping_scales_to_the_clip_norm():
    g = np.full(100, 3.0, np.float32)  # norm 30
    opt = AdamW(100, AdamWConfig(grad_clip=1.5))
    norm = opt.step(np.zeros(100, np.float32), g, 1, 0.0)
    assert norm == pytest.approx(30.0)
    assert np.linalg.norm(g) == pytest.approx(1.5, rel=1e-6)


def test_schedules():
    cos = SCHEDULES["cosine"](1.0, 110, warmup=10, final_frac=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)
    assert cos(110) == pytest.approx(0.1)
    flat = SCHEDULES["cosine"](3e-4, 50)  # defaults: constant
    assert {flat(s) for s in range(50)} == {3e-4}
    assert SCHEDULES["constant"](2.0, 10, 5, 0.1)(0) == 2.0
