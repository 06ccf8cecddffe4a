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
from graphc.models.config import GPT2Config, named_config
from graphc.models.gpt2 import build_forward
from graphc.models.kv_cache import build_decode
from graphc.models.params import param_specs
from graphc.passes.autodiff import grad_name
from graphc.passes.pipelines import optimize, precision_passes
from graphc.passes.precision import emulate_bf16, to_bf16
from graphc.compare import run_onnxruntime
from graphc.passes.verify import infer_shapes
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
    model, _ = optimize(build_forward(SMALL, loss=False, logits=True), "infer", precision="bf16", emulate=False)
    t = types_of(model)
    assert all(t[s.name] == BF16 for s in param_specs(SMALL))
    assert t["logits"] == FP32
    onnx.checker.check_model(model, full_check=True)


def test_kv_cache_in_bf16():
    model, report = optimize(build_decode(SMALL), "infer", precision="bf16", emulate=False)
    t = types_of(model)
    caches = [v.name for v in model.graph.input if v.name.startswith("past.")]
    assert caches and all(t[c] == BF16 for c in caches)
    assert all(t[v.name] == BF16 for v in model.graph.output if v.name.startswith("present."))
    assert t["logits"] == FP32
    assert report.passes[-1].name == "precision_bf16"


def test_unfused_graphs_are_safe():
    """The unfused training graph (``--no-opt``) and the KV-cache decode step also rewrite
    cleanly: ops the policy does not list (Softmax, ReduceMean, Sqrt, ...) compute in
    float32, and the emulation stays within bf16 rounding of float32."""
    from graphc.passes.autodiff import differentiate
    from graphc.passes.verify import verify

    params = perturbed_params(SMALL, 0)
    plain = differentiate(build_forward(SMALL, loss=True, logits=False), "loss", params.names(), keep_outputs=False)
    bf16 = verify(to_bf16(plain), "precision_bf16")
    t = types_of(bf16)
    fp32_ops = [n for n in bf16.graph.node if n.op_type in ("Softmax", "LogSoftmax", "ReduceMean", "Sqrt", "Tanh")]
    assert len(fp32_ops) > 10 and all(t[n.input[0]] == FP32 and t[n.output[0]] == FP32 for n in fp32_ops)
    assert all(t[n.output[0]] == BF16 for n in bf16.graph.node if n.op_type in ("Gemm", "MatMul"))
    tokens, targets = random_batch(SMALL, 2, 16)
    feeds = dict(params.feeds(), tokens=tokens, targets=targets)
    ref, em = run_onnxruntime(plain, feeds), run_onnxruntime(emulate_bf16(bf16), feeds)
    assert all(U_BF16 / 4 < rel_err(em[k], ref[k]) < 4 * U_BF16 for k in ref if k != "loss")

    decode, _ = optimize(build_decode(SMALL), "infer", precision="bf16")        # emulated
    cache = np.zeros((2, SMALL.n_head, 8, SMALL.head_dim), np.float32)
    feeds = {v.name: cache for v in decode.graph.input if v.name.startswith("past.")}
    feeds.update(params.feeds(), tokens=tokens[:, :1], past_len=np.zeros(2, np.int64))
    ref, em = run_onnxruntime(optimize(build_decode(SMALL), "infer")[0], feeds), run_onnxruntime(decode, feeds)
    assert U_BF16 / 4 < rel_err(em["logits"], ref["logits"]) < 4 * U_BF16
    assert np.array_equal(em["present.0.key"].astype(ml_dtypes.bfloat16).astype(np.float32), em["present.0.key"])
    # the caches reach TensorScatter unrounded (bf16-exact already): its update stays in place
    scatters = [n for n in decode.graph.node if n.op_type == "TensorScatter"]
    assert scatters and all(n.input[0].startswith("past.") and "/" not in n.input[0] for n in scatters)


def test_bf16_adds_no_tensorrt_violation(train32, train_bf16):
    """TensorRT parses the bf16 training graph as well as the fp32 one (kernels inlined, as
    TensorRT inlines local functions): the pass adds only Cast/CastLike, which it supports."""
    from trt_ops import violations

    plain = set(violations(onnx.inliner.inline_local_functions(train32)))
    assert set(violations(onnx.inliner.inline_local_functions(train_bf16))) <= plain


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


# ----------------------------------------------------------------------------- training
def _train_losses(model: onnx.ModelProto, cfg, tokens: np.ndarray, B: int, T: int, steps: int, lr: float):
    """llm.c's loop on onnxruntime: sequential batches, AdamW on the float32 master weights."""
    from graphc.backends.onnxruntime import OnnxRuntimeBackend
    from graphc.models.init import random_init
    from graphc.runtime.optimizer import AdamW, AdamWConfig

    params = random_init(cfg, 0)
    grads = params.like()
    prepared = OnnxRuntimeBackend().prepare(model)
    prepared.bind(params.feeds())
    adamw = AdamW(params.flat.size, AdamWConfig(lr=lr))
    losses = []
    for step in range(steps):
        span = tokens[step * B * T: step * B * T + B * T + 1]
        out = prepared.run({"tokens": span[:-1].reshape(B, T), "targets": span[1:].reshape(B, T)},
                           outputs={grad_name(s.name): grads[s.name] for s in params.specs})
        losses.append(float(out["loss"]))
        adamw.step(params.flat, grads.flat, step + 1, lr)
    return np.array(losses)


@pytest.mark.slow
def test_bf16_training_tracks_fp32(tiny_shards, train32):
    """41 steps of L2H2C64 on Tiny Shakespeare at lr 1e-3 (loss 10.8 -> 7.9): emulated bf16
    losses within 3e-2 of fp32 (measured: 2.1e-3 at most). ~20 s of CPU, hence slow."""
    from graphc.data.shards import read_shard

    tokens = read_shard(tiny_shards.train_path).astype(np.int64)
    emulated, _ = optimize(build_forward(SMALL, loss=True, logits=False), "train", precision="bf16")
    B, T, steps, lr = 4, 64, 41, 1e-3
    fp32 = _train_losses(train32, SMALL, tokens, B, T, steps, lr)
    bf16 = _train_losses(emulated, SMALL, tokens, B, T, steps, lr)
    assert fp32[-1] < fp32[0] - 2.0                       # it learns
    diff = np.abs(bf16 - fp32)
    assert diff.max() < 3e-2, diff
    assert diff.max() > 1e-4                              # and the bf16 run is not the fp32 one


# ----------------------------------------------------------------------------- command line
ORT_CPU_LACKS_BF16 = {"Add", "Mul", "Where", "Gemm", "MatMul", "Attention", "Gelu"}
"""Ops of the bf16 export that onnxruntime 1.32's CPU provider has no bf16 kernel for
(measured one op at a time; Gather, Slice, Reshape, Transpose, Split, Concat, Cast and
LayerNormalization do have one)."""


def test_compile_bf16_report_and_dump(capsys, tmp_path):
    from graphc.cli.main import main

    assert main(["compile", "--model", "L1H2C32", "--mode", "train", "--precision", "bf16",
                 "-b", "2", "-t", "16", "--dump", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "precision_bf16" in x)
    assert "casts=32" in line                     # 16 parameters in, 16 gradients out
    assert "fp32_kept=loss, grad.* x16, master params x16" in line
    assert "fp32_inside=statistics x6, softmax x3, loss x1" in line   # LN fwd+bwd; attention fwd+bwd, CE grad
    assert "emulate_bf16" not in out              # compile shows the bf16 graph itself
    listing = (tmp_path / "d" / "17_precision_bf16.txt").read_text()
    assert "Cast(h0.mlp.fc.w) -> h0.mlp.fc.w/bf16" in listing
    assert "input  h0.mlp.fc.w: float32" in listing and "output grad.h0.mlp.fc.w: float32" in listing
    assert onnx.load(str(tmp_path / "d" / "17_precision_bf16.onnx")).graph.node

    assert main(["compile", "--model", "L1H2C32", "--mode", "infer", "--precision", "bf16", "--json"]) == 0
    d = __import__("json").loads(capsys.readouterr().out)
    assert d["precision"] == "bf16" and d["passes"][-1]["name"] == "precision_bf16"
    assert d["passes"][-1]["stats"]["casts"] == 1  # the logits, to float32
    assert main(["compile", "--model", "L1H2C32", "--mode", "infer", "--precision", "fp8"]) == 2
    assert "--precision: invalid choice: 'fp8'" in capsys.readouterr().err


def test_export_bf16(tmp_path, capsys):
    """A bf16 ONNX model: bf16 weight initializers, checker-clean, TensorRT's op set; its
    float32 emulation on onnxruntime gives PyTorch-bf16 logits."""
    import onnxruntime as ort

    from graphc.cli.main import main
    from graphc.models.init import random_init
    from trt_ops import assert_trt_compatible

    cfg = named_config("L2H2C64")
    path = tmp_path / "m.onnx"
    assert main(["export", "--model", "L2H2C64", "--out", str(path), "--precision", "bf16"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert_trt_compatible(model, "bf16 export")
    weights = [t for t in model.graph.initializer if t.name in {s.name for s in param_specs(cfg)}]
    assert len(weights) == len(param_specs(cfg)) and all(t.data_type == BF16 for t in weights)
    assert [v.type.tensor_type.elem_type for v in model.graph.output] == [FP32]
    # onnxruntime loads it only if its CPU has every bf16 kernel; 1.32 lacks some: say which
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's NOT_IMPLEMENTED names the op
        assert "NOT_IMPLEMENTED" in str(e) and any(f"implementation for {op}(" in str(e) for op in ORT_CPU_LACKS_BF16), e
    tokens, _ = random_batch(cfg, 2, 16)
    emulated = run_onnxruntime(emulate_bf16(model), {"input_ids": tokens})["logits"]
    with torch.no_grad():
        ref = TorchGPT2(random_init(cfg, 0), compute=torch.bfloat16)(torch.from_numpy(tokens))[0].float().numpy()
        ref32 = TorchGPT2(random_init(cfg, 0))(torch.from_numpy(tokens))[0].numpy()
    assert rel_err(emulated, ref) < 2e-4 and U_BF16 / 4 < rel_err(emulated, ref32) < 4 * U_BF16   # 1.7e-5, 5.8e-3


def test_export_bf16_kv_cache_and_bad_flags(tmp_path, capsys):
    from graphc.cli.main import main

    path = tmp_path / "kv.onnx"
    assert main(["export", "--model", "L1H2C32", "--out", str(path), "--precision", "bf16", "--kv-cache"]) == 0
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    elem = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert elem["past_key_values.0.key"] == BF16 and elem["present.0.value"] == BF16 and elem["logits"] == FP32
    assert main(["export", "--model", "L1H2C32", "--weights-only", str(tmp_path / "w"), "--precision", "bf16"]) == 2
    assert capsys.readouterr().err.startswith("error: graphc export: --weights-only: ")
