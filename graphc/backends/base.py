"""The interface every backend shares.

Like Polygraphy's runners: a backend is prepared once for a graph (``prepare``), then run
many times on feeds (``run``); ``supports`` says which op types it can execute, so a test
can run one graph on every backend present and compare, and a pipeline can refuse early.
Parameters can be *bound* once (``bind``) so that a backend keeps them resident (device
memory, an ORT OrtValue) instead of receiving them with every call.
"""

from __future__ import annotations

import abc
from typing import Mapping

import numpy as np
import onnx


class Backend(abc.ABC):
    name: str = "?"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(usable here?, why not) -- e.g. (False, "tensorrt is not installed")."""
        return True, ""

    @classmethod
    @abc.abstractmethod
    def supports(cls, op_type: str, domain: str = "") -> bool: ...

    @abc.abstractmethod
    def prepare(self, model: onnx.ModelProto) -> "Prepared": ...


class Prepared(abc.ABC):
    """A graph compiled for one backend."""

    input_names: list[str]
    output_names: list[str]

    @abc.abstractmethod
    def bind(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Keep these inputs (usually parameters) resident; later runs need not pass them.

        The arrays are borrowed, not copied: updating them in place (the optimizer does)
        is seen by the next run.
        """

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None,
            ) -> dict[str, np.ndarray]:
        """Run once. ``outputs`` may supply preallocated arrays to write results into."""
