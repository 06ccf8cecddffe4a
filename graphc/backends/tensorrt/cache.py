"""The engine cache: serialized engines keyed by what determines them.

An engine depends on the graph, the TensorRT flavour and version that built it, the
target it was built for (datacenter TensorRT builds for the GPU it runs on; TensorRT for
RTX builds portable engines for all its compute capabilities), the precision and the
optimisation profile. The key hashes all of them, so a changed graph, an upgraded TensorRT
or another GPU can never pick up a stale engine. Engines live in
``$XDG_CACHE_HOME/graphc/engines/<key>.plan`` (``$GRAPHC_ENGINE_CACHE`` overrides the
folder), written atomically, with ``<key>.json`` describing the build.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from graphc.data.cache import cache_dir
from graphc.fileio import atomic_write

ENV = "GRAPHC_ENGINE_CACHE"


def engine_cache_dir() -> Path:
    return Path(os.environ.get(ENV) or cache_dir() / "engines")


def graph_hash(model: onnx.ModelProto) -> str:
    """sha256 of the graph's deterministic serialization (weights are inputs, not in it)."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


@dataclass(frozen=True)
class EngineKey:
    graph: str          # graph_hash
    flavor: str         # "tensorrt" | "rtx"
    version: str        # TensorRT version
    target: str         # "sm_90" (datacenter, the GPU's) | "rtx-portable"
    precision: str
    profile: str        # the optimisation profile's shapes

    def digest(self) -> str:
        text = json.dumps(self.__dict__, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class EngineCache:
    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else engine_cache_dir()

    def path(self, key: EngineKey) -> Path:
        return self.folder / f"{key.digest()}.plan"

    def load(self, key: EngineKey) -> bytes | None:
        path = self.path(key)
        return path.read_bytes() if path.is_file() else None

    def store(self, key: EngineKey, plan: bytes, info: dict | None = None) -> Path:
        path = self.path(key)
        with atomic_write(path) as f:
            f.write(plan)
        with atomic_write(path.with_suffix(".json"), "w") as f:
            json.dump({"key": key.__dict__, **(info or {})}, f, indent=1, sort_keys=True)
        return path
