"""The OpenAI completions protocol: request validation, errors, and response bodies.

One place knows the JSON shapes, so the HTTP app only moves bytes. Fields follow OpenAI's
legacy ``/v1/completions`` (what vLLM and TGI serve, and what evaluation harnesses such as
lm-eval call); ``top_k`` is an extension (0 or -1 = off). Every field is checked up front:
a wrong type or range is a 400 naming the field, before any work is queued.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

MAX_STOP = 4
MAX_LOGPROBS = 5


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclasses.dataclass
class CompletionRequest:
    model: str
    prompts: list[list[int]]          # token ids of each prompt (strings tokenized by the app)
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param, "invalid_value")


def _unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{param}: graphc does not support {what} (send the default, or leave it out)",
                    param, "unsupported_value")


def _check_unsupported(body: dict, n: int) -> None:
    """400 for OpenAI fields graphc does not implement, when they ask for something: silently
    ignoring them would return output the client did not ask for. Their default values pass,
    since clients (the openai SDK, lm-eval) send them."""
    bias = body.get("logit_bias")
    if bias is not None and (not isinstance(bias, dict) or bias):
        raise _unsupported("logit_bias", "logit_bias (only null or {})")
    for name in ("frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != 0):
            raise _unsupported(name, f"{name} (only null or 0)")
    suffix = body.get("suffix")
    if suffix is not None and suffix != "":
        raise _unsupported("suffix", "suffix (only null or \"\")")
    best_of = body.get("best_of")
    if best_of is not None and (isinstance(best_of, bool) or not isinstance(best_of, int)):
        raise _bad("best_of", f"must be an integer, got {best_of!r}")
    if best_of is not None and best_of not in (1, n):
        raise _unsupported("best_of", f"best_of other than n (only null, 1 or n = {n})")


def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    """An optional integer field; absent or ``null`` is ``default`` (OpenAI's meaning of null)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(name, f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
    return value


def _float(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"must be a number, got {value!r}")
    if value > hi or value < lo or (lo_open and value == lo):
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {value!r}")
    return value


def _is_ids(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def parse_completion(body: Any, tokenize, *, vocab_size: int, context: int, max_n: int,
                     max_sequences: int | None = None) -> CompletionRequest:
    """Validate a ``/v1/completions`` body; ``tokenize(str) -> ids``. Raises :class:`ApiError`.

    ``null`` for an optional field means its default, as in OpenAI's API. ``max_sequences``
    is the most sequences (prompts x n) the engine's queue can ever hold: a request needing
    more is a 400, not a 429, because no retry could succeed."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "required (a string naming the served model)")

    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [tokenize(prompt)]
    elif _is_ids(prompt) and prompt:
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenize(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(_is_ids(p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")
    for i, ids in enumerate(prompts):
        if not ids:
            raise _bad("prompt", f"prompt {i} is empty (it must have at least one token)")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise _bad("prompt", f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")

    echo = _bool(body, "echo", False)
    room = context - max(len(ids) for ids in prompts)      # positions left after the longest prompt
    # OpenAI's default of 16, cut to what fits: a small --context must not reject a request
    # for a max_tokens the client never sent (an explicit value is checked strictly).
    max_tokens = _int(body, "max_tokens", max(min(16, room), 0 if echo else 1), 0 if echo else 1, context)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} such strings")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    req = CompletionRequest(
        model=model, prompts=prompts, max_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_int(body, "top_k", 0, -1, vocab_size),
        seed=_int(body, "seed", None),
        stop=stop, n=_int(body, "n", 1, 1, max_n), stream=_bool(body, "stream", False),
        include_usage=bool(options and _bool(options, "include_usage", False)),
        echo=echo, logprobs=_int(body, "logprobs", None, 0, MAX_LOGPROBS),
    )
    if req.seed is not None and req.seed < 0:
        raise _bad("seed", f"must be >= 0, got {req.seed}")
    if options is not None and not req.stream:
        raise _bad("stream_options", "only allowed with stream: true")
    _check_unsupported(body, req.n)
    sequences = len(prompts) * req.n
    if max_sequences is not None and req.max_tokens > 0 and sequences > max_sequences:
        param = "n" if req.n > 1 else "prompt"
        raise ApiError(400, f"{param}: {len(prompts)} prompt(s) x n {req.n} = {sequences} sequences exceed the "
                       f"{max_sequences} the server's queue can hold (--max-queue); send fewer", param,
                       "too_many_sequences")
    for i, ids in enumerate(prompts):
        if body.get("max_tokens") is None and len(ids) + req.max_tokens > context:
            raise ApiError(400, f"prompt {i} has {len(ids)} tokens, which leaves no room to generate within the "
                           f"model's context of {context} tokens", "prompt", "context_length_exceeded")
        if len(ids) + req.max_tokens > context:
            raise ApiError(400, f"prompt {i} has {len(ids)} tokens; with max_tokens {req.max_tokens} that exceeds "
                           f"the model's context of {context} tokens", "max_tokens", "context_length_exceeded")
    return req


# ----------------------------------------------------------------------------- responses
def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_body(rid: str, model: str, choices: list[dict], usage: dict | None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
