"""The batched decode program with slots: what ``graphc generate`` and the server drive.

A :class:`Decoder` owns a fixed number of *slots*, each one sequence's place in the
preallocated KV cache (``[slots, H, capacity, D]`` per layer and kind, allocated by the
backend). Sequences come and go independently:

* :meth:`Decoder.add` puts a prompt into a free slot: it *prefills* the slot's cache rows
  and samples the sequence's first new token (with that sequence's own seeded
  :class:`~graphc.runtime.sampling.Sampler`);
* :meth:`Decoder.step` advances every live sequence by one token: one decode graph run for
  the whole batch, each row at its own length and position, each sampled by its own sampler;
* :meth:`Decoder.remove` frees a slot for the next request.

:meth:`Decoder.submit` is the non-blocking form of ``add`` that a server uses: it reserves
the slot and returns at once; the first token comes out of a later ``step()`` like any other
token. A backend with *chunked prefill* (the CUDA decoder) advances queued prompts a chunk
per step, in the same pass as the running sequences' decode rows, so a long prompt does not
stall them; the default here prefills at once and hands the first token out with the next step.

Because every sequence has its own length, position and random stream, a sequence's
tokens do not depend on what else shares the batch (given batch-invariant kernels).

:class:`GraphDecoder` is the generic version over a backend's :meth:`prepare` (onnxruntime
today): the prefill graph runs on the slot's own cache rows (a contiguous view, updated in
place by ``TensorScatter``), and the decode graph over slots ``0..k-1`` where ``k`` is one
past the highest live slot (slots are handed out lowest first), so a finished sequence at
the end of the batch stops costing work; a dead slot inside that range is fed a harmless
token at position 0 and its output ignored.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np

from graphc.errors import GraphcError
from graphc.models.gpt2 import build_forward
from graphc.models.kv_cache import build_decode, build_prefill, cache_shape, past_name, present_name
from graphc.runtime.programs import DeviceParams, compile_graph
from graphc.runtime.sampling import Sampler


@dataclasses.dataclass(frozen=True)
class Sampled:
    """One sampled token, with log-probabilities when its sequence asked for them.

    ``logprob`` is log p(token) under the model's distribution (log-softmax of the logits,
    before temperature/top-k/top-p), ``top`` the ``k`` most likely (token, logprob) pairs."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def top_logprobs(logp: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The ``k`` largest entries of one row of log-probabilities, most likely first."""
    if k <= 0:
        return ()
    idx = np.argpartition(-logp, k - 1)[:k]
    idx = idx[np.argsort(-logp[idx], kind="stable")]
    return tuple((int(i), float(logp[i])) for i in idx)


def sample_row(logits_row: np.ndarray, sampler: Sampler, logprobs: int | None) -> Sampled:
    """Sample one token from ``logits_row`` [1, V] with ``sampler``; logprobs if asked."""
    token = int(sampler(logits_row)[0])
    if logprobs is None:
        return Sampled(token)
    logp = log_softmax(logits_row[0])
    return Sampled(token, float(logp[token]), top_logprobs(logp, logprobs))


@dataclasses.dataclass
class DecodeSpec:
    slots: int                 # sequences decoded together at most
    capacity: int              # cache positions per sequence (prompt + new tokens)
    precision: str = "fp32"
    opt: bool = True


class Decoder(abc.ABC):
    """Batched decoding over slots; see the module docstring."""

    spec: DecodeSpec

    @abc.abstractmethod
    def add(self, prompt: list[int], sampler: Sampler, *, logprobs: int | None = None) -> tuple[int, Sampled]:
        """Prefill ``prompt`` into a free slot; returns (slot, its first sampled token).

        ``logprobs=k`` asks for log-probabilities (and the top ``k``) with every token of
        this sequence."""

    @abc.abstractmethod
    def step(self) -> dict[int, Sampled]:
        """One new token for every live slot: {slot: token}. A submitted sequence's first
        token appears in the step that finishes its prefill; until then it has no entry."""

    def submit(self, prompt: list[int], sampler: Sampler, *, logprobs: int | None = None) -> int:
        """Reserve a slot for ``prompt`` and return it at once; its first token comes out of
        a later :meth:`step`. Errors (the prompt does not fit, no free slot) as ``add``.

        Default: prefill now (``add``) and hold the first token for the next step;
        :meth:`_take_held` gives a ``step`` the held tokens (their slots skip that step)."""
        slot, first = self.add(prompt, sampler, logprobs=logprobs)
        self._held_tokens()[slot] = first
        return slot

    def _held_tokens(self) -> dict[int, Sampled]:
        if "_held" not in self.__dict__:
            self._held: dict[int, Sampled] = {}
        return self._held

    def _take_held(self) -> dict[int, Sampled]:
        held, self._held = dict(self._held_tokens()), {}
        return held

    @abc.abstractmethod
    def score(self, prompt: list[int], logprobs: int = 0) -> list[Sampled | None]:
        """Log-probabilities of each prompt token given the ones before it (None for the
        first): prompt scoring, as evaluation harnesses ask (``echo`` + ``logprobs``)."""

    @abc.abstractmethod
    def remove(self, slot: int) -> None: ...

    @property
    @abc.abstractmethod
    def live(self) -> list[int]:
        """The slots holding a sequence, in slot order."""

    @property
    def free(self) -> int:
        return self.spec.slots - len(self.live)

    def admit(self, n: int) -> int:
        """The free slot (lowest first) for a prompt of ``n`` tokens; one-line errors when the
        prompt does not fit the cache (with room for one new token) or every slot is busy."""
        if not 1 <= n < self.spec.capacity:
            raise GraphcError(None, f"prompt of {n} tokens does not fit a cache of {self.spec.capacity} "
                              "positions (it needs room for at least one new token)", "prompt")
        used = set(self.live)
        slot = next((s for s in range(self.spec.slots) if s not in used), None)
        if slot is None:
            raise GraphcError(None, f"all {self.spec.slots} slots are busy", "slots")
        return slot

    def length(self, slot: int) -> int:
        """Tokens in the slot's cache so far (prompt + generated tokens already fed back)."""
        raise NotImplementedError


@dataclasses.dataclass
class _Sequence:
    sampler: Sampler
    length: int           # tokens in the cache
    last: int             # the last sampled token, fed at the next step
    logprobs: int | None  # top-k log-probabilities wanted with each token (None: none)


class GraphDecoder(Decoder):
    def __init__(self, backend, params: DeviceParams, spec: DecodeSpec):
        if spec.slots < 1 or spec.capacity < 1:
            raise ValueError(f"a decoder needs >= 1 slot and capacity, got {spec}")
        if spec.capacity > params.cfg.max_seq_len:
            raise GraphcError(None, f"cache capacity {spec.capacity} exceeds the model's maximum sequence "
                              f"length {params.cfg.max_seq_len}", "--max-new-tokens")
        self.backend, self.params, self.spec = backend, params, spec
        cfg = params.cfg
        self.cfg = cfg
        views = params.views()
        self.prefill = backend.prepare(compile_graph(build_prefill(cfg), "infer", opt=spec.opt, backend=backend.name,
                                                     precision=spec.precision))
        self.prefill.bind(views)
        self.decode = backend.prepare(compile_graph(build_decode(cfg), "infer", opt=spec.opt, backend=backend.name,
                                                    precision=spec.precision))
        self.decode.bind(views)
        shape = cache_shape(cfg, spec.slots, spec.capacity)
        self.caches = {past_name(layer, kind): backend.alloc(shape, np.float32)
                       for layer in range(cfg.n_layer) for kind in ("key", "value")}
        self.seqs: dict[int, _Sequence] = {}
        self._scorer = None

    # ------------------------------------------------------------------ helpers
    def _cache_rows(self, start: int, stop: int) -> tuple[dict, dict]:
        """(past feeds, present outputs) for slots start..stop-1: the same buffers (in place)."""
        per = self.spec.capacity * self.cfg.n_head * self.cfg.head_dim
        shape = cache_shape(self.cfg, stop - start, self.spec.capacity)
        past = {name: buf.view(start * per, shape) for name, buf in self.caches.items()}
        present = {present_name(layer, kind): past[past_name(layer, kind)]
                   for layer in range(self.cfg.n_layer) for kind in ("key", "value")}
        return past, present

    @property
    def live(self) -> list[int]:
        return sorted(self.seqs)

    def length(self, slot: int) -> int:
        return self.seqs[slot].length

    # ------------------------------------------------------------------ program
    def add(self, prompt: list[int], sampler: Sampler, *, logprobs: int | None = None) -> tuple[int, Sampled]:
        n = len(prompt)
        slot = self.admit(n)
        past, present = self._cache_rows(slot, slot + 1)
        logits = self.prefill.run({"tokens": np.asarray([prompt], dtype=np.int64),
                                   "lengths": np.asarray([n], dtype=np.int64), **past}, outputs=present)["logits"]
        first = sample_row(logits, sampler, logprobs)
        self.seqs[slot] = _Sequence(sampler, n, first.token, logprobs)
        return slot, first

    def step(self) -> dict[int, Sampled]:
        held = self._take_held()          # submitted sequences: their first token, no decode yet
        running = {slot: seq for slot, seq in self.seqs.items() if slot not in held}
        if not running:
            return held
        # at least two rows: onnxruntime's CPU GEMMs take another path for a single row, whose
        # last bits differ, and a sequence must get the same logits alone as in any batch
        # (rows of free slots write only their own, unused cache position 0)
        k = max(max(self.seqs) + 1, min(2, self.spec.slots))
        tokens = np.zeros((k, 1), dtype=np.int64)
        past_len = np.zeros(k, dtype=np.int64)
        for slot, seq in self.seqs.items():
            if slot in running and seq.length >= self.spec.capacity:
                raise GraphcError(None, f"slot {slot} is full ({self.spec.capacity} positions)", "capacity")
            # a held slot is fed its own next row too (not position 0, which holds its prompt):
            # the K/V it writes at its length are rewritten by the step that samples there
            tokens[slot, 0], past_len[slot] = seq.last, seq.length
        past, present = self._cache_rows(0, k)
        logits = self.decode.run({"tokens": tokens, "past_len": past_len, **past}, outputs=present)["logits"][:, -1]
        out = held
        for slot, seq in running.items():
            seq.length += 1
            out[slot] = sample_row(logits[slot:slot + 1], seq.sampler, seq.logprobs)
            seq.last = out[slot].token
        return out

    def score(self, prompt: list[int], logprobs: int = 0) -> list[Sampled | None]:
        if not 1 <= len(prompt) <= self.cfg.max_seq_len:
            raise GraphcError(None, f"prompt of {len(prompt)} tokens: the model takes 1..{self.cfg.max_seq_len}",
                              "prompt")
        if self._scorer is None:
            self._scorer = self.backend.prepare(compile_graph(
                build_forward(self.cfg, loss=False, logits=True), "infer", opt=self.spec.opt,
                backend=self.backend.name, precision=self.spec.precision))
            self._scorer.bind(self.params.views())
        logits = self._scorer.run({"tokens": np.asarray([prompt], dtype=np.int64)})["logits"][0]   # [T, V]
        logp = log_softmax(logits[:-1])
        return [None] + [Sampled(t, float(row[t]), top_logprobs(row, logprobs)) for t, row in zip(prompt[1:], logp)]

    def remove(self, slot: int) -> None:
        self.seqs.pop(slot, None)
        self._held_tokens().pop(slot, None)
