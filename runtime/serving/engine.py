"""Continuous batching: one engine thread drives a backend's batched decode program.

The HTTP side (``runtime/serving/app.py``) turns each completion choice into a :class:`Job`
and :meth:`Engine.submit`\\ s it; the engine thread, between decode steps,

1. admits queued jobs while the decoder has free slots (``Decoder.submit``: the slot is
   reserved, the prompt queued for prefill),
2. runs one step: a new token for every running sequence, and prefill work for the
   submitted ones (a sequence's first token comes out of the step that ends its prefill;
   the CUDA decoder prefills in chunks beside the decode rows, so no one stalls for long),
3. hands the step's new tokens over in **one** call, ``deliver(events)`` (``events`` a list
   of ``(job, token, finish)``), and frees the slot of a job that finished (end of text,
   ``max_tokens``) or was cancelled (client gone, stop string met).

So requests join and leave at step boundaries and never wait for each other to finish.
Each job carries its own seeded :class:`~graphc.runtime.sampling.Sampler`, and the decoder
keeps every sequence's length and position, so results do not depend on the batch.
Admission is bounded twice: by the decoder's slots (KV-cache capacity) and by the queue
(``max_queue``; :class:`QueueFull` beyond it, which the server answers with 429; a request
of more sequences than ``max_queue`` could never fit, and the server refuses it with 400).

The model runs in this thread (onnxruntime and the CUDA runtime release the GIL), while
the asyncio loop tokenizes, detokenizes and talks HTTP: the two overlap. The default
``deliver`` calls each job's ``emit`` right here on the engine thread (the Triton model's
emit only queues a response); the HTTP app passes a ``deliver`` that schedules one callback
per step on its event loop (``loop.call_soon_threadsafe``), which calls the emits there:
one thread hand-off per step, not one per token, because with a GPU step of under a
millisecond the host work between steps is what limits throughput. The loop between steps
allocates nothing per step but the event list. Work that must not interleave with decoding,
such as prompt scoring, runs on the engine thread too through :meth:`Engine.call`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import threading
import time
from typing import Callable

from graphc.errors import GraphcError
from graphc.runtime.decode import Decoder, Sampled
from graphc.runtime.sampling import Sampler

EOT = 50256


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` jobs already."""


@dataclasses.dataclass(eq=False)
class Job:
    """One sequence to generate. ``emit(token, finish)`` receives every token; ``finish`` is
    None while it goes on, then ``"stop"`` (end of text), ``"length"`` (max_tokens),
    ``"abort"`` (engine stopped) or ``"error: ..."``; after a finish nothing more comes.
    Which thread calls ``emit`` is the engine's ``deliver``'s choice (see the module)."""

    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    emit: Callable[[Sampled | None, str | None], None]
    logprobs: int | None = None
    cancelled: bool = False
    done: bool = False            # finished or failed: its slot is free already
    generated: int = 0
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    id: int = dataclasses.field(default_factory=itertools.count().__next__)


Event = tuple[Job, "Sampled | None", "str | None"]


def emit_each(events: list[Event]) -> None:
    """The default ``deliver``: each job's ``emit``, on the calling (engine) thread."""
    for job, sampled, finish in events:
        job.emit(sampled, finish)


class Engine:
    """``on_step(seconds, tokens)`` is called after every step with its time and the tokens it
    delivered; ``on_first_token(seconds)`` with each job's wait for its first token."""

    def __init__(self, decoder: Decoder, *, eot: int | None = EOT, max_queue: int = 256,
                 on_first_token: Callable[[float], None] | None = None,
                 on_step: Callable[[float, int], None] | None = None,
                 deliver: Callable[[list[Event]], None] = emit_each):
        self.decoder = decoder
        self.eot = eot
        self.max_queue = max_queue
        self.on_first_token = on_first_token or (lambda seconds: None)
        self.on_step = on_step or (lambda seconds, tokens: None)
        self.deliver = deliver
        self._queue: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self._active: dict[int, Job] = {}
        self._cancels = False        # some job was cancelled since the last step
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ from any thread
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._active)

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self._running:
                raise QueueFull("the engine is not running")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already")
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop ``job`` at the next step boundary (its slot is freed; no more emits)."""
        if job.done or job.cancelled:
            return
        job.cancelled = True
        with self._cond:
            self._cancels = True
            self._cond.notify()

    def call(self, fn: Callable):
        """Run ``fn()`` on the engine thread between steps; a Future of its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self._running:
                raise QueueFull("the engine is not running")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def start(self) -> "Engine":
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="graphc-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; every job still queued or running gets ``"abort"``."""
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        aborted = [(job, None, "abort") for job in list(self._queue) + list(self._active.values())]
        if aborted:
            self.deliver(aborted)
        for _, future in self._calls:
            future.cancel()
        self._queue.clear()
        self._active.clear()
        self._calls.clear()

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        decoder, active, cond = self.decoder, self._active, self._cond
        while True:
            events: list[Event] = []
            with cond:
                while self._running and not (self._queue or active or self._calls):
                    cond.wait()
                if not self._running:
                    return
                calls, admit = (), ()
                if self._calls:
                    calls = list(self._calls)
                    self._calls.clear()
                if self._queue:
                    admit = [self._queue.popleft() for _ in range(min(len(self._queue), decoder.free))]
                cancels, self._cancels = self._cancels, False
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # handed to the caller, never kills the engine
                        future.set_exception(e)
            for job in admit:
                self._admit(job, events)
            if cancels:
                self._drop_cancelled()
            if active:
                t0 = time.perf_counter()
                try:
                    results = decoder.step()
                except Exception as e:  # a failing step fails the running jobs, not the server
                    self._fail_all(e, events)
                    self.deliver(events)
                    continue
                seconds = time.perf_counter() - t0
                before = len(events)       # admission errors are not tokens
                self._collect(results, events)
                self.on_step(seconds, len(events) - before)
            if events:
                self.deliver(events)

    def _admit(self, job: Job, events: list[Event]) -> None:
        if job.cancelled:
            return
        try:   # the first token comes out of a later step (chunked prefill beside the running rows)
            slot = self.decoder.submit(job.prompt, job.sampler, logprobs=job.logprobs)
        except GraphcError as e:
            job.done = True
            events.append((job, None, f"error: {e.message}"))
            return
        except Exception as e:
            job.done = True
            events.append((job, None, f"error: {type(e).__name__}: {e}"))
            return
        self._active[slot] = job

    def _collect(self, results: dict[int, Sampled], events: list[Event]) -> None:
        """This step's events; frees the slots of jobs that finished or were cancelled."""
        active, eot = self._active, self.eot
        for slot, sampled in results.items():
            job = active[slot]
            if job.cancelled:
                self._release(slot)
                continue
            if job.generated == 0:
                self.on_first_token(time.perf_counter() - job.submitted)
            job.generated += 1
            if sampled.token == eot:
                finish = "stop"
            elif job.generated >= job.max_tokens:
                finish = "length"
            else:
                events.append((job, sampled, None))
                continue
            job.done = True
            events.append((job, sampled, finish))
            self._release(slot)

    def _release(self, slot: int) -> None:
        self._active.pop(slot, None)
        self.decoder.remove(slot)

    def _drop_cancelled(self) -> None:
        for slot, job in list(self._active.items()):
            if job.cancelled:
                self._release(slot)

    def _fail_all(self, error: Exception, events: list[Event]) -> None:
        for slot, job in list(self._active.items()):
            job.done = True
            events.append((job, None, f"error: {type(error).__name__}: {error}"))
            self._release(slot)
