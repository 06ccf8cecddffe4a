"""``graphc export``: plain and decoder-with-past ONNX models run in onnxruntime and agree with
the independent PyTorch GPT-2; external data, opsets, HF weights, atomic writes, errors."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphc.cli.main import main
from graphc.errors import GraphcError
from graphc.models.config import GPT2Config, named_config
from graphc.models.export import bind, convert_opset, export_onnx, export_weights, kv_cache_model, plain_model
from graphc.models.init import random_init
from graphc.models.llmc import save_llmc
from graphc.models.load import load_model
from helpers import rel_err
from torch_gpt2 import TorchGPT2
from trt_ops import assert_trt_compatible

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=64)


@pytest.fixture(scope="module")
def params():
    p = random_init(SMALL, 0)
    rng = np.random.default_rng(1)
    for t in ["ln1w", "ln1b", "qkvb", "attprojb", "ln2w", "ln2b", "fcb", "fcprojb", "lnfw", "lnfb"]:
        p.tensor(t)[...] += rng.standard_normal(p.tensor(t).shape).astype(np.float32) * 0.1
    return p


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(2).integers(0, SMALL.vocab_size, (2, 12))


@pytest.fixture(scope="module")
def torch_logits(params, tokens):
    with torch.no_grad():
        return TorchGPT2(params)(torch.from_numpy(tokens))[0].numpy()


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, feeds):
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def io(sess):
    return ({i.name: (i.type, i.shape) for i in sess.get_inputs()},
            {o.name: (o.type, o.shape) for o in sess.get_outputs()})


def check_exported(path):
    onnx.checker.check_model(str(path), full_check=True)
    assert_trt_compatible(onnx.load(str(path), load_external_data=False), str(path))


# ----------------------------------------------------------------------------- plain
@pytest.fixture(scope="module")
def plain_path(params, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "gpt2.onnx"
    assert export_onnx(params, path) == [path]
    return path


def test_plain_export_io_and_logits_match_pytorch(plain_path, tokens, torch_logits):
    check_exported(plain_path)
    sess = session(plain_path)
    inputs, outputs = io(sess)
    assert inputs == {"input_ids": ("tensor(int64)", ["batch", "seq"])}
    assert outputs == {"logits": ("tensor(float)", ["batch", "seq", SMALL.vocab_size])}
    model = onnx.load(str(plain_path))
    assert {t.name for t in model.graph.initializer} >= {"wte", "wpe", "h1.attn.qkv.w", "lnf.b"}
    assert model.opset_import[0].version == 24
    logits = run(sess, {"input_ids": tokens})["logits"]
    assert rel_err(logits, torch_logits) <= 1e-5
    assert rel_err(run(sess, {"input_ids": tokens[:1, :1]})["logits"], torch_logits[:1, :1]) <= 1e-5


# ----------------------------------------------------------------------------- kv cache
@pytest.fixture(scope="module")
def kv_path(params, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "gpt2_kv.onnx"
    assert export_onnx(params, path, kv_cache=True) == [path]
    return path


def empty_past(B, cfg=SMALL):
    return {f"past_key_values.{l}.{k}": np.zeros((B, cfg.n_head, 0, cfg.head_dim), np.float32)
            for l in range(cfg.n_layer) for k in ("key", "value")}


def test_kv_export_io_names_and_shapes(kv_path):
    check_exported(kv_path)
    inputs, outputs = io(session(kv_path))
    H, D = SMALL.n_head, SMALL.head_dim
    expected_in = {"input_ids": ("tensor(int64)", ["batch", "seq"]),
                   "attention_mask": ("tensor(int64)", ["batch", "past_seq + seq"]),
                   "position_ids": ("tensor(int64)", ["batch", "seq"])}
    expected_out = {"logits": ("tensor(float)", ["batch", "seq", SMALL.vocab_size])}
    for l in range(SMALL.n_layer):
        for k in ("key", "value"):
            expected_in[f"past_key_values.{l}.{k}"] = ("tensor(float)", ["batch", H, "past_seq", D])
            expected_out[f"present.{l}.{k}"] = ("tensor(float)", ["batch", H, "past_seq + seq", D])
    assert inputs == expected_in and outputs == expected_out


def test_kv_export_decode_loop_matches_pytorch(kv_path, tokens, torch_logits):
    """Prefill with empty past tensors, then token by token, only through the exported model."""
    sess = session(kv_path)
    B, T = tokens.shape
    P = 5
    out = run(sess, {"input_ids": tokens[:, :P], "attention_mask": np.ones((B, P), np.int64),
                     "position_ids": np.tile(np.arange(P), (B, 1)), **empty_past(B)})
    assert rel_err(out["logits"], torch_logits[:, :P]) <= 1e-5
    for t in range(P, T):
        assert out["present.0.key"].shape == (B, SMALL.n_head, t, SMALL.head_dim)
        past = {f"past_key_values.{l}.{k}": out[f"present.{l}.{k}"] for l in range(SMALL.n_layer)
                for k in ("key", "value")}
        out = run(sess, {"input_ids": tokens[:, t:t + 1], "attention_mask": np.ones((B, t + 1), np.int64),
                         "position_ids": np.full((B, 1), t), **past})
        assert out["logits"].shape == (B, 1, SMALL.vocab_size)
        assert rel_err(out["logits"][:, 0], torch_logits[:, t]) <= 1e-5


def test_kv_export_left_padding_with_attention_mask(params, kv_path):
    """Prompts of different lengths, left-padded: attention_mask zeros hide the pads and
    position_ids are honoured, so each real position's logits equal the unpadded run."""
    sess = session(kv_path)
    prompts = [[464, 3290, 318, 257, 1310, 286], [40, 1101]]
    T = max(map(len, prompts))
    ids = np.full((2, T), 50256, np.int64)
    mask = np.zeros((2, T), np.int64)
    pos = np.zeros((2, T), np.int64)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
        mask[b, T - len(p):] = 1
        pos[b, T - len(p):] = np.arange(len(p))
    out = run(sess, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **empty_past(2)})
    assert np.all(np.isfinite(out["logits"]))                     # padded rows never produce NaN
    ref = TorchGPT2(params)
    refs = []
    for b, p in enumerate(prompts):
        with torch.no_grad():
            refs.append(ref(torch.tensor([p]))[0].numpy()[0])
        assert rel_err(out["logits"][b, T - len(p):], refs[b]) <= 1e-5
    # one decode step for both, continuing each sequence's own positions
    nxt = np.array([[11], [12]])
    past = {f"past_key_values.{l}.{k}": out[f"present.{l}.{k}"] for l in range(SMALL.n_layer) for k in ("key", "value")}
    step = run(sess, {"input_ids": nxt, "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
                      "position_ids": np.array([[len(p)] for p in prompts]), **past})
    for b, p in enumerate(prompts):
        with torch.no_grad():
            full = ref(torch.tensor([p + [int(nxt[b, 0])]]))[0].numpy()[0, -1]
        assert rel_err(step["logits"][b, 0], full) <= 1e-5


# ----------------------------------------------------------------------------- files and opsets
def test_external_data_when_over_threshold(params, tmp_path, tokens, torch_logits):
    path = tmp_path / "big.onnx"
    written = export_onnx(params, path, external_threshold=1024)   # pretend 1 KiB is "over 2 GB"
    assert written == [path, tmp_path / "big.onnx.data"]
    assert path.stat().st_size < 200_000 < (tmp_path / "big.onnx.data").stat().st_size
    check_exported(path)
    assert rel_err(run(session(path), {"input_ids": tokens})["logits"], torch_logits) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]   # no temp files left
    kv = tmp_path / "kv.onnx"
    assert export_onnx(params, kv, kv_cache=True, external_threshold=1024)[1] == tmp_path / "kv.onnx.data"
    check_exported(kv)


def test_export_replaces_an_existing_file_atomically(params, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    export_onnx(params, path)
    assert onnx.load(str(path)).graph.input[0].name == "input_ids"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("opset", [18, 21, 23])
def test_older_opsets_convert_and_still_match(params, tmp_path, tokens, torch_logits, opset):
    for kv in (False, True):
        path = tmp_path / f"m{opset}{kv}.onnx"
        export_onnx(params, path, kv_cache=kv, opset=opset)
        model = onnx.load(str(path))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
        check_exported(path)
        feeds = {"input_ids": tokens}
        if kv:
            feeds.update(attention_mask=np.ones(tokens.shape, np.int64),
                         position_ids=np.tile(np.arange(tokens.shape[1]), (2, 1)), **empty_past(2))
        assert rel_err(run(session(path), feeds)["logits"], torch_logits) <= 1e-5


@pytest.mark.parametrize("opset", [16, 17, 25])
def test_impossible_opsets_are_clear_errors(params, opset):
    with pytest.raises(GraphcError, match="--opset"):
        convert_opset(plain_model(params), opset)


def test_bind_moves_parameters_to_initializers(params):
    model = bind(kv_cache_model(params), params)
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert len(model.graph.initializer) > len(params.names())
    assert not set(params.names()) & {i.name for i in model.graph.input}


def test_weights_only_round_trip_and_transformers(params, tmp_path, tokens, torch_logits):
    folder = tmp_path / "hf"
    assert export_weights(params, folder) == [folder / "model.safetensors", folder / "config.json"]
    assert json.loads((folder / "config.json").read_text())["n_layer"] == SMALL.n_layer
    back = load_model(folder)
    assert back.cfg == params.cfg and np.array_equal(back.flat, params.flat)
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(tokens)).logits.numpy()
    assert rel_err(hf_logits, torch_logits) <= 1e-5


# ----------------------------------------------------------------------------- CLI
def test_cli_export(capsys, params, tmp_path, tokens, torch_logits):
    model_bin = tmp_path / "m.bin"
    save_llmc(params, model_bin)
    out = tmp_path / "cli.onnx"
    assert main(["export", "--model", str(model_bin), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert rel_err(run(session(out), {"input_ids": tokens})["logits"], torch_logits) <= 1e-5
    assert main(["export", "--model", str(model_bin), "--out", str(tmp_path / "kv.onnx"), "--kv-cache",
                 "--opset", "20"]) == 0
    check_exported(tmp_path / "kv.onnx")
    assert main(["export", "--model", str(model_bin), "--weights-only", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "model.safetensors").exists() and (tmp_path / "w" / "config.json").exists()
    capsys.readouterr()


@pytest.mark.parametrize("argv", [
    ["--model", "L1H2C32", "--out", "{tmp}/x.onnx", "--opset", "17"],
    ["--model", "L1H2C32", "--out", "{tmp}/x.onnx", "--opset", "30"],
    ["--model", "L1H2C32", "--weights-only", "{tmp}/w", "--kv-cache"],
    ["--model", "L1H2C32", "--out", "{tmp}"],
    ["--model", "{tmp}/missing.bin", "--out", "{tmp}/x.onnx"],
])
def test_cli_export_errors(capsys, tmp_path, argv):
    assert main(["export", *[a.format(tmp=tmp_path) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_d12_exports_match_pytorch(tmp_path):
    params = random_init(named_config("d12"), 0)
    tokens = np.random.default_rng(0).integers(0, 50257, (1, 16))
    with torch.no_grad():
        ref = TorchGPT2(params)(torch.from_numpy(tokens))[0].numpy()
    export_onnx(params, tmp_path / "d12.onnx")
    check_exported(tmp_path / "d12.onnx")
    assert rel_err(run(session(tmp_path / "d12.onnx"), {"input_ids": tokens})["logits"], ref) <= 1e-5
    export_onnx(params, tmp_path / "d12kv.onnx", kv_cache=True)
    check_exported(tmp_path / "d12kv.onnx")
    sess = session(tmp_path / "d12kv.onnx")
    assert io(sess)[0]["past_key_values.0.key"][1] == ["batch", 12, "past_seq", 64]
    out = run(sess, {"input_ids": tokens[:, :8], "attention_mask": np.ones((1, 8), np.int64),
                     "position_ids": np.arange(8)[None], **empty_past(1, params.cfg)})
    for t in range(8, 16):
        past = {f"past_key_values.{l}.{k}": out[f"present.{l}.{k}"] for l in range(12) for k in ("key", "value")}
        out = run(sess, {"input_ids": tokens[:, t:t + 1], "attention_mask": np.ones((1, t + 1), np.int64),
                         "position_ids": np.array([[t]]), **past})
        assert rel_err(out["logits"][:, 0], ref[:, t]) <= 1e-5
