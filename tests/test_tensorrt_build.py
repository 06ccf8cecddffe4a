"""Real TensorRT engines for the small test model: every mode, BF16 and FP32, via ``graphc engine``.

A parser rejection or builder failure fails the test (a one-line error, exit 2); the
printed layer and fused-attention counts are asserted: every attention is fused in BF16
(TensorRT's fused MHA kernels are BF16/FP16), none in FP32 (decomposed into GEMM + softmax,
which is why graphc marks FP32 attention decomposable).
"""

import re

import pytest

from graphc.cli.main import main
from graphc.models.config import GPT2Config
from tensorrt_helpers import require_builder

SMALL = "L2H4C64"
N_LAYER = 2
LINE = re.compile(r"^engine (?P<path>\S+): (?P<flavor>tensorrt|rtx) (?P<version>[\d.]+), (?P<precision>bf16|fp32), "
                  r"(?P<layers>\d+) layers, attention fused (?P<k>\d+)/(?P<L>\d+), built in (?P<s>[\d.]+) s$")


@pytest.fixture(scope="module")
def flavor():
    return require_builder()


def build_cli(capsys, out, *extra):
    rc = main(["engine", "--model", SMALL, "--out", str(out), "--max-batch", "4", "--max-seq", "64", *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, lines
    m = LINE.match(lines[0])
    assert m, lines[0]
    return m


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["infer", "prefill", "decode", "train"])
def test_engine_cli_builds(flavor, capsys, tmp_path, mode, precision):
    out = tmp_path / f"{mode}_{precision}.plan"
    m = build_cli(capsys, out, "--mode", mode, "--precision", precision)
    assert m["path"] == str(out) and m["precision"] == precision
    assert m["flavor"] == flavor.name and m["version"] == flavor.version
    assert out.stat().st_size > 100_000
    assert int(m["layers"]) > 50
    assert int(m["L"]) == N_LAYER                       # one attention per transformer block, decode included
    assert int(m["k"]) == (N_LAYER if precision == "bf16" else 0)
    assert not list(tmp_path.glob(".*.tmp"))            # written atomically


def test_engine_report_and_io(flavor):
    """The counts come from the builder's own report; the engine I/O is the mode's graph."""
    from graphc.backends.tensorrt.builder import build_engine
    from graphc.backends.tensorrt.graphs import engine_graph
    from graphc.models.params import param_specs

    cfg = GPT2Config(n_layer=N_LAYER, n_head=4, n_embd=64)
    train = build_engine(engine_graph(cfg, "train", "bf16"), flavor=flavor, precision="bf16", max_batch=2,
                         max_seq=32)
    names = [s.name for s in param_specs(cfg)]
    assert set(train.outputs) == {"loss", *(f"grad.{n}" for n in names)}
    assert all(dt == "FLOAT" for dt in train.outputs.values())      # loss and gradients stay FP32
    assert train.inputs["tokens"] == "INT64" and all(train.inputs[n] == "FLOAT" for n in names)  # FP32 masters
    fused_layers = [l for l in train.engine_layers if l.fused_attention]
    assert fused_layers and all(set(l.onnx_nodes) & set(train.fused_attention) for l in fused_layers)
    assert train.profile["tokens"] == ((1, 1), (2, 32), (2, 32))

    decode = build_engine(engine_graph(cfg, "decode", "fp32"), flavor=flavor, precision="fp32", max_batch=2,
                          max_seq=32)
    assert {"logits", *(f"present.{i}.{k}" for i in range(N_LAYER) for k in ("key", "value"))} == set(decode.outputs)
    assert decode.decomposable == decode.attention_nodes and len(decode.attention_nodes) == N_LAYER
    assert not decode.fused_attention


def test_parser_rejection_is_one_line(flavor, tmp_path):
    """A node TensorRT cannot take fails the build with a one-line error naming it."""
    from onnx import TensorProto as TP
    from onnx import helper

    from graphc.backends.tensorrt.builder import build_engine
    from graphc.errors import GraphcError

    # ScatterND-add into a rank-3 table: outside what the legalisation rewrites
    graph = helper.make_graph(
        [helper.make_node("ScatterND", ["data", "idx", "upd"], ["out"], reduction="add", name="my_scatter")], "g",
        [helper.make_tensor_value_info("data", TP.FLOAT, [4, 3, 2]),
         helper.make_tensor_value_info("idx", TP.INT64, [5, 1]),
         helper.make_tensor_value_info("upd", TP.FLOAT, [5, 3, 2])],
        [helper.make_tensor_value_info("out", TP.FLOAT, [4, 3, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    with pytest.raises(GraphcError, match=r"cannot parse node 'my_scatter' \(ScatterND\)") as e:
        build_engine(model, flavor=flavor, precision="fp32", max_batch=1, max_seq=1, where="m.onnx")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}"], "--out: is a directory"),
    (["--out", "{tmp}/e.plan", "--max-seq", "4096"], "--max-seq: --max-seq 4096 exceeds the model's maximum 1024"),
    (["--out", "{tmp}/e.plan", "--model", "nope.bin"], "nope.bin"),
])
def test_engine_cli_bad_input(capsys, tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    model = [] if "--model" in argv else ["--model", SMALL]
    assert main(["engine", *model, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "e.plan").exists()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["infer", "prefill", "decode", "train"])
def test_engine_d12(flavor, capsys, tmp_path, mode, precision):
    out = tmp_path / "d12.plan"
    assert main(["engine", "--model", "d12", "--out", str(out), "--mode", mode, "--precision", precision]) == 0
    m = LINE.match(capsys.readouterr().out.strip())
    assert m and int(m["L"]) == 12 and int(m["k"]) == (12 if precision == "bf16" else 0)
    print(f"d12 {mode} {precision}: {m['layers']} layers, {out.stat().st_size} bytes, {m['s']} s")


def test_fp32_attention_needs_decomposition(flavor, monkeypatch):
    """Why graphc marks FP32 attention decomposable: without it TensorRT has no FP32 kernel."""
    import graphc.backends.tensorrt.builder as builder
    from graphc.backends.tensorrt.graphs import engine_graph
    from graphc.errors import GraphcError

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, max_seq_len=16)
    monkeypatch.setattr(builder, "allow_decomposed_fp32_attention", lambda flavor, network: [])
    with pytest.raises(GraphcError, match="failed to build the engine: .*not supported by a dedicated kernel") as e:
        builder.build_engine(engine_graph(cfg, "infer", "fp32"), flavor=flavor, precision="fp32", max_batch=1,
                             max_seq=16)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("signum, exit_code, said", [(2, 130, "interrupted"), (15, 143, "terminated")])
def test_a_signal_during_the_build_cancels_it_and_writes_nothing(flavor, capsys, tmp_path, monkeypatch,
                                                                  signum, exit_code, said):
    """TensorRT swallows exceptions raised in its Python callbacks, so Ctrl-C / SIGTERM while it
    builds are recorded, the progress monitor cancels the build, and the signal is raised again
    afterwards: exit 130 / 143, no engine, and the build did not run to its end."""
    import os

    from graphc.backends.tensorrt import builder

    made = builder._make_progress_monitor
    steps = []

    def monitor_that_signals(trt, stop):
        class SignalAtFirstStep(type(made(trt, stop))):     # graphc's monitor, which cancels on ``stop``
            def step_complete(self, phase_name, step):
                steps.append(phase_name)
                if len(steps) == 1:
                    os.kill(os.getpid(), signum)    # the user's Ctrl-C / kill, in the middle of the build
                return super().step_complete(phase_name, step)

        return SignalAtFirstStep()

    monkeypatch.setattr(builder, "_make_progress_monitor", monitor_that_signals)
    out = tmp_path / "e.plan"
    rc = main(["engine", "--model", SMALL, "--out", str(out), "--mode", "decode", "--max-batch", "4",
               "--max-seq", "64"])
    captured = capsys.readouterr()
    assert rc == exit_code and captured.err.strip() == said and captured.out == "", captured
    assert not out.exists() and not list(tmp_path.iterdir())
    assert len(steps) <= 2       # cancelled at the step after the signal, not built to the end
