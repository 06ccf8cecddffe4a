"""BF16 mixed precision: the policy, the ``precision_bf16`` rewrite and its emulation.

Structure: which values are bf16 and which stay float32 (master parameters, gradient
outputs, loss, logits; layer-norm statistics, softmax and the loss inside their ops, seen
by inlining every function body), the full ONNX checker, KV caches in bf16.

Numerics, through the float32 emulation on onnxruntime, against two references: the
float32 graph (the emulation must differ from it by bf16 rounding, ~2^-8 relative, and
no more) and an independent PyTorch model run in bf16 with float32 LN/softmax/GELU/loss
(``tests/torch_gpt2.py``, ``compute=torch.bfloat16``), which must agree with the
emulation much more closely than either does with float32: the two compute the same
bf16 values and differ only where a float32 summation order tips a bf16 rounding.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx.inliner
import pytest
import torch
from onnx import TensorProto, helper

from graphc.errors import GraphcError
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.models.kv_cache import build_decode
from graphc.models.params import param_specs
from graphc.passes.autodiff import grad_name
from graphc.passes.pipelines import optimize, precision_passes
from graphc.passes.precision import emulate_bf16, to_bf16
from graphc.passes.verify import infer_shapes, run_onnxruntime
from graphc.precision import PRECISIONS, get_precision
from helpers import random_batch, rel_err
from test_autodiff_gpt2 import perturbed_params
from torch_gpt2 import TorchGPT2

SMALL = GPT2Config(n_layer=2, n_head=2, n_embd=64, max_seq_len=64)
BF16, FP32 = TensorProto.BFLOAT16, TensorProto.FLOAT
U_BF16 = 2.0 ** -8      # bf16 unit roundoff (8 significant bits)


# ----------------------------------------------------------------------------- graphs
@pytest.fixture(scope="module")
def train32():
    model, _ = optimize(build_forward(SMALL, loss=True, logits=False), "train")
    return model


@pytest.fixture(scope="module")
def train_bf16(train32):
    return to_bf16(train32)


def types_of(model: onnx.ModelProto) -> dict[str, int]:
    g = infer_shapes(model).graph
    out = {t.name: t.data_type for t in g.initializer}
    out.update({v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]})
    return out


def inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every local function inlined (ONNX's inliner), shapes inferred: the math as a backend sees it."""
    return infer_shapes(onnx.inliner.inline_local_functions(model))


# ----------------------------------------------------------------------------- policy
def test_precision_policies():
    bf16, fp32 = get_precision("bf16"), get_precision("fp32")
    assert set(PRECISIONS) == {"fp32", "bf16"}
    assert (bf16.compute, fp32.compute) == ("bfloat16", "float32")
    for p in (bf16, fp32):
        assert {p.master, p.optimizer_state, p.norm_stats, p.softmax, p.loss, p.grads} == {"float32"}
    assert bf16.mixed and not fp32.mixed
    assert get_precision(bf16) is bf16
    with pytest.raises(GraphcError) as e:
        get_precision("fp8")
    assert e.value.field == "--precision" and "fp8" in str(e.value)


def test_pipelines_append_precision_passes():
    assert precision_passes("fp32") == []
    assert precision_passes("bf16") == ["precision_bf16", "emulate_bf16"]        # CPU reference
    assert precision_passes("bf16", "onnxruntime") == ["precision_bf16", "emulate_bf16"]
    assert precision_passes("bf16", "tensorrt") == ["precision_bf16"]
    with pytest.raises(GraphcError):
        precision_passes("fp16")


# ----------------------------------------------------------------------------- structure
def test_training_graph_structure(train_bf16):
    onnx.checker.check_model(train_bf16, full_check=True)
    t = types_of(train_bf16)
    g = train_bf16.graph
    params = [s.name for s in param_specs(SMALL)]
    assert all(t[p] == FP32 for p in params)                                  # master weights
    assert all(t[grad_name(p)] == FP32 for p in params)                       # gradient outputs
    assert t["loss"] == FP32
    compute = [n for n in g.node if n.op_type in ("Gemm", "MatMul", "Attention", "Gelu", "LayerNormalization")]
    assert len(compute) > 20
    for n in compute:                                                          # bf16 operands and results
        assert all(t[x] == BF16 for x in n.input if x), n
        assert t[n.output[0]] == BF16, n
    for n in g.node:
        if n.op_type == "LayerNormalization":
            assert helper.get_attribute_value(next(a for a in n.attribute if a.name == "stash_type")) == 1
        if n.op_type == "Attention":
            assert helper.get_attribute_value(next(a for a in n.attribute if a.name == "softmax_precision")) == FP32
    # every graphc kernel reads bf16 activations
    for n in g.node:
        if n.domain == "graphc":
            assert BF16 in {t[x] for x in n.input if x}, n
    # one cast per parameter (shared by its uses) and one per gradient output
    casts = [n for n in g.node if n.op_type == "Cast"]
    assert len(casts) == 2 * len(params)


def test_no_bf16_statistics_softmax_or_loss(train_bf16):
    """Inline every kernel: softmax, log-softmax, LN statistics and the loss reduction
    compute in float32, though the kernels' inputs are bf16."""
    m = inlined(train_bf16)
    t = types_of(m)
    checked = 0
    for n in m.graph.node:
        if n.op_type in ("Softmax", "LogSoftmax", "ReduceMean", "Sqrt", "Reciprocal", "GatherElements", "Exp"):
            assert t[n.input[0]] == FP32 and t[n.output[0]] == FP32, n
            checked += 1
    assert checked >= 2 * 2 + 3 * 5   # per layer: AttentionGrad softmax; every LayerNormGrad's statistics
    # and the bf16 compute is still there after inlining
    assert sum(n.op_type in ("Gemm", "MatMul") and t[n.output[0]] == BF16 for n in m.graph.node) > 20


def test_inference_graph_has_bf16_parameters():
    model, _ = optimize(build_forward(SMALL, loss=False, logits=True), "infer", precision="bf16", backend="tensorrt")
    t = types_of(model)
    assert all(t[s.name] == BF16 for s in param_specs(SMALL))
    assert t["logits"] == FP32
    onnx.checker.check_model(model, full_check=True)


def test_kv_cache_in_bf16():
    model, report = optimize(build_decode(SMALL), "infer", precision="bf16", backend="tensorrt")
    t = types_of(model)
    caches = [v.name for v in model.graph.input if v.name.startswith("past.")]
    assert caches and all(t[c] == BF16 for c in caches)
    assert all(t[v.name] == BF16 for v in model.graph.output if v.name.startswith("present."))
    assert t["logits"] == FP32
    assert report.passes[-1].name == "precision_bf16"


# ----------------------------------------------------------------------------- emulation
def test_emulation_rounds_exactly_where_bf16_is_held():
    """y = Gelu(x @ w) in bf16; emulated = numpy with x, w, x @ w and y rounded to bf16."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Gelu", ["h"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FP32, [8, 16]),
                                       helper.make_tensor_value_info("w", FP32, [16, 4])],
                          [helper.make_tensor_value_info("y", FP32, [8, 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)])
    model.ir_version = 10
    em = emulate_bf16(to_bf16(model, params={"w"}))
    assert all(v.type.tensor_type.elem_type == FP32 for v in [*em.graph.input, *em.graph.output])
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
    r = lambda a: np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)  # noqa: E731
    h = r(r(x) @ r(w))
    expected = r(0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3))))
    got = run_onnxruntime(em, {"x": x, "w": w})["y"]
    plain = run_onnxruntime(model, {"x": x, "w": w})["y"]
    assert np.array_equal(got.astype(ml_dtypes.bfloat16).astype(np.float32), got)   # y is bf16-exact
    assert np.max(np.abs(got - expected)) <= 2 * U_BF16 * np.max(np.abs(expected))  # <= one ulp (Gelu's tanh)
    assert rel_err(got, plain) > 1e-4                                                 # and it did round


# ----------------------------------------------------------------------------- numerics
def _graph_run(model, params, tokens, targets):
    out = run_onnxruntime(model, dict(params.feeds(), tokens=tokens, targets=targets))
    grads = params.like()
    for s in params.specs:
        grads[s.name][...] = out[grad_name(s.name)]
    return float(out["loss"]), {t: grads.tensor(t) for t in TENSORS}


def _torch_run(params, tokens, targets, compute):
    model = TorchGPT2(params, compute=compute)
    _, loss = model(torch.from_numpy(tokens), torch.from_numpy(targets))
    loss.backward()
    return float(loss.detach()), model.grads()


TENSORS = ["wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b",
           "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb"]


def test_bf16_gradients_against_fp32_and_pytorch_bf16(train32):
    params = perturbed_params(SMALL, 0)
    tokens, targets = random_batch(SMALL, 4, 32, seed=1)
    emulated, report = optimize(build_forward(SMALL, loss=True, logits=False), "train", precision="bf16")
    assert [p.name for p in report.passes[-2:]] == ["precision_bf16", "emulate_bf16"]
    loss_em, g_em = _graph_run(emulated, params, tokens, targets)
    loss_32, g_32 = _graph_run(train32, params, tokens, targets)
    loss_tb, g_tb = _torch_run(params, tokens, targets, torch.bfloat16)
    loss_t32, g_t32 = _torch_run(params, tokens, targets, None)

    # float32 graph vs float32 PyTorch: the references agree where there is no bf16
    assert abs(loss_32 - loss_t32) < 1e-5 and all(rel_err(g_32[t], g_t32[t]) < 1e-4 for t in TENSORS)
    # losses: bf16-sized difference from fp32, much closer to each other
    assert abs(loss_em - loss_32) < 4 * U_BF16 * abs(loss_32)
    assert abs(loss_em - loss_tb) < 1e-5 * abs(loss_32)
    e_fp32 = {t: rel_err(g_em[t], g_32[t]) for t in TENSORS}
    e_torch = {t: rel_err(g_em[t], g_tb[t]) for t in TENSORS}
    e_torch_fp32 = {t: rel_err(g_tb[t], g_t32[t]) for t in TENSORS}
    for t in TENSORS:
        # bf16 rounding, a few units of roundoff at most, and really there
        assert U_BF16 / 4 < e_fp32[t] < 4 * U_BF16, (t, e_fp32[t])
        assert U_BF16 / 4 < e_torch_fp32[t] < 4 * U_BF16, (t, e_torch_fp32[t])
        # emulation vs PyTorch bf16: the same bf16 values up to an occasional one-ulp tip
        # (a 64-element LN weight gradient with one tipped element is already ~5e-4)
        assert e_torch[t] < U_BF16 * 0.75, (t, e_torch[t])
        assert e_torch[t] < e_fp32[t] / 2, (t, e_torch[t], e_fp32[t])
    mean = lambda d: float(np.mean(list(d.values())))   # noqa: E731
    assert mean(e_torch) < mean(e_fp32) / 5, (mean(e_torch), mean(e_fp32))
