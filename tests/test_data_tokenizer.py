"""GPT-2 BPE loading and llm.c's tokenizer file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tiktoken

from graphc.data import tokenizer as tk
from graphc.data.tokenizer import (
    GPT2_EOT,
    LlmcTokenizer,
    Tokenizer,
    encoding_from_dir,
    load_gpt2_encoding,
    read_llmc_tokenizer,
    write_llmc_tokenizer,
)
from graphc.errors import GraphcError
from shared_paths import GPT2_DIR, TIKTOKEN_CACHE, shared_path

TRICKY = [
    "",
    "Hello world",
    " leading space and trailing space ",
    "multiple   spaces\n\n\n\ttabs\r\nCRLF",
    "I'm sure they're fine, we'll see, you've done it, he'd go. 'Tis",
    "<|endoftext|> is ordinary text here",
    "numbers 1234567890 3.14159 -42 1e10",
    "émigré naïve façade Ünïcödé",
    "日本語のテキストと中文文本",
    "emoji 🤖🚀👩‍👩‍👧‍👦 flags 🇺🇦",
    "combining e\u0301 a\u0308 zero\u200bwidth",
    "\x00\x01\x7f control chars",
    "    def f(x):\n        return x ** 2  # indent\n",
    "ALLCAPS camelCase snake_case kebab-case",
    "!!!???...,,,;;;:::",
    " " * 40 + "\n" * 5,
]


@pytest.fixture
def tiktoken_cache(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(shared_path("tiktoken_cache")))
    monkeypatch.delenv("GRAPHC_TOKENIZER_DIR", raising=False)
    return TIKTOKEN_CACHE


@pytest.fixture(scope="module")
def dir_encoding():
    return encoding_from_dir(shared_path("gpt2"))


@pytest.fixture(scope="module")
def ref_encoding():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(shared_path("tiktoken_cache")))
        return tiktoken.get_encoding("gpt2")


# --------------------------------------------------------------------------------------------
# Building the encoding


def test_dir_encoding_equals_tiktoken_gpt2(dir_encoding, ref_encoding):
    assert dir_encoding._mergeable_ranks == ref_encoding._mergeable_ranks
    assert dir_encoding._pat_str == ref_encoding._pat_str
    assert dir_encoding._special_tokens == ref_encoding._special_tokens == {"<|endoftext|>": GPT2_EOT}
    assert dir_encoding.n_vocab == ref_encoding.n_vocab == 50257
    assert dir_encoding.eot_token == GPT2_EOT


def test_dir_encoding_same_ids_on_shakespeare_and_tricky_strings(dir_encoding, ref_encoding):
    text = shared_path("tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000]
    ids = dir_encoding.encode_ordinary(text)
    assert ids == ref_encoding.encode_ordinary(text)
    assert len(ids) > 20_000
    for s in TRICKY:
        assert dir_encoding.encode_ordinary(s) == ref_encoding.encode_ordinary(s), s
        assert dir_encoding.encode(s, allowed_special="all") == ref_encoding.encode(s, allowed_special="all"), s
        assert dir_encoding.decode(dir_encoding.encode_ordinary(s)) == s


def test_load_with_path_and_env(monkeypatch, tiktoken_cache):
    enc = load_gpt2_encoding(GPT2_DIR)
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    monkeypatch.setenv("GRAPHC_TOKENIZER_DIR", str(GPT2_DIR))
    called = []
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: called.append(name))
    enc = load_gpt2_encoding()
    assert not called, "GRAPHC_TOKENIZER_DIR must take precedence over tiktoken"
    assert enc.encode_ordinary("First Citizen:\n") == [5962, 22307, 25, 198]


def test_load_from_tiktoken_cache(tiktoken_cache):
    enc = load_gpt2_encoding()
    assert enc.name == "gpt2" and enc.n_vocab == 50257


def test_env_dir_that_is_wrong(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHC_TOKENIZER_DIR", str(tmp_path / "nope"))
    with pytest.raises(GraphcError, match="GRAPHC_TOKENIZER_DIR") as e:
        load_gpt2_encoding()
    assert "nope" in str(e.value)


def test_unloadable_tiktoken_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("GRAPHC_TOKENIZER_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def offline(name):
        raise ConnectionError("Max retries exceeded with url: openaipublic.blob.core.windows.net")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(GraphcError) as e:
        load_gpt2_encoding()
    msg = str(e.value)
    assert "TIKTOKEN_CACHE_DIR" in msg and "vocab.bpe" in msg and "encoder.json" in msg
    assert str(tmp_path) in msg and "\n" not in msg


def test_dir_missing_file(tmp_path):
    shutil.copy(shared_path("gpt2", "vocab.bpe"), tmp_path / "vocab.bpe")
    with pytest.raises(GraphcError, match="encoder.json") as e:
        encoding_from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_dir_mismatched_files(tmp_path):
    shutil.copy(shared_path("gpt2", "vocab.bpe"), tmp_path / "vocab.bpe")
    encoder = json.loads(shared_path("gpt2", "encoder.json").read_text(encoding="utf-8"))
    encoder["Ġthe"], encoder["Ġa"] = encoder["Ġa"], encoder["Ġthe"]  # swap two ids
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    with pytest.raises(GraphcError, match="does not match vocab.bpe") as e:
        encoding_from_dir(tmp_path)
    assert "encoder.json" in str(e.value)


def test_dir_malformed_json(tmp_path):
    shutil.copy(shared_path("gpt2", "vocab.bpe"), tmp_path / "vocab.bpe")
    (tmp_path / "encoder.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(GraphcError, match="not valid JSON"):
        encoding_from_dir(tmp_path)


# --------------------------------------------------------------------------------------------
# Tokenizer wrapper


def test_tokenizer_wrapper(dir_encoding):
    tok = Tokenizer(dir_encoding)
    assert tok.eot == 50256 and tok.vocab_size == 50257
    assert tok.encode("<|endoftext|>") != [tok.eot]  # ordinary text by default
    assert tok.encode("a<|endoftext|>b", allow_eot=True) == [64, tok.eot, 65]
    for s in TRICKY:
        assert tok.decode(tok.encode(s)) == s
    assert tok.decode_bytes(tok.eot) == b"<|endoftext|>"
    assert tok.decode_bytes(15496) == b"Hello"
    # A multi-byte character split across tokens: decoding part of it must not fail.
    ids = tok.encode("🤖")
    assert len(ids) > 1
    assert "\ufffd" in tok.decode(ids[:1])
    with pytest.raises(GraphcError, match="50257"):
        tok.decode([1, 50257])
    with pytest.raises(GraphcError, match="position 0"):
        tok.decode_bytes(-1)


def test_tokenizer_from_dir():
    tok = Tokenizer(tokenizer_dir=shared_path("gpt2"))
    assert tok.encode("Hello world") == [15496, 995]


# --------------------------------------------------------------------------------------------
# llm.c's gpt2_tokenizer.bin


def _header(path):
    return np.fromfile(path, dtype="<u4", count=256)


def test_llmc_tokenizer_round_trip(tmp_path, dir_encoding):
    path = tmp_path / "gpt2_tokenizer.bin"
    write_llmc_tokenizer(path, dir_encoding)
    h = _header(path)
    assert list(h[:4]) == [20240328, 2, 50257, 50256] and not h[4:].any()
    t = read_llmc_tokenizer(path)
    assert t.version == 2 and t.eot == 50256 and t.vocab_size == 50257
    assert t.token_bytes == [dir_encoding.decode_single_token_bytes(i) for i in range(50257)]
    ids = dir_encoding.encode_ordinary("Round trip: naïve 🤖 text.")
    assert t.decode(ids) == "Round trip: naïve 🤖 text."
    # the file size is header + one length byte per token + the bytes themselves
    assert path.stat().st_size == 1024 + 50257 + sum(len(b) for b in t.token_bytes)
    # writing what was read gives the same bytes
    path2 = tmp_path / "again.bin"
    write_llmc_tokenizer(path2, t)
    assert path2.read_bytes() == path.read_bytes()


def test_llmc_tokenizer_v1(tmp_path, dir_encoding):
    path = tmp_path / "v1.bin"
    write_llmc_tokenizer(path, dir_encoding, version=1)
    h = _header(path)
    assert list(h[:4]) == [20240328, 1, 50257, 0]
    t = read_llmc_tokenizer(path)
    assert t.version == 1 and t.eot == 50256 and t.vocab_size == 50257
    assert t.token_bytes[t.eot] == b"<|endoftext|>"


def test_llmc_tokenizer_small_vocab(tmp_path):
    path = tmp_path / "small.bin"
    table = [b"a", b"b", b"ab", b"\xff\xfe", b"<eot>"]
    write_llmc_tokenizer(path, table, eot=4)
    t = read_llmc_tokenizer(path)
    assert t == LlmcTokenizer(table, 4, 2)
    assert t.decode_bytes([2, 0, 1]) == b"abab"
    assert t.decode([3]) == "\ufffd\ufffd"
    with pytest.raises(GraphcError, match="outside the vocabulary"):
        t.decode([5])


def _good_small(tmp_path):
    path = tmp_path / "tok.bin"
    write_llmc_tokenizer(path, [b"x", b"yz", b"eot"])
    return path, bytearray(path.read_bytes())


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda b: b.__setitem__(slice(0, 4), (123).to_bytes(4, "little")), "magic", "bad magic 123"),
        (lambda b: b.__setitem__(slice(4, 8), (3).to_bytes(4, "little")), "version", "unknown version 3"),
        (lambda b: b.__setitem__(slice(4, 8), (1).to_bytes(4, "little")), "vocab_size", "version 1"),
        (lambda b: b.__setitem__(slice(12, 16), (7).to_bytes(4, "little")), "eot_token", "outside"),
        (lambda b: b.__setitem__(1024 + 2, 0), "token[1]", "zero-length"),
        (lambda b: b.__delitem__(slice(len(b) - 2, len(b))), "token[2]", "truncated"),
        (lambda b: b.__delitem__(slice(1024 + 2, len(b))), "token[1]", "truncated"),
        (lambda b: b.__delitem__(slice(500, len(b))), "header", "truncated"),
        (lambda b: b.extend(b"\x01z"), "vocab_size", "unexpected bytes"),
    ],
)
def test_llmc_tokenizer_bad_files(tmp_path, mutate, field, words):
    path, data = _good_small(tmp_path)
    mutate(data)
    path.write_bytes(bytes(data))
    with pytest.raises(GraphcError) as e:
        read_llmc_tokenizer(path)
    msg = str(e.value)
    assert str(path) in msg and field in msg and words in msg, msg
    assert e.value.field == field


def test_llmc_tokenizer_missing_file(tmp_path):
    with pytest.raises(GraphcError, match="not found") as e:
        read_llmc_tokenizer(tmp_path / "absent.bin")
    assert "absent.bin" in str(e.value)


def test_llmc_tokenizer_write_errors(tmp_path):
    path = tmp_path / "t.bin"
    with pytest.raises(GraphcError, match="1..255"):
        write_llmc_tokenizer(path, [b"a", b""])
    with pytest.raises(GraphcError, match="1..255"):
        write_llmc_tokenizer(path, [b"a", b"x" * 256])
    with pytest.raises(GraphcError, match="version 1 implies"):
        write_llmc_tokenizer(path, [b"a", b"b"], version=1)
    with pytest.raises(GraphcError, match="unknown"):
        write_llmc_tokenizer(path, [b"a", b"b"], version=5)
    with pytest.raises(GraphcError, match="eot"):
        write_llmc_tokenizer(path, [b"a", b"b"], eot=2)
    assert not path.exists()
    assert not list(tmp_path.iterdir()), "failed writes must leave nothing behind"


def test_module_exports():
    for name in tk.__all__:
        assert hasattr(tk, name)
