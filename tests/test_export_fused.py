"""Exports carry the standard fused ops, the IR version of their opset and graphc's name."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphc.cli.main import main
from graphc.versions import parse

MODEL = "L2H2C16"
L = 2


def _export(tmp_path, *flags) -> tuple[str, onnx.ModelProto]:
    path = tmp_path / ("_".join(f.strip("-") for f in flags) or "default") / "m.onnx"
    assert main(["export", "--model", MODEL, "--out", str(path), *flags]) == 0
    return str(path), onnx.load(str(path))


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _logits(path: str, ids: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["logits"], {"input_ids": ids})[0]


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 50257, size=(2, 7), dtype=np.int64)


@pytest.mark.parametrize("opset, fused", [(24, {"LayerNormalization": 2 * L + 1, "Gelu": L, "Attention": L}),
                                          (23, {"LayerNormalization": 2 * L + 1, "Gelu": L, "Attention": L}),
                                          (20, {"LayerNormalization": 2 * L + 1, "Gelu": L, "Attention": 0}),
                                          (18, {"LayerNormalization": 2 * L + 1, "Gelu": 0, "Attention": 0})])
def test_default_export_uses_the_standard_ops_its_opset_has(tmp_path, ids, opset, fused, capsys):
    path, model = _export(tmp_path, "--opset", str(opset))
    ops = _ops(model)
    assert {k: ops[k] for k in fused} == fused
    gelu = [n for n in model.graph.node if n.op_type == "Gelu"]
    assert all(onnx.helper.get_attribute_value(a) == b"tanh" for n in gelu for a in n.attribute if a.name == "approximate")
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node) and not model.functions
    primitive, pmodel = _export(tmp_path, "--opset", str(opset), "--primitive-ops")
    assert not {"LayerNormalization", "Gelu", "Attention"} & set(_ops(pmodel))
    np.testing.assert_allclose(_logits(path, ids), _logits(primitive, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset, ir", [(18, 8), (20, 9), (21, 10), (23, 11), (24, 12)])
def test_ir_version_belongs_to_the_opset(tmp_path, opset, ir):
    from graphc import __version__

    _, model = _export(tmp_path, "--opset", str(opset), "--kv-cache")
    assert model.ir_version == ir
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert (model.producer_name, model.producer_version) == ("graphc", __version__)


def test_onnxruntime_transformer_optimizer_runs_on_the_export(tmp_path, ids):
    """onnxruntime's GPT-2 optimizer crashed on the primitive layer-norm pattern; the fused export
    goes through it and keeps its logits."""
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    path, _ = _export(tmp_path)
    optimized = optimizer.optimize_model(path, model_type="gpt2", num_heads=2, hidden_size=16, opt_level=0)
    out = str(tmp_path / "optimized.onnx")
    optimized.save_model_to_file(out)
    np.testing.assert_allclose(_logits(out, ids), _logits(path, ids), rtol=1e-4, atol=1e-4)


def test_version_parsing():
    assert parse("1.25.0") == (1, 25, 0) and parse("1.25.0rc1") == (1, 25, 0) and parse("1.3.dev0") == (1, 3)
    assert parse("1.24.9") < (1, 25) <= parse("1.25")


def test_kv_cache_export_fuses_attention_under_its_mask(tmp_path):
    """The decoder-with-past's attention (past ++ new keys, padding mask) is one ONNX
    Attention with attn_mask, and computes what the primitive form does, padding included."""
    fused, fmodel = _export(tmp_path, "--kv-cache")
    primitive, pmodel = _export(tmp_path, "--kv-cache", "--primitive-ops")
    assert _ops(fmodel)["Attention"] == L and "Softmax" not in _ops(fmodel)
    assert _ops(pmodel)["Attention"] == 0
    rng = np.random.default_rng(1)
    B, P, S, H, D = 2, 5, 3, 2, 8
    feeds = {"input_ids": rng.integers(0, 50257, (B, S), dtype=np.int64),
             "attention_mask": np.ones((B, P + S), np.int64),
             "position_ids": np.tile(np.arange(P, P + S, dtype=np.int64), (B, 1))}
    feeds["attention_mask"][1, :2] = 0                      # a left-padded second sequence
    for i in range(L):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((B, H, P, D)).astype(np.float32)
    run = lambda path: ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    for a, b in zip(run(fused), run(primitive)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
