"""llm.c's debug state (``gpt2_124M_debug_state.bin``) and the check ``test_gpt2.c`` makes with it.

llm.c's ``train_gpt2.py`` (``write_state``) dumps one training step of the PyTorch
reference; ``test_gpt2.c`` recomputes it in C and compares. Layout, little-endian:

===========================  ==================================================
header int32[256]            [0] = 20240327 (magic), [1] = 2 (version), [2] = B, [3] = T
inputs int32[B*T]            token ids
targets int32[B*T]           next-token ids
logits float32[B*T*V]        V = the real vocabulary (50257), not the padded one
loss float32[1]              mean cross-entropy
grads float32[num_params]    every parameter gradient in llm.c's 16-tensor order, wte's
                             padded to Vp rows (the model ``.bin``'s parameter layout)
===========================  ==================================================

:func:`validate` recomputes logits, loss and (when ``graphc.passes.autodiff`` is
available) the gradients with graphc and compares them with llm.c's tolerances
(:data:`TOLERANCES`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from graphc.errors import GraphcError
from graphc.fileio import atomic_write, open_input, read_array
from graphc.models.config import GPT2Config
from graphc.models.params import LLMC_ORDER, Params, num_parameters

MAGIC = 20240327
VERSION = 2
HEADER_INTS = 256
TOLERANCES = {"logits": 1e-2, "loss": 1e-2, "grads": 2e-2}
"""llm.c test_gpt2's tolerances (max abs difference)."""


@dataclasses.dataclass
class DebugState:
    inputs: np.ndarray            # int64 [B, T]
    targets: np.ndarray           # int64 [B, T]
    logits: np.ndarray            # float32 [B, T, V]
    loss: float
    grads: Params                 # llm.c layout (wte padded to Vp rows)

    @property
    def B(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def T(self) -> int:
        return int(self.inputs.shape[1])


def expected_size(cfg: GPT2Config, B: int, T: int) -> int:
    return 4 * (HEADER_INTS + 2 * B * T + B * T * cfg.vocab_size + 1 + num_parameters(cfg))


def read_debug_state(path: str | os.PathLike, cfg: GPT2Config) -> DebugState:
    """Read a debug state for a model of config ``cfg``; every mismatch is a one-line error."""
    with open_input(path, "llm.c debug state") as f:
        header = read_array(f, np.int32, HEADER_INTS, path, "header")
        if header[0] != MAGIC:
            raise GraphcError(path, f"bad magic {int(header[0])}, expected {MAGIC} (not an llm.c debug state)",
                              "header.magic")
        if header[1] != VERSION:
            raise GraphcError(path, f"unsupported version {int(header[1])}, expected {VERSION}", "header.version")
        B, T = int(header[2]), int(header[3])
        if B <= 0 or T <= 0:
            raise GraphcError(path, f"batch B={B} and sequence length T={T} must be positive", "header.B/T")
        if T > cfg.max_seq_len:
            raise GraphcError(path, f"sequence length T={T} exceeds the model's maximum {cfg.max_seq_len}", "header.T")
        expected = expected_size(cfg, B, T)
        actual = os.fstat(f.fileno()).st_size
        unpadded = expected - 4 * (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
        if actual != expected and actual == unpadded:
            raise GraphcError(path, f"the wte gradient has {cfg.vocab_size} rows, not the padded {cfg.padded_vocab_size}: "
                              "an older llm.c debug state; regenerate it with a current train_gpt2.py", "grads.wte")
        if actual != expected:
            what = "is truncated or" if actual < expected else "is larger than expected:"
            raise GraphcError(path, f"file has {actual} bytes but B={B} T={T} with this model (V={cfg.vocab_size}, "
                              f"{num_parameters(cfg)} parameters, {cfg.describe()}) needs {expected}; the state {what} "
                              f"was written for a different model or batch", "size")
        inputs = read_array(f, np.int32, B * T, path, "inputs").reshape(B, T).astype(np.int64)
        targets = read_array(f, np.int32, B * T, path, "targets").reshape(B, T).astype(np.int64)
        for name, arr in (("inputs", inputs), ("targets", targets)):
            if arr.min() < 0 or arr.max() >= cfg.vocab_size:
                bad = int(arr[(arr < 0) | (arr >= cfg.vocab_size)][0])
                raise GraphcError(path, f"token id {bad} is outside the model's vocabulary (0..{cfg.vocab_size - 1})",
                                  name)
        logits = read_array(f, np.float32, B * T * cfg.vocab_size, path, "logits").reshape(B, T, cfg.vocab_size)
        loss = float(read_array(f, np.float32, 1, path, "loss")[0])
        grads = Params(cfg, read_array(f, np.float32, num_parameters(cfg), path, "grads"))
    return DebugState(inputs, targets, logits, loss, grads)


def write_debug_state(path: str | os.PathLike, inputs, targets, logits, loss: float, grads) -> None:
    """Write a debug state as llm.c's ``write_state`` does (atomically).

    ``grads`` is a :class:`Params` of gradients, a flat float32 array in llm.c's layout, or a
    dict of llm.c's 16 tensors (``"wte"`` ... ``"lnfb"``; per-layer ones stacked on a leading
    L axis); ``wte``'s gradient may have V or Vp rows (padded with zeros to Vp).
    """
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    logits = np.asarray(logits, dtype=np.float32)
    if inputs.ndim != 2 or targets.shape != inputs.shape or logits.shape[:2] != inputs.shape:
        raise ValueError(f"inputs/targets [B, T] and logits [B, T, V] disagree: {inputs.shape}, {targets.shape}, "
                         f"{logits.shape}")
    B, T = inputs.shape
    if isinstance(grads, Params):
        flat = grads.flat
    elif isinstance(grads, dict):
        flat = _flat_from_tensors(grads, logits.shape[2])
    else:
        flat = np.asarray(grads, dtype=np.float32).reshape(-1)
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:4] = [MAGIC, VERSION, B, T]
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(inputs.astype(np.int32).tobytes())
        f.write(targets.astype(np.int32).tobytes())
        f.write(np.ascontiguousarray(logits).tobytes())
        f.write(np.array([loss], dtype=np.float32).tobytes())
        f.write(np.ascontiguousarray(flat, dtype=np.float32).tobytes())


def _flat_from_tensors(tensors: dict[str, np.ndarray], vocab_size: int) -> np.ndarray:
    parts = []
    for name in LLMC_ORDER:
        arr = np.asarray(tensors[name], dtype=np.float32)
        parts.append(arr.reshape(-1))
    wte = np.asarray(tensors["wte"], dtype=np.float32)
    C = wte.shape[1]
    pad_to = (max(wte.shape[0], vocab_size) + 127) // 128 * 128
    if wte.shape[0] < pad_to:
        wte = np.concatenate([wte, np.zeros((pad_to - wte.shape[0], C), np.float32)])
    parts[0] = wte.reshape(-1)
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- validation
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
    notes: list[str]
    loss: float
    reference_loss: float

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max()) if d.size else 0.0  # NaN propagates and fails the check


def autodiff_available() -> bool:
    try:
        from graphc.passes.autodiff import differentiate  # noqa: F401
    except ImportError:
        return False
    return True


def compute(params: Params, inputs: np.ndarray, targets: np.ndarray, *, grads: bool = True,
            backend: str = "onnxruntime") -> tuple[np.ndarray, float, Params | None]:
    """graphc's logits [B, T, V], loss and (with ``grads`` and autodiff present) gradients."""
    from graphc.models.gpt2 import build_forward

    cfg = params.cfg
    model = build_forward(cfg, loss=True, logits=True)
    feeds = {"tokens": np.ascontiguousarray(inputs, dtype=np.int64),
             "targets": np.ascontiguousarray(targets, dtype=np.int64)}
    g = None
    outputs = {}
    if grads and autodiff_available():
        from graphc.passes.autodiff import differentiate, grad_name

        if backend == "onnxruntime":   # the plain autodiff graph: checks autodiff itself
            model = differentiate(model, loss="loss", wrt=params.names())  # keeps logits and loss
        else:                          # a compiled backend runs the optimised, legalised graph
            from graphc.passes.pipelines import optimize

            model, _ = optimize(model, "train", backend=backend, wrt=params.names())  # keeps logits and loss
        g = params.like()
        outputs = {grad_name(name): g[name] for name in params.names()}
    from graphc.backends import get_backend

    program = get_backend(backend)().prepare(model)
    program.bind(params.feeds())
    out = program.run(feeds, outputs=outputs)
    return np.asarray(out["logits"]), float(np.asarray(out["loss"])), g


def validate(params: Params, state: DebugState, *, backend: str = "onnxruntime") -> Report:
    """Compare graphc with the state: logits, loss, and every gradient tensor."""
    logits, loss, grads = compute(params, state.inputs, state.targets, backend=backend)
    checks = [Check("logits", _max_abs_diff(logits, state.logits), TOLERANCES["logits"]),
              Check("loss", abs(loss - state.loss) if np.isfinite(loss) else float("inf"), TOLERANCES["loss"])]
    notes = []
    if grads is None:
        notes.append("gradients not checked: graphc.passes.autodiff is not available in this checkout")
    else:
        for tensor in LLMC_ORDER:
            checks.append(Check(f"grad {tensor}", _max_abs_diff(grads.tensor(tensor), state.grads.tensor(tensor)),
                                TOLERANCES["grads"]))
    return Report(checks, notes, loss, state.loss)

