"""Compare two backends' outputs, Polygraphy-style: per output, a tolerance by dtype.

The error of an output is ``||actual - reference|| / ||reference||`` in float64 (NaN or
Inf never pass); the tolerance is the reference dtype's, or the looser one when the
backend under test computes in a lower precision (a BF16 engine against onnxruntime's FP32
is held to the BF16 tolerance).
"""

from __future__ import annotations

from typing import Mapping

import ml_dtypes
import numpy as np

from graphc.compare import relative_error

# relative-norm tolerances by the precision the backend computes in
TOLERANCES = {
    "float32": 1e-4,
    "float16": 5e-3,
    "bfloat16": 2e-2,
}
EXACT = {"int64", "int32", "bool"}


def compare(actual: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *,
            compute_dtype: str = "float32") -> dict[str, tuple[float, float, bool]]:
    """name -> (error, tolerance, passed) for every output both sides have."""
    result = {}
    for name in reference.keys() & actual.keys():
        ref = np.asarray(reference[name])
        dtype = "bfloat16" if ref.dtype == ml_dtypes.bfloat16 else ref.dtype.name
        if dtype in EXACT:
            ok = np.array_equal(np.asarray(actual[name]), ref)
            result[name] = (0.0 if ok else float("inf"), 0.0, bool(ok))
            continue
        tol = max(TOLERANCES.get(dtype, TOLERANCES["float32"]), TOLERANCES[compute_dtype])
        err = relative_error(actual[name], ref)
        result[name] = (err, tol, err <= tol)
    return result
