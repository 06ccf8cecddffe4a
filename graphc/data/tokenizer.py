"""GPT-2 byte-pair encoding, and llm.c's ``gpt2_tokenizer.bin`` file.

graphc encodes text with tiktoken because it is fast and, for GPT-2, exact: its ``gpt2``
encoding is built from OpenAI's own ``vocab.bpe`` and ``encoder.json``. Where that encoding
comes from matters on machines without internet access, so :func:`load_gpt2_encoding`
accepts three sources, in order:

1. an explicit directory holding OpenAI's ``vocab.bpe`` + ``encoder.json``,
2. the directory named by ``GRAPHC_TOKENIZER_DIR`` (same layout),
3. ``tiktoken.get_encoding("gpt2")``, which reads tiktoken's cache (``TIKTOKEN_CACHE_DIR``)
   and downloads into it when online.

llm.c's C code cannot run BPE; it only *decodes*, with a table of each token's raw bytes
stored in ``gpt2_tokenizer.bin``. :func:`write_llmc_tokenizer` and
:func:`read_llmc_tokenizer` speak that format so that graphc's outputs and llm.c's
programs can be used with each other.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from graphc.errors import GraphcError
from graphc.fileio import atomic_write, open_input, read_array

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
ENDOFTEXT = "<|endoftext|>"

# tiktoken's r50k/gpt2 split pattern. Taken from tiktoken itself when available so the two can
# never drift apart; the literal is the same string, kept for tiktoken versions that move it.
try:  # pragma: no cover - depends on the installed tiktoken layout
    from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PAT_STR
except Exception:  # pragma: no cover
    GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

LLMC_TOKENIZER_MAGIC = 20240328
LLMC_HEADER_INTS = 256

_HOW_TO_FIX = (
    "set TIKTOKEN_CACHE_DIR to a tiktoken cache holding the gpt2 files, or pass "
    "--tokenizer-dir / set GRAPHC_TOKENIZER_DIR to a directory with OpenAI's vocab.bpe and encoder.json"
)


def _short_reason(e: Exception) -> str:
    """Why tiktoken failed, in a few words: a failed download's urllib3 chain fills a screen,
    while the exception's type and the host it could not reach are what a user acts on."""
    text = str(e).splitlines()[0] if str(e) else ""
    host = re.search(r"host='([^']+)'", text)
    if host:
        return f"{type(e).__name__}: cannot reach {host.group(1)} (offline?)"
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------------
# Building the encoding


def _data_gym_bytes() -> tuple[list[int], dict[str, int]]:
    """GPT-2's ``bytes_to_unicode``: the byte order of the 256 single-byte ranks, and the
    printable stand-in character OpenAI's files use for each byte.

    ``vocab.bpe`` and ``encoder.json`` spell tokens with these characters so that every byte
    is visible and whitespace-free. Printable non-space bytes stand for themselves and come
    first; the rest map to ``chr(256 + n)`` in byte order. This is the table tiktoken's
    ``data_gym_to_mergeable_bpe_ranks`` builds; it is repeated here (rather than calling that
    function) because tiktoken's function routes local paths through its download cache,
    which would copy the files into ``TIKTOKEN_CACHE_DIR`` (possibly read-only) as a side
    effect, and it reports a mismatch between the two files with a bare ``assert``.
    """
    order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    symbol_to_byte = {chr(b): b for b in order}
    rest = [b for b in range(256) if b not in symbol_to_byte.values()]
    for n, b in enumerate(rest):
        symbol_to_byte[chr(256 + n)] = b
    return order + rest, symbol_to_byte


def _ranks_from_openai_files(directory: Path) -> dict[bytes, int]:
    """Mergeable BPE ranks from OpenAI's ``vocab.bpe`` + ``encoder.json`` in ``directory``.

    tiktoken assumes a token's id *is* its merge priority. That only holds if the ids in
    ``encoder.json`` agree with the order of merges in ``vocab.bpe``, so the two are checked
    against each other: a mismatched pair would otherwise tokenize silently wrong.
    """
    vocab_path = directory / "vocab.bpe"
    encoder_path = directory / "encoder.json"
    for p in (vocab_path, encoder_path):
        if not p.is_file():
            raise GraphcError(p, "missing; a GPT-2 tokenizer directory needs vocab.bpe and encoder.json", "--tokenizer-dir")
    byte_order, byte_of = _data_gym_bytes()

    def to_bytes(s: str, where: Path, field: str) -> bytes:
        try:
            return bytes(byte_of[c] for c in s)
        except KeyError as e:
            raise GraphcError(where, f"character {e.args[0]!r} is not a GPT-2 byte symbol", field) from None

    try:
        merges_text = vocab_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GraphcError(vocab_path, f"not UTF-8 text ({e.reason} at byte {e.start})", "vocab.bpe") from None
    # First line is a version comment, last is empty (file ends with a newline).
    ranks = {bytes([b]): i for i, b in enumerate(byte_order)}
    lines = merges_text.split("\n")[1:-1]
    for lineno, line in enumerate(lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise GraphcError(vocab_path, f"expected two symbols per merge, found {len(parts)}", f"line {lineno}")
        first = to_bytes(parts[0], vocab_path, f"line {lineno}")
        second = to_bytes(parts[1], vocab_path, f"line {lineno}")
        ranks[first + second] = len(ranks)

    try:
        encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GraphcError(encoder_path, f"not valid JSON: {e}", "encoder.json") from None
    if not isinstance(encoder, dict):
        raise GraphcError(encoder_path, "expected a JSON object mapping token to id", "encoder.json")
    from_json = {to_bytes(k, encoder_path, repr(k)): v for k, v in encoder.items() if k not in (ENDOFTEXT, "<|startoftext|>")}
    if from_json != ranks:
        differing = sorted(set(from_json.items()) ^ set(ranks.items()), key=lambda kv: kv[1])
        example = differing[0] if differing else None
        raise GraphcError(
            encoder_path,
            f"does not match {vocab_path.name}: {len(differing)} (token, id) pairs differ"
            + (f", e.g. {example[0]!r} -> {example[1]}" if example else ""),
            "encoder.json",
        )
    return ranks


def encoding_from_dir(directory: str | os.PathLike) -> "tiktoken.Encoding":  # noqa: F821
    """A tiktoken ``Encoding`` equal to tiktoken's ``gpt2``, built from OpenAI's files in ``directory``."""
    import tiktoken

    directory = Path(directory)
    if not directory.is_dir():
        raise GraphcError(directory, "tokenizer directory not found (expected a directory with vocab.bpe and encoder.json)",
                          "--tokenizer-dir")
    ranks = _ranks_from_openai_files(directory)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_EOT},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def load_gpt2_encoding(path: str | os.PathLike | None = None) -> "tiktoken.Encoding":  # noqa: F821
    """The GPT-2 BPE as a tiktoken ``Encoding``, from ``path``, ``GRAPHC_TOKENIZER_DIR`` or tiktoken.

    An explicit or environment directory wins so that an offline machine can be pointed at
    a copy of OpenAI's files; otherwise tiktoken's own loader is used, which honours
    ``TIKTOKEN_CACHE_DIR``. Any failure becomes a :class:`GraphcError` that says how to fix it.
    """
    if path is not None:
        return encoding_from_dir(path)
    env_dir = os.environ.get("GRAPHC_TOKENIZER_DIR")
    if env_dir:
        try:
            return encoding_from_dir(env_dir)
        except GraphcError as e:
            raise GraphcError(e.where, e.message, "GRAPHC_TOKENIZER_DIR") from None
    try:
        import tiktoken

        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # network errors, hash mismatches, unwritable cache: all one remedy
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"tiktoken cache {cache}" if cache else "tiktoken"
        raise GraphcError(where, f"cannot load the gpt2 encoding ({_short_reason(e)}); {_HOW_TO_FIX}", "gpt2") from None


# ----------------------------------------------------------------------------------------------
# A small wrapper with the few operations graphc needs


class Tokenizer:
    """GPT-2 tokenizer: ``encode`` text to ids, ``decode`` ids to text.

    A thin wrapper so the rest of graphc does not depend on tiktoken's API surface (and so
    decoding an id outside the vocabulary is a one-line user error, not a ``KeyError``).
    """

    def __init__(self, encoding=None, *, tokenizer_dir: str | os.PathLike | None = None):
        self.encoding = encoding if encoding is not None else load_gpt2_encoding(tokenizer_dir)
        self.eot: int = self.encoding.eot_token
        self.vocab_size: int = self.encoding.n_vocab

    def encode(self, text: str, *, allow_eot: bool = False) -> list[int]:
        """Token ids of ``text``.

        By default the literal string ``<|endoftext|>`` is ordinary text (tokenized as its
        characters), which is what one wants for arbitrary user input; with
        ``allow_eot=True`` it becomes the single EOT id, as llm.c's data scripts do.
        """
        if allow_eot:
            return self.encoding.encode(text, allowed_special={ENDOFTEXT}, disallowed_special=())
        return self.encoding.encode_ordinary(text)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for pos, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:
                raise GraphcError(None, f"token id {i} at position {pos} is outside the vocabulary (vocab_size {self.vocab_size})",
                                  "tokens")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD.

        Generation can stop in the middle of a multi-byte character, so strict decoding
        would fail on perfectly normal model output.
        """
        return self.encoding.decode_bytes(self._check_ids(list(ids))).decode("utf-8", errors="replace")

    def decode_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (what llm.c's tokenizer table stores)."""
        (token_id,) = self._check_ids([token_id])
        return self.encoding.decode_single_token_bytes(token_id)

    def token_bytes(self) -> list[bytes]:
        """Every token's bytes, id order."""
        return [self.encoding.decode_single_token_bytes(i) for i in range(self.vocab_size)]


# ----------------------------------------------------------------------------------------------
# llm.c's gpt2_tokenizer.bin


@dataclass
class LlmcTokenizer:
    """The decode table of an llm.c tokenizer file: each token's bytes, and the EOT id."""

    token_bytes: list[bytes]
    eot: int
    version: int = 2

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = []
        for pos, i in enumerate(ids):
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise GraphcError(None, f"token id {i} at position {pos} is outside the vocabulary (vocab_size {self.vocab_size})",
                                  "tokens")
            out.append(self.token_bytes[i])
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, invalid UTF-8 replaced (same policy as :meth:`Tokenizer.decode`)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def write_llmc_tokenizer(path: str | os.PathLike, encoding_or_token_bytes, version: int = 2, eot: int | None = None) -> None:
    """Write llm.c's ``gpt2_tokenizer.bin`` (what llm.c's ``train_gpt2.py`` ``write_tokenizer`` writes).

    Layout: 256 little-endian uint32 header words ``[magic 20240328, version, vocab_size,
    eot (v2 only)]`` and zeros, then per token a uint8 length and that many raw bytes.
    ``encoding_or_token_bytes`` is a tiktoken ``Encoding``, a :class:`Tokenizer`, an
    :class:`LlmcTokenizer` or a plain list of byte strings (then ``eot`` defaults to the last
    id, as in GPT-2). Version 1 has no EOT field; llm.c then assumes GPT-2's 50257/50256, so
    only that shape can be written as v1.
    """
    path = Path(path)
    src = encoding_or_token_bytes
    if isinstance(src, LlmcTokenizer):
        table, default_eot = list(src.token_bytes), src.eot
    elif isinstance(src, Tokenizer):
        table, default_eot = src.token_bytes(), src.eot
    elif hasattr(src, "decode_single_token_bytes"):  # tiktoken.Encoding
        n = src.max_token_value + 1
        table, default_eot = [src.decode_single_token_bytes(i) for i in range(n)], src.eot_token
    else:
        table = [bytes(b) for b in src]
        default_eot = len(table) - 1
    eot = default_eot if eot is None else int(eot)

    if version not in (1, 2):
        raise GraphcError(path, f"unknown tokenizer file version {version} (llm.c knows 1 and 2)", "version")
    if not table:
        raise GraphcError(path, "cannot write an empty vocabulary", "vocab_size")
    if not 0 <= eot < len(table):
        raise GraphcError(path, f"eot token {eot} is outside the vocabulary of {len(table)}", "eot_token")
    if version == 1 and (len(table) != GPT2_VOCAB_SIZE or eot != GPT2_EOT):
        raise GraphcError(path, f"version 1 implies vocab {GPT2_VOCAB_SIZE} with eot {GPT2_EOT}; got {len(table)}/{eot}; write version 2", "version")
    for i, b in enumerate(table):
        if not 0 < len(b) < 256:
            raise GraphcError(path, f"token length {len(b)} does not fit llm.c's 1..255 byte lengths", f"token[{i}]")

    header = np.zeros(LLMC_HEADER_INTS, dtype="<u4")
    header[0] = LLMC_TOKENIZER_MAGIC
    header[1] = version
    header[2] = len(table)
    if version == 2:
        header[3] = eot
    body = b"".join(struct.pack("<B", len(b)) + b for b in table)
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(body)


def read_llmc_tokenizer(path: str | os.PathLike) -> LlmcTokenizer:
    """Read llm.c's tokenizer file, with the checks llm.c's ``tokenizer_init`` asserts.

    Every check names the file and field: a wrong magic (not a tokenizer file), an unknown
    version, a v1 file whose vocabulary is not GPT-2's, a zero-length token, a file that
    ends early, or bytes left over after the last token (a sign the header lies).
    """
    path = Path(path)
    with open_input(path, "tokenizer file") as f:
        header = read_array(f, "<u4", LLMC_HEADER_INTS, path, "header")
        if int(header[0]) != LLMC_TOKENIZER_MAGIC:
            raise GraphcError(path, f"bad magic {int(header[0])}, expected {LLMC_TOKENIZER_MAGIC} (not an llm.c tokenizer file?)", "magic")
        version = int(header[1])
        vocab_size = int(header[2])
        if version == 1:
            if vocab_size != GPT2_VOCAB_SIZE:
                raise GraphcError(path, f"version 1 files must hold GPT-2's {GPT2_VOCAB_SIZE} tokens, header says {vocab_size}", "vocab_size")
            eot = GPT2_EOT
        elif version == 2:
            eot = int(header[3])
        else:
            raise GraphcError(path, f"unknown version {version} (llm.c knows 1 and 2)", "version")
        if vocab_size == 0:
            raise GraphcError(path, "vocabulary is empty", "vocab_size")
        if not 0 <= eot < vocab_size:
            raise GraphcError(path, f"eot token {eot} is outside the vocabulary of {vocab_size}", "eot_token")
        data = f.read()

    table: list[bytes] = []
    pos = 0
    for i in range(vocab_size):
        if pos >= len(data):
            raise GraphcError(path, f"file is truncated: header promises {vocab_size} tokens, found {i}", f"token[{i}]")
        n = data[pos]
        if n == 0:
            raise GraphcError(path, "zero-length token (every token must have at least one byte)", f"token[{i}]")
        if pos + 1 + n > len(data):
            raise GraphcError(path, f"file is truncated: token needs {n} bytes, {len(data) - pos - 1} left", f"token[{i}]")
        table.append(data[pos + 1 : pos + 1 + n])
        pos += 1 + n
    if pos != len(data):
        raise GraphcError(path, f"{len(data) - pos} unexpected bytes after the last token (header vocab_size {vocab_size})", "vocab_size")
    return LlmcTokenizer(table, eot, version)


__all__ = [
    "ENDOFTEXT",
    "GPT2_EOT",
    "GPT2_VOCAB_SIZE",
    "LlmcTokenizer",
    "Tokenizer",
    "encoding_from_dir",
    "load_gpt2_encoding",
    "read_llmc_tokenizer",
    "write_llmc_tokenizer",
]
