"""A small, dependency-free reader and writer of the safetensors format.

Format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the
header), then the raw little-endian data. We read it ourselves rather than through the
``safetensors`` package because numpy has no bfloat16 of its own (we use ml_dtypes) and
because every malformed field should produce graphc's one-line error naming it.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from graphc.errors import GraphcError
from graphc.fileio import atomic_write, open_input

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors (memory-mapped, read-only) and the ``__metadata__`` dict."""
    with open_input(path, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise GraphcError(path, "file is truncated: no header length", "header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise GraphcError(path, f"header length {n} exceeds the file size {size}", "header")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GraphcError(path, f"header is not valid JSON ({e.__class__.__name__})", "header") from None
    if not isinstance(header, dict):
        raise GraphcError(path, "header is not a JSON object", "header")
    meta = header.pop("__metadata__", {}) or {}
    data_start = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise GraphcError(path, "malformed tensor entry (dtype, shape, data_offsets)", name) from None
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if end - begin != nbytes:
            raise GraphcError(path, f"data_offsets span {end - begin} bytes but {info['dtype']}{list(shape)} "
                              f"needs {nbytes}", name)
        if data_start + end > size:
            raise GraphcError(path, f"file is truncated: tensor ends at byte {data_start + end}, file has {size}", name)
        tensors[name] = mm[data_start + begin:data_start + end].view(dtype).reshape(shape)
    return tensors, meta


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (in the given order) atomically."""
    header, offset = {}, 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in NAMES:
            raise ValueError(f"{name}: dtype {arr.dtype} has no safetensors name")
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
