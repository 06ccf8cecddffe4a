"""Which TensorRT: NVIDIA's datacenter ``tensorrt`` or TensorRT for RTX (``tensorrt_rtx``).

Both expose the same Python API (Builder, INetworkDefinition, OnnxParser, Runtime,
ICudaEngine, IExecutionContext.execute_async_v3); graphc writes its code once against it
and picks the module here. ``auto`` prefers datacenter TensorRT where it is installed (its
engines run on every GPU from compute capability 7.5, the H200 included), else TensorRT for
RTX, which installs from PyPI everywhere and builds engines even on a machine without a GPU,
but whose engines run only on compute capability 8.0, 8.6, 8.9 and 12.x.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from graphc.errors import GraphcError

FLAG = "--trt-flavor"

# flavour name -> (module to import, pip package that provides it)
MODULES = {
    "tensorrt": ("tensorrt", "tensorrt (datacenter TensorRT, NVIDIA's index)"),
    "rtx": ("tensorrt_rtx", "tensorrt-rtx-cu13 (graphc's [tensorrt] extra)"),
}
AUTO_ORDER = ("tensorrt", "rtx")
CHOICES = ("auto", *MODULES)

# compute capabilities (major, minor) whose GPUs run the flavour's engines
RTX_RUNS_ON = "8.0, 8.6, 8.9 or 12.x"


def rtx_runs_on(cc: tuple[int, int]) -> bool:
    return cc in {(8, 0), (8, 6), (8, 9)} or cc[0] >= 12


def datacenter_runs_on(cc: tuple[int, int]) -> bool:
    return cc >= (7, 5)


@dataclass(frozen=True)
class Flavor:
    """A loaded TensorRT flavour: its name, the imported module and its version."""

    name: str           # "tensorrt" | "rtx"
    trt: ModuleType
    version: str

    def runs_on(self, cc: tuple[int, int]) -> bool:
        """Whether engines this flavour builds can run on a GPU of compute capability ``cc``."""
        return rtx_runs_on(cc) if self.name == "rtx" else datacenter_runs_on(cc)

    @property
    def gpus(self) -> str:
        """The GPUs its engines run on, in words."""
        return f"compute capability {RTX_RUNS_ON}" if self.name == "rtx" else "compute capability 7.5 or newer"

    @property
    def module_name(self) -> str:
        return MODULES[self.name][0]


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(MODULES[name][0])
    except ImportError:
        return None


def load_flavor(choice: str = "auto") -> Flavor:
    """The TensorRT flavour for ``--trt-flavor`` (``auto``, ``tensorrt`` or ``rtx``)."""
    if choice not in CHOICES:
        raise GraphcError(choice, f"unknown TensorRT flavour (known: {', '.join(CHOICES)})", FLAG)
    for name in AUTO_ORDER if choice == "auto" else (choice,):
        module = _import(name)
        if module is not None and hasattr(module, "Builder"):
            return Flavor(name, module, module.__version__)
    wanted = AUTO_ORDER if choice == "auto" else (choice,)
    how = " or ".join(f"pip install {MODULES[n][1]}" for n in wanted)
    raise GraphcError(choice, f"TensorRT is not installed: {how}", FLAG)


def installed() -> list[str]:
    """Names of the flavours importable here (without importing more than needed)."""
    return [n for n in AUTO_ORDER if _import(n) is not None]
