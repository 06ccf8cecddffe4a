"""The GPT-2 ONNX graph against an independent PyTorch GPT-2 on the same weights (fp32)."""

import numpy as np
import pytest
import torch

from graphc.backends.onnxruntime import OnnxRuntimeBackend
from graphc.models.config import GPT2Config, named_config
from graphc.models.gpt2 import build_forward
from graphc.models.init import random_init
from helpers import random_batch, rel_err
from torch_gpt2 import TorchGPT2

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def run_both(cfg, B, T, seed=0):
    params = random_init(cfg, seed)
    # perturb biases and LN params so that every parameter matters
    rng = np.random.default_rng(seed + 1)
    for t in ["ln1w", "ln1b", "qkvb", "attprojb", "ln2w", "ln2b", "fcb", "fcprojb", "lnfw", "lnfb"]:
        params.tensor(t)[...] += rng.standard_normal(params.tensor(t).shape).astype(np.float32) * 0.1
    tokens, targets = random_batch(cfg, B, T, seed)
    prepared = OnnxRuntimeBackend().prepare(build_forward(cfg))
    prepared.bind(params.feeds())
    out = prepared.run({"tokens": tokens, "targets": targets})
    ref_logits, ref_loss = TorchGPT2(params)(torch.from_numpy(tokens), torch.from_numpy(targets))
    return out, ref_logits.detach().numpy(), float(ref_loss.detach())


@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (3, 64)])
def test_small_config_matches_pytorch(B, T):
    out, ref_logits, ref_loss = run_both(SMALL, B, T)
    assert out["logits"].shape == (B, T, SMALL.vocab_size)
    assert rel_err(out["logits"], ref_logits) <= 1e-5
    assert abs(float(out["loss"]) - ref_loss) / abs(ref_loss) <= 1e-5


def test_d12_matches_pytorch():
    out, ref_logits, ref_loss = run_both(named_config("d12"), 2, 64)
    assert rel_err(out["logits"], ref_logits) <= 1e-5
    assert abs(float(out["loss"]) - ref_loss) / abs(ref_loss) <= 1e-5
