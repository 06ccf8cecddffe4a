"""GPT-2 configurations: the named sizes for a random init, and custom L/H/C.

The random-init sizes have names of their own (``d12`` .. ``d48``, llm.c's): ``gpt2`` ..
``gpt2-xl`` mean OpenAI's pretrained weights (:mod:`graphc.models.hub`), never a random init.

The vocabulary is GPT-2's 50,257 BPE tokens; llm.c pads the embedding table to a multiple
of 128 (50,304) so its GEMMs tile evenly, and so does graphc. Only the first
``vocab_size`` rows are real: the LM head and the loss use those alone.
"""

from __future__ import annotations

import dataclasses
import re

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
    """``d12`` ... ``d48``, or a custom ``L4H4C128`` (also ``l4-h4-c128``)."""
    key = name.lower()
    if key in NAMED_SIZES:
        L, H, C = NAMED_SIZES[key]
        return GPT2Config(n_layer=L, n_head=H, n_embd=C)
    m = _CUSTOM.match(name)
    if m:
        L, H, C = map(int, m.groups())
        return GPT2Config(n_layer=L, n_head=H, n_embd=C)
    known = ", ".join(NAMED_SIZES)
    raise GraphcError(name, f"unknown model size (known: {known}, or custom like L4H4C128)", "--model")


def is_named_config(name: str) -> bool:
    return name.lower() in NAMED_SIZES or bool(_CUSTOM.match(name))
