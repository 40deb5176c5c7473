"""HDF5 arrays written in slices, so that Ctrl-C or SIGTERM is honoured between them.

h5py writes a dataset in one C call (compressing it, for gzip, at about 40 MB/s),
and a ``KeyboardInterrupt`` raised by Python's handler around it can be dropped (see
:mod:`csqcfs_deploy.interrupts`). :func:`write_array` writes an array larger than
:data:`SLICE_BYTES` one slice along its first axis at a time, calling
:func:`~csqcfs_deploy.interrupts.check_signals` between slices; call it inside
:func:`~csqcfs_deploy.interrupts.deferred_signals`. A compressed array is chunked one
chunk per slice, so each slice is compressed on its own.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from csqcfs_deploy.interrupts import check_signals

#: Bytes written per HDF5 call (and per chunk of a compressed array): ~0.1 s of gzip.
SLICE_BYTES = 4 * 2**20


def slice_rows(array: npt.NDArray[Any], slice_bytes: int = SLICE_BYTES) -> int:
    """Rows (first-axis entries) per slice: at least one, about ``slice_bytes`` bytes."""
    row_bytes = max(1, array.nbytes // max(1, array.shape[0]))
    return max(1, min(array.shape[0], slice_bytes // row_bytes))


def write_array(group: h5py.Group, name: str, array: npt.NDArray[Any],
                compression: str | None = None, slice_bytes: int = SLICE_BYTES
                ) -> h5py.Dataset:
    """``group[name] = array`` (with ``compression``), in slices of ``slice_bytes`` with a
    signal check before each; a small or 0-d array is written in one call, as
    ``group.create_dataset(name, data=array)`` would."""
    check_signals()
    array = np.asarray(array)
    if array.ndim == 0 or array.nbytes <= slice_bytes:
        return group.create_dataset(name, data=array, dtype=array.dtype,
                                    compression=compression)
    rows = slice_rows(array, slice_bytes)
    chunks = (rows, *array.shape[1:]) if compression else None
    dataset = group.create_dataset(name, shape=array.shape, dtype=array.dtype,
                                   chunks=chunks, compression=compression)
    for start in range(0, array.shape[0], rows):
        check_signals()
        dataset[start:start + rows] = array[start:start + rows]
    check_signals()
    return dataset
