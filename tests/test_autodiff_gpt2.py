"""Every GPT-2 parameter gradient from graphc's autodiff against PyTorch autograd (fp32).

Both training graphs are checked, run in onnxruntime: the *optimised* one ``graphc train``
runs by default (fused forward, then fused backward ops: ``runtime.programs.training_graph``)
and the plain ``differentiate(build_forward(cfg), "loss", param names)`` (``--no-opt``); the
reference is the independent ``tests/torch_gpt2.py`` on the same weights and batch. Gradients are compared per llm.c tensor (per-layer ones stacked), relative
error (``helpers.rel_err``) <= 1e-4 each, and the loss to 1e-5.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
import torch

from graphc.backends.onnxruntime import OnnxRuntimeBackend
from graphc.models.config import GPT2Config, named_config
from graphc.models.gpt2 import build_forward
from graphc.models.init import random_init
from graphc.models.params import LLMC_ORDER, param_specs
from graphc.passes.autodiff import differentiate, grad_name
from graphc.ops import count_fused
from graphc.runtime.programs import training_graph
from helpers import random_batch, rel_err
from torch_gpt2 import TorchGPT2

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)
PERTURBED = ["ln1w", "ln1b", "qkvb", "attprojb", "ln2w", "ln2b", "fcb", "fcprojb", "lnfw", "lnfb"]


def perturbed_params(cfg, seed=0):
    """Random GPT-2 weights with biases and LN params perturbed so every gradient is generic."""
    params = random_init(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    for t in PERTURBED:
        params.tensor(t)[...] += rng.standard_normal(params.tensor(t).shape).astype(np.float32) * 0.1
    return params


def graphc_grads(cfg, params, tokens, targets, opt):
    train = training_graph(cfg, opt=opt)
    assert count_fused(train)["attention_backward"] == (cfg.n_layer if opt else 0)
    prepared = OnnxRuntimeBackend().prepare(train)
    prepared.bind(params.feeds())
    grads = params.like()
    # bind the gradient outputs straight into the flat buffer, as the training runner does
    out = prepared.run({"tokens": tokens, "targets": targets},
                       outputs={grad_name(s.name): grads[s.name] for s in params.specs})
    return float(out["loss"]), grads


def torch_grads(params, tokens, targets):
    model = TorchGPT2(params)
    _, loss = model(torch.from_numpy(tokens), torch.from_numpy(targets))
    loss.backward()
    return float(loss.detach()), model.grads()


def compare(cfg, B, T, seed=0, tokens=None, opt=True):
    params = perturbed_params(cfg, seed)
    toks, targets = random_batch(cfg, B, T, seed)
    tokens = toks if tokens is None else tokens
    loss, grads = graphc_grads(cfg, params, tokens, targets, opt)
    ref_loss, ref = torch_grads(params, tokens, targets)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    errors = {t: rel_err(grads.tensor(t), ref[t]) for t in LLMC_ORDER}
    bad = {t: e for t, e in errors.items() if not e <= 1e-4}
    assert not bad, f"gradients differ from PyTorch: {bad}"
    return grads, ref


def test_training_graph_is_valid_and_shaped():
    train = differentiate(build_forward(SMALL), "loss", [s.name for s in param_specs(SMALL)])
    onnx.checker.check_model(train, full_check=True)
    outs = [o.name for o in train.graph.output]
    assert outs[:2] == ["loss", "logits"]
    assert outs[2:] == [grad_name(s.name) for s in param_specs(SMALL)]
    by_name = {o.name: o for o in train.graph.output}
    for s in param_specs(SMALL):
        dims = [d.dim_value for d in by_name[grad_name(s.name)].type.tensor_type.shape.dim]
        assert tuple(dims) == s.shape, s.name
        assert by_name[grad_name(s.name)].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # every broadcast in GPT-2 is proven statically: no run-time reduction axes
    assert not any(n.op_type in ("Compress", "NonZero") for n in train.graph.node)


OPT = pytest.mark.parametrize("opt", [True, False], ids=["optimised", "unoptimised"])


@OPT
@pytest.mark.parametrize("B,T", [(2, 16), (1, 1), (3, 37)])
def test_small_config_grads_match_pytorch(B, T, opt):
    compare(SMALL, B, T, opt=opt)


@OPT
def test_duplicate_token_ids_accumulate(opt):
    # many repeated ids: the wte gradient must sum every occurrence (ScatterND add)
    B, T = 2, 24
    tokens = np.tile(np.array([5, 5, 9, 5, 9, 100], np.int64), (B, T // 6))
    grads, ref = compare(SMALL, B, T, tokens=tokens, opt=opt)
    rows = grads.tensor("wte")[[5, 9, 100]]
    assert rel_err(rows, ref["wte"][[5, 9, 100]]) <= 1e-4
    # padded rows (past the real vocabulary) get exact zeros
    assert not grads.tensor("wte")[SMALL.vocab_size:].any()


@pytest.mark.parametrize("opt", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["optimised", "unoptimised"])
def test_d12_grads_match_pytorch(opt):
    """d12 in the default suite on the path that trains; the unoptimised graph (--no-opt) is slow here."""
    cfg = named_config("d12")
    start = time.perf_counter()
    compare(cfg, 4, 64, opt=opt)
    print(f"d12 B=4 T=64 gradient check: {time.perf_counter() - start:.1f} s")
