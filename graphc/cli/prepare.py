"""``graphc prepare``: tokenize Tiny Shakespeare into llm.c's train/val shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from graphc.cli.common import int_at_least
from graphc.data.prepare import (DEFAULT_VAL_TOKENS, TOKENIZER_FILENAME, TRAIN_FILENAME, VAL_FILENAME,
                                 find_tinyshakespeare, prepare_tinyshakespeare)
from graphc.fileio import remove_leftovers_of
from graphc.outputs import check_output_dir

HELP = "tokenize Tiny Shakespeare into llm.c-format train/val token shards (as llm.c's tinyshakespeare.py)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        metavar="TEXT_FILE",
        help="text to tokenize (default: $GRAPHC_DATA_DIR/tinyshakespeare.txt, else a cached download)",
    )
    parser.add_argument("--out", metavar="DIR", default="data/tinyshakespeare", help="output directory (default: %(default)s)")
    parser.add_argument(
        "--tokenizer-dir",
        metavar="DIR",
        help="directory with OpenAI's vocab.bpe and encoder.json (default: $GRAPHC_TOKENIZER_DIR, else tiktoken's gpt2)",
    )
    parser.add_argument(
        "--val-tokens", type=int_at_least("--val-tokens", 1), default=DEFAULT_VAL_TOKENS, metavar="N", help="first N tokens form the validation split (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    remove_leftovers_of(*(Path(args.out) / name for name in (VAL_FILENAME, TRAIN_FILENAME, TOKENIZER_FILENAME)))
    input_path = args.input if args.input is not None else find_tinyshakespeare()
    result = prepare_tinyshakespeare(input_path, args.out, tokenizer_dir=args.tokenizer_dir, val_tokens=args.val_tokens)
    print(f"wrote {result.val_tokens} val tokens to {result.val_path}")
    print(f"wrote {result.train_tokens} train tokens to {result.train_path}")
    print(f"wrote the llm.c tokenizer ({result.vocab_size} tokens) to {result.tokenizer_path}")
    return 0
