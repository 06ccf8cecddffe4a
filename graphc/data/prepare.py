"""Tiny Shakespeare to llm.c token shards, exactly as llm.c's ``dev/data/tinyshakespeare.py``.

Reproducing llm.c's preprocessing token for token (including its documented quirk of keeping
the ``"\\n\\n"`` at the end of each section) is what makes graphc's losses directly
comparable with llm.c's on the same data: a different split or tokenization would shift
every number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from graphc.data.cache import cached_download
from graphc.data.shards import write_shard
from graphc.data.tokenizer import ENDOFTEXT, load_gpt2_encoding, write_llmc_tokenizer
from graphc.errors import GraphcError

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_FILENAME = "tinyshakespeare.txt"
# sha256 of char-rnn's input.txt, so a broken download is never cached as the dataset.
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_VAL_TOKENS = 32768
VAL_FILENAME = "tiny_shakespeare_val.bin"
TRAIN_FILENAME = "tiny_shakespeare_train.bin"
TOKENIZER_FILENAME = "gpt2_tokenizer.bin"


def find_tinyshakespeare() -> Path:
    """The Tiny Shakespeare text: ``$GRAPHC_DATA_DIR/tinyshakespeare.txt``, else the cache (downloading once).

    ``GRAPHC_DATA_DIR`` comes first so machines without internet can point at a local copy.
    """
    data_dir = os.environ.get("GRAPHC_DATA_DIR")
    if data_dir:
        candidate = Path(data_dir) / TINYSHAKESPEARE_FILENAME
        if candidate.is_file():
            return candidate
    return cached_download(TINYSHAKESPEARE_URL, TINYSHAKESPEARE_FILENAME, sha256=TINYSHAKESPEARE_SHA256)


def tokenize_tinyshakespeare(text: str, encoding) -> list[int]:
    """llm.c's tokenization: each ``"\\n\\n"``-separated section is a document preceded by EOT.

    As in llm.c, every section but the last keeps its trailing ``"\\n\\n"`` (llm.c's
    backwards-compatible "mild bug"), and ``<|endoftext|>`` in the text is the special token.
    """
    eot = encoding._special_tokens[ENDOFTEXT]
    sections = text.split("\n\n")
    padded = [s + "\n\n" if i != len(sections) - 1 else s for i, s in enumerate(sections)]
    # encode_batch is encode() on each item (threaded); the result is the same as llm.c's loop.
    encoded = encoding.encode_batch(padded, allowed_special={ENDOFTEXT})
    tokens: list[int] = []
    for ids in encoded:
        tokens.append(eot)
        tokens.extend(ids)
    return tokens


@dataclass
class PrepareResult:
    val_path: Path
    train_path: Path
    tokenizer_path: Path
    val_tokens: int
    train_tokens: int
    vocab_size: int


def prepare_tinyshakespeare(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    val_tokens: int = DEFAULT_VAL_TOKENS,
) -> PrepareResult:
    """Write ``tiny_shakespeare_{val,train}.bin`` and ``gpt2_tokenizer.bin`` (llm.c's names) into ``out_dir``.

    The first ``val_tokens`` tokens are the validation split, the rest training, as in llm.c.
    """
    input_path = Path(input_path)
    out_dir = Path(out_dir)
    if val_tokens <= 0:
        raise GraphcError(None, f"must be positive, got {val_tokens}", "--val-tokens")
    if not input_path.is_file():
        raise GraphcError(input_path, "input text not found" if not input_path.exists() else "input is not a file", "--input")
    try:
        # Universal newlines and UTF-8, as llm.c's open(..., 'r').read() on a UTF-8 system.
        text = input_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GraphcError(input_path, f"not UTF-8 text ({e.reason} at byte {e.start})", "--input") from None
    encoding = load_gpt2_encoding(tokenizer_dir)
    tokens = tokenize_tinyshakespeare(text, encoding)
    if len(tokens) <= val_tokens:
        raise GraphcError(
            input_path, f"text gives {len(tokens)} tokens, not more than the {val_tokens} validation tokens; nothing left to train on",
            "--val-tokens")
    val, train = tokens[:val_tokens], tokens[val_tokens:]
    val_path, train_path, tok_path = out_dir / VAL_FILENAME, out_dir / TRAIN_FILENAME, out_dir / TOKENIZER_FILENAME
    write_shard(val_path, val)
    write_shard(train_path, train)
    write_llmc_tokenizer(tok_path, encoding)
    return PrepareResult(val_path, train_path, tok_path, len(val), len(train), encoding.max_token_value + 1)


__all__ = [
    "PrepareResult",
    "find_tinyshakespeare",
    "prepare_tinyshakespeare",
    "tokenize_tinyshakespeare",
]
