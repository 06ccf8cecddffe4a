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

This module is the file format only; :mod:`graphc.runtime.validate` recomputes the step
with graphc and compares (the compute belongs to the runtime, not to the models).
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

