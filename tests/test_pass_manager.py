"""The pass manager: verification after every pass (naming the culprit), dumps, report."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from graphc.ir.builder import GraphBuilder
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.passes.dce import DeadCodeElimination
from graphc.passes.fusions.gelu import fuse_gelu
from graphc.passes.fusions.layernorm import fuse_layernorm
from graphc.passes.manager import DUMP_ENV, PassManager, graph_pass, listing, run_passes
from graphc.passes.verify import VerificationError, structural_problems, verify

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def tiny():
    b = GraphBuilder("tiny")
    x = b.input("x", np.float32, ["N", 4])
    y = b.Relu(b.Neg(x))
    b.Exp(x)                                      # dead
    b.output(y, "y", np.float32)
    return b.model()


def copy(m):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


@graph_pass("dangle")
def dangle(model):
    m = copy(model)
    m.graph.node[0].input[0] = "nowhere"
    return m, True


@graph_pass("reorder")
def reorder(model):
    m = copy(model)
    nodes = list(m.graph.node)[::-1]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m, True


@graph_pass("double_write")
def double_write(model):
    m = copy(model)
    m.graph.node.append(helper.make_node("Neg", ["x"], [m.graph.node[0].output[0]]))
    return m, True


@graph_pass("bad_type")
def bad_type(model):
    m = copy(model)
    m.graph.node[0].op_type = "NoSuchOp"
    return m, True


@pytest.mark.parametrize("bad,what", [(dangle, "dangling value"), (reorder, "topological order"),
                                      (double_write, "single assignment"), (bad_type, "")])
def test_verifier_names_the_pass_that_broke_the_graph(bad, what):
    with pytest.raises(VerificationError, match=f"after pass '{bad.name}'") as e:
        run_passes(tiny(), [DeadCodeElimination(), bad])
    assert e.value.pass_name == bad.name
    assert what in str(e.value)


def test_structural_checks_accept_initializer_defaults():
    m = tiny()
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, 4), np.float32), "x"))
    assert structural_problems(m.graph) == []


def test_verify_returns_every_value_typed():
    m = verify(build_forward(SMALL))
    typed = {v.name for v in m.graph.value_info} | {v.name for v in m.graph.output}
    assert all(o in typed for n in m.graph.node for o in n.output)


def test_report_counts_nodes_fusions_and_time():
    model = build_forward(SMALL)
    _, report = run_passes(model, [fuse_layernorm(), fuse_gelu(), DeadCodeElimination()], name="t")
    assert [p.name for p in report.passes] == ["fuse_layernorm", "fuse_gelu", "dce"]
    ln, gelu, dce = report.passes
    assert ln.nodes_before == len(model.graph.node) and ln.nodes_before - ln.nodes_after == 5 * 9
    assert ln.fused == {"layernorm": 5} and gelu.fused == {"gelu": 2} and dce.fused == {}
    assert ln.stats == {"layernorm": 5}
    assert report.fused["layernorm"] == 5 and report.fused["attention"] == 0
    assert report.nodes_after == dce.nodes_after
    text = report.format()
    assert "fuse_layernorm" in text and "layernorm x5" in text
    json.loads(report.to_json())


def test_dump_dir_writes_every_stage(tmp_path):
    _, report = run_passes(tiny(), [DeadCodeElimination(), fuse_gelu()], dump_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00_input.onnx", "00_input.txt", "01_dce.onnx", "01_dce.txt", "02_fuse_gelu.onnx",
                     "02_fuse_gelu.txt"]
    assert len(onnx.load(str(tmp_path / "01_dce.onnx")).graph.node) == 3       # Neg, Relu, Identity
    text = (tmp_path / "00_input.txt").read_text()
    assert "Exp(x)" in text and "input  x: float32[N,4]" in text


def test_dump_env_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(DUMP_ENV, str(tmp_path / "d"))
    PassManager([DeadCodeElimination()]).run(tiny())
    assert (tmp_path / "d" / "01_dce.txt").exists()


def test_listing_is_one_line_per_node():
    m = tiny()
    lines = listing(m).splitlines()
    assert sum(1 for line in lines if line.startswith(" ")) == len(m.graph.node)


def test_passes_do_not_mutate_their_input():
    model = build_forward(SMALL)
    before = model.SerializeToString()
    from graphc.passes.pipelines import optimize

    optimize(model, "infer")
    assert model.SerializeToString() == before
