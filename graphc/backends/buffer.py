"""Buffers: a block of typed memory on some device, the unit backends and programs share.

Every backend allocates and returns :class:`Buffer` objects; the runtime never needs to
know whether the bytes live in host memory (numpy, onnxruntime's CPU OrtValues), in GPU
memory (an arena slice of the CUDA backend) or in a TensorRT binding. What the runtime may
do with a buffer is the small protocol below:

* ``device`` (``"cpu"``, ``"cuda:0"``), ``dtype`` (a numpy dtype; bfloat16 is
  ``ml_dtypes.bfloat16``), ``shape`` and ``ptr`` (the address of element 0) describe it;
* ``to_numpy()`` makes a host copy (on the CPU: a view, no copy) and
  ``copy_from_numpy(a)`` fills it from the host. These are the *only* host transfers, and
  the runtime calls them only where a user asks for a value (a loss, a sampled token, a
  checkpoint);
* ``view(offset, shape)`` is a sub-buffer sharing the memory (the flat parameter buffer's
  per-tensor views, a gradient bucket, one slot of a KV cache).

:class:`HostBuffer` is the CPU implementation, a thin wrapper of a numpy array that also
speaks DLPack (through numpy). GPU backends provide their own class with the same members.
"""

from __future__ import annotations

import abc
import math
from typing import Sequence

import numpy as np


class Buffer(abc.ABC):
    """Typed memory on a device; see the module docstring for the protocol."""

    device: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    @abc.abstractmethod
    def ptr(self) -> int:
        """Address of element 0 (host or device address space, per ``device``)."""

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @abc.abstractmethod
    def to_numpy(self) -> np.ndarray:
        """The contents on the host (a copy for device memory, a view on the CPU)."""

    @abc.abstractmethod
    def copy_from_numpy(self, array: np.ndarray) -> None:
        """Overwrite the contents with ``array`` (same size; converted to this dtype)."""

    @abc.abstractmethod
    def view(self, offset: int, shape: Sequence[int]) -> "Buffer":
        """The elements ``[offset, offset + prod(shape))`` as a buffer of ``shape``, sharing memory."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device}, {np.dtype(self.dtype).name}{list(self.shape)})"


class HostBuffer(Buffer):
    """A numpy array as a :class:`Buffer` (``device == "cpu"``). ``array`` is the array itself."""

    device = "cpu"

    def __init__(self, array: np.ndarray):
        if not array.flags.c_contiguous:
            raise ValueError("a HostBuffer needs a C-contiguous array")
        self.array = array

    @classmethod
    def empty(cls, shape: Sequence[int], dtype) -> "HostBuffer":
        return cls(np.zeros(tuple(shape), dtype=dtype))

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def ptr(self) -> int:
        return int(self.array.ctypes.data)

    def to_numpy(self) -> np.ndarray:
        return self.array

    def copy_from_numpy(self, array: np.ndarray) -> None:
        src = np.asarray(array)
        if src.size != self.array.size:
            raise ValueError(f"copy of {src.size} elements into a buffer of {self.array.size}")
        self.array.reshape(-1)[...] = src.reshape(-1)

    def view(self, offset: int, shape: Sequence[int]) -> "HostBuffer":
        n = math.prod(shape)
        return HostBuffer(self.array.reshape(-1)[offset:offset + n].reshape(tuple(shape)))

    def __dlpack__(self, *args, **kwargs):
        return self.array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def host_array(value) -> np.ndarray:
    """A numpy array for ``value`` (a Buffer -> its host contents; arrays pass through)."""
    return value.to_numpy() if isinstance(value, Buffer) else np.asarray(value)
