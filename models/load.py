"""Resolve a ``--model`` argument to parameters.

Accepted, in this order: an llm.c checkpoint (``.bin`` with magic 20240326), a Hugging
Face ``model.safetensors`` file or a folder holding one, or a named size (``d12``,
``gpt2-medium``, ``L4H4C128``...) for a seeded random init. Formats are a registry of
(probe, loader) pairs, so adding one is adding a row.
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


def _is_safetensors(path: Path) -> bool:
    return (path.is_dir() and (path / "model.safetensors").exists()) or path.suffix == ".safetensors"


FORMATS: list[tuple[str, Callable[[Path], bool], Callable[[Path], Params]]] = [
    ("llm.c checkpoint", lambda p: p.is_file() and is_llmc_file(p), load_llmc),
    ("Hugging Face safetensors", _is_safetensors, load_hf),
]


def load_model(spec: str | os.PathLike, seed: int = 0) -> Params:
    path = Path(spec)
    if path.exists():
        for _, probe, loader in FORMATS:
            if probe(path):
                return loader(path)
        if path.is_file() and path.suffix == ".bin":
            return load_llmc(path)  # reports the bad magic precisely
        raise GraphcError(path, "not an llm.c .bin, a .safetensors file, or a folder with model.safetensors", "--model")
    if is_named_config(str(spec)):
        return random_init(named_config(str(spec)), seed)
    raise GraphcError(spec, "no such file, and not a named size (d12, gpt2-medium, L4H4C128, ...)", "--model")
