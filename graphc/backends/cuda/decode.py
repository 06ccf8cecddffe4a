"""The batched decode program on the GPU: prefill and decode as row passes, one CUDA graph per step.

A *pass* runs GPT-2 over ``M`` rows (a row = one token of one sequence, at its own cache
slot and position) and samples ``S`` of them, with the fused kernels of
``decode_kernels.py``: embed; per layer LN1+QKV (K/V written into the cache in place),
decode attention, projection+residual, LN2+FC+GELU, projection+residual; LNf+LM head over
the sampled rows only; sampling. Per-row and per-sample settings live in one small device
block (``meta``) that the pass copies in from pinned memory as its first operation, and the
sampled ids are copied out as its last, so

* a **decode step** over the ``k`` live sequences is one CUDA graph (captured once per
  ``k``) replayed: N tokens are N replays, no host work per layer, only ids come back;
* a **prefill** is the same pass over the prompt's rows in chunks (run eagerly), its last
  row sampled; the K/V of every prompt token land in the slot's cache rows;
* **chunked prefill** (``submit``, what the server uses): a queued prompt's rows ride along
  with a decode step's rows, ``prefill_per_step`` at a time, in one pass; the running
  sequences get their token from that same pass, so a long prompt slows their steps a little
  instead of stopping them for its whole prefill.

A finished sequence frees its slot and costs nothing in the next step (rows are the live
slots only). Every kernel's per-row arithmetic is independent of the other rows, so a
sequence's tokens are the same alone or in any batch; sampling uses the sequence's own seed
and token counter. Activations and accumulation are fp32; under ``bf16`` the weight
matrices (and the embedding) are bf16 copies of the fp32 parameters, the cache is bf16 and
every row GEMM runs on the tensor cores (``decode_mma.py``; fp32 keeps the CUDA-core GEMV).
Consecutive kernels use programmatic dependent launch: a GEMM's weights stream in while the
kernel before it finishes.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np

from graphc.backends.cuda import decode_kernels as DK
from graphc.backends.cuda import decode_mma as MMA
from graphc.backends.cuda.program import KernelStep
from graphc.errors import GraphcError
from graphc.runtime.decode import DecodeSpec, Decoder, Sampled, log_softmax, top_logprobs
from graphc.runtime.sampling import Sampler

PREFILL_CHUNK = 512          # rows per prefill pass
PREFILL_PER_STEP = 128       # prompt rows a step runs beside its decode rows (chunked prefill)
PDL = os.environ.get("GRAPHC_PDL", "1") != "0"   # programmatic dependent launch between decode kernels
MATRICES = ("wte", "qkvw", "attprojw", "fcw", "fcprojw")


def _bf16():
    from ml_dtypes import bfloat16

    return np.dtype(bfloat16)


@dataclasses.dataclass
class _Seq:
    sampler: Sampler
    seed: int
    length: int               # tokens in the cache
    count: int                # tokens sampled so far (the random stream's counter)
    logprobs: int | None


@dataclasses.dataclass
class _Pending:
    seq: _Seq
    prompt: list[int]
    done: int = 0             # prompt tokens already in the cache


class _Meta:
    """Per-row and per-sample int32/float32 arrays in one pinned block mirrored on the device."""

    ROW = ("row_slot", "row_pos", "row_tok")
    SAMPLE = ("s_row", "s_slot", "s_topk", "s_counter", "s_temp", "s_topp", "s_seed")

    def __init__(self, backend, rows: int, samples: int):
        from graphc.runtime.cuda import PinnedBuffer

        self.layout, off = {}, 0
        for name in self.ROW:
            self.layout[name] = (off, rows)
            off += rows
        for name in self.SAMPLE:
            n = 2 * samples if name == "s_seed" else samples
            self.layout[name] = (off, n)
            off += n
        self.words = off
        self.pinned = PinnedBuffer(4 * off)
        self.host = self.pinned.array(np.int32, (off,))
        self.device = backend.alloc((off,), np.int32)
        self.out_pinned = PinnedBuffer(4 * samples)
        self.out_host = self.out_pinned.array(np.int32, (samples,))
        self.out_device = backend.alloc((samples,), np.int32)

    def ptr(self, name: str) -> int:
        return self.device.ptr + 4 * self.layout[name][0]

    def put(self, name: str, values, dtype=np.int32) -> None:
        off, n = self.layout[name]
        a = np.asarray(values, dtype=dtype).view(np.int32).ravel()
        self.host[off:off + a.size] = a


class CudaDecoder(Decoder):
    def __init__(self, backend, params, spec: DecodeSpec):
        from graphc.runtime.cuda import DeviceBuffer

        cfg = params.cfg
        if spec.slots < 1 or spec.capacity < 1:
            raise ValueError(f"a decoder needs >= 1 slot and capacity, got {spec}")
        if spec.capacity > cfg.max_seq_len:
            raise GraphcError(None, f"cache capacity {spec.capacity} exceeds the model's maximum sequence "
                              f"length {cfg.max_seq_len}", "--max-new-tokens")
        if spec.precision not in ("fp32", "bf16"):
            raise GraphcError(None, f"precision {spec.precision!r}: the CUDA decoder runs fp32 or bf16", "--precision")
        if getattr(params.flat, "device", "cpu") != "cuda:0":
            params = backend.upload_params(params.to_host())
        self.backend, self.params, self.spec, self.cfg = backend, params, spec, cfg
        rt = backend.rt
        self.wdtype = _bf16() if spec.precision == "bf16" else np.dtype(np.float32)
        self.cdtype = self.wdtype
        # bf16: every row GEMM on the tensor cores (for every row count, so a sequence's
        # arithmetic is the same alone or in a batch); fp32 keeps the exact CUDA-core GEMV.
        self.tensor_cores = spec.precision == "bf16"
        flat = params.flat
        self.weights = flat if self.wdtype == np.float32 else backend.upload(
            flat.to_numpy().astype(self.wdtype))
        self.specs = {s.name: s for s in params.specs}
        C, H, L, V = cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size
        D, cap = cfg.head_dim, spec.capacity
        self.rows_max = max(spec.slots, min(PREFILL_CHUNK, cap))
        self.samples_max = max(spec.slots, 64)
        R, S = self.rows_max, self.samples_max
        alloc = backend.alloc
        self.x, self.q, self.att = alloc((R, C), np.float32), alloc((R, C), np.float32), alloc((R, C), np.float32)
        self.h = alloc((R, 4 * C), np.float32)
        self.logits = alloc((S, V), np.float32)
        splits = DK.attention_splits(cap)
        self.part_o = alloc((R * H * splits * D,), np.float32)
        self.part_ml = alloc((R * H * splits * 2,), np.float32)
        self.counters = alloc((R * H,), np.int32)
        self.kc = [alloc((spec.slots, H, cap, D), self.cdtype) for _ in range(L)]
        self.vc = [alloc((spec.slots, H, cap, D), self.cdtype) for _ in range(L)]
        self.last_token = alloc((spec.slots,), np.int32)
        self.meta = _Meta(backend, R, S)
        self.rt = rt
        self.seqs: dict[int, _Seq] = {}
        self.pending: dict[int, _Pending] = {}      # submitted, prefill not finished (oldest first)
        self.prefill_per_step = PREFILL_PER_STEP
        self._graphs: dict[int, object] = {}
        self._passes: dict[tuple, list] = {}
        self._thread = threading.get_ident()
        assert isinstance(self.x, DeviceBuffer)

    def _on_this_thread(self) -> None:
        """Make the device's context current on the calling thread: the server builds the
        decoder on the main thread and drives it from its engine thread, and a CUDA context
        is current per thread (a call from a thread without it fails with an invalid context)."""
        tid = threading.get_ident()
        if tid != self._thread:
            self.rt.device.set_current()
            self._thread = tid

    # ------------------------------------------------------------------ addresses
    def _p(self, name: str, layer: int | None = None) -> int:
        """fp32 parameter address (vectors: biases, layer norms, wpe)."""
        s = self.specs[name if layer is None else f"h{layer}.{name}"]
        return self.params.flat.ptr + 4 * s.offset

    def _w(self, name: str, layer: int | None = None) -> int:
        """Weight-matrix address in the compute dtype's copy."""
        s = self.specs[name if layer is None else f"h{layer}.{name}"]
        return self.weights.ptr + self.wdtype.itemsize * s.offset

    # ------------------------------------------------------------------ one pass
    def _kernel_steps(self, M: int, S: int) -> list:
        key = (M, S)
        if key in self._passes:
            return self._passes[key]
        cfg, spec, meta = self.cfg, self.spec, self.meta
        C, H, D, V = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.vocab_size
        cap, eps = spec.capacity, cfg.ln_eps
        I = lambda v: ("i64", int(v))  # noqa: E731 -- pointers and sizes as 64-bit ints
        slot, pos = meta.ptr("row_slot"), meta.ptr("row_pos")
        steps = []

        def gemv(K, N, ln, epi, x, rowmap, lnw, lnb, w, bias, out, rows, kc=0, vc=0):
            if self.tensor_cores:
                grid, block = MMA.mma_shape(K, N, rows)
                src, name = MMA.mma_gemm(K, N, ln=ln, epilogue=epi, eps=eps, heads=H, capacity=cap,
                                         cache_dtype=self.cdtype)
            else:
                r, c, grid, block = DK.gemv_shape(N, rows)
                src, name = DK.gemv(K, N, self.wdtype, ln=ln, epilogue=epi, eps=eps, heads=H, capacity=cap,
                                    cache_dtype=self.cdtype, rows=r, cols=c)
            steps.append(KernelStep(src, name, grid, block,
                                    [I(x), I(rowmap), I(lnw), I(lnb), I(w), I(bias), I(out), I(rows),
                                     I(slot), I(pos), I(kc), I(vc)], node=name))

        src, name = DK.embed(C, self.wdtype)
        steps.append(KernelStep(src, name, (M,), (256,), [I(self._w("wte")), I(self._p("wpe")), I(meta.ptr("row_tok")),
                                                          I(slot), I(pos), I(self.last_token.ptr), I(self.x.ptr)],
                                node="embed"))
        att_src, att_name = DK.decode_attention(H, D, cap, self.cdtype)
        for layer in range(cfg.n_layer):
            gemv(C, 3 * C, True, "qkv", self.x.ptr, 0, self._p("ln1.w", layer), self._p("ln1.b", layer),
                 self._w("attn.qkv.w", layer), self._p("attn.qkv.b", layer), self.q.ptr, M,
                 self.kc[layer].ptr, self.vc[layer].ptr)
            steps.append(KernelStep(att_src, att_name, (M, H, DK.attention_splits(cap)), (DK.CHUNK,),
                                    [I(self.q.ptr), I(self.kc[layer].ptr), I(self.vc[layer].ptr), I(slot), I(pos),
                                     I(self.part_o.ptr), I(self.part_ml.ptr), I(self.counters.ptr), I(self.att.ptr)],
                                    node="attention"))
            gemv(C, C, False, "residual", self.att.ptr, 0, 0, 0, self._w("attn.proj.w", layer),
                 self._p("attn.proj.b", layer), self.x.ptr, M)
            gemv(C, 4 * C, True, "gelu", self.x.ptr, 0, self._p("ln2.w", layer), self._p("ln2.b", layer),
                 self._w("mlp.fc.w", layer), self._p("mlp.fc.b", layer), self.h.ptr, M)
            gemv(4 * C, C, False, "residual", self.h.ptr, 0, 0, 0, self._w("mlp.proj.w", layer),
                 self._p("mlp.proj.b", layer), self.x.ptr, M)
        gemv(C, V, True, "plain", self.x.ptr, meta.ptr("s_row"), self._p("lnf.w"), self._p("lnf.b"),
             self._w("wte"), 0, self.logits.ptr, S)
        src, name = DK.sample(V)
        steps.append(KernelStep(src, name, (S,), (DK.SAMPLE_THREADS,),
                                [I(self.logits.ptr), I(meta.ptr("s_temp")), I(meta.ptr("s_topk")),
                                 I(meta.ptr("s_topp")), I(meta.ptr("s_seed")), I(meta.ptr("s_counter")),
                                 I(meta.ptr("s_slot")), I(meta.out_device.ptr), I(self.last_token.ptr)],
                                node="sample"))
        for step in steps[1:]:    # each kernel's prologue overlaps its predecessor (the embed follows a copy)
            step.pdl = PDL
        for step in steps:
            step.prepare(self.rt, self.backend.modules)
        self._passes[key] = steps
        return steps

    def _record(self, M: int, S: int, stream: int) -> None:
        from graphc.runtime.cuda.driver import memcpy_dtoh_async, memcpy_htod_async

        meta = self.meta
        memcpy_htod_async(meta.device.ptr, meta.pinned.ptr, 4 * meta.words, stream)
        for step in self._kernel_steps(M, S):
            step.record(stream)
        memcpy_dtoh_async(meta.out_pinned.ptr, meta.out_device.ptr, 4 * S, stream)

    def _set_samples(self, items: list[tuple[int, int, _Seq]]) -> None:
        """items: (row index, slot, sequence) for each sampled row, in output order."""
        meta = self.meta
        meta.put("s_row", [r for r, _, _ in items])
        meta.put("s_slot", [s for _, s, _ in items])
        meta.put("s_topk", [int(q.sampler.top_k or 0) for _, _, q in items])
        meta.put("s_counter", [q.count for _, _, q in items])
        meta.put("s_temp", [q.sampler.temperature for _, _, q in items], np.float32)
        meta.put("s_topp", [q.sampler.top_p for _, _, q in items], np.float32)
        meta.put("s_seed", [q.seed for _, _, q in items], np.uint64)

    def _sampled(self, items) -> list[Sampled]:
        out = []
        want = [i for i, (_, _, q) in enumerate(items) if q.logprobs is not None]
        rows = self._logits_rows(len(items)) if want else None
        for i, (_, _, q) in enumerate(items):
            token = int(self.meta.out_host[i])
            q.count += 1
            if q.logprobs is None:
                out.append(Sampled(token))
            else:
                logp = log_softmax(rows[i])
                out.append(Sampled(token, float(logp[token]), top_logprobs(logp, q.logprobs)))
        return out

    def _logits_rows(self, n: int) -> np.ndarray:
        return self.logits.to_numpy()[:n]

    def _prefill(self, slot: int, prompt: list[int], seq: _Seq | None) -> Sampled | None:
        """The prompt's rows through the model in chunks; samples the last row when ``seq``."""
        n, first = len(prompt), None
        for start in range(0, n, self.rows_max):
            chunk = prompt[start:start + self.rows_max]
            M = len(chunk)
            last = start + M == n
            self.meta.put("row_slot", [slot] * M)
            self.meta.put("row_pos", np.arange(start, start + M))
            self.meta.put("row_tok", chunk)
            items = [(M - 1, slot, seq)] if (last and seq is not None) else [(M - 1, slot, _Seq(Sampler(0.0), 0, 0, 0, None))]
            self._set_samples(items)
            self._record(M, 1, self.rt.stream)
            self.rt.synchronize()
            if last and seq is not None:
                first = self._sampled(items)[0]
        return first

    # ------------------------------------------------------------------ the seam
    @property
    def live(self) -> list[int]:
        return sorted(set(self.seqs) | set(self.pending))

    def length(self, slot: int) -> int:
        return self.seqs[slot].length if slot in self.seqs else self.pending[slot].done

    def _new_sequence(self, prompt, sampler: Sampler, logprobs: int | None) -> tuple[int, _Seq, list[int]]:
        """(slot, sequence, prompt ids) after the checks: it fits, a slot is free, ids in the vocabulary."""
        n = len(prompt)
        slot = self.admit(n)
        V = self.cfg.vocab_size
        if any(not 0 <= int(t) < V for t in prompt):
            raise GraphcError(None, f"token id outside the vocabulary (0..{V - 1})", "prompt")
        seed = sampler.seed if sampler.seed is not None else int(sampler.rng.integers(0, 2**63))
        return slot, _Seq(sampler, int(seed) & (2**64 - 1), n, 0, logprobs), [int(t) for t in prompt]

    def add(self, prompt, sampler: Sampler, *, logprobs: int | None = None):
        self._on_this_thread()
        slot, seq, tokens = self._new_sequence(prompt, sampler, logprobs)
        first = self._prefill(slot, tokens, seq)
        self.seqs[slot] = seq
        return slot, first

    def submit(self, prompt, sampler: Sampler, *, logprobs: int | None = None) -> int:
        """Queue the prompt: later steps prefill it ``prefill_per_step`` rows at a time beside
        the decode rows (chunked prefill); the step that ends it returns its first token."""
        slot, seq, tokens = self._new_sequence(prompt, sampler, logprobs)
        self.pending[slot] = _Pending(seq, tokens)
        return slot

    def step(self) -> dict[int, Sampled]:
        if not self.seqs and not self.pending:
            return {}
        self._on_this_thread()
        slots = sorted(self.seqs)
        for s in slots:
            if self.seqs[s].length >= self.spec.capacity:
                raise GraphcError(None, f"slot {s} is full ({self.spec.capacity} positions)", "capacity")
        row_slot, row_pos = list(slots), [self.seqs[s].length for s in slots]
        row_tok = [-1] * len(slots)                     # decode rows embed the slot's last token
        items = [(i, s, self.seqs[s]) for i, s in enumerate(slots)]
        finished, budget = [], min(self.prefill_per_step, self.rows_max - len(slots))
        for slot, p in list(self.pending.items()):      # prefill chunks, oldest request first
            if budget <= 0:
                break
            take = min(budget, len(p.prompt) - p.done)
            row_slot += [slot] * take
            row_pos += range(p.done, p.done + take)
            row_tok += p.prompt[p.done:p.done + take]
            p.done += take
            budget -= take
            if p.done == len(p.prompt):                 # its last row is sampled: the first token
                items.append((len(row_slot) - 1, slot, p.seq))
                finished.append(slot)
        M, S = len(row_slot), len(items)
        self.meta.put("row_slot", row_slot)
        self.meta.put("row_pos", row_pos)
        self.meta.put("row_tok", row_tok)
        if M == len(slots):                             # decode rows only: the captured graph
            self._set_samples(items)
            self._replay(M)
        else:                                           # with prefill rows: one eager pass
            dummy = [] if items else [(M - 1, row_slot[-1], _Seq(Sampler(0.0), 0, 0, 0, None))]
            self._set_samples(items + dummy)
            self._record(M, S + len(dummy), self.rt.stream)
            self.rt.synchronize()
        out = {slot: sampled for (_, slot, _), sampled in zip(items, self._sampled(items))}
        for s in slots:
            self.seqs[s].length += 1
        for s in finished:
            self.seqs[s] = self.pending.pop(s).seq
        return out

    def _replay(self, M: int) -> None:
        """The decode step over M rows as one CUDA graph (captured on first use per M)."""
        from graphc.runtime.cuda import Graph

        graph = self._graphs.get(M)
        if graph is None:
            self._kernel_steps(M, M)
            graph = self._graphs[M] = Graph(self.rt.stream, lambda stream: self._record(M, M, stream))
        graph.replay()
        self.rt.synchronize()

    def score(self, prompt, logprobs: int = 0):
        self._on_this_thread()
        cfg = self.cfg
        if not 1 <= len(prompt) <= min(cfg.max_seq_len, self.spec.capacity):
            raise GraphcError(None, f"prompt of {len(prompt)} tokens: the model takes 1..{self.spec.capacity}",
                              "prompt")
        slot = self.admit(1)            # a free slot's cache rows hold the prompt meanwhile
        rows, step = [], min(self.samples_max, self.rows_max)
        greedy = _Seq(Sampler(0.0), 0, 0, 0, None)
        for start in range(0, len(prompt), step):
            chunk = [int(t) for t in prompt[start:start + step]]
            M = len(chunk)
            self.meta.put("row_slot", [slot] * M)
            self.meta.put("row_pos", np.arange(start, start + M))
            self.meta.put("row_tok", chunk)
            self._set_samples([(i, slot, greedy) for i in range(M)])
            self._record(M, M, self.rt.stream)
            self.rt.synchronize()
            rows.append(self._logits_rows(M))
        logp = log_softmax(np.concatenate(rows)[:-1])
        return [None] + [Sampled(int(t), float(r[t]), top_logprobs(r, logprobs)) for t, r in zip(prompt[1:], logp)]

    def remove(self, slot: int) -> None:
        self.seqs.pop(slot, None)
        self.pending.pop(slot, None)
