"""Polygraphy's file formats, so that graphc's comparisons and NVIDIA's tool read each other.

``polygraphy run MODEL.onnx --trt --load-inputs inputs.json --save-outputs trt.json`` is how
TensorRT users check an engine against another runner. ``graphc compare`` speaks the same
files: it writes the graph it ran (``--save-model``), its inputs in Polygraphy's inputs format
(``--save-inputs``: a list of feed dicts) and every backend's outputs as Polygraphy
``RunResults`` (``--save-outputs``), and takes Polygraphy's results back as more sides of the
comparison (``--load-outputs``). So a run made where graphc cannot run (Polygraphy's own
TensorRT runner on a GPU that runs engines, or another machine) is compared with graphc's
backends by graphc's one comparator and tolerance table.

The files are read and written by Polygraphy's own code (``polygraphy.json``,
``polygraphy.comparator.RunResults``), not by a copy of its format. One gap is bridged here:
NumPy has no bfloat16, so Polygraphy keeps BF16 arrays as ``torch.bfloat16`` tensors (its
TensorRT runner feeds those), and a NumPy array of ``ml_dtypes.bfloat16`` would be written
as raw 2-byte voids. BF16 inputs are therefore written as torch tensors, and BF16 arrays
read back (torch tensors, or 2-byte voids from older writers) become ``ml_dtypes.bfloat16``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from graphc.errors import GraphcError

PIP_HINT = "pip install polygraphy"


def _polygraphy(path, flag: str):
    try:
        import polygraphy.comparator as comparator
        import polygraphy.json as pjson
    except ImportError:
        raise GraphcError(path, f"needs Polygraphy, which is not installed ({PIP_HINT})", flag) from None
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR   # its "[I] Saving ..." lines are not graphc's output
    return comparator, pjson


def _to_polygraphy(array: np.ndarray, path, flag: str):
    """A value Polygraphy stores faithfully: NumPy arrays, BF16 as a torch tensor."""
    import ml_dtypes

    array = np.asarray(array)
    if array.dtype != ml_dtypes.bfloat16:
        return np.asarray(array, order="C")   # (ascontiguousarray would make a scalar 1-d)
    try:
        import torch
    except ImportError:
        raise GraphcError(path, "BF16 arrays are kept as torch tensors in Polygraphy's files; "
                                "install torch or compare in fp32", flag) from None
    bits = np.asarray(array, order="C").view(np.int16)
    return torch.from_numpy(bits.copy()).view(torch.bfloat16)


def _from_polygraphy(value) -> np.ndarray:
    """A NumPy array (``ml_dtypes.bfloat16`` for BF16) from what Polygraphy loaded."""
    import ml_dtypes

    if type(value).__module__.startswith("torch"):
        import torch

        if value.dtype == torch.bfloat16:
            return value.detach().cpu().contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:   # an ml_dtypes bf16 array written by NumPy
        return array.view(ml_dtypes.bfloat16)
    return array


def save_inputs(path: str | Path, feeds: Mapping[str, np.ndarray], flag: str = "--save-inputs") -> None:
    """``feeds`` as Polygraphy's inputs file (what ``polygraphy run --load-inputs`` reads)."""
    _polygraphy(path, flag)
    _write_json(path, [{name: _to_polygraphy(value, path, flag) for name, value in feeds.items()}])


def save_results(path: str | Path, results: Mapping[str, Mapping[str, np.ndarray]],
                 flag: str = "--save-outputs") -> None:
    """``{run label: {output: array}}`` as Polygraphy ``RunResults`` (one iteration a run)."""
    comparator, _ = _polygraphy(path, flag)
    run_results = comparator.RunResults()
    for label, outputs in results.items():
        run_results.add([{name: _to_polygraphy(a, path, flag) for name, a in outputs.items()}], runner_name=label)
    _write_json(path, run_results)


def _write_json(path: str | Path, obj) -> None:
    """``obj`` in Polygraphy's JSON encoding, written atomically."""
    import polygraphy.json as pjson

    from graphc.fileio import atomic_write

    text = pjson.to_json(obj)
    with atomic_write(path, "w") as f:
        f.write(text)


def load_results(path: str | Path, flag: str = "--load-outputs") -> dict[str, dict[str, np.ndarray]]:
    """The runs of a Polygraphy ``RunResults`` file (``polygraphy run --save-outputs``):
    ``{runner name: {output: array}}``. graphc compares one set of inputs, so a runner with
    several iterations is refused rather than silently reduced to its first."""
    comparator, pjson = _polygraphy(path, flag)
    path = Path(path)
    if not path.is_file():
        raise GraphcError(path, "no such file" if not path.exists() else "not a file", flag)
    try:   # (RunResults.load would print Polygraphy's own multi-line complaint about another kind of JSON)
        run_results = pjson.load_json(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraphcError(path, f"not a JSON file ({type(e).__name__})", flag) from None
    except Exception as e:   # Polygraphy raises its own PolygraphyException on a JSON of another kind
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraphcError(path, f"not Polygraphy inference results ({first})", flag) from None
    if not isinstance(run_results, comparator.RunResults):
        raise GraphcError(path, f"not Polygraphy inference results (it holds an object of type {type(run_results).__name__}; "
                                "Polygraphy inputs files hold a list)", flag)
    runs: dict[str, dict[str, np.ndarray]] = {}
    for name, iterations in run_results.items():
        if len(iterations) != 1:
            raise GraphcError(path, f"runner {name!r} has {len(iterations)} iterations; graphc compares one set "
                                    "of inputs (run Polygraphy with --load-inputs of graphc's --save-inputs)", flag)
        if name in runs:
            raise GraphcError(path, f"runner {name!r} appears twice", flag)
        runs[name] = {out: _from_polygraphy(value) for out, value in iterations[0].items()}
    if not runs:
        raise GraphcError(path, "holds no runs", flag)
    return runs
