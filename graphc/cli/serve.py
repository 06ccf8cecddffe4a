"""``graphc serve``: an OpenAI-compatible completions server with continuous batching."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys

from graphc.cli.common import add_model_args, add_precision_arg, positive
from graphc.errors import GraphcError

HELP = "serve a model over an OpenAI-compatible HTTP API (/v1/completions, streaming, continuous batching)"


def add_arguments(p):
    from graphc.backends import REGISTRY

    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--backend", default="onnxruntime", choices=sorted(REGISTRY), help="execution backend")
    add_precision_arg(p)
    p.add_argument("--max-batch", type=positive("--max-batch"), default=32,
                   help="sequences decoded together at most (KV-cache slots; default 32)")
    p.add_argument("--max-queue", type=positive("--max-queue"), default=256,
                   help="sequences waiting for a slot at most; beyond it requests get 429, and one request "
                        "of more sequences (prompts x n) than this gets 400 (default 256)")
    p.add_argument("--context", type=positive("--context"), default=None,
                   help="cache positions per sequence: the longest prompt + max_tokens accepted "
                        "(default: the model's maximum sequence length)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set GRAPHC_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model as given)")
    p.add_argument("--no-opt", action="store_true", help="run the unoptimised graphs")


def run(args) -> int:
    from graphc.backends import get_backend
    from graphc.data.tokenizer import Tokenizer
    from graphc.models.load import load_model
    from graphc.runtime.decode import DecodeSpec
    from graphc.runtime.serving.app import ServerConfig, build_app
    from graphc.runtime.serving.engine import Engine

    if args.api_key is not None and not args.api_key:   # "" would silently serve without authentication
        raise GraphcError(None, "must not be empty", "--api-key")
    if not 0 <= args.port <= 65535:
        raise GraphcError(None, f"must be 0..65535, got {args.port}", "--port")
    sock = bind_socket(args.host, args.port)      # before the model loads: a taken port is found at once
    with sock:                                   # closed on every way out
        params = load_model(args.model, args.seed)
        cfg = params.cfg
        context = args.context or cfg.max_seq_len
        if context > cfg.max_seq_len:
            raise GraphcError(None, f"{context} exceeds the model's maximum sequence length {cfg.max_seq_len}", "--context")
        tokenizer = Tokenizer()
        backend = get_backend(args.backend)()
        decoder = backend.decoder(backend.upload_params(params),
                                  DecodeSpec(args.max_batch, context, args.precision, not args.no_opt))
        engine = Engine(decoder, eot=tokenizer.eot, max_queue=args.max_queue)
        name = args.served_model_name or args.model
        config = ServerConfig(model_name=name, context=context, vocab_size=cfg.vocab_size, max_batch=args.max_batch,
                              api_key=args.api_key or os.environ.get("GRAPHC_API_KEY") or None)
        app = build_app(engine, tokenizer, config)

        banner = f"(backend {backend.name}, max batch {args.max_batch})"
        if not run_server(engine, app, sock, name, banner):
            raise GraphcError(None, f"could not listen on {args.host}:{args.port}", "--port")
    print("stopped", file=sys.stderr)
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound now: a host that does not resolve or is not this machine's,
    or a port in use, is one line (uvicorn would log it and exit 3 after the model loaded)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise GraphcError(host, f"not an address to listen on ({e.strerror})", "--host") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise GraphcError(f"{host}:{port}", "address already in use (another server? pick another --port, "
                                                "or 0 for a free one)", "--port") from None
        raise GraphcError(host, f"cannot listen here ({e.strerror})", "--host") from None
    sock.set_inheritable(True)
    return sock


def run_server(engine, app, sock: socket.socket, name: str, banner: str) -> bool:
    """Start ``engine``, serve ``app`` with uvicorn on ``sock`` (:func:`bind_socket`) until
    SIGINT/SIGTERM, stop the engine.

    Prints ``serving NAME on http://HOST:PORT BANNER`` once listening (what clients and the
    tests read the port from). Returns whether it ever listened."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                bound_host, bound_port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"serving {name} on http://{_url_host(bound_host)}:{bound_port} {banner}", flush=True)

        @contextlib.contextmanager
        def capture_signals(self):
            """SIGINT/SIGTERM start a graceful shutdown; the process then exits 0 (uvicorn's own
            version re-raises the signal afterwards, which would turn a clean stop into a kill)."""
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets=None):
            engine.stop()               # in-flight requests get their answer ("abort") and end
            await super().shutdown(sockets)

    engine.start()
    server = Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
    return bool(server.started)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
