"""The HTTP side of ``graphc serve``: an OpenAI-compatible API on Starlette.

Routes: ``POST /v1/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). Errors are OpenAI-style JSON
(:class:`~graphc.runtime.serving.protocol.ApiError`) for every status, unknown routes too.

Each completion choice (prompt x ``n``) is one :class:`~graphc.runtime.serving.engine.Job`
with its own seeded sampler (:func:`choice_seed`: the request's seed for choice 0, a hash of
seed and index for the others; a fresh random seed when the request has none). Each engine
step's tokens arrive in one ``loop.call_soon_threadsafe`` (the engine's ``deliver``,
:class:`_HandOff`); on the loop each token goes to its choice's
:class:`ChoiceText`, and the request's handler is woken only when there is something to send
(each step while streaming; once per choice, at its end, otherwise). This side detokenizes
(lazily: a non-streaming choice without stop strings once, at the end; UTF-8 pieces split
across tokens are held back until complete), applies stop strings (text that could still
grow into a stop string is held back while streaming) and builds the bodies. A client that disconnects, or a
choice that meets a stop string, cancels its job: the engine frees the slot at the next step.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import json
import secrets
import time

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from graphc.runtime.decode import Sampled
from graphc.runtime.sampling import Sampler
from graphc.runtime.serving import metrics as m
from graphc.runtime.serving.engine import Engine, Job, QueueFull, emit_each
from graphc.runtime.serving.protocol import (
    ApiError,
    CompletionRequest,
    completion_body,
    new_id,
    parse_completion,
    usage_body,
)

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.25


@dataclasses.dataclass
class ServerConfig:
    model_name: str
    context: int                  # the longest prompt + max_tokens accepted
    vocab_size: int
    max_batch: int
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES


class Metrics:
    def __init__(self, engine: Engine):
        self.requests = m.Counter("graphc_requests_total", "HTTP requests by route and status", ("route", "status"))
        self.prompt_tokens = m.Counter("graphc_prompt_tokens_total", "prompt tokens of accepted requests")
        self.generated_tokens = m.Counter("graphc_generation_tokens_total", "tokens generated")
        self.ttft = m.Histogram("graphc_time_to_first_token_seconds", "queue + prefill time to a sequence's first token")
        self.step = m.Histogram("graphc_time_per_output_token_seconds", "decode step time (one token per running sequence)")
        self.all = [self.requests, self.prompt_tokens, self.generated_tokens,
                    m.Gauge("graphc_queue_depth", "jobs waiting for a slot", lambda: engine.queue_depth),
                    m.Gauge("graphc_running_batch", "sequences in the running batch", lambda: engine.running),
                    self.ttft, self.step]


class ChoiceText:
    """One choice's text: incremental detokenization, stop strings, logprobs, finish reason.

    Adding a token only appends it; the text is decoded when it is asked for (:meth:`delta`)
    or when stop strings must be looked for, so a non-streaming choice without stop strings
    is detokenized once, at the end."""

    def __init__(self, tokenizer, stop: list[str], prefix: str = ""):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = prefix          # everything decoded so far (echoed prompt included)
        self.sent = 0               # characters already handed out
        self.scan_from = len(prefix)
        self.tokens: list[Sampled | None] = []
        self.token_texts: list[str] = []   # filled up to len(tokens) on demand (logprobs)
        self.offsets: list[int] = []       # each token's text_offset, filled like token_texts
        self.offset_utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.offset_pos = len(prefix)      # generated tokens' offsets start after the echoed prompt
        self.undecoded: list[int] = []     # generated ids not in ``text`` yet
        self.flushed = False               # the UTF-8 decoder's tail is in ``text``
        self.finish: str | None = None
        self.generated = 0

    def add_prompt_logprobs(self, scored: list[Sampled | None], prompt: list[int]) -> None:
        """The echoed prompt's tokens (scored by the model) ahead of the generated ones; their
        offsets count the characters of the prompt's text before each."""
        utf8, pos = codecs.getincrementaldecoder("utf-8")("replace"), 0
        for tok, s in zip(prompt, scored):
            self.tokens.append(s)
            self.token_texts.append(self._piece(tok))
            self.offsets.append(pos)
            pos += len(utf8.decode(self.tokenizer.decode_bytes(tok)))

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode_bytes(token).decode("utf-8", errors="replace")

    def add(self, sampled: Sampled | None, finish: str | None, eot: int) -> None:
        if sampled is not None:
            self.generated += 1
            if not (finish == "stop" and sampled.token == eot):   # end of text: counted, not shown
                self.tokens.append(sampled)
                self.undecoded.append(sampled.token)
        if finish is not None:
            self.finish = finish
        if self.stop:
            self._decode()
            self._apply_stop()

    def _decode(self) -> None:
        """Bring ``text`` up to date with the tokens added (UTF-8 pieces split across tokens
        wait for the rest of their bytes until the choice finishes)."""
        if self.undecoded:
            data = b"".join([self.tokenizer.decode_bytes(t) for t in self.undecoded])
            self.undecoded.clear()
            self.text += self.utf8.decode(data)
        if self.finish is not None and not self.flushed:
            self.flushed = True
            self.text += self.utf8.decode(b"", final=True)

    def _apply_stop(self) -> None:
        hits = [i for i in (self.text.find(s, max(self.scan_from - self.hold, 0)) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish = "stop"
            self.flushed = True     # the text ends here: nothing after it is decoded
            self.undecoded.clear()
        self.scan_from = len(self.text)

    def delta(self) -> str:
        """New text that is safe to send (all of it once finished)."""
        self._decode()
        ready = len(self.text) if self.finish else max(len(self.text) - self.hold, self.sent)
        piece = self.text[self.sent:ready]
        self.sent = ready
        return piece

    def logprobs_body(self, start: int = 0) -> dict:
        """OpenAI's legacy logprobs object for tokens ``start:``.

        ``top_logprobs`` holds the chosen token too (OpenAI: up to logprobs + 1 entries).
        ``text_offset`` is a character offset into the choice's text (echoed prompt included,
        the same across streamed chunks): the length of the text decoded before the token. A
        character split across tokens counts once, where it starts, so offsets do not drift
        after one (the tokens' own strings hold a replacement character for each part)."""
        for s in self.tokens[len(self.offsets):]:
            self.offsets.append(self.offset_pos)
            self.offset_pos += len(self.offset_utf8.decode(self.tokenizer.decode_bytes(s.token)))
        self.token_texts += [self._piece(s.token) for s in self.tokens[len(self.token_texts):]]
        toks = self.tokens[start:]
        return {
            "tokens": self.token_texts[start:],
            "token_logprobs": [None if s is None else s.logprob for s in toks],
            "top_logprobs": [None if s is None else self._top(s) for s in toks],
            "text_offset": self.offsets[start:],
        }

    def _top(self, s: Sampled) -> dict[str, float]:
        top = {self._piece(t): lp for t, lp in s.top}
        top.setdefault(self._piece(s.token), s.logprob)
        return top


def build_app(engine: Engine, tokenizer, config: ServerConfig):
    metrics = Metrics(engine)
    hand_off = _HandOff()
    engine.on_first_token = metrics.ttft.observe

    def on_step(seconds: float, tokens: int) -> None:
        metrics.step.observe(seconds)
        metrics.generated_tokens.inc(tokens)

    engine.on_step = on_step
    engine.deliver = hand_off.deliver

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def check_auth(request: Request) -> None:
        if config.api_key and request.headers.get("authorization") != f"Bearer {config.api_key}":
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", None,
                           "invalid_api_key")

    async def read_json(request: Request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            raise ApiError(413, f"request body of {length} bytes exceeds {config.max_body_bytes}", None, "too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise ApiError(413, f"request body exceeds {config.max_body_bytes} bytes", None, "too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})", None, "invalid_json") from None

    def tokenize(text: str) -> list[int]:
        return tokenizer.encode(text)

    def sampler_for(req: CompletionRequest, index: int) -> Sampler:
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return Sampler(temperature=req.temperature, top_k=req.top_k if req.top_k > 0 else None, top_p=req.top_p,
                       seed=choice_seed(seed, index))

    async def completions(request: Request) -> Response:
        check_auth(request)
        body = await read_json(request)
        req = parse_completion(body, tokenize, vocab_size=config.vocab_size, context=config.context,
                               max_n=config.max_batch, max_sequences=engine.max_queue)
        if req.model != config.model_name:
            raise ApiError(404, f"model {req.model!r} is not served here (this server serves "
                           f"{config.model_name!r})", "model", "model_not_found")
        metrics.prompt_tokens.inc(_prompt_tokens(req))
        return await (stream_completion if req.stream else full_completion)(request, req)

    async def run_choices(request: Request, req: CompletionRequest):
        """Start every choice; yields (index, ChoiceText) as each changes (streaming) or as each
        finishes (non-streaming); cancels all on exit.

        The engine's tokens arrive through :class:`_HandOff` (one callback per step, on this
        loop) into each job's ``emit``, which updates its ChoiceText directly and wakes this
        generator only when there is something to yield."""
        loop = asyncio.get_running_loop()
        if hand_off.loop is not loop:
            hand_off.loop = loop
        woken = asyncio.Event()
        changed: dict[int, None] = {}            # choices with news since the last yield (ordered set)
        failure: list[str] = []
        choices, jobs = [], {}
        plan = [(i * req.n + k, prompt) for i, prompt in enumerate(req.prompts) for k in range(req.n)]
        for index, prompt in plan:
            prefix = tokenizer.decode(prompt) if req.echo else ""
            choice = ChoiceText(tokenizer, req.stop, prefix)
            if req.echo and req.logprobs is not None:
                scored = await asyncio.wrap_future(engine.call(lambda p=prompt: engine.decoder.score(p, req.logprobs)))
                choice.add_prompt_logprobs(scored, prompt)
            choices.append(choice)
        pending = 0                              # choices still generating (set once all are submitted)

        def emit(sampled, finish, index):        # on this loop, from the engine's per-step hand-off
            nonlocal pending
            choice = choices[index]
            if choice.finish is not None:
                return                           # tokens already in flight after a stop string
            if finish == "abort" or (finish is not None and finish.startswith("error")):
                failure.append(finish)
                woken.set()
                return
            choice.add(sampled, finish, tokenizer.eot)
            if choice.finish is not None:
                pending -= 1
                if finish is None:               # a stop string ended it: free the slot now
                    engine.cancel(jobs[index])
            elif not req.stream:
                return                           # nothing to say before the end
            changed[index] = None
            woken.set()

        try:
            for index, prompt in plan:
                if req.max_tokens == 0:
                    choices[index].add(None, "length", tokenizer.eot)
                    continue
                job = Job(prompt, req.max_tokens, sampler_for(req, index),
                          lambda sampled, finish, index=index: emit(sampled, finish, index), logprobs=req.logprobs)
                engine.submit(job)
                jobs[index] = job
        except QueueFull as e:
            for job in jobs.values():
                engine.cancel(job)
            raise ApiError(429, f"the server is busy ({e}); retry later", None, "queue_full") from None
        pending = sum(1 for c in choices if c.finish is None)   # no emit has run yet: nothing awaited
        gone = False

        async def watch_disconnect():            # one timer per request, not one per wake-up
            nonlocal gone
            while not await request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            gone = True
            woken.set()

        watcher = loop.create_task(watch_disconnect()) if pending else None
        try:
            for index, choice in enumerate(choices):
                if choice.finish is not None:
                    yield index, choice
            while True:
                if failure:
                    finish = failure[0]
                    if finish == "abort":
                        raise ApiError(503, "the server is shutting down", None, "shutting_down")
                    raise ApiError(500, f"generation failed: {finish[len('error: '):]}", None, "engine_error")
                if changed:
                    ready = list(changed)
                    changed.clear()
                    for index in ready:
                        yield index, choices[index]
                    continue
                if not pending or gone:
                    return
                woken.clear()
                await woken.wait()
        finally:
            if watcher is not None:
                watcher.cancel()
            for job in jobs.values():
                engine.cancel(job)

    async def full_completion(request: Request, req: CompletionRequest) -> Response:
        choices: dict[int, ChoiceText] = {}
        async for index, choice in run_choices(request, req):
            choices[index] = choice
        if len(choices) < len(req.prompts) * req.n:
            return Response(status_code=499)     # the client went away
        out = []
        for index in sorted(choices):
            c = choices[index]
            out.append({"index": index, "text": c.delta(), "finish_reason": _reason(c.finish),
                        "logprobs": c.logprobs_body() if req.logprobs is not None else None})
        completion_tokens = sum(c.generated for c in choices.values())
        return JSONResponse(completion_body(new_id(), config.model_name, out, usage_body(_prompt_tokens(req), completion_tokens)))

    async def stream_completion(request: Request, req: CompletionRequest) -> Response:
        rid = new_id()
        stream = run_choices(request, req)
        # start the choices now, so a full queue is still a 429 and not a broken stream
        first = await _first(stream)

        async def events():
            sent_tokens: dict[int, int] = {}
            seen: dict[int, ChoiceText] = {}
            try:
                items = ([first] if first is not None else [])
                async for item in _chain(items, stream):
                    index, choice = item
                    seen[index] = choice
                    text = choice.delta()
                    start = sent_tokens.get(index, 0)
                    if not text and choice.finish is None:
                        continue
                    payload = {"index": index, "text": text, "finish_reason": _reason(choice.finish),
                               "logprobs": choice.logprobs_body(start) if req.logprobs is not None else None}
                    sent_tokens[index] = len(choice.tokens)
                    yield _sse(completion_body(rid, config.model_name, [payload], None))
                if req.include_usage:
                    completion_tokens = sum(c.generated for c in seen.values())
                    yield _sse(completion_body(rid, config.model_name, [], usage_body(_prompt_tokens(req), completion_tokens)))
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield _sse(e.body())
                yield "data: [DONE]\n\n"
            finally:
                await stream.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": int(time.time()), "owned_by": "graphc",
             "max_model_len": config.context}]})

    async def health(request: Request) -> Response:
        ok = engine._running
        return JSONResponse({"status": "ok" if ok else "stopping"}, status_code=200 if ok else 503)

    async def metrics_route(request: Request) -> Response:
        return PlainTextResponse(m.exposition(metrics.all), media_type="text/plain; version=0.0.4")

    async def api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(ApiError(exc.status_code, message, None, "not_found" if exc.status_code == 404 else None))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error"))

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ], exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})

    return CountRequests(app, metrics.requests)


class CountRequests:
    """ASGI middleware: count every HTTP response by route and status (streaming untouched)."""

    def __init__(self, app, counter: m.Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in _ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counter.inc(1, route, str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


_ROUTES = {"/v1/completions", "/v1/models", "/health", "/metrics"}


class _HandOff:
    """The engine's ``deliver`` for the HTTP app: one ``call_soon_threadsafe`` per step hands
    the step's events to the event loop (set by the first request), where each job's
    ``emit`` runs. One wake-up of the loop per step instead of one per token."""

    loop: asyncio.AbstractEventLoop | None = None

    def deliver(self, events) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(emit_each, events)


def choice_seed(seed: int, index: int) -> int:
    """Choice ``index``'s seed: ``seed`` itself for choice 0 (so ``n: 1`` samples with the
    request's seed, as before), a 64-bit hash of (seed, index) for the others.

    Not ``seed + index``: then seed 8's choices 0-1 would repeat seed 7's choices 1-2. numpy's
    SeedSequence spawn key is its documented way to derive independent streams; the result is
    an integer because the CUDA decoder seeds its sampling kernel with one."""
    if index == 0:
        return seed
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)[0])


def _prompt_tokens(req: CompletionRequest) -> int:
    """``usage.prompt_tokens`` as OpenAI counts it: each prompt once, whatever ``n`` is."""
    return sum(len(p) for p in req.prompts)


def _reason(finish: str | None) -> str | None:
    return None if finish is None else ("length" if finish == "length" else "stop")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _first(agen):
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(items, agen):
    for item in items:
        yield item
    async for item in agen:
        yield item
