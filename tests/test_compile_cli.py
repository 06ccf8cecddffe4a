"""``graphc compile``: the text report, the --json contract, dumps, and bad input."""

import json

import pytest

from graphc.cli.main import main

KEYS = ["attention", "attention_backward", "layernorm", "layernorm_backward", "gelu", "gelu_backward",
        "cross_entropy", "cross_entropy_backward"]


def run_json(capsys, *argv):
    assert main(["compile", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1                       # exactly one JSON object
    return json.loads(out)


def test_train_json_small(capsys):
    d = run_json(capsys, "--model", "L2H4C64", "--mode", "train", "-b", "2", "-t", "16")
    assert set(d["fused"]) == set(KEYS)
    assert d["fused"] == {"attention": 2, "attention_backward": 2, "layernorm": 5, "layernorm_backward": 5,
                          "gelu": 2, "gelu_backward": 2, "cross_entropy": 1, "cross_entropy_backward": 1}
    assert d["nodes_before"] > 0 and d["nodes_after"] > 0
    assert 0 < d["peak_bytes"] < d["naive_bytes"]
    assert d["passes"] and all({"name", "nodes_before", "nodes_after", "fused", "seconds"} <= set(p)
                               for p in d["passes"])
    assert any(p["name"] == "autodiff" for p in d["passes"])


def test_infer_json_d12(capsys):
    d = run_json(capsys, "--model", "d12", "--mode", "infer")
    assert d["B"] == 4 and d["T"] == 64
    assert d["fused"]["attention"] == 12 and d["fused"]["layernorm"] == 25 and d["fused"]["gelu"] == 12
    assert d["fused"]["cross_entropy"] == 0 and d["fused"]["attention_backward"] == 0
    assert d["peak_bytes"] < d["naive_bytes"]


def test_text_report_and_dump(capsys, tmp_path):
    assert main(["compile", "--model", "L1H2C32", "--mode", "train", "--dump", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "fuse_attention" in out and "attention x1" in out and "autodiff" in out
    assert "peak_bytes" in out and "naive_bytes" in out
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert "00_input.onnx" in files and any(f.endswith("_autodiff.txt") for f in files)


def test_bad_input(capsys):
    assert main(["compile", "--model", "nope", "--mode", "train"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["compile", "--model", "L1H2C32", "--mode", "infer", "-t", "5000"]) == 2
    capsys.readouterr()
    assert main(["compile", "--model", "d12", "--mode", "sideways"]) == 2  # one line, no usage block
    assert capsys.readouterr().err.startswith("error: graphc compile: --mode: invalid choice")


def test_decode_step_memory_plan(capsys):
    """The decode step (one token over a KV cache of capacity T) is planned too."""
    assert main(["compile", "--model", "d12", "--mode", "decode", "-b", "1", "-t", "1024", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fused"]["layernorm"] == 25 and report["fused"]["gelu"] == 12
    # one token's activations are tiny next to the cache; reuse brings the arena far below naive
    assert 0 < report["peak_bytes"] < report["naive_bytes"] / 4
