"""Flags and checks shared by several commands (one definition, many users)."""

from __future__ import annotations

import argparse
import math

from graphc.backends import REGISTRY
from graphc.errors import GraphcError
from graphc.models.config import GPT2Config


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="llm.c .bin, HF model.safetensors (file or folder), a pretrained model "
                        "(gpt2, gpt2-medium, gpt2-large, gpt2-xl, ORG/NAME, hf:ORG/NAME[@REV]: Hugging Face "
                        "cache, else downloaded), or a size for a seeded random init (d12, d24, d36, d48, L4H4C128)")
    p.add_argument("--seed", type=SEED, default=0, help="seed for random init and sampling (default 0)")


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="onnxruntime", choices=sorted(REGISTRY),
                   help="execution backend (default onnxruntime, CPU)")
    p.add_argument("--no-opt", action="store_true", help="run the unoptimised graphs (no fusion passes)")
    add_precision_arg(p, "bf16 mixed precision: BF16 compute, FP32 master weights, Adam state, "
                         "layer-norm statistics, softmax and loss; on onnxruntime bf16 is an exact emulation "
                         "in FP32 with values rounded to bf16 where the BF16 graph holds them")


def add_precision_arg(p: argparse.ArgumentParser, what: str = "") -> None:
    """``--precision fp32|bf16`` (graphc.precision.PRECISIONS), default fp32."""
    from graphc.precision import PRECISIONS

    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="compute precision (default fp32)" + (f"; {what}" if what else ""))


def int_at_least(name: str, minimum: int, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum]; argparse names the flag in the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def positive(name: str):
    return int_at_least(name, 1)


SEED = int_at_least("--seed", 0, 2**32 - 1)
"""Seeds feed numpy's generators, which take 0 .. 2**32 - 1."""


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False):
    """An argparse type: a finite float in the given range (``nan``/``inf`` never train well).

    ``number(0, low_open=True)`` is ``> 0``; ``number(0, 1, high_open=True)`` is ``[0, 1)``.
    """
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    where = f"in {lo}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if ((low is not None and (value < low or (low_open and value == low)))
                or (high is not None and (value > high or (high_open and value == high)))):
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def check_seq_len(cfg: GPT2Config, T: int, flag: str = "-t") -> None:
    if T > cfg.max_seq_len:
        raise GraphcError(None, f"sequence length {T} exceeds the model's maximum {cfg.max_seq_len}", flag)
