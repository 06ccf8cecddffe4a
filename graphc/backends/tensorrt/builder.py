"""Build a TensorRT engine from a graphc graph and report what was built.

``build_engine(model, ...)``: legalise (``legalize.py``), parse into a strongly typed
network, let FP32 attentions decompose, add the optimisation profile, build with detailed
profiling verbosity, and read the builder's layer report to count the attentions that became
fused MHA kernels. Any parser or builder failure is a one-line :class:`GraphcError`.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field

import onnx

from graphc.backends.tensorrt.flavor import Flavor
from graphc.backends.tensorrt.legalize import LegalizeForTensorRT
from graphc.backends.tensorrt.network import (
    add_profile,
    allow_decomposed_fp32_attention,
    fix_static_dims,
    one_line,
    parse_onnx,
    profile_shapes,
)
from graphc.backends.tensorrt.report import EngineLayer, fused_attention_nodes, layers_from_log
from graphc.errors import GraphcError


@dataclass
class EngineBuild:
    """A serialized engine and what the builder said about it."""

    plan: bytes
    flavor: str
    version: str
    precision: str
    num_layers: int                     # layers of the parsed network
    attention_nodes: list[str]          # ONNX Attention nodes of the graph (L)
    fused_attention: list[str]          # those built as a fused MHA kernel (k of L)
    decomposable: list[str]             # FP32 attentions allowed to decompose
    seconds: float
    engine_layers: list[EngineLayer] = field(default_factory=list)
    profile: dict = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)    # engine input name -> TensorRT dtype name
    outputs: dict[str, str] = field(default_factory=dict)   # engine output name -> TensorRT dtype name

    def line(self, path) -> str:
        """The line ``graphc engine`` prints."""
        return (f"engine {path}: {self.flavor} {self.version}, {self.precision}, {self.num_layers} layers, "
                f"attention fused {len(self.fused_attention)}/{len(self.attention_nodes)}, "
                f"built in {self.seconds:.1f} s")


def _make_logger(trt):
    class CapturingLogger(trt.ILogger):
        """Keeps every message: the layer report arrives as one VERBOSE message."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[object, str]] = []

        def log(self, severity, msg):
            self.messages.append((severity, msg))

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR)]

    return CapturingLogger()


def _make_progress_monitor(trt, stop: list[int]):
    class CancelOnSignal(trt.IProgressMonitor):
        """Cancels the build (``step_complete`` returns False) once a signal was recorded."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def step_complete(self, phase_name, step):
            return not stop

        def phase_finish(self, phase_name):
            pass

    return CancelOnSignal()


@contextlib.contextmanager
def signals_deferred(stop: list[int]):
    """SIGINT / SIGTERM while TensorRT builds: recorded in ``stop``, re-raised afterwards.

    TensorRT calls back into Python only through its logger and progress monitor, and it
    swallows what they raise: a Ctrl-C raised there printed ``[ERROR] Exception caught in
    log(): KeyboardInterrupt`` and the build went on to write the engine. So the handlers
    only record the signal, the progress monitor cancels the build, and the signal is raised
    again once the builder has returned, reaching the handlers that were there before
    (``KeyboardInterrupt``, the CLI's SIGTERM exit): exit 130 / 143 and no engine written."""
    try:   # (an ignored signal stays ignored: a background job of a non-interactive shell ignores SIGINT)
        previous = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN}
    except ValueError:          # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if stop:
            signal.raise_signal(stop[0])


def name_attention_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the graph's ``Attention`` nodes (unnamed ones get a name: the report keys on it)."""
    names = []
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            if not node.name:
                node.name = f"attention_node_{i}"
            names.append(node.name)
    return names


def build_engine(model: onnx.ModelProto, *, flavor: Flavor, precision: str, max_batch: int, max_seq: int,
                 where: str | None = None) -> EngineBuild:
    """Build ``model`` (a graphc graph, precision already applied) into a serialized engine."""
    trt = flavor.trt
    start = time.perf_counter()
    legal, _ = LegalizeForTensorRT()(model)
    model = fix_static_dims(legal, max_batch, max_seq)   # a copy: naming nodes below leaves the caller's alone
    attention_nodes = name_attention_nodes(model)
    shapes = profile_shapes(model, max_batch, max_seq)

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = parse_onnx(flavor, builder, logger, model, where)
    decomposable = allow_decomposed_fp32_attention(flavor, network)
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    add_profile(flavor, builder, config, shapes)
    stop: list[int] = []
    config.progress_monitor = _make_progress_monitor(trt, stop)
    with signals_deferred(stop):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = logger.errors() or ["the builder returned no engine"]
        raise GraphcError(where, f"TensorRT {flavor.name} {flavor.version} failed to build the engine: "
                                 f"{one_line(errors[0])}", "engine")
    seconds = time.perf_counter() - start
    layers = layers_from_log([m for _, m in logger.messages])
    if not layers:
        raise RuntimeError("TensorRT's builder gave no layer report (ProfilingVerbosity.DETAILED, VERBOSE log)")
    return EngineBuild(
        plan=bytes(plan), flavor=flavor.name, version=flavor.version, precision=precision,
        num_layers=network.num_layers, attention_nodes=attention_nodes,
        fused_attention=fused_attention_nodes(layers, attention_nodes), decomposable=decomposable,
        seconds=seconds, engine_layers=layers, profile=shapes.profile,
        inputs={t.name: t.dtype.name for t in map(network.get_input, range(network.num_inputs))},
        outputs={t.name: t.dtype.name for t in map(network.get_output, range(network.num_outputs))},
    )
