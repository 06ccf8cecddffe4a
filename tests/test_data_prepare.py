"""``graphc prepare``: Tiny Shakespeare to llm.c shards, and the download cache."""

from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request

import numpy as np
import pytest
import tiktoken

from graphc.cli.main import main
from graphc.data.cache import cache_dir, cached_download
from graphc.data.prepare import (
    TINYSHAKESPEARE_SHA256,
    TINYSHAKESPEARE_URL,
    find_tinyshakespeare,
    prepare_tinyshakespeare,
    tokenize_tinyshakespeare,
)
from graphc.data.shards import read_shard
from graphc.data.tokenizer import read_llmc_tokenizer
from graphc.errors import GraphcError
from shared_paths import shared_path


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path):
    """Shared tiktoken cache, a private XDG cache, and no accidental network access."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(shared_path("tiktoken_cache")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("GRAPHC_DATA_DIR", raising=False)
    monkeypatch.delenv("GRAPHC_TOKENIZER_DIR", raising=False)

    def no_network(*a, **k):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def _llmc_reference(text: str) -> list[int]:
    """llm.c's dev/data/tinyshakespeare.py loop, written out literally as an independent check."""
    enc = tiktoken.get_encoding("gpt2")
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})  # noqa: E731
    eot = enc._special_tokens["<|endoftext|>"]
    sections = text.split("\n\n")
    tokens = []
    for i, s in enumerate(sections):
        tokens.append(eot)
        spad = s + "\n\n" if i != len(sections) - 1 else s
        tokens.extend(encode(spad))
    return tokens


def test_prepare_real_tinyshakespeare(tmp_path):
    src = shared_path("tinyshakespeare.txt")
    res = prepare_tinyshakespeare(src, tmp_path / "out")
    val = read_shard(res.val_path)
    train = read_shard(res.train_path)
    assert res.val_path.name == "tiny_shakespeare_val.bin" and res.train_path.name == "tiny_shakespeare_train.bin"
    assert len(val) == res.val_tokens == 32768
    assert len(train) == res.train_tokens == 305260
    assert len(val) + len(train) == 338028
    assert val[:5].tolist() == [50256, 5962, 22307, 25, 198]  # EOT, "First Citizen:\n"

    expected = _llmc_reference(src.read_text(encoding="utf-8"))
    assert len(expected) == 338028
    assert np.array_equal(np.concatenate([val, train]), np.array(expected, dtype=np.uint16))

    tok = read_llmc_tokenizer(res.tokenizer_path)
    assert res.tokenizer_path.name == "gpt2_tokenizer.bin"
    assert tok.vocab_size == 50257 and tok.eot == 50256
    assert tok.decode(val[1:5]) == "First Citizen:\n"


def test_tokenize_quirks():
    enc = tiktoken.get_encoding("gpt2")
    text = "A\n\nB<|endoftext|>C\n\n\n\nD"
    toks = tokenize_tinyshakespeare(text, enc)
    assert toks == _llmc_reference(text)
    # sections "A", "B<|eot|>C", "", "D": four EOTs from the loop plus the literal one
    assert toks.count(50256) == 5
    assert enc.decode(toks) == "<|endoftext|>A\n\n<|endoftext|>B<|endoftext|>C\n\n<|endoftext|>\n\n<|endoftext|>D"


def test_prepare_val_tokens_and_tokenizer_dir(tmp_path):
    src = tmp_path / "small.txt"
    src.write_text("To be, or not to be:\n\nthat is the question.\n", encoding="utf-8")
    res = prepare_tinyshakespeare(src, tmp_path / "o", tokenizer_dir=shared_path("gpt2"), val_tokens=4)
    all_tokens = _llmc_reference(src.read_text(encoding="utf-8"))
    assert read_shard(res.val_path).tolist() == all_tokens[:4]
    assert read_shard(res.train_path).tolist() == all_tokens[4:]
    with pytest.raises(GraphcError, match="nothing left to train on") as e:
        prepare_tinyshakespeare(src, tmp_path / "o2", val_tokens=len(all_tokens))
    assert "small.txt" in str(e.value)


def test_prepare_bad_inputs(tmp_path):
    with pytest.raises(GraphcError, match="not found") as e:
        prepare_tinyshakespeare(tmp_path / "missing.txt", tmp_path / "o")
    assert "missing.txt" in str(e.value)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(GraphcError, match="not UTF-8") as e:
        prepare_tinyshakespeare(bad, tmp_path / "o")
    assert "latin1.txt" in str(e.value)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_prepare(tmp_path, capsys):
    out = tmp_path / "data"
    rc = main(["prepare", "--input", str(shared_path("tinyshakespeare.txt")), "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert f"wrote 32768 val tokens to {out / 'tiny_shakespeare_val.bin'}" in stdout
    assert f"wrote 305260 train tokens to {out / 'tiny_shakespeare_train.bin'}" in stdout
    assert "gpt2_tokenizer.bin" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpt2_tokenizer.bin", "tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin"]


def test_cli_prepare_bad_input_exits_2(tmp_path, capsys):
    rc = main(["prepare", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.txt" in err and err.count("\n") == 1


def test_cli_prepare_offline_without_input_exits_2(tmp_path, capsys):
    rc = main(["prepare", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "download failed" in err and "tinyshakespeare.txt" in err


def test_cli_prepare_uses_graphc_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRAPHC_DATA_DIR", str(shared_path()))
    assert main(["prepare", "--out", str(tmp_path / "o"), "--val-tokens", "1000"]) == 0
    assert "wrote 1000 val tokens" in capsys.readouterr().out
    assert main(["prepare", "--input", str(shared_path("tinyshakespeare.txt")), "--val-tokens", "0", "--out", str(tmp_path / "x")]) == 2


# --------------------------------------------------------------------------------------------
# Finding the text and the download cache


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_find_prefers_data_dir_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_DATA_DIR", str(shared_path()))
    assert find_tinyshakespeare() == shared_path("tinyshakespeare.txt")
    monkeypatch.setenv("GRAPHC_DATA_DIR", str(tmp_path / "empty"))  # no file there: fall back to the cache
    assert cache_dir() == tmp_path / "xdg" / "graphc"
    cached = cache_dir() / "tinyshakespeare.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(shared_path("tinyshakespeare.txt").read_bytes())
    assert find_tinyshakespeare() == cached  # served from the cache: no network needed


def test_cached_download_fetches_once(tmp_path, monkeypatch):
    payload = shared_path("tinyshakespeare.txt").read_bytes()
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return _FakeResponse(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    path = find_tinyshakespeare()
    assert path == tmp_path / "xdg" / "graphc" / "tinyshakespeare.txt"
    assert path.read_bytes() == payload and calls == [TINYSHAKESPEARE_URL]
    assert hashlib.sha256(payload).hexdigest() == TINYSHAKESPEARE_SHA256
    assert find_tinyshakespeare() == path and len(calls) == 1
    assert [p.name for p in path.parent.iterdir()] == ["tinyshakespeare.txt"]


def test_cached_download_rejects_bad_hash_and_reports_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b"<html>captive portal</html>"))
    with pytest.raises(GraphcError, match="expected") as e:
        cached_download("https://example.invalid/x.txt", "x.txt", sha256="0" * 64)
    assert "example.invalid" in str(e.value)
    assert not (cache_dir() / "x.txt").exists()
    # without a hash the same bytes are cached
    assert cached_download("https://example.invalid/x.txt", "x.txt").read_bytes() == b"<html>captive portal</html>"

    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(GraphcError) as e:
        cached_download("https://example.invalid/y.txt", "y.txt")
    msg = str(e.value)
    assert "download failed" in msg and "name resolution" in msg and str(cache_dir() / "y.txt") in msg
    assert "\n" not in msg
