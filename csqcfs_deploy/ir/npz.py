"""Reading members of an npz (zip) archive lazily, checking each one's declared size first.

:class:`NpzMembers` opens one member at a time, when it is asked for. It reads the
member's npy header (at most :data:`MAX_HEADER_BYTES`, numpy's own limit), checks the
declared dtype and shape, charges the declared element count to a budget, and only
then reads exactly the declared bytes. So an archive that declares a 12 GiB array
costs nothing unless that array is asked for, and then it is refused before any
allocation. Only int, unsigned and float dtypes are read (no bool, complex, string,
object or structured arrays), with at most :data:`MAX_ARRAY_DIMS` dimensions.

Every failure is an :class:`~csqcfs_deploy.errors.InputFileError` naming the archive
and the member; :data:`ARCHIVE_ERRORS` are the exceptions the zip and decompression
layers raise on a corrupt file, which callers map to it.
"""

from __future__ import annotations

import io
import lzma
import math
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from csqcfs_deploy.errors import InputFileError

NPY_MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 10_000
MAX_ARRAY_DIMS = 8

#: What zipfile, zlib, bz2 and lzma raise on a corrupt, truncated or exotic archive
#: (RuntimeError: an encrypted member; NotImplementedError: a compression method).
ARCHIVE_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, EOFError, OSError,
    ValueError, NotImplementedError, RuntimeError, struct.error, OverflowError)


class NpzMembers:
    """The npy members of an open zip archive, read on request against an element budget.

    ``source`` names the archive in messages; ``max_elements`` is the budget of declared
    elements over every member read (each member is read at most once); ``limit_hint``
    tells the user how to raise it.
    """

    def __init__(self, archive: zipfile.ZipFile, source: str, max_elements: int,
                 limit_hint: str = "") -> None:
        self._archive = archive
        self._source = source
        self._left = max_elements
        self._max = max_elements
        self._hint = limit_hint
        self._names = frozenset(archive.namelist())
        self._cache: dict[str, npt.NDArray[Any]] = {}

    def has(self, key: str) -> bool:
        """True when the archive holds member ``key.npy``."""
        return f"{key}.npy" in self._names

    def read(self, key: str, dtype: np.dtype[Any] | None = None) -> npt.NDArray[Any]:
        """Member ``key.npy`` as a read-only array (InputFileError if absent or refused);
        ``dtype``: the one dtype accepted (a 1-D array), checked before the data is read."""
        if key in self._cache:
            return self._cache[key]
        where = f"{self._source}: array {key[:80]!r}"
        if not self.has(key):
            raise InputFileError(f"{where} is missing from the archive")
        with self._archive.open(f"{key}.npy") as fh:
            shape, fortran, declared = read_header(fh, where)
            if dtype is not None and (declared != dtype or len(shape) != 1):
                raise InputFileError(f"{where} is {declared} of shape {shape}, expected a "
                                     f"1-D {dtype} array")
            count = math.prod(shape)
            if count > self._left:
                raise InputFileError(
                    f"{where} declares shape {shape} ({count} elements): the arrays would "
                    f"exceed the limit of {self._max} elements{self._hint}")
            self._left -= count
            arr = read_data(fh, shape, fortran, declared, where)
        self._cache[key] = arr
        return arr


def read_header(fh: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, fortran_order, dtype) of the npy stream ``fh``, checked; reads the header only."""
    magic = fh.read(8)
    if len(magic) != 8 or not magic.startswith(NPY_MAGIC):
        raise InputFileError(f"{where} is not an npy array")
    version = (magic[6], magic[7])
    if version not in ((1, 0), (2, 0)):
        raise InputFileError(f"{where}: npy format version {version} is not supported")
    size_format = "<H" if version == (1, 0) else "<I"
    size_bytes = fh.read(struct.calcsize(size_format))
    if len(size_bytes) != struct.calcsize(size_format):
        raise InputFileError(f"{where}: truncated npy header")
    (size,) = struct.unpack(size_format, size_bytes)
    if size > MAX_HEADER_BYTES:
        raise InputFileError(f"{where}: npy header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    header = fh.read(size)
    if len(header) != size:
        raise InputFileError(f"{where}: truncated npy header")
    parse: Callable[[IO[bytes]], tuple[tuple[int, ...], bool, np.dtype[Any]]] = (
        np.lib.format.read_array_header_1_0 if version == (1, 0)
        else np.lib.format.read_array_header_2_0)
    try:
        shape, fortran, dtype = parse(io.BytesIO(size_bytes + header))
    except (ValueError, TypeError, SyntaxError, RecursionError) as exc:
        raise InputFileError(f"{where}: malformed npy header ({str(exc)[:120]})") from None
    check_declared(shape, dtype, where)
    return tuple(shape), bool(fortran), dtype


def check_declared(shape: tuple[int, ...], dtype: np.dtype[Any], where: str) -> None:
    """InputFileError unless ``dtype`` is a plain int/float and ``shape`` is sane."""
    if dtype.kind not in "iuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise InputFileError(f"{where} has dtype {dtype}; only integer and float arrays "
                             "are read")
    if len(shape) > MAX_ARRAY_DIMS or any(d < 0 for d in shape):
        raise InputFileError(f"{where} declares an invalid shape {shape}")


def read_data(fh: IO[bytes], shape: tuple[int, ...], fortran: bool, dtype: np.dtype[Any],
              where: str) -> npt.NDArray[Any]:
    """Exactly the declared bytes of an npy stream after its header, as a read-only array."""
    nbytes = math.prod(shape) * dtype.itemsize
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise InputFileError(f"{where} is truncated ({len(data)} of {nbytes} bytes)")
    flat = np.frombuffer(data, dtype=dtype)
    if fortran:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)
