"""Autoregressive generation for GPT-2, with or without the KV cache.

With the cache (the default) a batch of prompts runs on the backend's batched decode
program (:class:`graphc.runtime.decode.Decoder`): each prompt is prefilled into its own slot
of a preallocated cache (``capacity = longest prompt + max_new_tokens``) and then every live
sequence advances one token per decode step, at its own length and position. The cache is
updated in place by the graphs' ``TensorScatter`` (no per-token copies), parameters are
bound once, and each sequence samples with its own seeded random stream
(:meth:`Sampler.for_sequence`), so a prompt's tokens do not depend on the others in the batch.

Without the cache (``kv_cache=False``) every step recomputes the whole sequence with the
plain forward graph: the slow, obviously-correct reference the cache must agree with.

Each sequence stops at ``<|endoftext|>`` (kept as its last token) or after
``max_new_tokens``; a finished sequence leaves the batch (its slot is freed).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from graphc.backends import get_backend
from graphc.errors import GraphcError
from graphc.models.gpt2 import build_forward
from graphc.models.params import Params
from graphc.runtime.decode import DecodeSpec
from graphc.runtime.programs import compile_graph
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
                 eot: int | None = EOT, opt: bool = True, precision: str = "fp32"):
        self.cfg = params.cfg
        self.kv_cache = kv_cache
        self.backend = get_backend(backend)()  # a one-line error now for an unusable backend
        self.params = self.backend.upload_params(params)
        self.eot, self.opt, self.precision = eot, opt, precision
        self._forward = None

    # ------------------------------------------------------------------ public
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 sampler: Sampler | None = None) -> list[list[int]]:
        """The generated ids of each prompt (ending with EOT where a sequence stopped on it).

        ``sampler`` gives the settings and the seed; sequence ``i`` samples with its own
        stream, ``sampler.for_sequence(i)``."""
        prompts = check_prompts(prompts, max_new_tokens, self.cfg)
        sampler = sampler if sampler is not None else Sampler(temperature=0.0)
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        samplers = [sampler.for_sequence(i) for i in range(len(prompts))]
        run = self._with_cache if self.kv_cache else self._without_cache
        return run(prompts, max_new_tokens, samplers)

    def _finished(self, seq: list[int], max_new_tokens: int) -> bool:
        return len(seq) >= max_new_tokens or (self.eot is not None and seq[-1] == self.eot)

    # ------------------------------------------------------------------ step loops
    def _with_cache(self, prompts, max_new_tokens, samplers) -> list[list[int]]:
        capacity = max(len(p) for p in prompts) + max_new_tokens
        decoder = self.backend.decoder(self.params, DecodeSpec(len(prompts), capacity, self.precision, self.opt))
        out: list[list[int]] = [[] for _ in prompts]
        slot_of = {}
        for i, (prompt, sampler) in enumerate(zip(prompts, samplers)):
            slot, first = decoder.add(prompt, sampler)
            out[i].append(first.token)
            if self._finished(out[i], max_new_tokens):
                decoder.remove(slot)
            else:
                slot_of[slot] = i
        while slot_of:
            for slot, sampled in decoder.step().items():
                i = slot_of[slot]
                out[i].append(sampled.token)
                if self._finished(out[i], max_new_tokens):
                    decoder.remove(slot)
                    del slot_of[slot]
        return out

    def _without_cache(self, prompts, max_new_tokens, samplers) -> list[list[int]]:
        """The reference: recompute every live sequence from scratch at each step."""
        if self._forward is None:
            model = compile_graph(build_forward(self.cfg, loss=False, logits=True), "infer", opt=self.opt,
                                  backend=self.backend.name, precision=self.precision)
            self._forward = self.backend.prepare(model)
            self._forward.bind(self.params.views())
        seqs = [list(p) for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        while live:
            lengths = np.array([len(seqs[i]) for i in live], dtype=np.int64)
            tokens = np.zeros((len(live), int(lengths.max())), dtype=np.int64)
            for row, i in enumerate(live):
                tokens[row, :len(seqs[i])] = seqs[i]
            logits = self._forward.run({"tokens": tokens})["logits"]            # [b, T, V]
            for row, i in enumerate(live):
                token = int(samplers[i](logits[row:row + 1, lengths[row] - 1])[0])
                seqs[i].append(token)
                out[i].append(token)
            live = [i for i in live if not self._finished(out[i], max_new_tokens)]
        return out


def generate(params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0, seed: int | None = 0,
             kv_cache: bool = True, backend: str = "onnxruntime", eot: int | None = EOT, opt: bool = True,
             precision: str = "fp32") -> list[list[int]]:
    """One-call generation: ``generate(params, [[464, 3290]], 20)`` -> ``[[...20 ids...]]``."""
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return Generator(params, kv_cache=kv_cache, backend=backend, eot=eot, opt=opt, precision=precision).generate(
        prompts, max_new_tokens, sampler)


def sample_text(params: Params, max_new_tokens: int = 64, *, seed: int = 0, backend: str = "onnxruntime",
                opt: bool = True, precision: str = "fp32") -> str:
    """A sample from ``<|endoftext|>``, sampled from the full distribution (as llm.c's trainer)."""
    from graphc.data.tokenizer import Tokenizer

    ids = generate(params, [[EOT]], max_new_tokens, temperature=1.0, seed=seed, backend=backend, opt=opt,
                   precision=precision)[0]
    return Tokenizer().decode([t for t in ids if t != EOT])
