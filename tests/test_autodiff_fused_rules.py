"""The registered (fused-first) rules: fused backward ops where they apply, the general
primitive rules everywhere else, so `graphc grad` on arbitrary models stays exact."""

import numpy as np
import pytest

from gradcheck import check_fd, check_torch, make_case


def op(op_type, *names, **attrs):
    return lambda b, v: b.op(op_type, *[v[n] for n in names], **attrs)


def rnd(*shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def op_types(case):
    case.grads()  # builds and runs the training graph
    return {(n.domain, n.op_type) for n in case.train.graph.node}


def test_float32_layernorm_gets_the_fused_backward():
    case = make_case(op("LayerNormalization", "x", "w", "b", epsilon=1e-5),
                     {"x": rnd(4, 8, dtype=np.float32), "w": rnd(8, dtype=np.float32), "b": rnd(8, dtype=np.float32)})
    assert ("graphc", "LayerNormGrad") in op_types(case)


@pytest.mark.parametrize("shape,axis", [((3, 4, 5), 1), ((3, 4, 5), -1)])
def test_float64_layernorm_uses_the_general_rule(shape, axis):
    inputs = {"x": rnd(*shape), "w": rnd(*shape[axis:], seed=1), "b": rnd(*shape[axis:], seed=2)}
    case = make_case(op("LayerNormalization", "x", "w", "b", axis=axis, epsilon=1e-5), inputs)
    assert ("graphc", "LayerNormGrad") not in op_types(case)
    check_fd(case)


def test_float64_tanh_gelu_uses_the_general_rule():
    case = make_case(op("Gelu", "x", approximate="tanh"), {"x": rnd(5, 7)})
    assert ("graphc", "GeluGrad") not in op_types(case)
    check_fd(case)


def test_exact_gelu_uses_the_general_rule():
    # onnxruntime has no float64 Erf kernel: float32 graph, torch float64 reference
    import torch

    case = make_case(op("Gelu", "x"), {"x": rnd(5, 7, dtype=np.float32)})
    assert ("graphc", "GeluGrad") not in op_types(case)
    check_torch(case, lambda x: torch.nn.functional.gelu(x), rtol=1e-5, atol=1e-6)


def test_float32_tanh_gelu_gets_the_fused_backward():
    case = make_case(op("Gelu", "x", approximate="tanh"), {"x": rnd(5, 7, dtype=np.float32)})
    assert ("graphc", "GeluGrad") in op_types(case)
