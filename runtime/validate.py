"""llm.c's debug-state check (what ``test_gpt2.c`` does), computed with graphc.

Recomputes one training step's logits, loss and every parameter gradient for the state's
batch on the path that trains by default: the loss and gradients come from the
*optimised* training graph ``graphc train`` runs (fused forward and fused backward ops),
the logits from the optimised forward graph ``graphc eval``/``generate`` run; with
``opt=False`` the unoptimised graphs. Each is compared with llm.c's tolerances
(:data:`TOLERANCES`, max abs difference). The file format is
:mod:`graphc.models.debug_state`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphc.models.debug_state import DebugState
from graphc.models.params import LLMC_ORDER, Params
from graphc.backends import get_backend
from graphc.runtime.programs import forward_graph, training_graph

TOLERANCES = {"logits": 1e-2, "loss": 1e-2, "grads": 2e-2}
"""llm.c test_gpt2's tolerances (max abs difference)."""


@dataclasses.dataclass
class Check:
    name: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance

    def line(self) -> str:
        return f"{self.name} max abs diff {self.max_abs_diff:.3e} (tolerance {self.tolerance:.0e})"


@dataclasses.dataclass
class Report:
    checks: list[Check]
    loss: float
    reference_loss: float

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]


def prepare(model, params: Params, backend: str):
    """``model`` prepared on ``backend`` with the parameters bound."""
    executable = get_backend(backend)().prepare(model)
    executable.bind(params.feeds())
    return executable


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max()) if d.size else 0.0  # NaN propagates and fails the check


def compute(params: Params, inputs: np.ndarray, targets: np.ndarray, *, backend: str = "onnxruntime",
            opt: bool = True) -> tuple[np.ndarray, float, Params]:
    """graphc's logits [B, T, V], loss and gradients (llm.c layout) for one batch."""
    from graphc.passes.autodiff import grad_name

    cfg = params.cfg
    feeds = {"tokens": np.ascontiguousarray(inputs, dtype=np.int64),
             "targets": np.ascontiguousarray(targets, dtype=np.int64)}
    grads = params.like()
    train = prepare(training_graph(cfg, opt=opt, backend=backend), params, backend)
    # gradients land in the flat buffer, as in the training runner
    loss = train.run(feeds, outputs={grad_name(name): grads[name] for name in params.names()})["loss"]
    logits = prepare(forward_graph(cfg, loss=False, logits=True, opt=opt, backend=backend), params, backend).run(
        {"tokens": feeds["tokens"]})["logits"]
    return np.asarray(logits), float(np.asarray(loss)), grads


def validate(params: Params, state: DebugState, *, backend: str = "onnxruntime", opt: bool = True) -> Report:
    """Compare graphc with the state: logits, loss, and every gradient tensor."""
    logits, loss, grads = compute(params, state.inputs, state.targets, backend=backend, opt=opt)
    checks = [Check("logits", _max_abs_diff(logits, state.logits), TOLERANCES["logits"]),
              Check("loss", abs(loss - state.loss) if np.isfinite(loss) else float("inf"), TOLERANCES["loss"])]
    for tensor in LLMC_ORDER:
        checks.append(Check(f"grad {tensor}", _max_abs_diff(grads.tensor(tensor), state.grads.tensor(tensor)),
                            TOLERANCES["grads"]))
    return Report(checks, loss, state.loss)
