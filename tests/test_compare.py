"""``graphc compare`` and the comparator (graphc/compare.py): PASS when backends agree, FAIL
(exit 1) naming the output when one is wrong, one-line errors (exit 2) for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from graphc.backends import reference_ops
from graphc.cli.main import main
from graphc.compare import TOLERANCES, Run, compare, diff, tolerance
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward

MODEL = "L2H4C64"


def cli(capsys, *args):
    code = main(["compare", "--model", MODEL, *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("mode", ["infer", "train", "decode"])
def test_onnxruntime_and_reference_pass(capsys, mode):
    code, out, err = cli(capsys, "--mode", mode, "--backends", "onnxruntime,reference", "-t", "16")
    lines = out.splitlines()
    assert code == 0 and lines[-1] == "PASS", out + err
    compared = [line for line in lines if line.startswith("reference: ")]
    names = [line.split(": ")[1] for line in compared]
    expected = {"infer": ["logits", "loss"],
                "train": ["loss"] + [n for n in names if n.startswith("grad.")],
                "decode": ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]}[mode]
    assert names == expected
    if mode == "train":
        assert len(names) == 1 + 2 + 2 + 2 * 12   # loss, wte/wpe, lnf w/b, 12 per layer
    assert all(" max abs " in line and " rel " in line and line.endswith(" ok") for line in compared)


def test_a_wrong_backend_fails(capsys, monkeypatch):
    # a reference GELU off by 1% must be caught in the logits and the loss
    good = reference_ops.OPS[("", "Gelu")]
    monkeypatch.setitem(reference_ops.OPS, ("", "Gelu"), lambda attrs, x: good(attrs, x) * 1.01)
    code, out, _ = cli(capsys, "--mode", "infer", "--backends", "onnxruntime,reference", "-t", "8")
    last = out.splitlines()[-1]
    assert code == 1 and last.startswith("FAIL: ") and "reference: logits" in last
    assert "outside tolerance against onnxruntime" in last


@pytest.mark.parametrize("args, message", [
    (["--mode", "infer", "--backends", "onnxruntime"], "at least two backends"),
    (["--mode", "infer", "--backends", "onnxruntime,nope"], "unknown backend"),
    (["--mode", "infer", "--backends", "reference,reference"], "named twice"),
    (["--mode", "infer", "--backends", "onnxruntime,reference", "-t", "5000"], "exceeds the model's maximum"),
])
def test_bad_input_is_a_one_line_error(capsys, args, message):
    code, out, err = cli(capsys, *args)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert "PASS" not in out


def test_unknown_precision_is_refused(capsys):
    code, out, err = cli(capsys, "--mode", "infer", "--backends", "onnxruntime,reference", "--precision", "fp8")
    assert code == 2 and "--precision" in err and "fp8" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("mode", ["infer", "train", "decode"])
def test_bf16_emulation_against_float64_passes_with_the_bf16_tolerance(capsys, mode):
    """onnxruntime runs the float32 emulation of the BF16 graph; the reference runs the
    BF16 graph's exact math in float64: within the bf16 tolerance, beyond the fp32 one."""
    code, out, err = cli(capsys, "--mode", mode, "--backends", "onnxruntime,reference", "--precision", "bf16",
                         "-t", "16")
    assert code == 0 and out.splitlines()[-1] == "PASS", out + err
    rels = [float(line.split(" rel ")[1].split()[0]) for line in out.splitlines() if line.startswith("reference: ")]
    assert max(rels) > TOLERANCES["float32"].rtol       # the bf16 rounding is really there


def test_tolerance_table_and_diff():
    assert tolerance("float32") is TOLERANCES["float32"]
    assert TOLERANCES["float64"].rtol < TOLERANCES["float32"].rtol < TOLERANCES["bfloat16"].rtol
    with pytest.raises(KeyError):
        tolerance("int8")
    tol = TOLERANCES["float32"]
    ref = np.array([10.0, -2.0, 0.5])
    assert diff("y", "b", ref * (1 + 5e-5), ref, tol).ok
    d = diff("y", "b", ref + np.array([0, 0, 2e-3]), ref, tol)
    assert not d.ok and d.max_abs == pytest.approx(2e-3) and d.max_rel == pytest.approx(2e-4)
    assert not diff("y", "b", ref * np.nan, ref, tol).ok
    assert not diff("y", "b", ref[:2], ref, tol).ok


def test_graph_variants_compare_too():
    """Runs may differ in the graph, not only the backend: the optimised forward vs the plain one."""
    from graphc.compare import random_feeds
    from graphc.runtime.programs import optimize

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, max_seq_len=16)
    plain = build_forward(cfg)
    feeds = random_feeds(plain, {"B": 2, "T": 8}, int_high=cfg.vocab_size)
    result = compare([Run("plain", "onnxruntime", plain), Run("fused", "onnxruntime", optimize(plain, "infer")),
                      Run("fused float64", "reference", optimize(plain, "infer"))], feeds)
    assert result.ok and {d.run for d in result.diffs} == {"fused", "fused float64"}
