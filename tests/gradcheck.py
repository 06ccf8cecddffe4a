"""Shared gradient-checking helpers for the autodiff tests.

A *case* is a small ONNX model (one node or a few, built with a callback on a
:class:`GraphBuilder`) whose scalar output is ``loss = sum_k sum(out_k * c_k)`` with fixed
random cotangents ``c_k``: its gradient is exactly the vector-Jacobian product of the
op(s) with those cotangents. :func:`check_fd` differentiates the case with graphc's pass,
runs the training model in onnxruntime and compares every analytic gradient with central
finite differences (float64 only: eps 1e-6 and rtol 1e-6 are meaningful only there).
:func:`check_dot` is the cheaper test for larger shapes: for random directions ``t``,
``<dL/dx, t>`` must equal ``(L(x + eps t) - L(x - eps t)) / 2 eps``.

For ops onnxruntime cannot run in float64 (``Erf``, and so ``Gelu`` without the tanh
approximation) or runs with float32 inside (``Attention``, ~1e-8), a case made with
``backend="reference"`` runs its forward and training graphs on graphc's float64
reference interpreter (``graphc.backends.reference``) instead; :func:`check_torch`
compares float32 graphs' gradients with ``torch.autograd`` in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from graphc.ir.builder import GraphBuilder
from graphc.passes.autodiff import differentiate, grad_name

BuildFn = Callable[[GraphBuilder, dict], "str | list[str]"]


@dataclass
class Case:
    """A forward model with scalar output ``loss``, its feeds, and what to differentiate."""

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    wrt: list[str]
    cotangents: list[np.ndarray] = field(default_factory=list)
    train: onnx.ModelProto | None = None
    backend: str = "onnxruntime"      # or "reference": graphc's float64 interpreter

    def grads(self, **kwargs) -> dict[str, np.ndarray]:
        """Analytic gradients from graphc's training graph, run in onnxruntime."""
        if self.train is None:
            self.train = differentiate(self.model, "loss", self.wrt, **kwargs)
            onnx.checker.check_model(self.train, full_check=True)
        out = run(self.train, self.feeds, self.backend)
        grads = {w: out[grad_name(w)] for w in self.wrt}
        for w, g in grads.items():
            assert g.shape == self.feeds[w].shape, f"grad of {w}: shape {g.shape}, expected {self.feeds[w].shape}"
            assert g.dtype == self.feeds[w].dtype, f"grad of {w}: dtype {g.dtype}, expected {self.feeds[w].dtype}"
        return grads

    def loss_fn(self, reference: Callable | None = None) -> Callable[[dict[str, np.ndarray]], float]:
        """The loss as a function of the feeds: the ONNX forward in onnxruntime, or
        ``reference(**feeds) -> output(s)`` (numpy, float64) with the case's cotangents."""
        if reference is not None:
            def loss(feeds):
                outs = reference(**feeds)
                outs = [outs] if isinstance(outs, np.ndarray) else list(outs)
                return float(sum(np.sum(o * c) for o, c in zip(outs, self.cotangents)))
            return loss
        if self.backend != "onnxruntime":
            return lambda feeds: float(run(self.model, feeds, self.backend)["loss"])
        sess = session(self.model)
        return lambda feeds: float(sess.run(["loss"], feeds)[0])


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], backend: str = "onnxruntime",
        ) -> dict[str, np.ndarray]:
    if backend == "reference":
        from graphc.backends.reference import ReferenceBackend

        prepared = ReferenceBackend(keep_float64=True).prepare(model)
        return prepared.run({k: v for k, v in feeds.items() if k in prepared.input_names})
    assert backend == "onnxruntime", backend
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def _graph(fn: BuildFn, inputs: dict, consts: dict, cotangents: list | None):
    b = GraphBuilder("case")
    names = {}
    for n, a in inputs.items():
        names[n] = b.input(n, a.dtype, list(a.shape))
    for n, a in consts.items():
        names[n] = b.const(np.asarray(a), n)
    outs = fn(b, names)
    outs = [outs] if isinstance(outs, str) else list(outs)
    if cotangents is None:
        for o in outs:
            b.output(o)
        return b.model(infer_shapes=False), outs
    terms = [b.ReduceSum(b.Mul(o, b.const(c, "cot")), keepdims=0) for o, c in zip(outs, cotangents)]
    b.output(terms[0] if len(terms) == 1 else b.Sum(*terms), "loss")
    return b.model(), outs


def make_case(fn: BuildFn, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray] | None = None,
              wrt: list[str] | None = None, seed: int = 0, cotangents: list[np.ndarray] | None = None,
              backend: str = "onnxruntime") -> Case:
    """A case from ``fn(b, names) -> output value(s)``.

    ``inputs`` become graph inputs (floating ones are differentiated unless ``wrt`` says
    otherwise), ``consts`` become initializers; ``names`` maps both to value names.
    ``backend`` runs the case's graphs (``"reference"``: float64 throughout).
    """
    consts = consts or {}
    if cotangents is None:
        probe, _ = _graph(fn, inputs, consts, None)
        outs = list(run(probe, inputs, backend).values())
        rng = np.random.default_rng(seed + 1000)
        cotangents = [rng.standard_normal(o.shape).astype(o.dtype) for o in outs]
    model, _ = _graph(fn, inputs, consts, cotangents)
    if wrt is None:
        wrt = [n for n, a in inputs.items() if a.dtype.kind == "f"]
    return Case(model, dict(inputs), list(wrt), list(cotangents), backend=backend)


def fd_grad(loss: Callable, feeds: dict[str, np.ndarray], name: str, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of ``loss`` with respect to ``feeds[name]``, element by element."""
    x = feeds[name]
    grad = np.zeros(x.shape, dtype=np.float64)
    flat = grad.reshape(-1)
    for i in range(x.size):
        xp, xm = x.copy(), x.copy()
        xp.reshape(-1)[i] += eps
        xm.reshape(-1)[i] -= eps
        flat[i] = (loss({**feeds, name: xp}) - loss({**feeds, name: xm})) / (2 * eps)
    return grad


def assert_close(actual, expected, rtol: float, atol: float, what: str) -> None:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = ~(np.abs(actual - expected) <= atol + rtol * np.abs(expected))
    if bad.any():
        i = np.unravel_index(np.argmax(np.abs(actual - expected) - rtol * np.abs(expected)), actual.shape)
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} elements differ; worst at {i}: "
                             f"analytic {actual[i]!r} vs reference {expected[i]!r}")


def check_fd(case: Case, rtol: float = 1e-6, atol: float = 1e-8, eps: float = 1e-6,
             reference: Callable | None = None) -> dict[str, np.ndarray]:
    """Every analytic gradient against central finite differences (float64 cases only).

    The differences are of the ONNX forward run in onnxruntime, or of ``reference`` (a
    numpy float64 implementation) where onnxruntime's float64 kernel is not accurate to
    float64 precision (its Attention is not: errors ~1e-8 would swamp eps = 1e-6).
    """
    for w in case.wrt:
        assert case.feeds[w].dtype == np.float64, f"finite differences need float64 inputs, {w} is {case.feeds[w].dtype}"
    grads = case.grads()
    loss = case.loss_fn(reference)
    scale = max(1.0, abs(loss(case.feeds)))
    for w in case.wrt:
        assert_close(grads[w], fd_grad(loss, case.feeds, w, eps), rtol, atol * scale, f"d loss / d {w}")
    return grads


def check_dot(case: Case, n_dirs: int = 2, eps: float = 1e-6, rtol: float = 1e-6, seed: int = 0) -> None:
    """Dot-product test: <J^T c, t> == <c, J t> with J t by central differences along t."""
    grads = case.grads()
    loss = case.loss_fn()
    rng = np.random.default_rng(seed)
    for w in case.wrt:
        x = case.feeds[w]
        assert x.dtype == np.float64
        for _ in range(n_dirs):
            t = rng.standard_normal(x.shape)
            lhs = float(np.sum(grads[w] * t))
            rhs = (loss({**case.feeds, w: x + eps * t}) - loss({**case.feeds, w: x - eps * t})) / (2 * eps)
            assert abs(lhs - rhs) <= rtol * max(1.0, abs(rhs)), f"d loss / d {w}: <g, t> = {lhs!r}, FD {rhs!r}"


def check_torch(case: Case, torch_fn: Callable, rtol: float = 1e-5, atol: float = 1e-6) -> dict[str, np.ndarray]:
    """Gradients of a (float32) case against torch.autograd in float64 on the same inputs.

    ``torch_fn(**tensors)`` returns the case's output(s) as torch tensors; the reference
    loss is ``sum_k sum(out_k * c_k)`` with the case's own cotangents.
    """
    import torch

    grads = case.grads()
    tensors = {n: torch.tensor(a.astype(np.float64) if a.dtype.kind == "f" else a,
                               requires_grad=(n in case.wrt)) for n, a in case.feeds.items()}
    outs = torch_fn(**tensors)
    outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
    loss = sum((o * torch.tensor(c.astype(np.float64))).sum() for o, c in zip(outs, case.cotangents))
    loss.backward()
    for w in case.wrt:
        ref = tensors[w].grad.numpy()
        scale = float(np.abs(ref).max()) or 1.0
        assert_close(grads[w], ref, rtol, atol * scale, f"d loss / d {w} (vs torch float64)")
    return grads


def backward_nodes(train: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes the autodiff pass added (its nodes are named ``grad/<forward node>/...``)."""
    return [n for n in train.graph.node if n.name.startswith("grad")]
