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


# ----------------------------------------------------------------------------- Polygraphy's files
def test_polygraphy_runs_the_saved_graph_and_its_results_come_back(capsys, tmp_path):
    """graphc writes the graph, inputs and outputs; Polygraphy's own onnxruntime runner (an
    independent executor harness, its CLI) runs them; its results join the comparison."""
    import subprocess
    import sys

    files = {k: str(tmp_path / f"{k}.{ext}") for k, ext in (("model", "onnx"), ("inputs", "json"),
                                                             ("outputs", "json"), ("pg", "json"))}
    code, out, err = cli(capsys, "--mode", "infer", "--backends", "onnxruntime,reference", "-t", "8",
                         "--save-model", files["model"], "--save-inputs", files["inputs"],
                         "--save-outputs", files["outputs"])
    assert code == 0 and out.splitlines()[-1] == "PASS", out + err
    assert f"wrote {files['model']}: the infer graph built for onnxruntime" in out
    polygraphy = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())"]
    done = subprocess.run([*polygraphy, "run", files["model"], "--onnxrt",
                           "--load-inputs", files["inputs"], "--save-outputs", files["pg"]],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    code, out, err = cli(capsys, "--mode", "infer", "--backends", "onnxruntime,reference", "-t", "8",
                         "--load-outputs", files["pg"], "--load-outputs", files["outputs"])
    lines = out.splitlines()
    assert code == 0 and lines[-1] == "PASS", out + err
    runners = {line.split(": ")[0] for line in lines if ": logits: " in line}
    assert any(r.startswith("onnxrt-runner") for r in runners), runners
    # the saved outputs of both backends come back under the file's name, and the same values
    assert {f"{files['outputs']}:onnxruntime", f"{files['outputs']}:reference"} <= runners
    exact = [line for line in lines if line.startswith(f"{files['outputs']}:onnxruntime: ")]
    assert len(exact) == 2 and all("max abs 0.000e+00" in line for line in exact), exact


def test_a_wrong_polygraphy_result_fails(capsys, tmp_path):
    from polygraphy.comparator import RunResults

    path = tmp_path / "out.json"
    code, out, _ = cli(capsys, "--mode", "infer", "--backends", "onnxruntime,reference", "-t", "8",
                       "--save-outputs", str(path))
    assert code == 0
    results = RunResults.load(str(path))
    bad = RunResults()
    logits = results["onnxruntime"][0]["logits"]
    bad.add([{"logits": logits * np.float32(1.01), "loss": results["onnxruntime"][0]["loss"]}], runner_name="trt")
    bad.save(str(tmp_path / "bad.json"))
    capsys.readouterr()
    code, out, _ = cli(capsys, "--mode", "infer", "--backends", "onnxruntime,reference", "-t", "8",
                       "--load-outputs", str(tmp_path / "bad.json"))
    last = out.splitlines()[-1]
    assert code == 1 and last == "FAIL: trt: logits outside tolerance against onnxruntime", out


def test_bf16_arrays_keep_their_bits_through_polygraphy_files(tmp_path):
    """NumPy has no bfloat16: BF16 inputs go to Polygraphy as torch.bfloat16 tensors (what its
    TensorRT runner feeds), and come back as ml_dtypes.bfloat16 with the same bits."""
    import ml_dtypes
    import torch
    from polygraphy.json import load_json

    from graphc.polygraphy_io import load_results, save_inputs, save_results

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    ids = rng.integers(0, 50257, (2, 4))
    save_inputs(tmp_path / "in.json", {"past": x, "tokens": ids})
    (feed,) = load_json(str(tmp_path / "in.json"))
    assert feed["past"].dtype == torch.bfloat16 and np.array_equal(feed["tokens"], ids)
    assert np.array_equal(feed["past"].view(torch.int16).numpy(), x.view(np.int16))
    save_results(tmp_path / "out.json", {"cuda": {"present": x, "loss": np.float32(2.5)}})
    back = load_results(tmp_path / "out.json")["cuda"]
    assert back["present"].dtype == ml_dtypes.bfloat16 and np.array_equal(back["present"].view(np.int16),
                                                                           x.view(np.int16))
    assert back["loss"].shape == () and back["loss"] == np.float32(2.5)


def test_the_graph_saved_for_tensorrt_is_the_one_its_backend_builds(capsys, tmp_path):
    """--save-for names any backend, one that cannot run here too: the file is the graph that
    backend is given (BF16 inputs for a BF16 TensorRT decode graph)."""
    import onnx

    from graphc.compare import gpt2_case
    from graphc.models.load import load_model

    path = tmp_path / "trt.onnx"
    code, out, err = cli(capsys, "--mode", "decode", "--precision", "bf16", "--backends", "onnxruntime,reference",
                         "-t", "8", "--save-for", "tensorrt", "--save-model", str(path))
    assert code == 0 and f"wrote {path}: the decode graph built for tensorrt" in out, out + err
    expected = gpt2_case(load_model(MODEL, 0), "decode", 2, 8).graph(backend="tensorrt", precision="bf16", opt=True)
    saved = onnx.load(str(path))
    assert saved.graph == expected.graph
    assert onnx.TensorProto.BFLOAT16 in {v.type.tensor_type.elem_type for v in saved.graph.input}


def test_loaded_runs_from_other_inputs_fail_with_a_note_and_one_backend_suffices(capsys, tmp_path):
    path = tmp_path / "out.json"
    code, _, _ = cli(capsys, "--mode", "infer", "--backends", "onnxruntime,reference", "-t", "8",
                     "--save-outputs", str(path))
    assert code == 0
    code, out, err = cli(capsys, "--mode", "infer", "--backends", "onnxruntime", "-t", "8",
                         "--load-outputs", str(path), str(path))       # one flag, several files
    lines = out.splitlines()
    assert code == 0 and lines[-1] == "PASS", out + err
    runs = [line.split(": ")[0] for line in lines if ": loss: " in line]
    assert runs == [f"{path}:onnxruntime", "reference", f"{path}:onnxruntime #2", f"{path}:reference"]
    code, out, err = cli(capsys, "--mode", "infer", "--backends", "onnxruntime", "-t", "8", "--seed", "3",
                         "--load-outputs", str(path))
    lines = out.splitlines()
    assert code == 1 and lines[-1].startswith("FAIL: ") and lines[-2].startswith("note: runs from --load-outputs "
                                                                              "compare only when they ran on the "
                                                                              "same inputs"), out


def test_save_for_a_backend_without_that_graph_is_one_line(capsys, tmp_path):
    code, out, err = cli(capsys, "--mode", "decode", "--backends", "onnxruntime,reference", "-t", "8",
                         "--save-for", "cuda", "--save-model", str(tmp_path / "c.onnx"))
    assert code == 2 and out == "" and err.startswith("error: cuda: --save-for: has no decode graph to save ("), err
    assert not (tmp_path / "c.onnx").exists()
