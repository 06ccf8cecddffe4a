"""The interface every backend implements: the seam between the compiler and the hardware.

A backend does three things for the runtime:

1. **It owns memory.** :meth:`Backend.alloc` returns :class:`~graphc.backends.buffer.Buffer`
   objects on the backend's device; :meth:`Backend.upload_params` places a model's flat
   parameter buffer there once (on the CPU backends that is the host array itself, no copy).
   Gradients, optimizer state, activations and KV caches are allocated by the programs
   through the same calls, so nothing above this layer touches a device array directly.
2. **It runs graphs.** :meth:`Backend.prepare` turns an ONNX graph (already optimised and
   legalised for this backend, see :func:`graphc.passes.pipelines.optimize`) into an
   :class:`Executable`; inputs can be bound once (parameters) and outputs bound to buffers
   (gradients straight into the flat gradient buffer, a KV cache updated in place), as
   Polygraphy's runners do. :meth:`Backend.supports` answers from the backend's lowering
   table, and the pipeline refuses a graph with an op the backend cannot run, naming the
   node, before anything runs.
3. **It builds programs** — the units the runtime drives (``runtime/programs.py``): a
   :class:`~graphc.runtime.programs.TrainStep` (forward, backward, clip, AdamW; returns the
   loss), an :class:`~graphc.runtime.programs.Evaluator` and a batched
   :class:`~graphc.runtime.decode.Decoder` with slots. The base class assembles generic ones
   from :meth:`prepare` and the numpy optimizer; a GPU backend overrides the factories to
   run the whole step on the device as one CUDA graph. How a program does its work is the
   backend's business; what it returns is not.

Backends are registered by name in :data:`graphc.backends.REGISTRY` and imported lazily.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import onnx

from graphc.backends.buffer import Buffer, HostBuffer

if TYPE_CHECKING:  # the programs live in the runtime; imported lazily below
    from graphc.models.params import Params
    from graphc.runtime.decode import Decoder, DecodeSpec
    from graphc.runtime.programs import DeviceParams, Evaluator, TrainSpec, TrainStep

Feed = Buffer | np.ndarray


class Executable(abc.ABC):
    """A graph prepared for one backend: bind resident inputs once, run many times."""

    input_names: list[str]
    output_names: list[str]

    @abc.abstractmethod
    def bind(self, feeds: Mapping[str, Feed]) -> None:
        """Keep these inputs (usually parameters) resident; later runs need not pass them.

        Buffers are borrowed, not copied: updating them in place (the optimizer does) is
        seen by the next run. Names the graph does not have are ignored.
        """

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, Feed], outputs: Mapping[str, Feed] | None = None) -> dict[str, np.ndarray]:
        """Run once; ``outputs`` may name buffers to write results into (returned as given)."""



class Backend(abc.ABC):
    name: str = "?"
    device: str = "cpu"

    # ------------------------------------------------------------------ what it can do
    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(usable here?, why not) -- e.g. (False, "no CUDA driver: libcuda.so.1 not found")."""
        return True, ""

    @classmethod
    @abc.abstractmethod
    def supports(cls, op_type: str, domain: str = "") -> bool:
        """Can this backend run ``domain.op_type``? (Its lowering table's answer.)"""

    @classmethod
    def unsupported(cls, model: onnx.ModelProto) -> list[onnx.NodeProto]:
        """The graph's nodes this backend cannot run, in graph order."""
        return [n for n in model.graph.node if not cls.supports(n.op_type, n.domain or "")]

    # ------------------------------------------------------------------ memory
    def alloc(self, shape: Sequence[int], dtype) -> Buffer:
        """A zero-filled buffer on this backend's device."""
        return HostBuffer.empty(shape, dtype)

    def upload(self, array: np.ndarray) -> Buffer:
        """``array`` on this backend's device (on the CPU: the array itself, not a copy)."""
        return HostBuffer(np.ascontiguousarray(array))

    def upload_params(self, params: "Params") -> "DeviceParams":
        """The model's flat parameter buffer on this device, with per-tensor views."""
        from graphc.runtime.programs import DeviceParams

        return DeviceParams(params.cfg, self.upload(params.flat))

    # ------------------------------------------------------------------ graphs
    @abc.abstractmethod
    def prepare(self, model: onnx.ModelProto) -> Executable: ...

    # ------------------------------------------------------------------ programs
    def train_step(self, params: "DeviceParams", spec: "TrainSpec") -> "TrainStep":
        from graphc.runtime.programs import GraphTrainStep

        return GraphTrainStep(self, params, spec)

    def evaluator(self, params: "DeviceParams", B: int, T: int, *, precision: str = "fp32",
                  opt: bool = True) -> "Evaluator":
        from graphc.runtime.programs import GraphEvaluator

        return GraphEvaluator(self, params, B, T, precision=precision, opt=opt)

    def decoder(self, params: "DeviceParams", spec: "DecodeSpec") -> "Decoder":
        from graphc.runtime.decode import GraphDecoder

        return GraphDecoder(self, params, spec)
