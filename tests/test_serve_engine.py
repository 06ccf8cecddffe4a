"""The serving engine's hand-off and the choice text, without a model or HTTP.

The engine drives ``bench/fake_decoder.py``'s simulated decoder (deterministic tokens, no
model), so these tests check what the host side does with the tokens: one ``deliver`` call
per step carrying every running job's token, the right tokens and finish reasons, cancelled
slots freed, an abort for what is left at stop; and :class:`ChoiceText`'s lazy
detokenization gives the same text as decoding everything at once (UTF-8 split across
tokens included), streaming or not, with stop strings.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest

from graphc.runtime.sampling import Sampler
from graphc.runtime.serving.engine import Engine, Job

_spec = importlib.util.spec_from_file_location("fake_decoder", Path(__file__).resolve().parents[1] / "bench" / "fake_decoder.py")
fake_decoder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_decoder)


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    out, last = [], prompt[-1]
    for _ in range(n):
        last = (last * 7 + 13) % 50000
        out.append(last)
    return out


class Recorder:
    """A ``deliver`` that records each call (on the engine thread) and the decoder's steps."""

    def __init__(self, decoder):
        self.calls: list[list] = []
        self.steps = 0
        self.done = threading.Event()
        self.finished = 0
        self.expect = 0
        step = decoder.step

        def counted_step():
            self.steps += 1
            return step()

        decoder.step = counted_step

    def __call__(self, events):
        self.calls.append(list(events))
        self.finished += sum(1 for _, _, finish in events if finish is not None)
        if self.finished >= self.expect:
            self.done.set()


def test_one_deliver_per_step_with_every_running_token():
    prompts = [[10 + i, 20 + i] for i in range(6)]
    max_tokens = [3, 5, 8, 2, 6, 4]
    decoder = fake_decoder.FakeDecoder(4, 64, 0.0)      # 6 jobs, 4 slots: two wait for a slot
    recorder = Recorder(decoder)
    recorder.expect = len(prompts)
    counted = []
    engine = Engine(decoder, deliver=recorder, on_step=lambda seconds, tokens: counted.append(tokens))
    jobs = [Job(p, m, Sampler(temperature=0), emit=None) for p, m in zip(prompts, max_tokens)]
    engine.start()
    try:
        for job in jobs:
            engine.submit(job)
        assert recorder.done.wait(10)
    finally:
        engine.stop()
    # every call is one step's events: at most one per job, never more calls than steps
    assert len(recorder.calls) <= recorder.steps
    for events in recorder.calls:
        ids = [job.id for job, _, _ in events]
        assert len(ids) == len(set(ids))
    for job, prompt, n in zip(jobs, prompts, max_tokens):
        got = [(s.token, f) for events in recorder.calls for j, s, f in events if j is job]
        assert [t for t, _ in got] == expected_tokens(prompt, n)
        assert [f for _, f in got] == [None] * (n - 1) + ["length"]
    assert decoder.live == []
    assert sum(counted) == sum(max_tokens)              # the generated-tokens metric's source


def test_end_of_text_finishes_with_stop():
    decoder = fake_decoder.FakeDecoder(2, 64, 0.0)
    recorder = Recorder(decoder)
    recorder.expect = 1
    first = expected_tokens([5], 1)[0]
    engine = Engine(decoder, eot=expected_tokens([5], 3)[2], deliver=recorder)   # the third token is "EOT"
    job = Job([5], 10, Sampler(temperature=0), emit=None)
    engine.start()
    try:
        engine.submit(job)
        assert recorder.done.wait(10)
    finally:
        engine.stop()
    got = [(s.token, f) for events in recorder.calls for _, s, f in events]
    assert got[0] == (first, None) and got[-1][1] == "stop" and len(got) == 3


def test_cancel_frees_the_slot_and_stop_aborts_the_rest():
    decoder = fake_decoder.FakeDecoder(1, 10_000, 0.001)
    recorder = Recorder(decoder)
    recorder.expect = 10**9                             # never "done": the jobs run until cancelled
    engine = Engine(decoder, deliver=recorder)
    running = Job([1, 2], 5000, Sampler(temperature=0), emit=None)
    waiting = Job([3], 5000, Sampler(temperature=0), emit=None)
    engine.start()
    try:
        engine.submit(running)
        engine.submit(waiting)                          # one slot: this one waits
        pause = threading.Event()               # never set: a bounded sleep
        while not any(j is running for events in recorder.calls for j, _, _ in events):
            assert not pause.wait(0.01) and recorder.steps < 5000
        engine.cancel(running)
        while not any(j is waiting for events in recorder.calls for j, _, _ in events):
            assert not pause.wait(0.01) and recorder.steps < 5000
        assert decoder.live == [0] and engine.running == 1
        seen = len(recorder.calls)
    finally:
        engine.stop()
    after = [f for events in recorder.calls[seen:] for j, _, f in events if j is running]
    assert after == []                                  # nothing for a cancelled job
    assert recorder.calls[-1] == [(waiting, None, "abort")]


@pytest.fixture(scope="module")
def tokenizer():
    from graphc.data.tokenizer import Tokenizer

    return Tokenizer()


TEXT = "Héllo wörld — 世界 🙂 done. The end"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stop", [[], ["end"], ["🙂"], ["xyz", "wörld"]])
def test_choice_text_lazy_detokenization_matches_decoding_at_once(tokenizer, stream, stop):
    from graphc.runtime.decode import Sampled
    from graphc.runtime.serving.app import ChoiceText

    ids = tokenizer.encode(TEXT)
    assert any(not tokenizer.decode_bytes(t).decode("utf-8", "ignore") for t in ids)   # a split character
    choice = ChoiceText(tokenizer, stop)
    out = []
    for i, token in enumerate(ids):
        choice.add(Sampled(token), "length" if i == len(ids) - 1 else None, tokenizer.eot)
        if stream:
            out.append(choice.delta())
        if choice.finish is not None:
            break
    out.append(choice.delta())
    full = tokenizer.decode(ids)
    cut = min([full.find(s) for s in stop if s in full], default=len(full))
    assert "".join(out) == full[:cut]
    assert choice.finish == ("stop" if cut < len(full) else "length")
    assert choice.generated == len(choice.tokens) <= len(ids)


def test_choice_seeds_keep_choice_0_and_never_repeat_a_neighbour():
    from graphc.runtime.serving.app import choice_seed

    assert [choice_seed(s, 0) for s in (0, 7, 2**63 - 1)] == [0, 7, 2**63 - 1]
    seeds = [choice_seed(s, i) for s in range(200) for i in range(8)]
    assert len(set(seeds)) == len(seeds) and all(0 <= x < 2**64 for x in seeds)


def _choice_with_logprobs(tokenizer, ids, prompt=None, stream=False):
    """A ChoiceText fed ``ids`` (each with logprob -1 and one wrong alternative) the way the
    app feeds it: optionally an echoed, scored ``prompt`` first; per-step logprobs when streaming."""
    from graphc.runtime.decode import Sampled
    from graphc.runtime.serving.app import ChoiceText

    choice = ChoiceText(tokenizer, [], tokenizer.decode(prompt) if prompt else "")
    if prompt:
        choice.add_prompt_logprobs([None] + [Sampled(t, -2.0, ((0, -0.5),)) for t in prompt[1:]], prompt)
    text, bodies = "", []
    for i, token in enumerate(ids):
        start = len(choice.tokens)
        choice.add(Sampled(token, -1.0, ((0, -0.5),)), "length" if i == len(ids) - 1 else None, tokenizer.eot)
        if stream:
            text += choice.delta()
            bodies.append(choice.logprobs_body(start if prompt is None or i else 0))
    if not stream:
        text, bodies = choice.delta(), [choice.logprobs_body()]
    merged = {key: [x for b in bodies for x in b[key]] for key in bodies[0]}
    return text, merged


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("echo", [False, True])
def test_text_offsets_are_character_offsets_after_split_utf8(tokenizer, stream, echo):
    """'😀' is split across two tokens; ' w' must still start at its character offset, 7."""
    ids = tokenizer.encode("héllo 😀 wörld")
    prompt = tokenizer.encode("Prompt 😀 x") if echo else None
    text, lp = _choice_with_logprobs(tokenizer, ids, prompt, stream)
    assert text == (tokenizer.decode(prompt) if echo else "") + "héllo 😀 wörld"
    base = len(tokenizer.decode(prompt)) if echo else 0
    assert lp["text_offset"][-len(ids):] == [base + o for o in (0, 1, 2, 5, 6, 7, 9, 11)]
    # every token that is whole characters is found in the text at its offset
    for piece, offset in zip(lp["tokens"], lp["text_offset"]):
        if "\ufffd" not in piece:
            assert text[offset:offset + len(piece)] == piece
    assert lp["text_offset"] == sorted(lp["text_offset"]) and len(lp["text_offset"]) == len(lp["tokens"])


def test_top_logprobs_include_the_chosen_token(tokenizer):
    ids = tokenizer.encode(" the cat")
    _, lp = _choice_with_logprobs(tokenizer, ids, prompt=[464, 2068])
    alt = tokenizer.decode_bytes(0).decode()
    assert lp["top_logprobs"][0] is None                       # the first prompt token has no context
    assert lp["top_logprobs"][1] == {alt: -0.5, " quick": -2.0}
    assert lp["top_logprobs"][2:] == [{alt: -0.5, tokenizer.decode([t]): -1.0} for t in ids]
