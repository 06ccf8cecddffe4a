"""``graphc prepare``: tokenize Tiny Shakespeare into llm.c's train/val shards.

With ``--model`` (``gpt2`` for OpenAI's GPT-2 124M) it also writes the model as llm.c's
``gpt2_124M.bin`` (fp32) and ``gpt2_124M_bf16.bin``: with the tokenizer and the shards, the
files of llm.c's starter pack.
"""

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
        "--model",
        metavar="NAME|PATH",
        help="also write this model as llm.c's gpt2_<size>.bin and gpt2_<size>_bf16.bin (gpt2: OpenAI's GPT-2 124M)",
    )
    parser.add_argument(
        "--val-tokens", type=int_at_least("--val-tokens", 1), default=DEFAULT_VAL_TOKENS, metavar="N", help="first N tokens form the validation split (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    params = None
    if args.model is not None:  # first: a model that cannot be had stops the run before anything is written
        from graphc.models.load import load_model

        params = load_model(args.model)
    remove_leftovers_of(*(Path(args.out) / name for name in (VAL_FILENAME, TRAIN_FILENAME, TOKENIZER_FILENAME)))
    input_path = args.input if args.input is not None else find_tinyshakespeare()
    result = prepare_tinyshakespeare(input_path, args.out, tokenizer_dir=args.tokenizer_dir, val_tokens=args.val_tokens)
    print(f"wrote {result.val_tokens} val tokens to {result.val_path}")
    print(f"wrote {result.train_tokens} train tokens to {result.train_path}")
    print(f"wrote the llm.c tokenizer ({result.vocab_size} tokens) to {result.tokenizer_path}")
    if params is not None:
        _write_llmc_model(params, Path(args.out))
    return 0


def _write_llmc_model(params, out: Path) -> None:
    from graphc.models.llmc import llmc_model_name, save_llmc

    stem = llmc_model_name(params.cfg)
    for suffix, version in (("", 3), ("_bf16", 5)):
        path = out / f"{stem}{suffix}.bin"
        save_llmc(params, path, version=version)
        print(f"wrote the model ({params.cfg.describe()}) as llm.c version {version} to {path}")
