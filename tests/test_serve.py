"""``graphc serve`` on loopback, driven by the official ``openai`` client and raw HTTP.

The server runs as a real subprocess (``--port 0``; the port is read from its ``serving ...``
line), so signals, disconnects and memory are the real thing. Every request loop here is
bounded and goes to 127.0.0.1 only.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the openai client is a test dependency ([test] extra)")

MODEL = "L2H2C64"
SERVE_LINE = re.compile(r"^serving (\S+) on http://127\.0\.0\.1:(\d+) \(backend onnxruntime, max batch (\d+)\)$")


def _env():
    env = dict(os.environ)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiktoken_cache"
    if shared.is_dir():
        env.setdefault("TIKTOKEN_CACHE_DIR", str(shared))
    return env


class Server:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "graphc", "serve", "--model", MODEL, "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        line = self.proc.stdout.readline().strip()
        match = SERVE_LINE.match(line)
        if not match:
            self.proc.kill()
            raise AssertionError(f"unexpected first line {line!r}; stderr: {self.proc.stderr.read()}")
        self.name, self.port, self.max_batch = match.group(1), int(match.group(2)), int(match.group(3))
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def post(self, body, **kw):
        return httpx.post(self.url + "/v1/completions", json=body, timeout=60, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def stop(self, sig=signal.SIGTERM, timeout=20) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", "8", "--max-queue", "128")
    yield s
    assert s.stop() == 0


def _alone(prompt, max_tokens, **kw):
    from graphc.models.load import load_model
    from graphc.runtime.generate import generate

    return generate(load_model(MODEL, 0), [prompt], max_tokens, **kw)[0]


def test_completion_matches_graphc_generate(server):
    from graphc.data.tokenizer import Tokenizer

    tok = Tokenizer()
    prompt = "The quick brown fox"
    res = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    expected = _alone(tok.encode(prompt), 12)
    assert res.choices[0].text == tok.decode([t for t in expected if t != tok.eot])
    assert res.choices[0].finish_reason in ("length", "stop")
    assert res.usage.prompt_tokens == len(tok.encode(prompt)) and res.usage.completion_tokens == len(expected)
    assert res.model == MODEL and res.object == "text_completion"


def test_streaming_gives_the_same_text_and_usage(server):
    client = server.client()
    kw = dict(model=MODEL, prompt=[11, 22, 33], max_tokens=10, temperature=0.9, seed=5)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_concurrent_requests_return_what_they_return_alone(server):
    """64 requests of mixed lengths, more than the 8 slots: continuous batching is invisible."""
    cases = [([(7 * i + j) % 5000 + 1 for j in range(1 + i % 9)], 3 + i % 7, i) for i in range(64)]

    def ask(case):
        prompt, n, seed = case
        r = server.post({"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0.8, "seed": seed,
                         "logprobs": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, cases))
    from graphc.data.tokenizer import Tokenizer

    tok = Tokenizer()
    for (prompt, n, seed), got in zip(cases, results):
        ids = _alone(prompt, n, temperature=0.8, seed=seed)
        assert got["logprobs"]["tokens"] == [tok.decode_bytes(t).decode("utf-8", "replace") for t in ids
                                             if t != tok.eot]


def test_n_choices_and_list_prompts(server):
    r = server.post({"model": MODEL, "prompt": ["a b", "c"], "n": 2, "max_tokens": 4, "seed": 1})
    body = r.json()
    assert r.status_code == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 16


def test_prompt_tokens_count_each_prompt_once_whatever_n(server):
    from graphc.data.tokenizer import Tokenizer

    hi = len(Tokenizer().encode("hi"))
    before = server.metric("graphc_prompt_tokens_total")
    client = server.client()
    assert client.completions.create(model=MODEL, prompt="hi", n=3, max_tokens=2).usage.prompt_tokens == hi
    chunks = list(client.completions.create(model=MODEL, prompt=[[1, 2], [3, 4, 5]], n=2, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == 5 and chunks[-1].usage.completion_tokens == 8
    assert server.metric("graphc_prompt_tokens_total") - before == hi + 5


def test_a_request_the_queue_can_never_hold_is_not_a_rate_limit(server):
    """429 makes the openai client retry, and no retry can fit 136 sequences into 128."""
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model=MODEL, prompt=["a"] * 17, n=8, max_tokens=1)
    assert "128" in info.value.body["message"] and info.value.body["param"] == "n"


def test_null_fields_mean_their_defaults(server):
    r = server.post({"model": MODEL, "prompt": "a", "max_tokens": None, "n": None, "top_k": None, "top_p": None,
                     "logit_bias": None, "suffix": None, "best_of": None, "frequency_penalty": None,
                     "presence_penalty": None, "stop": None, "seed": None, "logprobs": None, "echo": None,
                     "temperature": None, "stream": None, "stream_options": None, "user": None})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 1 and body["usage"]["completion_tokens"] in range(1, 17)


def test_choices_of_neighbouring_seeds_do_not_overlap(server):
    """Choice 0 samples with the plain seed (as n: 1 does); the others must not be seed + i,
    or seed 8's choices 0-1 would be seed 7's choices 1-2."""
    def texts(seed, n):
        body = {"model": MODEL, "prompt": "Once", "max_tokens": 8, "temperature": 1.0, "seed": seed, "n": n}
        return [c["text"] for c in server.post(body).json()["choices"]]

    seven, eight = texts(7, 3), texts(8, 3)
    assert eight[:2] != seven[1:] and eight[0] != seven[1] and eight[1] != seven[2]
    assert texts(8, 1) == eight[:1] and len(set(eight)) == 3


def test_stop_strings_cut_the_text(server):
    base = server.post({"model": MODEL, "prompt": "x", "max_tokens": 20, "temperature": 0}).json()["choices"][0]["text"]
    stop = base[3:6]
    assert stop.strip(), base
    r = server.post({"model": MODEL, "prompt": "x", "max_tokens": 20, "temperature": 0, "stop": [stop]}).json()
    assert r["choices"][0]["text"] == base[:base.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
    chunks = [json.loads(line[6:]) for line in httpx.post(
        server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 20, "temperature": 0,
                                              "stop": stop, "stream": True}, timeout=60).text.splitlines()
              if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == base[:base.index(stop)]


def test_echo_and_prompt_scoring(server):
    r = server.post({"model": MODEL, "prompt": [464, 2068, 7586], "echo": True, "max_tokens": 0, "logprobs": 1}).json()
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == "The quick brown"
    assert lp["tokens"] == ["The", " quick", " brown"] and lp["token_logprobs"][0] is None
    assert all(v < 0 for v in lp["token_logprobs"][1:]) and lp["text_offset"] == [0, 3, 9]
    for token, logprob, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[token] == logprob and 1 <= len(top) <= 2          # logprobs + 1 at most: the chosen one is in
    lp = server.post({"model": MODEL, "prompt": "a", "max_tokens": 5, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert lp["top_logprobs"] == [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"])]


BAD = [
    ({"prompt": "a"}, 400, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, 2, 99999]}, 400, "prompt"),
    ({"model": MODEL, "prompt": [[1], "a"]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": list(range(1, 1020)), "max_tokens": 10}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "a", "top_k": -5}, 400, "top_k"),
    ({"model": MODEL, "prompt": "a", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "a", "n": 1000}, 400, "n"),
    ({"model": MODEL, "prompt": "a", "logprobs": 9}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": "a", "seed": -3}, 400, "seed"),
    ({"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": MODEL, "prompt": "a", "logit_bias": {"50256": -100}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "a", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"model": MODEL, "prompt": "a", "presence_penalty": 1}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": "a", "suffix": "end"}, 400, "suffix"),
    ({"model": MODEL, "prompt": "a", "best_of": 3}, 400, "best_of"),
    ({"model": MODEL, "prompt": ["a"] * 17, "n": 8}, 400, "n"),           # 136 sequences, the queue holds 128
    ({"model": MODEL, "prompt": ["a"] * 129}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ([1, 2], 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = server.post(body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_bad_transport_and_routes(server):
    assert httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=10).status_code == 400
    big = httpx.post(server.url + "/v1/completions", content=b" " * (2 << 20), timeout=10)
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
    for method, path, status in (("GET", "/v2/nothing", 404), ("GET", "/v1/completions", 405)):
        r = httpx.request(method, server.url + path, timeout=10)
        assert r.status_code == status and "error" in r.json()
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"] == MODEL
    # the server still answers after all of that
    assert server.post({"model": MODEL, "prompt": "a", "max_tokens": 1}).status_code == 200


def test_disconnect_mid_stream_frees_the_slot(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "a", "max_tokens": 900, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    deadline = time.monotonic() + 10
    while server.metric("graphc_running_batch") != 0:
        assert time.monotonic() < deadline, "the disconnected stream still holds its slot"
        time.sleep(0.1)


def test_sequential_requests_leave_memory_flat(server):
    with httpx.Client(timeout=30) as http:
        def burst(n):
            for i in range(n):
                assert http.post(server.url + "/v1/completions",
                                 json={"model": MODEL, "prompt": [i % 500 + 1], "max_tokens": 1}).status_code == 200
        burst(100)                 # warm up allocators and caches
        before = server.rss_kb()
        burst(1000)
        after = server.rss_kb()
    assert after - before < 20_000, f"RSS grew by {after - before} kB over 1000 requests"


def test_default_max_tokens_fits_a_small_context():
    """OpenAI's default max_tokens (16) must not be refused by --context 8: the user never sent it."""
    s = Server("--context", "8", "--max-batch", "2")
    try:
        r = s.post({"model": MODEL, "prompt": [1, 2, 3], "temperature": 0})
        assert r.status_code == 200, r.text
        assert 1 <= r.json()["usage"]["completion_tokens"] <= 5
        r = s.post({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 16})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    finally:
        assert s.stop() == 0


def test_api_key_queue_limit_and_clean_shutdown():
    s = Server("--max-batch", "1", "--max-queue", "1", "--api-key", "sekrit")
    try:
        assert s.post({"model": MODEL, "prompt": "a", "max_tokens": 1}).status_code == 401
        auth = {"Authorization": "Bearer sekrit"}
        assert s.post({"model": MODEL, "prompt": "a", "max_tokens": 1}, headers=auth).status_code == 200
        assert s.client(api_key="sekrit").completions.create(model=MODEL, prompt="a", max_tokens=2).choices
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(s.post, {"model": MODEL, "prompt": "a", "max_tokens": 300}, headers=auth)
                       for _ in range(4)]
            codes = sorted(f.result().status_code for f in futures)
        assert 429 in codes and 200 in codes, codes
        busy = concurrent.futures.ThreadPoolExecutor(1).submit(
            s.post, {"model": MODEL, "prompt": "a", "max_tokens": 1000}, headers=auth)
        time.sleep(0.5)
    finally:
        code = s.stop(signal.SIGINT)
    assert code == 0
    assert busy.result().status_code in (200, 503)      # finished, or told the server stopped: never hung
