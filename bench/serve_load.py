"""Load test of ``graphc serve`` on loopback: throughput, time to first token, time per token.

    python bench/serve_load.py --model d12 --backend onnxruntime [--concurrency 1,8,32,64]

Starts the server as a subprocess (``--port 0``, 127.0.0.1 only), then for each concurrency
level runs that many clients, each sending a bounded number of streaming requests
(``--requests`` per client, ``--max-tokens`` each, greedy, a prompt of ``--prompt-tokens``);
every loop is bounded in count and time and the server is stopped at the end. Prints one
table: generated tokens/s over the whole level, and time to first token / time per output
token (per request: (last token - first) / (tokens - 1)) at p50 and p99. ``--raw`` adds the raw batched
decode program (``Decoder.step`` at the same batch, in this process, no HTTP) for the
comparison the serving issue asks for (server tokens/s within 15% of it at 32 clients).
It also prints the server process's CPU time per generated token and the cores the server
and the clients (this process) kept busy: on a machine of few cores the clients compete
with the server, and CPU per token is the host overhead that does not depend on that.

``--fake-decoder-ms 0.85`` serves ``bench/fake_decoder.py`` (a simulated GPU step that holds
no CPU and no GIL) instead of a model: the server's host overhead without a GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import numpy as np

LINE = re.compile(r"^serving \S+ on http://127\.0\.0\.1:(\d+) ")


def start_server(args) -> tuple[subprocess.Popen, str]:
    if args.fake_decoder_ms is not None:   # the simulated GPU step: host overhead only
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_decoder.py"),
               "--step-ms", str(args.fake_decoder_ms), "--max-batch", str(max(args.concurrency)),
               "--context", str(args.prompt_tokens + args.max_tokens)]
    else:
        cmd = [sys.executable, "-m", "graphc", "serve", "--model", args.model, "--port", "0", "--backend", args.backend,
           "--precision", args.precision, "--max-batch", str(max(args.concurrency)), "--max-queue", "1024",
               "--served-model-name", "m", "--context", str(args.prompt_tokens + args.max_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = LINE.match(line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{match.group(1)}"


def one_request(http: httpx.Client, url: str, prompt: list[int], max_tokens: int, deadline: float,
                stream: bool = True):
    """(first-token seconds, [time per output token], tokens) of one request. Streaming: the
    tokens are the usage the server reports (an event can carry several tokens when the
    client reads slower than the model steps), TPOT = (last event - first) / (tokens - 1), as
    vLLM's benchmark defines it. Non-streaming: the whole answer's time as its first token,
    no TPOT."""
    t0 = time.perf_counter()
    stamps = []
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    tokens = 0
    if not stream:
        r = http.post(url + "/v1/completions", json=body, timeout=max(deadline - t0, 1))
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
        return time.perf_counter() - t0, [], r.json()["usage"]["completion_tokens"]
    with http.stream("POST", url + "/v1/completions", json=body, timeout=max(deadline - t0, 1)) as r:
        if r.is_error:   # the server's one-line error says why (the status alone does not)
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:500]}")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    stamps.append(time.perf_counter())
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    if not stamps or not tokens:
        return None
    return stamps[0] - t0, ([(stamps[-1] - stamps[0]) / (tokens - 1)] if tokens > 1 else []), tokens


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def level(url: str, clients: int, args, server_pid: int) -> dict:
    """One concurrency level. The HTTP clients, their connections and the prompts are made
    before the clock starts (an httpx.Client costs milliseconds of CPU to create, which on
    2 cores would be charged to the server)."""
    rng = np.random.default_rng(clients)
    prompts = [[[int(t) for t in rng.integers(1, 50000, args.prompt_tokens)] for _ in range(args.requests)]
               for _ in range(clients)]
    https = [httpx.Client() for _ in range(clients)]
    for http in https:   # connect (one cheap request each), outside the timing
        http.get(url + "/health", timeout=30)
    start = threading.Barrier(clients + 1)
    deadline = time.perf_counter() + args.level_timeout

    def client(i: int):
        out = []
        start.wait()
        for prompt in prompts[i]:
            if time.perf_counter() > deadline:
                break
            res = one_request(https[i], url, prompt, args.max_tokens, deadline, not args.no_stream)
            if res is not None:
                out.append(res)
        return out

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        start.wait()
        t0, cpu0, own0 = time.perf_counter(), cpu_seconds(server_pid), time.process_time()
        results = [r for f in futures for r in f.result()]
        seconds = time.perf_counter() - t0
        server_cpu, client_cpu = cpu_seconds(server_pid) - cpu0, time.process_time() - own0
    for http in https:
        http.close()
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    pct = lambda xs, q: float(np.percentile(xs, q) * 1000) if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "tok_s": tokens / seconds,
            "server_us": server_cpu / tokens * 1e6, "server_cores": server_cpu / seconds,
            "client_cores": client_cpu / seconds,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(gaps, 50), "tpot_p99": pct(gaps, 99)}


def raw_decode(args, batch: int) -> float:
    """tokens/s of the batched decode program alone at ``batch`` live sequences."""
    from graphc.runtime.sampling import Sampler

    capacity = args.prompt_tokens + args.max_tokens
    if args.fake_decoder_ms is not None:
        from fake_decoder import FakeDecoder

        dec = FakeDecoder(batch, capacity, args.fake_decoder_ms / 1000)
    else:
        from graphc.backends import get_backend
        from graphc.models.load import load_model
        from graphc.runtime.decode import DecodeSpec

        backend = get_backend(args.backend)()
        params = backend.upload_params(load_model(args.model, 0))
        dec = backend.decoder(params, DecodeSpec(batch, capacity, args.precision))
    rng = np.random.default_rng(0)
    for _ in range(batch):
        dec.add([int(t) for t in rng.integers(1, 50000, args.prompt_tokens)], Sampler(temperature=0))
    steps = args.max_tokens - 2
    dec.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        dec.step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="d12")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--requests", type=int, default=4, help="requests per client per level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--level-timeout", type=float, default=300.0, help="seconds per level at most")
    p.add_argument("--raw", action="store_true", help="also time the raw batched decode program")
    p.add_argument("--no-stream", action="store_true",
                   help="non-streaming requests (TTFT is then the whole answer's time; no TPOT)")
    p.add_argument("--fake-decoder-ms", type=float, default=None,
                   help="serve bench/fake_decoder.py (a simulated step of this many ms) instead of a model: "
                        "the server's host overhead alone")
    p.add_argument("--repeats", type=int, default=1, help="run each level this many times (tokens/s: median, range)")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    proc, url = start_server(args)
    rows = []
    try:
        for clients in args.concurrency:
            runs = [level(url, clients, args, proc.pid) for _ in range(args.repeats)]
            row = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
            row["tok_s_range"] = (min(r["tok_s"] for r in runs), max(r["tok_s"] for r in runs))
            rows.append(row)
    finally:
        proc.terminate()
        proc.wait(30)
    model = "fake decoder" if args.fake_decoder_ms is not None else f"{args.model}, backend {args.backend} {args.precision}"
    print(f"\ngraphc serve, {model}, greedy, {args.prompt_tokens}-token "
          f"prompts, {args.max_tokens} tokens each, {'non-streaming' if args.no_stream else 'streaming'}; "
          f"cpu threads {os.cpu_count()}")
    if args.fake_decoder_ms is not None:
        print(f"simulated decoder: {args.fake_decoder_ms} ms per step (bench/fake_decoder.py), "
              f"{args.repeats} run(s) per level: tokens/s median (min..max)")
    print("| clients | requests | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms "
          "| server CPU µs/token | server cores | client cores |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        lo, hi = r["tok_s_range"]
        spread = f" ({lo:.0f}..{hi:.0f})" if args.repeats > 1 else ""
        print(f"| {r['clients']} | {r['requests']} | {r['tok_s']:.1f}{spread} | {r['ttft_p50']:.1f} | "
              f"{r['ttft_p99']:.1f} | {r['tpot_p50']:.1f} | {r['tpot_p99']:.1f} | {r['server_us']:.1f} | "
              f"{r['server_cores']:.2f} | {r['client_cores']:.2f} |")
    if args.raw:
        for clients in args.concurrency:
            if clients > 1:
                raw = raw_decode(args, clients)
                served = next(r["tok_s"] for r in rows if r["clients"] == clients)
                print(f"raw batched decode at batch {clients}: {raw:.1f} tokens/s; server at {clients} clients: "
                      f"{served / raw:.0%} of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
