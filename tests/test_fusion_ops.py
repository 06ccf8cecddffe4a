"""graphc's fused-op local functions against PyTorch autograd (fp64 reference, fp32 run).

Each fused backward op is run by onnxruntime (which inlines the function body) on random
inputs and compared with torch.autograd on the same forward math.
"""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from graphc import OPSET
from graphc.ops import FUSED_KEYS, count_fused, ensure_functions, make_node
from helpers import rel_err

F = TensorProto.FLOAT


def run_node(node, inputs: dict, n_out: int, input_types=None):
    outs = list(node.output)
    g = helper.make_graph(
        [node], "t",
        [helper.make_tensor_value_info(k, (input_types or {}).get(k, F), list(v.shape)) for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outs[:n_out]])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 10
    m = onnx.shape_inference.infer_shapes(ensure_functions(m), strict_mode=True, data_prop=True)
    onnx.checker.check_model(m, full_check=True)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, inputs)


def rnd(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def t64(a):
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("causal", [1, 0])
def test_attention_grad(causal):
    B, H, T, D = 2, 3, 7, 8
    q, k, v, dy = (rnd(B, H, T, D, seed=i) for i in range(4))
    scale = 1 / math.sqrt(D)
    tq, tk, tv = t64(q), t64(k), t64(v)
    s = tq @ tk.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
    y = torch.softmax(s, -1) @ tv
    y.backward(torch.tensor(dy, dtype=torch.float64))
    node = make_node("AttentionGrad", ["dY", "Q", "K", "V", "Y"], ["dQ", "dK", "dV"], scale=scale, is_causal=causal)
    dq, dk, dv = run_node(node, {"dY": dy, "Q": q, "K": k, "V": v, "Y": y.detach().numpy().astype(np.float32)}, 3)
    for got, ref in [(dq, tq.grad), (dk, tk.grad), (dv, tv.grad)]:
        assert rel_err(got, ref.numpy()) < 1e-5


def test_layernorm_grad():
    x, dy = rnd(10, 16, seed=1) * 3 + 1, rnd(10, 16, seed=2)
    w, b = rnd(16, seed=3), rnd(16, seed=4)
    tx, tw, tb = t64(x), t64(w), t64(b)
    y = torch.nn.functional.layer_norm(tx, (16,), tw, tb, eps=1e-5)
    y.backward(torch.tensor(dy, dtype=torch.float64))
    node = make_node("LayerNormGrad", ["dY", "X", "W"], ["dX", "dW", "dB"], epsilon=1e-5)
    dx, dw, db = run_node(node, {"dY": dy, "X": x, "W": w}, 3)
    for got, ref in [(dx, tx.grad), (dw, tw.grad), (db, tb.grad)]:
        assert rel_err(got, ref.numpy()) < 1e-5


def test_layernorm_grad_3d():
    x, dy, w = rnd(2, 5, 8, seed=1), rnd(2, 5, 8, seed=2), rnd(8, seed=3)
    tx, tw = t64(x), t64(w)
    torch.nn.functional.layer_norm(tx, (8,), tw, None, eps=1e-5).backward(torch.tensor(dy, dtype=torch.float64))
    dx, dw, _ = run_node(make_node("LayerNormGrad", ["dY", "X", "W"], ["dX", "dW", "dB"], epsilon=1e-5),
                         {"dY": dy, "X": x, "W": w}, 3)
    assert rel_err(dx, tx.grad.numpy()) < 1e-5 and rel_err(dw, tw.grad.numpy()) < 1e-5


def test_gelu_grad():
    x, dy = rnd(6, 32, seed=5) * 3, rnd(6, 32, seed=6)
    tx = t64(x)
    torch.nn.functional.gelu(tx, approximate="tanh").backward(torch.tensor(dy, dtype=torch.float64))
    (dx,) = run_node(make_node("GeluGrad", ["dY", "X"], ["dX"]), {"dY": dy, "X": x}, 1)
    assert rel_err(dx, tx.grad.numpy()) < 1e-5


def test_cross_entropy_and_grad():
    N, V = 12, 50
    z = rnd(N, V, seed=7) * 2
    t = np.random.default_rng(8).integers(0, V, size=(N, 1)).astype(np.int64)
    tz = t64(z)
    loss = torch.nn.functional.cross_entropy(tz, torch.tensor(t[:, 0]))
    loss.backward(torch.tensor(0.7, dtype=torch.float64))
    (got_loss,) = run_node(make_node("CrossEntropy", ["Z", "T"], ["loss"]), {"Z": z, "T": t}, 1,
                           {"T": TensorProto.INT64})
    ref = float(loss.detach())
    assert abs(float(got_loss) - ref) <= 1e-5 * abs(ref)
    (dz,) = run_node(make_node("CrossEntropyGrad", ["dloss", "Z", "T"], ["dZ"]),
                     {"dloss": np.array(0.7, np.float32), "Z": z, "T": t}, 1, {"T": TensorProto.INT64})
    assert rel_err(dz, tz.grad.numpy()) < 1e-5


def test_count_fused_has_every_key():
    assert set(count_fused([])) == set(FUSED_KEYS)
    assert len(FUSED_KEYS) == 8
