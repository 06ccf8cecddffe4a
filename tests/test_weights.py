"""Weights: llm.c .bin v3/v5 round trips, Hugging Face safetensors, random init, bad files."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch

from graphc.backends.onnxruntime import OnnxRuntimeBackend
from graphc.errors import GraphcError
from graphc.models.config import GPT2Config, named_config
from graphc.models.gpt2 import build_forward
from graphc.models.hf import hf_tensors, load_hf, save_hf
from graphc.models.init import random_init
from graphc.models.llmc import load_llmc, save_llmc
from graphc.models.load import load_model
from graphc.models.params import num_parameters
from graphc.models.safetensors_io import write_safetensors
from helpers import random_batch

CFG = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def test_named_sizes():
    assert num_parameters(named_config("d12")) == 124_475_904  # llm.c prints this for gpt2_124M
    for name, (L, H, C) in {"d24": (24, 16, 1024), "d36": (36, 20, 1280), "d48": (48, 25, 1600),
                            "L3H2C32": (3, 2, 32)}.items():
        cfg = named_config(name)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (L, H, C)
        assert cfg.padded_vocab_size == 50304 and cfg.max_seq_len == 1024
    for name in ("d13", "gpt2", "gpt2-medium"):  # gpt2..gpt2-xl mean the pretrained weights (test_hub.py)
        with pytest.raises(GraphcError, match="unknown model size"):
            named_config(name)


def test_random_init_scheme():
    cfg = GPT2Config(n_layer=4, n_head=4, n_embd=128)
    p = random_init(cfg, seed=1)
    assert np.array_equal(p.flat, random_init(cfg, seed=1).flat)
    assert not np.array_equal(p.flat, random_init(cfg, seed=2).flat)
    assert abs(p.tensor("qkvw").std() - 0.02) < 1e-3
    assert abs(p.tensor("attprojw").std() - 0.02 / np.sqrt(8)) < 1e-3
    assert np.all(p.tensor("ln1w") == 1) and np.all(p.tensor("qkvb") == 0)
    assert np.all(p.tensor("wte")[cfg.vocab_size:] == 0)


def test_llmc_v3_round_trip(tmp_path):
    p = random_init(CFG, seed=0)
    save_llmc(p, tmp_path / "m.bin", version=3)
    header = np.fromfile(tmp_path / "m.bin", dtype=np.int32, count=8)
    assert list(header) == [20240326, 3, 128, 50257, 2, 4, 64, 50304]
    q = load_llmc(tmp_path / "m.bin")
    assert q.cfg == p.cfg and np.array_equal(q.flat, p.flat)
    assert (tmp_path / "m.bin").stat().st_size == 1024 + 4 * num_parameters(CFG)


def test_llmc_v5_round_trip(tmp_path):
    p = random_init(CFG, seed=0)
    save_llmc(p, tmp_path / "m.bin", version=5)
    assert (tmp_path / "m.bin").stat().st_size == 1024 + 2 * num_parameters(CFG)
    q = load_llmc(tmp_path / "m.bin")
    assert np.array_equal(q.flat, p.flat.astype(ml_dtypes.bfloat16).astype(np.float32))
    # a bf16-exact model survives v5 unchanged
    save_llmc(q, tmp_path / "m2.bin", version=5)
    assert (tmp_path / "m2.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b"\x01\x02\x03\x04" + b[4:], "magic"),
    (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "version"),
    (lambda b: b[:1000], "truncated"),
    (lambda b: b[:-4], "truncated"),
    (lambda b: b + b"\0" * 8, "past the"),
    (lambda b: b[:16] + (0).to_bytes(4, "little") + b[20:], "num_layers"),
])
def test_llmc_bad_files(tmp_path, mutate, match):
    good = tmp_path / "good.bin"
    save_llmc(random_init(CFG), good)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(mutate(good.read_bytes()))
    with pytest.raises(GraphcError, match=match) as e:
        load_llmc(bad)
    assert "bad.bin" in str(e.value)


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.bin"
    save_llmc(random_init(CFG, seed=0), path)
    before = path.read_bytes()

    class Boom(Exception):
        pass

    def explode(*a, **k):
        raise Boom

    monkeypatch.setattr("graphc.fileio.os.fsync", explode)  # fail mid-write
    with pytest.raises(Boom):
        save_llmc(random_init(CFG, seed=1), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.bin"]


def logits_of(params, tokens):
    prepared = OnnxRuntimeBackend().prepare(build_forward(params.cfg, loss=False))
    prepared.bind(params.feeds())
    return prepared.run({"tokens": tokens})["logits"]


def test_hf_safetensors_gives_same_logits_as_llmc(tmp_path):
    p = random_init(CFG, seed=4)
    save_llmc(p, tmp_path / "m.bin")
    folder = save_hf(p, tmp_path / "hf")
    tokens, _ = random_batch(CFG, 2, 9)
    a = logits_of(load_model(tmp_path / "m.bin"), tokens)
    b = logits_of(load_model(folder), tokens)
    c = logits_of(load_hf(folder / "model.safetensors"), tokens)
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_hf_layout_against_transformers(tmp_path):
    """A file written by transformers itself (GPT2LMHeadModel naming, Conv1D layout)."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    params = load_model(tmp_path / "hf")
    tokens, _ = random_batch(CFG, 2, 11)
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    from helpers import rel_err

    assert rel_err(logits_of(params, tokens), expected) <= 1e-5


def test_hf_prefix_bf16_and_no_config(tmp_path):
    p = random_init(CFG, seed=5)
    tensors = {f"transformer.{k}": v.astype(ml_dtypes.bfloat16) for k, v in hf_tensors(p).items()}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    q = load_model(tmp_path / "x.safetensors")  # sizes inferred: heads = C / 64 = 1
    assert (q.cfg.n_layer, q.cfg.n_embd, q.cfg.max_seq_len, q.cfg.n_head) == (2, 64, 128, 1)
    assert np.array_equal(q.tensor("qkvw"), p.tensor("qkvw").astype(ml_dtypes.bfloat16).astype(np.float32))


def test_hf_bad_files(tmp_path):
    p = random_init(CFG)
    folder = save_hf(p, tmp_path / "hf")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(GraphcError, match="truncated"):
        load_model(folder)
    tensors = hf_tensors(p)
    del tensors["h.1.mlp.c_fc.bias"]
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(GraphcError, match="h.1.mlp.c_fc.bias"):
        load_model(folder)
    tensors = hf_tensors(p)
    tensors["h.0.attn.c_attn.weight"] = tensors["h.0.attn.c_attn.weight"].T.copy()
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(GraphcError, match="c_attn.weight.*shape"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({"n_embd": 65}))
    with pytest.raises(GraphcError, match="n_embd"):
        load_model(folder)


def test_model_spec_errors(tmp_path):
    with pytest.raises(GraphcError, match="no such file"):
        load_model(tmp_path / "missing.bin")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(GraphcError, match="not an llm.c"):
        load_model(tmp_path / "notes.txt")
