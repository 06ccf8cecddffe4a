"""``graphc validate``: llm.c's debug-state check against a state written from the independent
PyTorch GPT-2 (forward + backward); corrupted and mismatched states."""

import numpy as np
import pytest
import torch

from graphc.cli.main import main
from graphc.errors import GraphcError
from graphc.models.config import GPT2Config, named_config
from graphc.models.debug_state import HEADER_INTS, MAGIC, read_debug_state, write_debug_state
from graphc.models.init import random_init
from graphc.models.llmc import save_llmc
from graphc.models.params import LLMC_ORDER, Params
from graphc.runtime.validate import TOLERANCES
from torch_gpt2 import TorchGPT2

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=32)
B, T = 2, 16


def reference_state(params, path, B=B, T=T, seed=0):
    """Write a debug state from PyTorch as llm.c's train_gpt2.py write_state does."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, params.cfg.vocab_size, (B, T))
    y = rng.integers(0, params.cfg.vocab_size, (B, T))
    model = TorchGPT2(params)
    logits, loss = model(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    grads = model.grads()
    assert grads["wte"].shape[0] == params.cfg.padded_vocab_size      # padded, as llm.c writes it
    write_debug_state(path, x, y, logits.detach().numpy(), float(loss.detach()), grads)
    return x, y, logits.detach().numpy(), float(loss.detach()), grads


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("validate")
    params = random_init(SMALL, 0)
    rng = np.random.default_rng(3)
    for t in ["ln1b", "qkvb", "attprojb", "ln2w", "fcb", "fcprojb", "lnfb"]:
        params.tensor(t)[...] += rng.standard_normal(params.tensor(t).shape).astype(np.float32) * 0.1
    save_llmc(params, d / "model.bin")
    ref = reference_state(params, d / "state.bin")
    return d, params, ref


def cli(capsys, model, state):
    code = main(["validate", "--model", str(model), "--state", str(state)])
    out, err = capsys.readouterr()
    return code, out, err


def test_round_trip(files):
    d, params, (x, y, logits, loss, grads) = files
    state = read_debug_state(d / "state.bin", params.cfg)
    assert (state.B, state.T) == (B, T)
    assert np.array_equal(state.inputs, x) and np.array_equal(state.targets, y)
    assert np.array_equal(state.logits, logits) and state.loss == np.float32(loss)
    for name in LLMC_ORDER:
        assert np.array_equal(state.grads.tensor(name), grads[name])


def test_pytorch_state_validates_ok(capsys, files):
    d, _, _ = files
    code, out, err = cli(capsys, d / "model.bin", d / "state.bin")
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[-1] == "OK"
    assert any(line.startswith("logits max abs diff ") for line in lines)
    assert any(line.startswith("loss max abs diff ") for line in lines)
    grad_lines = [line for line in lines if line.startswith("grad ")]
    assert len(grad_lines) == len(LLMC_ORDER)


def corrupt(src, dst, cfg, what):
    data = bytearray(src.read_bytes())
    floats = np.frombuffer(data, dtype=np.float32).copy()
    logits_at = HEADER_INTS + 2 * B * T
    loss_at = logits_at + B * T * cfg.vocab_size
    index = {"logits": logits_at + 12345, "loss": loss_at, "grad": loss_at + 1 + 777}[what]
    floats[index] += 0.5
    dst.write_bytes(floats.tobytes())


@pytest.mark.parametrize("what", ["logits", "loss", "grad"])
def test_corrupted_state_fails(capsys, files, tmp_path, what):
    d, params, _ = files
    corrupt(d / "state.bin", tmp_path / "bad.bin", params.cfg, what)
    code, out, _ = cli(capsys, d / "model.bin", tmp_path / "bad.bin")
    assert code == 1
    last = out.splitlines()[-1]
    assert last.startswith("FAIL") and what in last
    assert "OK" not in out.splitlines()


def test_nan_fails(capsys, files, tmp_path):
    d, params, _ = files
    floats = np.frombuffer((d / "state.bin").read_bytes(), dtype=np.float32).copy()
    floats[HEADER_INTS + 2 * B * T + 5] = np.nan
    (tmp_path / "nan.bin").write_bytes(floats.tobytes())
    code, out, _ = cli(capsys, d / "model.bin", tmp_path / "nan.bin")
    assert code == 1 and out.splitlines()[-1].startswith("FAIL")


def rewrite_header(src, dst, **fields):
    data = bytearray(src.read_bytes())
    header = np.frombuffer(data[:HEADER_INTS * 4], dtype=np.int32).copy()
    for i, key in enumerate(["magic", "version", "B", "T"]):
        if key in fields:
            header[i] = fields[key]
    dst.write_bytes(header.tobytes() + bytes(data[HEADER_INTS * 4:]))


@pytest.mark.parametrize("fields, message", [
    (dict(magic=20240326), "bad magic"),
    (dict(version=1), "version"),
    (dict(B=3), "bytes"),                    # B/T that do not match the file's contents
    (dict(T=8), "bytes"),
    (dict(T=64), "exceeds the model's maximum"),
    (dict(B=0), "positive"),
])
def test_bad_header_is_a_one_line_error(capsys, files, tmp_path, fields, message):
    d, _, _ = files
    rewrite_header(d / "state.bin", tmp_path / "bad.bin", **fields)
    code, out, err = cli(capsys, d / "model.bin", tmp_path / "bad.bin")
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_truncated_state_is_a_one_line_error(capsys, files, tmp_path):
    d, _, _ = files
    data = (d / "state.bin").read_bytes()
    for n in (100, HEADER_INTS * 4 + 10, len(data) - 4):
        (tmp_path / "cut.bin").write_bytes(data[:n])
        code, _, err = cli(capsys, d / "model.bin", tmp_path / "cut.bin")
        assert code == 2 and err.startswith("error: ") and "truncated" in err


def test_model_shape_mismatch_is_a_one_line_error(capsys, files, tmp_path):
    d, _, _ = files
    other = random_init(GPT2Config(n_layer=1, n_head=4, n_embd=64, max_seq_len=32), 0)
    save_llmc(other, tmp_path / "other.bin")
    code, _, err = cli(capsys, tmp_path / "other.bin", d / "state.bin")
    assert code == 2 and "different model" in err and len(err.strip().splitlines()) == 1


def test_out_of_vocab_tokens_are_an_error(files, tmp_path):
    d, params, (x, y, logits, loss, grads) = files
    bad = x.copy()
    bad[0, 0] = params.cfg.vocab_size
    write_debug_state(tmp_path / "s.bin", bad, y, logits, loss, grads)
    with pytest.raises(GraphcError, match="outside the model's vocabulary"):
        read_debug_state(tmp_path / "s.bin", params.cfg)


def test_write_accepts_params_flat_and_unpadded_wte(files, tmp_path):
    d, params, (x, y, logits, loss, grads) = files
    flat = read_debug_state(d / "state.bin", params.cfg).grads.flat
    unpadded = dict(grads, wte=grads["wte"][:params.cfg.vocab_size])
    for i, g in enumerate([Params(params.cfg, flat.copy()), flat, unpadded]):
        write_debug_state(tmp_path / f"{i}.bin", x, y, logits, loss, g)
        assert (tmp_path / f"{i}.bin").read_bytes() == (d / "state.bin").read_bytes()


def test_tolerances_are_llmc_s():
    assert TOLERANCES == {"logits": 1e-2, "loss": 1e-2, "grads": 2e-2}
    assert MAGIC == 20240327


def test_d12_state_validates(capsys, tmp_path):
    params = random_init(named_config("d12"), 0)
    save_llmc(params, tmp_path / "d12.bin")
    reference_state(params, tmp_path / "d12_state.bin", B=2, T=32)
    code, out, _ = cli(capsys, tmp_path / "d12.bin", tmp_path / "d12_state.bin")
    assert code == 0, out
    assert out.splitlines()[-1] == "OK"


def test_unpadded_wte_gradient_is_named(capsys, files, tmp_path):
    """An older llm.c state (wte gradient over the real 50257 rows) gets a precise error."""
    d, params, (x, y, logits, loss, grads) = files
    cfg = params.cfg
    data = (d / "state.bin").read_bytes()
    wte_start = HEADER_INTS * 4 + 4 * (2 * x.size + logits.size + 1)
    pad = 4 * (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
    wte_end = wte_start + 4 * cfg.padded_vocab_size * cfg.n_embd
    (tmp_path / "old.bin").write_bytes(data[:wte_end - pad] + data[wte_end:])
    code, _, err = cli(capsys, d / "model.bin", tmp_path / "old.bin")
    assert code == 2 and "grads.wte" in err and "padded" in err and len(err.strip().splitlines()) == 1


def test_validate_checks_the_optimised_training_graph(files, monkeypatch):
    """By default the gradients come from the fused training graph ``graphc train`` runs."""
    import graphc.runtime.validate as validate_mod
    from graphc.ops import count_fused

    d, params, _ = files
    state = read_debug_state(d / "state.bin", params.cfg)
    prepared = []
    real_prepare = validate_mod.prepare
    monkeypatch.setattr(validate_mod, "prepare", lambda model, *a, **k: prepared.append(model) or
                        real_prepare(model, *a, **k))
    for opt in (True, False):
        prepared.clear()
        report = validate_mod.validate(params, state, opt=opt)
        assert report.ok, report.failed
        train = next(m for m in prepared if any(o.name.startswith("grad.") for o in m.graph.output))
        fused = count_fused(train)
        L = params.cfg.n_layer
        expected = {"attention_backward": L, "layernorm_backward": 2 * L + 1, "gelu_backward": L,
                    "cross_entropy_backward": 1}
        assert all(fused[k] == (n if opt else 0) for k, n in expected.items()), fused


def test_no_opt_validates_ok(capsys, files):
    d, _, _ = files
    code = main(["validate", "--model", str(d / "model.bin"), "--state", str(d / "state.bin"), "--no-opt"])
    out, _ = capsys.readouterr()
    assert code == 0 and out.splitlines()[-1] == "OK", out
