"""Flags and checks shared by several commands (one definition, many users)."""

from __future__ import annotations

import argparse

from graphc.backends import REGISTRY
from graphc.errors import GraphcError
from graphc.models.config import GPT2Config


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="llm.c .bin, HF model.safetensors (file or folder), a pretrained model "
                        "(gpt2, gpt2-medium, gpt2-large, gpt2-xl, ORG/NAME, hf:ORG/NAME[@REV]: Hugging Face "
                        "cache, else downloaded), or a size for a seeded random init (d12, d24, d36, d48, L4H4C128)")
    p.add_argument("--seed", type=int, default=0, help="seed for random init and sampling (default 0)")


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


def int_at_least(name: str, minimum: int):
    """An argparse type: an integer >= ``minimum``, with a message naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
        return value

    return parse


def positive(name: str):
    return int_at_least(name, 1)


def check_seq_len(cfg: GPT2Config, T: int, flag: str = "-t") -> None:
    if T > cfg.max_seq_len:
        raise GraphcError(flag, f"sequence length {T} exceeds the model's maximum {cfg.max_seq_len}", "T")
