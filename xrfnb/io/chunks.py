"""Fast whole-row reads of chunked HDF5 scans: raw chunks inflated in parallel threads.

h5py serialises all HDF5 calls under one lock and keeps the GIL while the library inflates chunks, so a
plain ``dset[rows]`` decompresses on one core and blocks everything else meanwhile. :class:`ChunkReader`
fetches the raw (compressed) chunks with ``read_direct_chunk``, inflates them with ISA-L (the ``isal``
package, about twice as fast as :mod:`zlib`; zlib where isal is not installed; both release the GIL) and
un-shuffles them with NumPy in a small thread pool.

A chunk that does not decode (a bit flip in the file, a truncated copy) raises :class:`DataError` naming
the file, the dataset and the chunk (its offset, pixel row and columns), like the h5py path
(:class:`xrfnb.io.hdf5.CheckedDataset`) does.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .._errors import DataError
from .hdf5 import chunk_text

if TYPE_CHECKING:
    import h5py

__all__ = ["ChunkReader", "inflate", "inflater"]


@functools.cache
def inflater() -> Callable[[bytes, int, int], bytes]:
    """``decompress(data, wbits, bufsize)`` of ISA-L's zlib-compatible module, or of :mod:`zlib`."""
    try:
        from isal import isal_zlib

        return isal_zlib.decompress
    except ImportError:  # pragma: no cover - isal is a dependency; zlib still reads every file
        return zlib.decompress


def _inflate_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (zlib.error, ValueError)
    try:
        from isal import isal_zlib

        errors += (isal_zlib.error,)
    except ImportError:  # pragma: no cover
        pass
    return errors


def inflate(data: bytes, nbytes: int) -> bytes:
    """Inflate one deflate-compressed HDF5 chunk (zlib stream) of ``nbytes`` uncompressed bytes."""
    return inflater()(data, 15, nbytes)


class ChunkReader:
    """Read whole-row blocks of a chunked HDF5 dataset, decompressing its chunks in parallel threads.

    Only the common filter pipelines are handled (none, shuffle, deflate, shuffle + deflate, native byte
    order): :meth:`maybe` returns None for anything else, and the caller reads through h5py.

    Parameters
    ----------
    dset : h5py.Dataset
        A 3-D chunked dataset (rows, cols, channels).
    filters : list of int
        HDF5 filter ids of the dataset, in write order.
    threads : int
        Decompression threads.
    """

    def __init__(self, dset: h5py.Dataset, filters: list[int], threads: int) -> None:
        self.dset = dset
        self.filters = filters  # write order
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="xrfnb-inflate"
        )
        self.dtype = np.dtype(dset.dtype)
        self.chunk = tuple(int(c) for c in dset.chunks)
        self.nbytes = int(np.prod(self.chunk)) * self.dtype.itemsize
        self._errors = _inflate_errors()

    @classmethod
    def maybe(cls, dset: h5py.Dataset, threads: int | None = None) -> ChunkReader | None:
        """A reader for ``dset``, or None when its layout or filters are not handled here."""
        try:
            import h5py
            from h5py import h5z
        except ImportError:  # pragma: no cover
            return None
        if not isinstance(dset, h5py.Dataset) or dset.chunks is None or dset.ndim != 3:
            return None
        dtype = np.dtype(dset.dtype)
        if dtype.kind not in "iuf" or not dtype.isnative or not hasattr(dset.id, "read_direct_chunk"):
            return None
        plist = dset.id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        if filters not in (
            [],
            [h5z.FILTER_DEFLATE],
            [h5z.FILTER_SHUFFLE],
            [h5z.FILTER_SHUFFLE, h5z.FILTER_DEFLATE],
        ):
            return None
        return cls(dset, filters, threads or min(4, os.cpu_count() or 1))

    def _decode(self, raw: bytes, filter_mask: int) -> np.ndarray:
        from h5py import h5z

        data: bytes | np.ndarray = raw
        for i in reversed(range(len(self.filters))):
            if filter_mask & (1 << i):
                continue  # this filter was skipped for this chunk
            if self.filters[i] == h5z.FILTER_DEFLATE:
                data = inflate(data, self.nbytes)
            elif self.filters[i] == h5z.FILTER_SHUFFLE and self.dtype.itemsize > 1:
                k = self.dtype.itemsize
                planes = np.frombuffer(data, dtype=np.uint8).reshape(k, -1)
                unshuffled = np.empty((planes.shape[1], k), dtype=np.uint8)
                for j in range(k):
                    unshuffled[:, j] = planes[j]
                data = unshuffled
        n_bytes = len(data) if isinstance(data, bytes) else data.nbytes
        if n_bytes != self.nbytes:
            raise ValueError(f"decodes to {n_bytes} bytes instead of {self.nbytes}")
        return np.frombuffer(data, dtype=self.dtype).reshape(self.chunk)

    def _damaged(self, offset: tuple[int, int, int], exc: BaseException) -> DataError:
        return DataError(
            f"{self.dset.file.filename}:{self.dset.name}: {chunk_text(offset, self.chunk, self.dset.shape)} "
            f"is damaged: the compressed data cannot be decoded ({type(exc).__name__}: {exc}); the file is "
            "corrupted (other chunks may still read): re-copy it from the instrument or a backup"
        )

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` (r0 a multiple of the chunk rows), shape (r1 - r0, cols, channels).

        Raises
        ------
        DataError
            A chunk of these rows does not decode (corrupted file): the message names the chunk.
        """
        _rows, cols, n_ch = (int(s) for s in self.dset.shape)
        cr, cc, cch = self.chunk
        if r0 % cr:
            return np.asarray(self.dset[r0:r1])
        out = np.empty((r1 - r0, cols, n_ch), dtype=self.dtype)

        def place(offset: tuple[int, int, int], raw: bytes | None, mask: int) -> None:
            a0, b0, c0 = offset
            a1, b1, c1 = min(a0 + cr, r1), min(b0 + cc, cols), min(c0 + cch, n_ch)
            if raw is None:  # chunk never written: HDF5 returns the fill value
                out[a0 - r0 : a1 - r0, b0:b1, c0:c1] = self.dset[a0:a1, b0:b1, c0:c1]
                return
            try:
                chunk = self._decode(raw, mask)
            except self._errors as exc:
                raise self._damaged(offset, exc) from None
            out[a0 - r0 : a1 - r0, b0:b1, c0:c1] = chunk[: a1 - a0, : b1 - b0, : c1 - c0]

        futures = []
        for a0 in range(r0, r1, cr):
            for b0 in range(0, cols, cc):
                for c0 in range(0, n_ch, cch):
                    try:
                        mask, raw = self.dset.id.read_direct_chunk((a0, b0, c0))
                    except (KeyError, OSError, ValueError, RuntimeError):  # chunk not allocated
                        mask, raw = 0, None
                    futures.append(self.pool.submit(place, (a0, b0, c0), raw, mask))
        for f in futures:
            f.result()
        return out

    def close(self) -> None:
        """Stop the decompression threads."""
        self.pool.shutdown(wait=True)
