"""Fast row reads from HDF5 datasets stored one chunk per sample (the MMEarth layout).

MMEarth writes every dataset gzip-compressed with ``chunks=(1, ...)`` (``data_formats.md`` 1.2), so
one sample is one compressed chunk. For such datasets h5py's per-call selection machinery costs more
than the read itself; :class:`RowReader` fetches the raw chunk with ``H5Dread_chunk``
(``dataset.id.read_direct_chunk``) and inflates it with libdeflate (the ``deflate`` package, about
2x faster than zlib on MMEarth-sized chunks; :mod:`zlib` when it is not installed), skipping HDF5's
hyperslab code and chunk cache. Any other layout (contiguous, other chunk shapes, shuffle / fletcher32 / other
filters, unallocated chunks) falls back to a normal h5py read, so the result is always identical to
``dataset[row]``.
"""

from __future__ import annotations

import zlib

import h5py
import numpy as np

__all__ = ["RowReader", "splitmix64", "inflate"]

try:
    import deflate as _libdeflate
except ImportError:  # optional speed-up
    _libdeflate = None


def inflate(buf: bytes, nbytes: int) -> bytes:
    """Decompress a zlib stream (HDF5's gzip filter) whose output is ``nbytes`` long."""
    if _libdeflate is not None:
        try:
            return _libdeflate.zlib_decompress(buf, nbytes)
        except Exception:  # noqa: BLE001 - libdeflate rejects a wrong size; zlib gives the real error
            pass
    return zlib.decompress(buf)


def _direct_ok(dset: h5py.Dataset) -> bool:
    """True when ``dset`` is chunked one row per chunk with no filter other than deflate."""
    if dset.chunks is None or dset.ndim == 0 or tuple(dset.chunks) != (1, *dset.shape[1:]):
        return False
    plist = dset.id.get_create_plist()
    if plist.get_layout() != h5py.h5d.CHUNKED:
        return False
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    return filters in ([], [h5py.h5z.FILTER_DEFLATE])


class RowReader:
    """Reads row ``i`` of an (N, ...) HDF5 dataset as a numpy array of shape ``dataset.shape[1:]``.

    Args:
        dset: An open h5py dataset.

    The returned array may be read-only (a view of the inflated buffer); copy before writing to it.
    """

    def __init__(self, dset: h5py.Dataset) -> None:
        self.dset = dset
        self.row_shape = tuple(dset.shape[1:])
        self.dtype = dset.dtype
        self._nbytes = int(np.prod(self.row_shape, dtype=np.int64)) * dset.dtype.itemsize
        self._direct = _direct_ok(dset)
        self._deflate = self._direct and dset.id.get_create_plist().get_nfilters() == 1
        self._zero = (0,) * len(self.row_shape)

    @property
    def direct(self) -> bool:
        """Whether rows are read as raw chunks (fast path)."""
        return self._direct

    def read(self, row: int) -> np.ndarray:
        """Return row ``row`` (a ``dataset.shape[1:]`` array of ``dataset.dtype``)."""
        if self._direct:
            try:
                mask, buf = self.dset.id.read_direct_chunk((int(row), *self._zero))
            except (KeyError, RuntimeError, OSError, ValueError):  # unallocated chunk: HDF5 fill value
                return self.dset[row]
            if self._deflate and not mask & 1:
                buf = inflate(buf, self._nbytes)
            if len(buf) == self._nbytes:
                return np.frombuffer(buf, dtype=self.dtype).reshape(self.row_shape)
        return self.dset[row]


_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al., 2014), vectorised: uint64 array -> well-mixed uint64 array."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))
