"""The comparator: one graph, several backends (or graph variants), the same inputs.

Like Polygraphy's comparator: each *run* is a label, a backend and a model; all runs get
the same seeded feeds; every output of every later run is compared with the first run's
with the tolerance of the precision the graph computes in (:data:`TOLERANCES`, one
table). ``graphc compare`` and the tests use it, as do the passes' tests (a pass must
not change what a graph computes: :func:`relative_errors`).

The GPT-2 cases (:func:`gpt2_case`) are the graphs the runtime executes: ``infer`` (the
optimised forward with logits and loss), ``train`` (the training graph: loss and every
``grad.*``) and ``decode`` (one KV-cache decode step after a filled cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from graphc.errors import GraphcError


# ----------------------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerance:
    """An output passes when ``max|x - ref| <= atol + rtol * max|ref|``."""

    rtol: float
    atol: float


TOLERANCES: dict[str, Tolerance] = {
    # float64 against float64: only summation order differs
    "float64": Tolerance(rtol=1e-10, atol=1e-12),
    # float32 against float32/float64: 24-bit mantissas through a dozen layers of GEMMs
    "float32": Tolerance(rtol=1e-4, atol=1e-6),
    # bfloat16 compute (8-bit mantissas, 2^-8 per rounding) against an fp32/fp64 reference
    "bfloat16": Tolerance(rtol=3e-2, atol=1e-3),
}
"""Per compute dtype (the precision a graph computes in, not its output dtype: a BF16
graph still returns float32 logits, loss and gradients)."""


def tolerance(dtype: str) -> Tolerance:
    if dtype not in TOLERANCES:
        raise KeyError(f"no comparison tolerance for dtype {dtype!r} (known: {', '.join(TOLERANCES)})")
    return TOLERANCES[dtype]


# ----------------------------------------------------------------------------- feeds and runs
def random_feeds(model: onnx.ModelProto, dims: dict[str, int], *, int_high: int | dict[str, int] = 2,
                 scale: float = 0.2, seed: int = 0) -> dict:
    """Random values for every graph input (symbolic dims from ``dims``): floats ~ N(0,
    scale^2), integers uniform in [0, int_high) (a dict gives per-input bounds)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in model.graph.input:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dims[d.dim_param] for d in t.shape.dim]
        dt = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if dt.kind == "f":
            feeds[v.name] = (rng.standard_normal(shape) * scale).astype(dt)
        elif dt.kind in "iu":
            high = int_high.get(v.name, 2) if isinstance(int_high, dict) else int_high
            feeds[v.name] = rng.integers(0, high, size=shape).astype(dt)
        elif dt == np.bool_:
            feeds[v.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise TypeError(f"no random feed for {v.name} of type {dt}")
    return feeds


def run_model(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], backend: str = "onnxruntime",
              **backend_options) -> dict[str, np.ndarray]:
    """Run ``model`` once on ``backend`` (inputs it does not declare are ignored); outputs by name."""
    from graphc.backends import get_backend

    prepared = get_backend(backend)(**backend_options).prepare(model)
    return prepared.run({k: v for k, v in feeds.items() if k in prepared.input_names})


def run_onnxruntime(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_model(model, feeds, "onnxruntime")


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """||actual - reference|| / ||reference|| in float64 (a shape mismatch, NaN or Inf: inf)."""
    x, y = np.asarray(reference).astype(np.float64), np.asarray(actual).astype(np.float64)
    if x.shape != y.shape or not np.all(np.isfinite(y)):
        return float("inf")
    denom = np.linalg.norm(x)
    return float(np.linalg.norm(y - x) / (denom if denom > 0 else 1.0))


def relative_errors(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict, backend: str = "onnxruntime",
                    ) -> dict[str, float]:
    """:func:`relative_error` of model ``b`` against model ``a`` for every output they share."""
    ra, rb = run_model(a, feeds, backend), run_model(b, feeds, backend)
    return {k: relative_error(rb[k], ra[k]) for k in ra.keys() & rb.keys()}


# ----------------------------------------------------------------------------- comparison
@dataclass
class OutputDiff:
    """One output of one run against the same output of the first run."""

    name: str
    run: str
    max_abs: float
    max_rel: float          # max_abs / max|reference| (the output's scale)
    ok: bool
    note: str = ""

    def line(self) -> str:
        verdict = "ok" if self.ok else f"FAIL{' (' + self.note + ')' if self.note else ''}"
        return f"{self.run}: {self.name}: max abs {self.max_abs:.3e} rel {self.max_rel:.3e} {verdict}"


@dataclass
class Comparison:
    reference: str                          # the first run's label
    tolerance: Tolerance
    diffs: list[OutputDiff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.diffs)

    @property
    def failed(self) -> list[str]:
        return [f"{d.run}: {d.name}" for d in self.diffs if not d.ok]


def diff(name: str, run: str, value: np.ndarray, ref: np.ndarray, tol: Tolerance) -> OutputDiff:
    if np.asarray(ref).dtype.kind in "iub":   # token ids, lengths, masks: exactly equal or wrong
        same = np.shape(value) == np.shape(ref) and np.array_equal(np.asarray(value), np.asarray(ref))
        return OutputDiff(name, run, 0.0 if same else float("inf"), 0.0 if same else float("inf"), same,
                          "" if same else "integer values differ")
    x, r = np.asarray(value, np.float64), np.asarray(ref, np.float64)
    if x.shape != r.shape:
        return OutputDiff(name, run, float("inf"), float("inf"), False, f"shape {x.shape} vs {r.shape}")
    if not np.all(np.isfinite(x)) or not np.all(np.isfinite(r)):
        return OutputDiff(name, run, float("inf"), float("inf"), False, "not finite")
    max_abs = float(np.max(np.abs(x - r))) if x.size else 0.0
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputDiff(name, run, max_abs, max_rel, max_abs <= tol.atol + tol.rtol * scale)


@dataclass
class Run:
    """One thing to compare: a label, a backend name, the model it runs (and backend options)."""

    label: str
    backend: str
    model: onnx.ModelProto
    options: dict = field(default_factory=dict)


def compare(runs: Sequence[Run], feeds: Mapping[str, np.ndarray], *, dtype: str = "float32",
            outputs: Sequence[str] | None = None) -> Comparison:
    """Run every run on ``feeds``; compare each later run's outputs with the first run's.

    ``outputs`` (default: every output of the first run) are compared by name; a run
    missing one fails it. ``dtype`` picks the tolerance (:data:`TOLERANCES`).
    """
    results = [run_model(r.model, feeds, r.backend, **r.options) for r in runs]
    return compare_results([r.label for r in runs], results, dtype=dtype, outputs=outputs)


def compare_results(labels: Sequence[str], results: Sequence[Mapping[str, np.ndarray]], *, dtype: str = "float32",
                    outputs: Sequence[str] | None = None) -> Comparison:
    """Each later result against the first, output by output (default: all of the first's)."""
    if len(results) < 2:
        raise GraphcError(None, f"need at least two runs to compare, got {len(results)}", "--backends")
    tol = tolerance(dtype)
    names = list(outputs) if outputs is not None else list(results[0])
    result = Comparison(labels[0], tol)
    for label, out in zip(labels[1:], results[1:]):
        for name in names:
            if name not in out:
                result.diffs.append(OutputDiff(name, label, float("inf"), float("inf"), False, "missing"))
                continue
            result.diffs.append(diff(name, label, out[name], results[0][name], tol))
    return result


# ----------------------------------------------------------------------------- GPT-2 cases
GraphFn = Callable[..., onnx.ModelProto]


@dataclass
class Case:
    """A GPT-2 step of one mode: ``graph(backend=, precision=, opt=)`` builds the graph a
    backend runs (optimised, legalised, rewritten for the precision), ``feeds`` are the
    shared inputs (parameters included), ``outputs`` what to compare (None: all)."""

    graph: GraphFn
    feeds: dict[str, np.ndarray]
    outputs: list[str] | None = None


def _batch(cfg, B: int, T: int, rng) -> dict[str, np.ndarray]:
    return {"tokens": rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int64),
            "targets": rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int64)}


def infer_case(params, B: int, T: int, *, seed: int = 0) -> Case:
    """The forward graph ``graphc eval`` runs: logits and loss of a random batch."""
    from graphc.runtime.programs import forward_graph

    def graph(**how):
        return forward_graph(params.cfg, loss=True, logits=True, **how)

    return Case(graph, {**_batch(params.cfg, B, T, np.random.default_rng(seed)), **params.feeds()})


def train_case(params, B: int, T: int, *, seed: int = 0) -> Case:
    """The training graph ``graphc train`` runs: the loss and every ``grad.*``."""
    from graphc.runtime.programs import training_graph

    def graph(**how):
        return training_graph(params.cfg, **how)

    return Case(graph, {**_batch(params.cfg, B, T, np.random.default_rng(seed)), **params.feeds()})


def decode_case(params, B: int, T: int, *, seed: int = 0) -> Case:
    """One KV-cache decode step: a cache of capacity T filled (random K/V, N(0, 1)) up to each
    sequence's own past length in [T/2, T-1], one new token per sequence; compares the
    logits and every updated cache."""
    from graphc.models.kv_cache import build_decode, cache_shape, past_name
    from graphc.runtime.programs import compile_graph

    cfg = params.cfg
    if T < 2:
        raise GraphcError(None, f"decode needs a cache of at least 2 slots, got {T}", "-t")
    rng = np.random.default_rng(seed)
    past_len = rng.integers(T // 2, T, size=B, dtype=np.int64)
    feeds = {"tokens": rng.integers(0, cfg.vocab_size, (B, 1), dtype=np.int64), "past_len": past_len}
    filled = np.arange(T)[None, None, :, None] < past_len[:, None, None, None]   # [B, 1, T, 1]
    for layer in range(cfg.n_layer):
        for kind in ("key", "value"):
            cache = rng.standard_normal(cache_shape(cfg, B, T)).astype(np.float32)
            feeds[past_name(layer, kind)] = np.where(filled, cache, np.float32(0))

    def graph(**how):
        return compile_graph(build_decode(cfg), "infer", **how)

    return Case(graph, {**feeds, **params.feeds()})


MODES = {"infer": infer_case, "train": train_case, "decode": decode_case}
"""``--mode`` -> the case builder ``(params, B, T, *, seed) -> Case``."""


def feeds_for(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` in the dtypes ``model`` declares (a BF16 inference graph takes bfloat16
    parameters and caches): the same values for every backend, rounded where a graph says so."""
    from graphc.ir.builder import np_dtype

    out = {}
    for v in model.graph.input:
        if v.name in feeds:
            want = np_dtype(v.type.tensor_type.elem_type)
            out[v.name] = feeds[v.name] if feeds[v.name].dtype == want else feeds[v.name].astype(want)
    return out


def gpt2_case(params, mode: str, B: int = 2, T: int = 32, *, seed: int = 0) -> Case:
    """The ``mode`` case (:data:`MODES`) of ``params``: the graphs to build and the shared feeds."""
    if mode not in MODES:
        raise GraphcError(mode, f"unknown mode (known: {', '.join(MODES)})", "--mode")
    return MODES[mode](params, B, T, seed=seed)


def run_gpt2(case: Case, graphs: Mapping[str, onnx.ModelProto]) -> dict[str, dict[str, np.ndarray]]:
    """Each backend runs the graph built for it (``{backend: graph}``, e.g. ``case.graph(backend=
    name, ...)``) on ``case``'s feeds in that graph's dtypes: ``{backend: {output: array}}``."""
    return {name: run_model(graph, feeds_for(graph, case.feeds), name) for name, graph in graphs.items()}
