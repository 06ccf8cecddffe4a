"""``graphc grad`` on a hand-made ONNX model (plain onnx.helper, not graphc's builder)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.cli import grad as grad_cli
from graphc.cli.main import main
from gradcheck import fd_grad, run, session


def mlp_model() -> onnx.ModelProto:
    """x [4, 3] -> tanh(x W1 + b1) W2 -> softmax -> loss = mean((p - y)^2); float64."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((3, 5)), "W1")
    b1 = numpy_helper.from_array(rng.standard_normal(5), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((5, 2)), "W2")
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["h"]),
        helper.make_node("Gemm", ["h", "W2"], ["z"]),
        helper.make_node("Softmax", ["z"], ["p"], axis=-1),
        helper.make_node("Sub", ["p", "y"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["mse"], keepdims=0),
        helper.make_node("Identity", ["mse"], ["loss"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [4, 3]),
         helper.make_tensor_value_info("y", TensorProto.DOUBLE, [4, 2]),
         helper.make_tensor_value_info("steps", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("loss", TensorProto.DOUBLE, []),
         helper.make_tensor_value_info("p", TensorProto.DOUBLE, [4, 2])],
        [w1, b1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="handmade")
    model.ir_version = 9
    return model


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    return path


def feeds():
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((4, 3)), "y": rng.uniform(0, 1, (4, 2)), "steps": np.array([3], np.int64)}


def test_grad_cli_writes_a_runnable_training_model(model_path, tmp_path, capsys):
    out = tmp_path / "sub" / "train.onnx"
    assert main(["grad", str(model_path), "--loss", "loss", "--wrt", "W1,b1,x,W2", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}: 9 forward nodes, ") and line.endswith(" backward nodes, 4 gradients")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]      # no temporary left behind
    train = onnx.load(str(out))
    onnx.checker.check_model(train, full_check=True)
    assert [o.name for o in train.graph.output] == ["loss", "p", "grad.W1", "grad.b1", "grad.x", "grad.W2"]
    f = feeds()
    got = run(train, f)
    # finite differences of the forward model with its initializers turned into inputs
    forward = mlp_model()
    inits = {t.name: numpy_helper.to_array(t) for t in forward.graph.initializer}
    for name, value in inits.items():
        forward.graph.input.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, value.shape))
    del forward.graph.initializer[:]
    sess = session(forward)
    all_feeds = {**f, **inits}
    names = {i.name for i in sess.get_inputs()}

    def loss(values):
        return float(sess.run(["loss"], {k: v for k, v in values.items() if k in names})[0])

    for name in ["W1", "b1", "x", "W2"]:
        ref = fd_grad(loss, all_feeds, name)
        np.testing.assert_allclose(got[f"grad.{name}"], ref, rtol=1e-6, atol=1e-9)


def test_grad_cli_no_keep_outputs(model_path, tmp_path):
    out = tmp_path / "train.onnx"
    assert main(["grad", str(model_path), "--loss", "loss", "--wrt", "b1", "--out", str(out), "--no-keep-outputs"]) == 0
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["loss", "grad.b1"]


@pytest.mark.parametrize("args,message", [
    (["--loss", "nope", "--wrt", "W1"], "--loss: 'nope' is not a value of the graph"),
    (["--loss", "p", "--wrt", "W1"], "--loss: 'p' has shape"),
    (["--loss", "loss", "--wrt", "W1,nope"], "--wrt: 'nope' is not a value of the graph"),
    (["--loss", "loss", "--wrt", "steps"], "--wrt: 'steps' is INT64, not floating point"),
    (["--loss", "loss", "--wrt", "h"], "--wrt: 'h' is an intermediate value"),
    (["--loss", "loss", "--wrt", ","], "--wrt: no names given"),
])
def test_grad_cli_bad_names(model_path, tmp_path, capsys, args, message):
    out = tmp_path / "train.onnx"
    assert main(["grad", str(model_path), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {model_path}: ")
    assert message in err
    assert not out.exists()


def test_grad_cli_bad_files(tmp_path, capsys):
    out = tmp_path / "train.onnx"
    assert main(["grad", str(tmp_path / "missing.onnx"), "--loss", "l", "--wrt", "w", "--out", str(out)]) == 2
    assert "model: not found" in capsys.readouterr().err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffthis is not a protobuf at all" * 10)
    assert main(["grad", str(junk), "--loss", "l", "--wrt", "w", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{junk}: model: not" in err
    assert not out.exists()


def test_grad_cli_unsupported_op_is_one_line(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    loss = helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])
    nodes = [helper.make_node("Sin", ["x"], ["s"], name="sine"), helper.make_node("ReduceSum", ["s"], ["loss"], keepdims=0)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [loss]), opset_imports=[helper.make_opsetid("", 24)])
    path = tmp_path / "sin.onnx"
    onnx.save(model, str(path))
    assert main(["grad", str(path), "--loss", "loss", "--wrt", "x", "--out", str(tmp_path / "t.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Sin" in err and "sine" in err


def test_large_models_use_external_data(model_path, tmp_path, monkeypatch):
    # past protobuf's 2 GB limit tensors go to TRAIN.onnx.data; exercised with a tiny limit
    monkeypatch.setattr(grad_cli, "PROTOBUF_LIMIT", 100)
    monkeypatch.setattr(grad_cli, "EXTERNAL_MIN_BYTES", 64)
    out = tmp_path / "train.onnx"
    assert main(["grad", str(model_path), "--loss", "loss", "--wrt", "W1", "--out", str(out)]) == 0
    assert (tmp_path / "train.onnx.data").stat().st_size > 0
    on_disk = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in on_disk.graph.initializer)
    train = onnx.load(str(out))
    small = tmp_path / "small.onnx"
    monkeypatch.setattr(grad_cli, "PROTOBUF_LIMIT", 2**31 - 1)
    assert main(["grad", str(model_path), "--loss", "loss", "--wrt", "W1", "--out", str(small)]) == 0
    np.testing.assert_array_equal(run(train, feeds())["grad.W1"], run(onnx.load(str(small)), feeds())["grad.W1"])
