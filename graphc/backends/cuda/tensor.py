"""Device tensors during lowering: a storage (a region of the arena, placed later) and a
strided view of it. View ops (Reshape, Transpose, Split, Slice, Squeeze, Unsqueeze) make
new views of the same storage; kernels take element strides, so most need no copy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Storage:
    id: int
    nbytes: int
    kind: str        # "act", "param", "grad", "input", "const", "scratch", "state"
    name: str
    offset: int = -1  # byte offset in the arena, set when the arena is laid out
    addr: int = 0     # device address, set when the arena is allocated


@dataclass(frozen=True)
class Tensor:
    storage: Storage
    shape: tuple
    strides: tuple   # in elements
    dtype: np.dtype
    offset: int = 0  # in elements

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ptr(self) -> int:
        return self.storage.addr + self.offset * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        return normalized(self.shape, self.strides) == normalized(self.shape, contiguous_strides(self.shape))

    def view(self, shape, strides, offset=None) -> "Tensor":
        return Tensor(self.storage, tuple(int(s) for s in shape), tuple(int(s) for s in strides), self.dtype,
                      self.offset if offset is None else offset)

    def transpose(self, perm) -> "Tensor":
        return self.view([self.shape[p] for p in perm], [self.strides[p] for p in perm])

    def reshape(self, shape) -> "Tensor | None":
        """A view with ``shape``, or None when the layout cannot express it without a copy."""
        strides = reshape_strides(self.shape, self.strides, tuple(shape))
        return None if strides is None else self.view(shape, strides)

    def row_stride(self) -> int | None:
        """For a 2-D view with unit inner stride: its row stride (else None)."""
        if len(self.shape) != 2:
            return None
        if self.shape[1] == 1 or self.strides[1] == 1:
            return self.strides[0] if self.shape[0] > 1 else self.shape[1]
        return None


def contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= int(d)
    return tuple(reversed(strides))


def normalized(shape, strides) -> tuple:
    """Strides with size-1 axes ignored (their stride never matters)."""
    return tuple(s for d, s in zip(shape, strides) if d != 1)


def broadcast_strides(shape, strides, out_shape) -> tuple:
    """Strides of a view broadcast (numpy rules) to ``out_shape``: 0 on broadcast axes."""
    pad = len(out_shape) - len(shape)
    out = [0] * pad
    for d, s, o in zip(shape, strides, out_shape[pad:]):
        out.append(0 if (d == 1 and o != 1) else s)
    return tuple(out)


def reshape_strides(shape, strides, new_shape):
    """numpy's no-copy reshape: strides for ``new_shape`` over the same elements, or None."""
    if int(np.prod(shape, dtype=np.int64)) != int(np.prod(new_shape, dtype=np.int64)):
        return None
    old = [(d, s) for d, s in zip(shape, strides) if d != 1]
    new_dims = [d for d in new_shape]
    result = [0] * len(new_dims)
    # group old and new axes into runs with equal products; each old run must be contiguous
    oi, nj = 0, 0
    non1 = [k for k, d in enumerate(new_dims) if d != 1]
    while oi < len(old) or nj < len(non1):
        if oi >= len(old) or nj >= len(non1):
            return None
        op, np_ = old[oi][0], new_dims[non1[nj]]
        o_run, n_run = [oi], [non1[nj]]
        while op != np_:
            if op < np_:
                oi += 1
                if oi >= len(old):
                    return None
                op *= old[oi][0]
                o_run.append(oi)
            else:
                nj += 1
                if nj >= len(non1):
                    return None
                np_ *= new_dims[non1[nj]]
                n_run.append(non1[nj])
        for a, b in zip(o_run[:-1], o_run[1:]):
            if old[a][1] != old[b][1] * old[b][0]:
                return None
        stride = old[o_run[-1]][1]
        for k in reversed(n_run):
            result[k] = stride
            stride *= new_dims[k]
        oi += 1
        nj += 1
    for k, d in enumerate(new_dims):
        if d == 1:
            result[k] = 0
    return tuple(result)
