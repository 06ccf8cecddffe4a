"""Pretrained GPT-2 by name: the Hugging Face cache, downloads through huggingface_hub, and their failures.

No internet here: a Hub-shaped server on 127.0.0.1 (tests/hub_server.py) serves a small GPT-2
written by graphc's HF export, and ``HF_ENDPOINT`` points huggingface_hub at it. The
environment variables are the interface, so each test sets them and re-reads
huggingface_hub's constants (which it reads once, at import).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphc.cli.main import main
from graphc.errors import GraphcError
from graphc.models.config import GPT2Config
from graphc.models.hub import UNREACHABLE, HubRef, parse_hub_spec
from graphc.models.init import random_init
from graphc.models.load import load_model
from helpers import random_batch, rel_err
from hub_server import git_blob_sha1, serve_hub

CFG = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=512, padded_vocab_size=512, max_seq_len=64)
REPO = "graphc-test/tiny-gpt2"
OFFLINE_LINE = f"error: gpt2: --model: {UNREACHABLE}\n"


def repo_files(tmp_path: Path, seed: int = 3) -> tuple[dict[str, bytes], object]:
    """config.json + model.safetensors of a small random GPT-2, as ``graphc export --weights-only`` writes them."""
    from graphc.models.hf import save_hf

    params = random_init(CFG, seed)
    folder = save_hf(params, tmp_path / f"export{seed}")
    return {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}, params


def set_hub_env(monkeypatch, **env):
    """Set HF_* variables and make huggingface_hub read them again."""
    from huggingface_hub import constants

    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(value))
    importlib.reload(constants)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake Hub, HF_HOME in tmp_path, HF_ENDPOINT at the fake; restored afterwards."""
    with serve_hub() as server:
        set_hub_env(monkeypatch, HF_HOME=tmp_path / "hf_home", HF_ENDPOINT=server.url, HF_HUB_OFFLINE=None,
                    HF_HUB_CACHE=None, HF_TOKEN=None, HF_HUB_DISABLE_PROGRESS_BARS=1)
        yield server
    monkeypatch.undo()
    from huggingface_hub import constants

    importlib.reload(constants)


def cache_dir(tmp_path) -> Path:
    return tmp_path / "hf_home" / "hub" / ("models--" + REPO.replace("/", "--"))


def test_parse_hub_spec():
    assert parse_hub_spec("gpt2") == HubRef("gpt2", "openai-community/gpt2")
    assert parse_hub_spec("GPT2-XL").repo_id == "openai-community/gpt2-xl"
    assert parse_hub_spec("openai-community/gpt2-medium") == HubRef("openai-community/gpt2-medium",
                                                                     "openai-community/gpt2-medium")
    assert parse_hub_spec("hf:org/name@v1.0") == HubRef("hf:org/name@v1.0", "org/name", "v1.0")
    assert parse_hub_spec("hf:gpt2").repo_id == "openai-community/gpt2"
    for not_hub in ("d12", "L4H4C256", "runs/model.bin", "out/x/model.safetensors", "model.bin", "gpt3"):
        assert parse_hub_spec(not_hub) is None, not_hub
    for bad in ("hf:", "hf:a/b/c", "hf:org/name@", "hf:/x"):
        with pytest.raises(GraphcError, match="expected hf:ORG/NAME"):
            parse_hub_spec(bad)


def test_download_then_cache_hit_without_requests(hub, tmp_path):
    files, params = repo_files(tmp_path)
    commit = hub.add_repo(REPO, files)
    loaded = load_model(f"hf:{REPO}")
    assert loaded.cfg == params.cfg and np.array_equal(loaded.flat, params.flat)
    files_asked = hub.file_requests()
    assert [(r.server, r.method) for r in files_asked] == [
        ("hub", "HEAD"), ("hub", "GET"), ("hub", "HEAD"), ("cdn", "GET")]
    assert f"/resolve/{commit}/model.safetensors" in files_asked[2].path  # pinned to config.json's commit
    root = cache_dir(tmp_path)
    assert (root / "refs" / "main").read_text() == commit
    for name, data in files.items():
        link = root / "snapshots" / commit / name
        assert link.is_symlink() and link.read_bytes() == data
    assert not list(root.rglob("*.incomplete"))

    n = len(hub.requests)
    again = load_model(f"hf:{REPO}")
    assert len(hub.requests) == n, "a cache hit makes no request"
    assert np.array_equal(again.flat, params.flat)
    assert np.array_equal(load_model(f"hf:{REPO}@{commit}").flat, params.flat) and len(hub.requests) == n


@pytest.mark.parametrize("repo_id", ["openai-community/gpt2", "gpt2"])
def test_cache_written_by_huggingface_hub_is_read(hub, tmp_path, repo_id):
    """Files that hf_hub_download (transformers, `hf download`) cached are used as they are, with no
    request; transformers' from_pretrained("gpt2") caches them under the legacy id ``gpt2``."""
    from huggingface_hub import hf_hub_download

    files, params = repo_files(tmp_path)
    hub.add_repo(repo_id, files)
    for name in files:
        hf_hub_download(repo_id, name)
    hub.requests.clear()
    assert np.array_equal(load_model("gpt2").flat, params.flat)
    assert hub.requests == []


def test_dropped_connection_is_retried(hub, tmp_path):
    """huggingface_hub retries a connection that drops mid-body (from its last whole 10 MB chunk)."""
    files, params = repo_files(tmp_path)
    hub.add_repo(REPO, files)
    hub.faults["model.safetensors"] = "drop"
    assert np.array_equal(load_model(f"hf:{REPO}").flat, params.flat)
    assert len([r for r in hub.file_requests() if r.server == "cdn"]) == 2


def test_truncated_download_is_refused_then_resumed_by_the_next_run(hub, tmp_path):
    files, params = repo_files(tmp_path)
    hub.add_repo(REPO, files)
    size = len(files["model.safetensors"])
    hub.faults["model.safetensors"] = "truncate"
    with pytest.raises(GraphcError, match=rf"model.safetensors stopped at {size // 2} of {size} bytes.*run again"):
        load_model(f"hf:{REPO}")
    root = cache_dir(tmp_path)
    assert not (root / "snapshots").exists() and not (root / "refs").exists()
    assert sorted(p.name.endswith(".incomplete") for p in (root / "blobs").iterdir()) == [True, True]

    del hub.faults["model.safetensors"]
    hub.requests.clear()
    assert np.array_equal(load_model(f"hf:{REPO}").flat, params.flat)
    cdn = [r for r in hub.requests if r.server == "cdn"]
    assert [r.headers.get("range") for r in cdn] == [f"bytes={size // 2}-"]
    assert not list(root.rglob("*.incomplete"))


def test_corrupted_download_is_refused_and_not_cached(hub, tmp_path):
    files, _ = repo_files(tmp_path)
    hub.add_repo(REPO, files)
    hub.faults["model.safetensors"] = "corrupt"
    with pytest.raises(GraphcError, match=r"downloaded model.safetensors is corrupt \(hash [0-9a-f]{64}, the Hub"):
        load_model(f"hf:{REPO}")
    root = cache_dir(tmp_path)
    assert not (root / "snapshots").exists() and not (root / "refs").exists()
    left = [p.name for p in (root / "blobs").iterdir()]
    assert left == [git_blob_sha1(files["config.json"]) + ".incomplete"], left  # the bad weights are deleted
    del hub.faults["model.safetensors"]
    load_model(f"hf:{REPO}")  # the next run downloads it afresh
    assert (root / "refs" / "main").exists()


def test_repo_without_safetensors(hub, tmp_path):
    files, _ = repo_files(tmp_path)
    hub.add_repo(REPO, {"config.json": files["config.json"], "pytorch_model.bin": b"pickle"})
    with pytest.raises(GraphcError) as e:
        load_model(f"hf:{REPO}")
    assert str(e.value) == (f"hf:{REPO}: --model: {REPO}@main has no model.safetensors "
                            "(graphc reads safetensors only; transformers' save_pretrained writes it)")
    assert not (cache_dir(tmp_path) / "snapshots").exists()


def test_non_gpt2_config_is_refused_before_the_weights(hub, tmp_path):
    files, _ = repo_files(tmp_path)
    files["config.json"] = b'{"model_type": "bert", "architectures": ["BertForMaskedLM"]}'
    hub.add_repo(REPO, files)
    with pytest.raises(GraphcError, match=r"config.json: model_type 'bert' is not GPT-2"):
        load_model(f"hf:{REPO}")
    assert not any("model.safetensors" in r.path for r in hub.file_requests())
    assert not (cache_dir(tmp_path) / "snapshots").exists()
    assert not list((cache_dir(tmp_path) / "blobs").iterdir())


def test_unknown_repo_and_revision(hub, tmp_path):
    files, _ = repo_files(tmp_path)
    hub.add_repo(REPO, files)
    with pytest.raises(GraphcError, match="no model graphc-test/nope on the Hub"):
        load_model("hf:graphc-test/nope")
    with pytest.raises(GraphcError, match="has no revision 'v9'"):
        load_model(f"hf:{REPO}@v9")


def test_offline_and_unreachable_give_one_line(hub, tmp_path, monkeypatch, capsys):
    files, params = repo_files(tmp_path)
    hub.add_repo("openai-community/gpt2", files)
    argv = ["generate", "--model", "gpt2", "--prompt-ids", "1 2", "--max-new-tokens", "1"]

    set_hub_env(monkeypatch, HF_HUB_OFFLINE=1)
    assert main(argv) == 2
    assert capsys.readouterr().err == OFFLINE_LINE
    assert hub.requests == []

    set_hub_env(monkeypatch, HF_HUB_OFFLINE=None, HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there
    assert main(argv) == 2
    assert capsys.readouterr().err == OFFLINE_LINE

    set_hub_env(monkeypatch, HF_ENDPOINT=hub.url)
    load_model("gpt2")  # now cached
    set_hub_env(monkeypatch, HF_HUB_OFFLINE=1)
    hub.requests.clear()
    assert main(argv + ["--print-ids"]) == 0
    assert hub.requests == []
    assert np.array_equal(load_model("gpt2").flat, params.flat)


def test_same_logits_as_transformers_from_pretrained(hub, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from graphc.models.hub import cached_snapshot

    files, _ = repo_files(tmp_path, seed=7)
    hub.add_repo(REPO, files)
    params = load_model(f"hf:{REPO}")
    folder = cached_snapshot(parse_hub_spec(f"hf:{REPO}"))
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    tokens, _ = random_batch(CFG, 2, 16)
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    from test_weights import logits_of

    assert rel_err(logits_of(params, tokens)[..., :CFG.vocab_size], expected) <= 1e-5


def test_prepare_writes_the_llmc_starter_pack(hub, tmp_path):
    from graphc.data.tokenizer import read_llmc_tokenizer
    from graphc.models.llmc import load_llmc
    from shared_paths import TINYSHAKESPEARE

    files, params = repo_files(tmp_path)
    hub.add_repo(REPO, files)
    out = tmp_path / "pack"
    if not TINYSHAKESPEARE.exists():
        pytest.skip("shared Tiny Shakespeare not available")
    bad = ["prepare", "--model", "hf:graphc-test/missing", "--input", str(TINYSHAKESPEARE), "--out", str(out)]
    assert main(bad) == 2 and not out.exists()  # the model is resolved before anything is written
    assert main(["prepare", "--model", f"hf:{REPO}", "--input", str(TINYSHAKESPEARE), "--out", str(out)]) == 0
    label = "gpt2_%dK" % round(params.flat.size / 1e3)  # llm.c names files by parameter count
    fp32, bf16 = load_llmc(out / f"{label}.bin"), load_llmc(out / f"{label}_bf16.bin")
    assert np.array_equal(fp32.flat, params.flat)
    import ml_dtypes

    assert np.array_equal(bf16.flat, params.flat.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert read_llmc_tokenizer(out / "gpt2_tokenizer.bin")
    assert (out / "tiny_shakespeare_val.bin").exists()


def test_environment_variables_in_a_fresh_process(hub, tmp_path):
    """HF_HOME, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE as a user sets them, read by a new process."""
    files, params = repo_files(tmp_path)
    hub.add_repo(REPO, files)
    env = {**os.environ, "HF_HOME": str(tmp_path / "fresh_home"), "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_secret",
           "HF_HUB_OFFLINE": "0"}
    cmd = [sys.executable, "-m", "graphc", "export", "--model", f"hf:{REPO}", "--weights-only", str(tmp_path / "w")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in hub.file_requests() if r.server == "hub")
    assert all("authorization" not in r.headers for r in hub.requests if r.server == "cdn")
    assert (tmp_path / "fresh_home" / "hub" / ("models--" + REPO.replace("/", "--")) / "refs" / "main").exists()

    hub.requests.clear()
    env["HF_HUB_OFFLINE"] = "1"
    cmd[-1] = str(tmp_path / "w2")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert hub.requests == []
    assert (tmp_path / "w2" / "model.safetensors").read_bytes() == files["model.safetensors"]
