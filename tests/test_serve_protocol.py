"""``/v1/completions`` request validation (runtime/serving/protocol.py), without a server.

What OpenAI clients send and what they expect back: ``null`` means the default, the default
``max_tokens`` fits a small context, a request that can never fit the queue is a 400 (not a
429 to retry forever), and fields graphc does not implement are refused instead of ignored.
"""

from __future__ import annotations

import dataclasses

import pytest

from graphc.runtime.serving.protocol import ApiError, parse_completion


def tokenize(text: str) -> list[int]:
    return [ord(c) % 1000 for c in text]      # one token per character


def parse(body: dict, context: int = 64, max_n: int = 8, max_sequences: int | None = None):
    return parse_completion({"model": "m", **body}, tokenize, vocab_size=1000, context=context, max_n=max_n,
                            max_sequences=max_sequences)


def error(body: dict, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, **kw)
    assert info.value.status == 400
    return info.value


OPTIONAL = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "echo", "logprobs",
            "stream_options", "logit_bias", "frequency_penalty", "presence_penalty", "suffix", "best_of", "user"]


def test_null_means_the_default_for_every_optional_field():
    plain = parse({"prompt": "hello"})
    nulls = parse({"prompt": "hello", **{name: None for name in OPTIONAL}})
    assert dataclasses.asdict(nulls) == dataclasses.asdict(plain)
    assert plain.max_tokens == 16 and plain.n == 1 and plain.top_k == 0


def test_default_max_tokens_fits_the_context_and_an_explicit_one_is_strict():
    assert parse({"prompt": "abc"}, context=8).max_tokens == 5
    assert parse({"prompt": ["a", "abcdef"]}, context=8).max_tokens == 2       # the longest prompt decides
    assert parse({"prompt": "abc"}, context=100).max_tokens == 16
    assert parse({"prompt": "abcdefgh", "echo": True}, context=8).max_tokens == 0
    e = error({"prompt": "abc", "max_tokens": 16}, context=8)
    assert e.param == "max_tokens" and "16" in e.message
    e = error({"prompt": "abc", "max_tokens": 6}, context=8)
    assert e.param == "max_tokens" and e.code == "context_length_exceeded"
    e = error({"prompt": "abcdefgh"}, context=8)                              # no room left at all
    assert e.param == "prompt" and e.code == "context_length_exceeded" and "max_tokens" not in e.message


def test_more_sequences_than_the_queue_holds_is_a_400_naming_n_or_prompt():
    e = error({"prompt": ["a", "b", "c", "d"], "n": 3}, max_sequences=10)
    assert e.param == "n" and "12" in e.message and "10" in e.message and e.message.startswith("n: ")
    e = error({"prompt": ["a"] * 11}, max_sequences=10)
    assert e.param == "prompt" and "10" in e.message
    assert len(parse({"prompt": ["a"] * 5, "n": 2}, max_sequences=10).prompts) == 5
    # scoring only (echo, max_tokens 0) queues no sequence
    assert parse({"prompt": ["a"] * 11, "echo": True, "max_tokens": 0}, max_sequences=10).max_tokens == 0


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {"50256": -100}), ("logit_bias", [1]), ("frequency_penalty", 0.5), ("presence_penalty", -1),
    ("presence_penalty", "0"), ("suffix", "tail"), ("best_of", 3), ("best_of", 5),
])
def test_unsupported_fields_are_refused_when_they_ask_for_something(field, value):
    e = error({"prompt": "a", "n": 2, field: value})
    assert e.param == field and "does not support" in e.message and e.message.startswith(f"{field}: ")


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {}), ("frequency_penalty", 0), ("presence_penalty", 0.0), ("suffix", ""), ("best_of", 1),
    ("best_of", 2),
])
def test_default_values_of_unsupported_fields_pass(field, value):
    assert parse({"prompt": "a", "n": 2, field: value}).n == 2


def test_best_of_must_be_an_integer():
    assert error({"prompt": "a", "best_of": "2"}).param == "best_of"
