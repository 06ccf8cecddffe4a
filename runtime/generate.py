"""Autoregressive generation for GPT-2, with or without the KV cache.

With the cache (the default) a batch of prompts is generated as

1. **prefill**: the prompts, right-padded to the longest, run once through
   :func:`graphc.models.kv_cache.build_prefill`; each sequence's K/V land in slots
   ``0..len-1`` of per-layer caches ``[B, H, capacity, D]`` preallocated here with
   ``capacity = longest prompt + max_new_tokens``, and the logits of each prompt's last
   token come back;
2. **decode**: one token per sequence per step through
   :func:`graphc.models.kv_cache.build_decode`, which writes the new K/V at slot
   ``past_len[b]`` (each sequence its own length) and attends over the cache, masked by
   position.

The cache arrays are passed as the graphs' ``past.*`` inputs *and* bound as their
``present.*`` outputs, so TensorScatter updates them in place: no per-token copies or
reallocations, and parameters are bound once.

Without the cache (``kv_cache=False``) every step recomputes the whole sequence with the
plain forward graph: the slow, obviously-correct reference the cache must agree with.

Each sequence stops at ``<|endoftext|>`` (kept as its last token) or after
``max_new_tokens``; a batch finishes when all its sequences have.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from graphc.backends import get_backend
from graphc.errors import GraphcError
from graphc.models.gpt2 import build_forward
from graphc.models.kv_cache import build_decode, build_prefill, cache_shape, past_name, present_name
from graphc.models.params import Params
from graphc.runtime.programs import optimize, prepare
from graphc.runtime.sampling import Sampler

EOT = 50256


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, cfg, flag: str = "--prompt"
                  ) -> list[list[int]]:
    """Validated prompts as lists of ints, or a one-line :class:`GraphcError`."""
    if max_new_tokens < 0:
        raise GraphcError(None, f"must be >= 0, got {max_new_tokens}", "--max-new-tokens")
    if not prompts:
        raise GraphcError(None, "no prompt given", flag)
    out = []
    for i, prompt in enumerate(prompts):
        where = flag if len(prompts) == 1 else f"{flag} #{i + 1}"
        ids = [int(t) for t in prompt]
        if not ids:
            raise GraphcError(None, "prompt is empty (it must have at least one token)", where)
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GraphcError(None, f"token id {bad[0]} is outside the vocabulary (0..{cfg.vocab_size - 1})", where)
        if len(ids) > cfg.max_seq_len:
            raise GraphcError(None, f"prompt has {len(ids)} tokens, more than the model's maximum sequence length "
                              f"{cfg.max_seq_len}", where)
        if len(ids) + max_new_tokens > cfg.max_seq_len:
            raise GraphcError(None, f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the model's "
                              f"maximum sequence length {cfg.max_seq_len} (lower --max-new-tokens)", where)
        out.append(ids)
    return out


class Generator:
    """Generate continuations of token-id prompts with one model on one backend."""

    def __init__(self, params: Params, *, kv_cache: bool = True, backend: str = "onnxruntime",
                 eot: int | None = EOT, opt: bool = True):
        self.params = params
        self.opt = opt
        self.cfg = params.cfg
        self.kv_cache = kv_cache
        get_backend(backend)  # a one-line error now for an unusable backend, not at the first prompt
        self.backend_name = backend
        self.eot = eot
        self._programs: dict[str, object] = {}

    def _program(self, kind: str):
        if kind not in self._programs:
            model = {"prefill": lambda: build_prefill(self.cfg),
                     "decode": lambda: build_decode(self.cfg),
                     "forward": lambda: build_forward(self.cfg, loss=False, logits=True)}[kind]()
            if self.opt:
                model = optimize(model, "infer")
            self._programs[kind] = prepare(model, self.params, self.backend_name)
        return self._programs[kind]

    # ------------------------------------------------------------------ public
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 sampler: Sampler | None = None) -> list[list[int]]:
        """The generated ids of each prompt (ending with EOT where a sequence stopped on it)."""
        prompts = check_prompts(prompts, max_new_tokens, self.cfg)
        sampler = sampler if sampler is not None else Sampler(temperature=0.0)
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        steps = self._kv_steps if self.kv_cache else self._full_steps
        B = len(prompts)
        out: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, dtype=bool)
        gen = steps(prompts, max_new_tokens)
        logits = next(gen)
        for step in range(max_new_tokens):
            tokens = sampler(logits)                                       # [B]
            for b in np.flatnonzero(~done):
                out[b].append(int(tokens[b]))
            if self.eot is not None:
                done |= tokens == self.eot
            if done.all() or step == max_new_tokens - 1:
                break
            logits = gen.send(tokens)
        gen.close()
        return out

    # ------------------------------------------------------------------ step loops
    def _kv_steps(self, prompts: list[list[int]], max_new_tokens: int):
        """Yields logits [B, V]; is sent the tokens chosen from them."""
        cfg, B = self.cfg, len(prompts)
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        T = int(lengths.max())
        capacity = T + max_new_tokens
        tokens = np.zeros((B, T), dtype=np.int64)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = p
        caches = {}
        for layer in range(cfg.n_layer):
            for kind in ("key", "value"):
                caches[past_name(layer, kind)] = np.zeros(cache_shape(cfg, B, capacity), dtype=np.float32)
        # present.* are written straight into the past.* buffers (TensorScatter in place)
        in_place = {present_name(layer, kind): caches[past_name(layer, kind)]
                    for layer in range(cfg.n_layer) for kind in ("key", "value")}
        logits = self._program("prefill").run({"tokens": tokens, "lengths": lengths, **caches},
                                              outputs=in_place)["logits"]
        decode = self._program("decode")
        past_len = lengths.copy()
        while True:
            new = yield logits
            logits = decode.run({"tokens": np.asarray(new, dtype=np.int64).reshape(B, 1), "past_len": past_len,
                                 **caches}, outputs=in_place)["logits"][:, -1]
            past_len += 1

    def _full_steps(self, prompts: list[list[int]], max_new_tokens: int):
        """The reference: recompute every sequence from scratch at each step."""
        forward = self._program("forward")
        seqs = [list(p) for p in prompts]
        B = len(seqs)
        while True:
            lengths = np.array([len(s) for s in seqs], dtype=np.int64)
            tokens = np.zeros((B, int(lengths.max())), dtype=np.int64)
            for b, s in enumerate(seqs):
                tokens[b, :len(s)] = s
            logits = forward.run({"tokens": tokens})["logits"]                  # [B, T, V]
            new = yield logits[np.arange(B), lengths - 1]
            for b in range(B):
                seqs[b].append(int(new[b]))


def generate(params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0, seed: int | None = 0,
             kv_cache: bool = True, backend: str = "onnxruntime", eot: int | None = EOT, opt: bool = True,
             ) -> list[list[int]]:
    """One-call generation: ``generate(params, [[464, 3290]], 20)`` -> ``[[...20 ids...]]``."""
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return Generator(params, kv_cache=kv_cache, backend=backend, eot=eot, opt=opt).generate(
        prompts, max_new_tokens, sampler)


def sample_text(params: Params, max_new_tokens: int = 64, *, seed: int = 0, backend: str = "onnxruntime",
                opt: bool = True) -> str:
    """A sample from ``<|endoftext|>``, sampled from the full distribution (as llm.c's trainer)."""
    from graphc.data.tokenizer import Tokenizer

    ids = generate(params, [[EOT]], max_new_tokens, temperature=1.0, seed=seed, backend=backend, opt=opt)[0]
    return Tokenizer().decode([t for t in ids if t != EOT])
