"""A GPU-like stand-in decoder, to measure the server's host overhead without a GPU.

:class:`FakeDecoder` is a :class:`~graphc.runtime.decode.Decoder` whose ``step()`` releases
the GIL for a fixed time (``time.sleep``), as a CUDA-graph decode step does while the host
waits for the device, and returns deterministic tokens (never end-of-text, so every request
runs to ``max_tokens``). Everything the server does around the step (the engine loop, the
hand-off to asyncio, detokenizing, JSON, HTTP) is the real code, so the server's tokens/s
against this decoder's raw steps (``serve_load.py --raw``) is the host overhead alone. CPU-side measurement only: the
real CUDA decoder also has its own host work per step (sampling, copies).

    python bench/fake_decoder.py --step-ms 0.85 --max-batch 32 --port 0

serves it (the same ``serving NAME on http://...`` line as ``graphc serve``);
``bench/serve_load.py --fake-decoder-ms 0.85`` starts it for a load test.
"""

from __future__ import annotations

import argparse
import sys
import time

from graphc.errors import GraphcError
from graphc.runtime.decode import DecodeSpec, Decoder, Sampled

VOCAB = 50257
EOT = 50256


class FakeDecoder(Decoder):
    """Slots like the real decoder; each step sleeps ``step_s`` and gives every live slot the
    token ``(previous * 7 + 13) % 50000`` (deterministic, never EOT)."""

    def __init__(self, slots: int, capacity: int, step_s: float):
        self.spec = DecodeSpec(slots, capacity)
        self.step_s = step_s
        self.last: dict[int, int] = {}
        self.lengths: dict[int, int] = {}

    def add(self, prompt, sampler, *, logprobs=None):
        slot = self.admit(len(prompt))
        self.last[slot], self.lengths[slot] = prompt[-1], len(prompt)
        return slot, self._next(slot)

    def _next(self, slot: int) -> Sampled:
        token = (self.last[slot] * 7 + 13) % 50000
        self.last[slot] = token
        self.lengths[slot] += 1
        return Sampled(token)

    def step(self) -> dict[int, Sampled]:
        held = self._take_held()
        running = [slot for slot in self.last if slot not in held]
        if running:
            time.sleep(self.step_s)    # the device step: the GIL is free meanwhile
        for slot in running:
            if self.lengths[slot] >= self.spec.capacity:
                raise GraphcError(None, f"slot {slot} is full ({self.spec.capacity} positions)", "capacity")
            held[slot] = self._next(slot)
        return held

    def score(self, prompt, logprobs=0):
        return [None] + [Sampled(t, -1.0, ()) for t in prompt[1:]]

    def remove(self, slot: int) -> None:
        self.last.pop(slot, None)
        self.lengths.pop(slot, None)
        self._held_tokens().pop(slot, None)

    @property
    def live(self) -> list[int]:
        return sorted(self.last)

    def length(self, slot: int) -> int:
        return self.lengths[slot]


def main() -> int:
    from graphc.cli.serve import bind_socket, run_server
    from graphc.data.tokenizer import Tokenizer
    from graphc.runtime.serving.app import ServerConfig, build_app
    from graphc.runtime.serving.engine import Engine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step-ms", type=float, default=0.85, help="simulated decode step (default 0.85, H200 d12 batch 32)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--served-model-name", default="m")
    args = p.parse_args()
    tokenizer = Tokenizer()
    engine = Engine(FakeDecoder(args.max_batch, args.context, args.step_ms / 1000), eot=tokenizer.eot,
                    max_queue=args.max_queue)
    config = ServerConfig(model_name=args.served_model_name, context=args.context, vocab_size=VOCAB,
                          max_batch=args.max_batch)
    app = build_app(engine, tokenizer, config)
    started = run_server(engine, app, bind_socket("127.0.0.1", args.port), args.served_model_name,
                         f"(backend fake {args.step_ms} ms/step, max batch {args.max_batch})")
    return 0 if started else 2


if __name__ == "__main__":
    sys.exit(main())
