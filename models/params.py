"""GPT-2 parameters: llm.c's 16 tensors in one flat buffer, and per-layer graph names.

llm.c stores every parameter in one contiguous float array, tensor-major: all of ``wte``,
then all of ``wpe``, then ``ln1w`` for every layer, ``ln1b`` for every layer, and so on.
graphc keeps exactly that layout (:class:`Params`), so that

* an llm.c checkpoint is read or written with one ``tofile``/``fromfile``,
* the optimizer updates all parameters with a handful of vectorised ops on three flat
  arrays (parameters, m, v), and gradients land in a flat buffer of the same layout,
* graph inputs are zero-copy views: ``h3.attn.qkv.w`` is a (3C, C) view into the flat
  ``qkvw`` block at layer 3.

Weights keep llm.c's (out, in) orientation; the graph multiplies by their transpose with
``Gemm(transB=1)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphc.errors import GraphcError
from graphc.models.config import GPT2Config

# llm.c's tensor order. Per-layer tensors have a leading L axis in the flat buffer; the
# graph sees one input per layer named by LAYER_NAMES.
LLMC_ORDER = [
    "wte", "wpe",
    "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb",
    "lnfw", "lnfb",
]
LAYER_NAMES = {
    "ln1w": "ln1.w", "ln1b": "ln1.b",
    "qkvw": "attn.qkv.w", "qkvb": "attn.qkv.b",
    "attprojw": "attn.proj.w", "attprojb": "attn.proj.b",
    "ln2w": "ln2.w", "ln2b": "ln2.b",
    "fcw": "mlp.fc.w", "fcb": "mlp.fc.b",
    "fcprojw": "mlp.proj.w", "fcprojb": "mlp.proj.b",
}
GLOBAL_NAMES = {"wte": "wte", "wpe": "wpe", "lnfw": "lnf.w", "lnfb": "lnf.b"}


def tensor_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Shapes of llm.c's 16 tensors (per-layer ones with their leading L axis)."""
    L, C, Vp, T = cfg.n_layer, cfg.n_embd, cfg.padded_vocab_size, cfg.max_seq_len
    return {
        "wte": (Vp, C), "wpe": (T, C),
        "ln1w": (L, C), "ln1b": (L, C), "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
        "attprojw": (L, C, C), "attprojb": (L, C),
        "ln2w": (L, C), "ln2b": (L, C), "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
        "lnfw": (C,), "lnfb": (C,),
    }


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One graph-level parameter: its name, shape and place in the flat buffer."""

    name: str          # graph input name, e.g. "h3.attn.qkv.w"
    shape: tuple[int, ...]
    offset: int        # element offset into the flat buffer
    tensor: str        # llm.c tensor it belongs to, e.g. "qkvw"
    layer: int | None  # layer index for per-layer tensors

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def is_matrix(self) -> bool:
        """2-D weights (what PyTorch-style weight decay applies to)."""
        return len(self.shape) == 2


def param_specs(cfg: GPT2Config) -> list[ParamSpec]:
    """Every graph parameter, in flat-buffer order (llm.c's order)."""
    specs, offset = [], 0
    for tensor, shape in tensor_shapes(cfg).items():
        if tensor in GLOBAL_NAMES:
            specs.append(ParamSpec(GLOBAL_NAMES[tensor], shape, offset, tensor, None))
            offset += int(np.prod(shape))
        else:
            per_layer = shape[1:]
            for layer in range(cfg.n_layer):
                specs.append(ParamSpec(f"h{layer}.{LAYER_NAMES[tensor]}", per_layer, offset, tensor, layer))
                offset += int(np.prod(per_layer))
    return specs


def num_parameters(cfg: GPT2Config) -> int:
    return sum(int(np.prod(s)) for s in tensor_shapes(cfg).values())


class Params:
    """GPT-2 parameters in one flat float32 array with named views.

    ``params["h0.attn.qkv.w"]`` and ``params.tensor("qkvw")`` are views, never copies, so
    writing through them updates the flat buffer the optimizer and checkpoints use.
    """

    def __init__(self, cfg: GPT2Config, flat: np.ndarray | None = None):
        self.cfg = cfg
        self.specs = param_specs(cfg)
        self.by_name = {s.name: s for s in self.specs}
        n = num_parameters(cfg)
        if flat is None:
            flat = np.zeros(n, dtype=np.float32)
        if flat.shape != (n,) or flat.dtype != np.float32:
            raise ValueError(f"flat parameter buffer must be float32[{n}], got {flat.dtype}{list(flat.shape)}")
        self.flat = flat
        self._tensor_offsets = {}
        off = 0
        for tensor, shape in tensor_shapes(cfg).items():
            self._tensor_offsets[tensor] = (off, shape)
            off += int(np.prod(shape))

    def __getitem__(self, name: str) -> np.ndarray:
        s = self.by_name[name]
        return self.flat[s.offset:s.offset + s.size].reshape(s.shape)

    def tensor(self, tensor: str) -> np.ndarray:
        """One of llm.c's 16 tensors (per-layer tensors with their leading L axis)."""
        off, shape = self._tensor_offsets[tensor]
        return self.flat[off:off + int(np.prod(shape))].reshape(shape)

    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def feeds(self) -> dict[str, np.ndarray]:
        """Every parameter as a named view, ready to feed a graph."""
        return {s.name: self[s.name] for s in self.specs}

    def like(self, flat: np.ndarray | None = None) -> "Params":
        """Another buffer of the same layout (gradients, Adam moments)."""
        return Params(self.cfg, np.zeros_like(self.flat) if flat is None else flat)

    def copy(self) -> "Params":
        return Params(self.cfg, self.flat.copy())


def require_finite(params: "Params", where, field: str = "parameters") -> "Params":
    """A model file with NaN/inf weights (a diverged run) is bad input, not something to sample
    from: it would generate token 0 forever."""
    bad = int(np.count_nonzero(~np.isfinite(params.flat)))
    if bad:
        first = next(s.name for s in params.specs
                     if not np.isfinite(params.flat[s.offset:s.offset + s.size]).all())
        raise GraphcError(where, f"{bad} weights are not finite (NaN/inf), first in {first}: "
                          "the model diverged; use an earlier checkpoint", field)
    return params
