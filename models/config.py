"""GPT-2 configurations: the named sizes for a random init, and custom L/H/C.

The random-init sizes have names of their own (``d12`` .. ``d48``, llm.c's): ``gpt2`` ..
``gpt2-xl`` mean OpenAI's pretrained weights (:mod:`graphc.models.hub`), never a random init.

The vocabulary is GPT-2's 50,257 BPE tokens; llm.c pads the embedding table to a multiple
of 128 (50,304) so its GEMMs tile evenly, and so does graphc. Only the first
``vocab_size`` rows are real: the LM head and the loss use those alone.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from graphc.errors import GraphcError

GPT2_VOCAB = 50257
MAX_T = 1024


def padded(vocab_size: int, multiple: int = 128) -> int:
    return (vocab_size + multiple - 1) // multiple * multiple


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = GPT2_VOCAB
    padded_vocab_size: int = padded(GPT2_VOCAB)
    max_seq_len: int = MAX_T
    ln_eps: float = 1e-5

    def __post_init__(self):
        for field in ("n_layer", "n_head", "n_embd", "vocab_size", "padded_vocab_size", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise GraphcError(None, f"{field} must be an integer, got {value!r}", "config")
            if value < 1:
                raise GraphcError(None, f"{field} must be positive, got {value}", "config")
        if not isinstance(self.ln_eps, (int, float)) or not 0 < self.ln_eps < 1:
            raise GraphcError(None, f"ln_eps must be a number in (0, 1), got {self.ln_eps!r}", "config")
        if self.n_embd % self.n_head:
            raise GraphcError(None, f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}", "config")
        if self.padded_vocab_size < self.vocab_size:
            raise GraphcError(None, "padded vocab is smaller than vocab", "config")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def describe(self) -> str:
        return (f"L={self.n_layer} H={self.n_head} C={self.n_embd} V={self.vocab_size} "
                f"Vp={self.padded_vocab_size} maxT={self.max_seq_len}")


NAMED_SIZES: dict[str, tuple[int, int, int]] = {
    "d12": (12, 12, 768),
    "d24": (24, 16, 1024),
    "d36": (36, 20, 1280),
    "d48": (48, 25, 1600),
}
_CUSTOM = re.compile(r"^L(\d+)[-_]?H(\d+)[-_]?C(\d+)$", re.IGNORECASE)


def named_config(name: str) -> GPT2Config:
    """``d12`` ... ``d48``, or a custom ``L4H4C128`` (also ``l4-h4-c128``).

    A degenerate or oversized name (``L0H4C128``, ``L4H3C128``, ``L1H1C10000000``) is a
    one-line error naming it, with the memory its weights would need.
    """
    key = name.lower()
    m = _CUSTOM.match(name)
    if key in NAMED_SIZES or m:
        L, H, C = NAMED_SIZES[key] if key in NAMED_SIZES else map(int, m.groups())
        try:
            cfg = GPT2Config(n_layer=L, n_head=H, n_embd=C)
        except GraphcError as e:
            raise GraphcError(name, e.message, "--model") from None
        require_fits_in_memory(cfg, name, "--model")
        return cfg
    known = ", ".join(NAMED_SIZES)
    raise GraphcError(name, f"unknown model size (known: {known}, or custom like L4H4C128)", "--model")


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def require_fits_in_memory(cfg: GPT2Config, where, field: str, memory: int | None = None) -> None:
    """The weights alone must fit in this machine's memory (training needs about 4x: grads, m, v)."""
    from graphc.models.params import num_parameters
    from graphc.outputs import human_bytes

    memory = memory if memory is not None else physical_memory()
    need = 4 * num_parameters(cfg)
    if memory is not None and need > memory:
        raise GraphcError(where, f"its weights need {human_bytes(need)} (float32) but this machine has "
                          f"{human_bytes(memory)} of memory", field)


def is_named_config(name: str) -> bool:
    return name.lower() in NAMED_SIZES or bool(_CUSTOM.match(name))
