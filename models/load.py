"""Resolve a ``--model`` argument to parameters.

Accepted, in this order: an llm.c checkpoint (``.bin`` with magic 20240326), a Hugging
Face ``model.safetensors`` file or a folder holding one, a pretrained model on the Hugging
Face Hub (``gpt2`` .. ``gpt2-xl``, ``openai-community/gpt2``, ``hf:ORG/NAME[@REV]``: read
from the local Hugging Face cache, else downloaded), or a random-init size (``d12`` ..
``d48``, ``L4H4C128``) for a seeded random init. Sources are a registry of (name, probe,
loader) rows, so adding one is adding a row; local files come first, so a folder named
``gpt2`` holding a ``model.safetensors`` is that folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from graphc.errors import GraphcError
from graphc.models.config import is_named_config, named_config
from graphc.models.hf import load_hf
from graphc.models.init import random_init
from graphc.models.llmc import is_llmc_file, load_llmc
from graphc.models.params import Params


def _is_safetensors(spec: str) -> bool:
    path = Path(spec)
    return (path.is_dir() and (path / "model.safetensors").exists()) or (
        path.exists() and path.suffix == ".safetensors")


def _is_hub_model(spec: str) -> bool:
    from graphc.models.hub import parse_hub_spec

    return not Path(spec).exists() and parse_hub_spec(spec) is not None


def _load_pretrained(spec: str, seed: int) -> Params:
    from graphc.models.hub import fetch, parse_hub_spec

    return load_hf(fetch(parse_hub_spec(spec)))


SOURCES: list[tuple[str, Callable[[str], bool], Callable[[str, int], Params]]] = [
    ("llm.c checkpoint", lambda s: Path(s).is_file() and is_llmc_file(s), lambda s, seed: load_llmc(s)),
    ("Hugging Face safetensors", _is_safetensors, lambda s, seed: load_hf(s)),
    ("pretrained, from the Hugging Face Hub", _is_hub_model, _load_pretrained),
    ("random init", lambda s: not Path(s).exists() and is_named_config(s),
     lambda s, seed: random_init(named_config(s), seed)),
]


def load_model(spec: str | os.PathLike, seed: int = 0) -> Params:
    spec = os.fspath(spec)
    for _, probe, loader in SOURCES:
        if probe(spec):
            return loader(spec, seed)
    path = Path(spec)
    if path.is_file() and path.suffix == ".bin":
        return load_llmc(path)  # reports the bad magic precisely
    if path.exists():
        raise GraphcError(path, "not an llm.c .bin, a .safetensors file, or a folder with model.safetensors", "--model")
    raise GraphcError(spec, "no such file, and not a pretrained name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                      "hf:ORG/NAME[@REV]) or a random-init size (d12, d24, d36, d48, L4H4C128, ...)", "--model")
