"""``graphc generate``: sample a continuation of one or more prompts.

Output contract (other tools parse it):

* text (default): the decoded continuation of each prompt, followed by a newline; with
  several prompts the blocks come in prompt order separated by a line ``---``;
* ``--print-ids``: one line per prompt, the generated token ids separated by spaces.

A sequence stops at ``<|endoftext|>`` (printed as its last id with ``--print-ids``, left
out of the text) or after ``--max-new-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import re
import sys

from graphc.cli.common import add_backend_args, add_model_args, int_at_least
from graphc.errors import GraphcError

HELP = "generate text (or token ids) from a prompt with a GPT-2 model, with a KV cache by default"
BLOCK_SEPARATOR = "---"




def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="prompt text; repeat for several prompts generated as one batch")
    src.add_argument("--prompt-ids", action="append", metavar="'ID ID ...'",
                     help="prompt as GPT-2 token ids separated by spaces (or commas); repeatable")
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 0), default=64,
                   help="tokens to generate per prompt at most (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int_at_least("--top-k", 0), default=50,
                   help="keep the k most likely tokens; 0 = off (default %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus sampling mass; 1 = off (default %(default)s)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole sequence at every step (the slow reference)")
    p.add_argument("--print-ids", action="store_true",
                   help="print the generated token ids (one line per prompt) instead of text")
    add_backend_args(p)
    p.add_argument("--tokenizer-dir", metavar="DIR",
                   help="directory with OpenAI's vocab.bpe and encoder.json (default: $GRAPHC_TOKENIZER_DIR, "
                        "else tiktoken's gpt2 from TIKTOKEN_CACHE_DIR)")


def parse_ids(text: str, where: str) -> list[int]:
    """``"464 3290, 318"`` -> ``[464, 3290, 318]``; anything else is a one-line error."""
    parts = [t for t in re.split(r"[\s,]+", text.strip()) if t]
    ids = []
    for t in parts:
        try:
            ids.append(int(t))
        except ValueError:
            raise GraphcError(None, f"{t!r} is not a token id (expected integers separated by spaces)", where) from None
    return ids


def run(args: argparse.Namespace) -> int:
    from graphc.models.load import load_model
    from graphc.runtime.generate import Generator, check_prompts
    from graphc.runtime.sampling import Sampler

    sampler = Sampler(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
    tokenizer = None
    if args.prompt is not None:
        prompts = []
        for i, text in enumerate(args.prompt):
            if not text:
                raise GraphcError(None, "prompt is empty", "--prompt" if len(args.prompt) == 1 else f"--prompt #{i + 1}")
        tokenizer = _tokenizer(args)
        prompts = [tokenizer.encode(text) for text in args.prompt]
    else:
        prompts = [parse_ids(text, "--prompt-ids" if len(args.prompt_ids) == 1 else f"--prompt-ids #{i + 1}")
                   for i, text in enumerate(args.prompt_ids)]
    params = load_model(args.model, args.seed)
    check_prompts(prompts, args.max_new_tokens, params.cfg, "--prompt" if args.prompt is not None else "--prompt-ids")  # fail before building any graph
    generator = Generator(params, kv_cache=not args.no_kv_cache, backend=args.backend, opt=not args.no_opt,
                          precision=args.precision)
    outputs = generator.generate(prompts, args.max_new_tokens, sampler)

    if args.print_ids:
        for ids in outputs:
            print(" ".join(str(t) for t in ids))
        return 0
    tokenizer = tokenizer or _tokenizer(args)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    for i, ids in enumerate(outputs):
        if i:
            print(BLOCK_SEPARATOR)
        if ids and ids[-1] == generator.eot:
            ids = ids[:-1]
        print(tokenizer.decode(ids))
    return 0


def _tokenizer(args):
    from graphc.data.tokenizer import Tokenizer

    return Tokenizer(tokenizer_dir=args.tokenizer_dir)
