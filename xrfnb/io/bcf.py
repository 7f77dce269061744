"""Bruker ``.bcf`` hypermaps of any size: a row index over the pulse stream, rows decoded on demand.

A ``.bcf`` is an AidAim SFS container; a hypermap is its file ``EDSDatabase/SpectrumData<i>``, a
*pulse stream*: a 0x1A0-byte header (height, width, ...), then per image row a 4-byte pixel count and
per pixel a 22-byte header (x index, channel counts, packing flag, number of pulses, data size)
followed by its packed counts: 16-bit pulse list (flag 0), 12-bit pulse list (flag 1) or Delphi
"instructed" bunches (flag > 1, plus optional 16-bit extra pulses).

:func:`index_bcf_rows` walks the stream once, reading pixel headers and skipping payloads, and keeps
the byte offset where each row starts (``rows + 1`` integers). :class:`BcfRows` is then a lazy,
read-only array of counts (rows, cols, channels): indexing it reads only the bytes of the rows asked
for, checks them record by record (:func:`check_bcf_block`: every pixel header, every instructed
bunch, vectorised over the block's pixels) and decodes them with rosettasciio's compiled decoder,
fed a stream that holds just those rows. Peak memory is one block of rows, whatever the map's size.

The container's stream is read through its chunk pointer table (:class:`SfsStream`), so a byte
range of the stream is read without reading what comes before it; zlib-compressed containers are
read through their table of compressed blocks.

Several detectors. A file from a system with more than one EDS detector (an M4 Tornado or M6 Jetstream
with two SDDs) holds one hypermap per detector, ``SpectrumData0``, ``SpectrumData1``, ..., each with its
own sum spectrum (calibration, live time) in the header, whose ``DetectorCount`` says how many there
are; the vendor software shows their sum. :func:`select_bcf_maps` decides which hypermaps a request
(``index=``, ``detector=``) stands for, and :class:`BcfDetectorSum` sums the detectors' rows lazily
(each rebinned onto detector 0's energy axis where their calibrations differ).

Live time. A pixel record holds its column, two channel counts, a 4-byte value that is the same in
every known file, the packing flag, two sizes and the number of pulses: no live or real time. The only
times in the file are those of each hypermap's sum spectrum (``LifeTime``/``RealTime`` in the header).
"""

from __future__ import annotations

import functools
import itertools
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._errors import DataError, FormatError
from ..core.calibration import EnergyCalibration

__all__ = [
    "STREAM_HEADER_BYTES",
    "BcfDetectorSum",
    "BcfRows",
    "BcfSelection",
    "SfsStream",
    "check_bcf_block",
    "decode_bcf_block",
    "index_bcf_rows",
    "rebin_rows",
    "select_bcf_maps",
]

#: bytes of the hypermap stream header (height and width are its first two int32)
STREAM_HEADER_BYTES = 0x1A0
#: zero bytes after a block handed to the decoder: one instructed bunch reads at most 2 + 8 + 512
#: bytes from a position inside its pixel record, so no read can leave the buffer
_PAD = 1024
#: bytes of stream read at a time by the index pass
_WINDOW = 8 << 20
#: decoded bytes per block of rows (at least one row per block)
BLOCK_BYTES = 48 << 20
#: decoded bytes per call of the compiled decoder when rows are decoded into a given array: its own
#: output array stays small enough for the C library to reuse its memory (an array above the allocator's
#: mmap threshold, 32 MB at most with glibc, is fresh pages from the kernel on every call, which cost more
#: CPU than the decoding)
GROUP_BYTES = 8 << 20


class SfsStream:
    """Random access to one file of a ``.bcf`` (SFS) container: ``read(offset, length)``.

    Parameters
    ----------
    path : Path
        The container.
    item : object
        rosettasciio's ``SFSTreeItem`` of the file (its ``pointers`` table: the container byte address of
        each data chunk; ``size``: the file's length in bytes; ``sfs``: the container's chunk sizes and
        compression).

    Attributes
    ----------
    size : int
        Length of the (uncompressed) file in bytes.
    """

    def __init__(self, path: Path, item: Any) -> None:
        self.path = path
        self._pointers = np.asarray(item.pointers, dtype=np.int64)
        self._usable = int(item.sfs.usable_chunk)
        self._chunk = int(item.sfs.chunksize)
        self._raw_size = int(item.size)
        self._local = threading.local()  # per thread: reused buffers of read_array
        self.compressed = item.sfs.compression == "zlib"
        if self.compressed:
            self._block = int(item.uncompressed_blk_size)
            self._blocks = self._compressed_blocks(int(item.no_of_compr_blk))
            self.size = self._uncompressed_size()
        else:
            self.size = self._raw_size

    # -- the container's chunks ------------------------------------------------------------------
    def _scratch(self, name: str, size: int) -> np.ndarray:
        """A uint8 buffer of at least ``size`` bytes kept by this thread for reuse (grown when needed)."""
        buf = getattr(self._local, name, None)
        if buf is None or buf.size < size:
            buf = np.empty(max(size, 0) + (size >> 3), np.uint8)
            setattr(self._local, name, buf)
        return buf

    def _read_raw_into(self, offset: int, length: int, out: np.ndarray) -> None:
        """Bytes ``offset:offset+length`` of the file as stored (maybe compressed) into ``out`` (uint8,
        ``length`` bytes), via the chunk table: each run of chunks stored one after the other is one read
        into a reused buffer, its chunks' payloads then copied out in one strided copy."""
        if offset < 0 or length < 0 or offset + length > self._raw_size:
            raise FormatError(
                f"{self.path}: .bcf stream read of {length} bytes at {offset} outside its {self._raw_size} "
                "bytes (truncated or corrupted)"
            )
        if length == 0:
            return
        first, last = offset // self._usable, (offset + length - 1) // self._usable
        if last >= self._pointers.size:
            raise FormatError(f"{self.path}: .bcf chunk table is shorter than the stream (corrupted)")
        starts = self._pointers[first : last + 1]
        # runs of chunks stored one after the other: where each begins in starts
        breaks = np.flatnonzero(starts[1:] != starts[:-1] + self._chunk) + 1
        bounds = [0, *breaks.tolist(), starts.size]
        at = -(offset - first * self._usable)  # where the first chunk's payload lands in out
        with open(self.path, "rb", buffering=0) as fh:
            for k, j in itertools.pairwise(bounds):
                want = (j - k - 1) * self._chunk + self._usable
                raw = self._scratch("raw", (j - k) * self._chunk)
                fh.seek(int(starts[k]))
                got = fh.readinto(memoryview(raw)[:want])
                if got < want and j < starts.size:
                    raise FormatError(f"{self.path}: .bcf container is truncated (chunk at {int(starts[k])})")
                raw[got : (j - k) * self._chunk] = 0
                payload = raw[: (j - k) * self._chunk].reshape(j - k, self._chunk)[:, : self._usable]
                lo, hi = max(at, 0), min(at + (j - k) * self._usable, length)
                if hi > lo:
                    out[lo:hi] = payload.reshape(-1)[lo - at : hi - at]
                at += (j - k) * self._usable

    def _read_raw(self, offset: int, length: int) -> bytes:
        """Bytes ``offset:offset+length`` of the file as stored (maybe compressed), via the chunk table."""
        out = np.empty(max(0, length), np.uint8)
        self._read_raw_into(offset, length, out)
        return out.tobytes()

    def _compressed_blocks(self, n_blocks: int) -> np.ndarray:
        """(stored offset, stored size) of each zlib block: headers of 16 bytes from stored byte 0x80."""
        table = np.empty((n_blocks, 2), np.int64)
        off = 0x80
        for k in range(n_blocks):
            (size,) = struct.unpack_from("<I", self._read_raw(off, 16))
            table[k] = off + 16, size
            off += 16 + size
        return table

    def _uncompressed_size(self) -> int:
        if self._blocks.shape[0] == 0:
            return 0
        last = zlib.decompress(self._read_raw(*(int(v) for v in self._blocks[-1])))
        return (self._blocks.shape[0] - 1) * self._block + len(last)

    # -- the file's bytes ------------------------------------------------------------------------
    def read_array(self, offset: int, length: int) -> np.ndarray:
        """Bytes ``offset:offset+length`` of the (uncompressed) file as a uint8 array; fewer only at its
        end. The array is a buffer this thread reuses: valid until its next ``read_array``.

        Raises
        ------
        FormatError
            The container is truncated or a compressed block does not decompress.
        """
        length = max(0, min(length, self.size - offset))
        if self.compressed:
            return np.frombuffer(self.read(offset, length), np.uint8)
        out = self._scratch("data", length)[:length]
        self._read_raw_into(offset, length, out)
        return out

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``offset:offset+length`` of the (uncompressed) file; fewer only at its end.

        Parameters
        ----------
        offset, length : int
            Byte range in the file.

        Returns
        -------
        bytes
            At most ``length`` bytes.

        Raises
        ------
        FormatError
            The container is truncated or a compressed block does not decompress.
        """
        length = max(0, min(length, self.size - offset))
        if not self.compressed:
            return self._read_raw(offset, length)
        if length == 0:
            return b""
        first, last = offset // self._block, (offset + length - 1) // self._block
        parts = []
        for k in range(first, last + 1):
            try:
                parts.append(zlib.decompress(self._read_raw(*(int(v) for v in self._blocks[k]))))
            except zlib.error as exc:
                raise FormatError(f"{self.path}: compressed .bcf block {k} is damaged ({exc})") from None
        data = b"".join(parts)
        skip = offset - first * self._block
        return data[skip : skip + length]


#: a row's pixel count; a pixel record's header (22 bytes): column, two channel counts and a constant
#: (skipped), packing flag, a size (skipped), number of pulses, data size
_ROW_HEADER = struct.Struct("<i")
_PIXEL_HEADER = struct.Struct("<I8xH2xHI")


def _walk_row(
    data: bytes | memoryview, off: int, limit: int, cols: int, where: str, payloads: list[int] | None
) -> tuple[int, bool]:
    """Check one row's pixel records in ``data[off:limit]``.

    Returns the offset after the row (-1 when the row runs past ``limit``) and whether it holds an
    instructed-packed pixel; ``payloads`` (when given) receives the (start, end) offsets of each
    instructed payload, the span the decoder walks.
    """
    unpack = _PIXEL_HEADER.unpack_from
    if off + 4 > limit:
        return -1, False
    (n_pix,) = _ROW_HEADER.unpack_from(data, off)
    off += 4
    if not 0 <= n_pix <= cols:
        raise FormatError(f"{where}: the row holds {n_pix} pixels for {cols} columns (corrupted file)")
    packed = False
    for _ in range(n_pix):
        if off + 22 > limit:
            return -1, packed
        x, flag, n_pulses, size2 = unpack(data, off)
        off += 22
        if x >= cols:
            raise FormatError(f"{where}: pixel x={x} outside the {cols} columns (corrupted file)")
        if flag == 0:
            if size2 < 2 * n_pulses:
                raise FormatError(f"{where}: 16-bit pulse record of {size2} bytes for {n_pulses} pulses")
            off += size2
        elif flag == 1:
            if size2 < 6 * ((n_pulses + 3) // 4):
                raise FormatError(f"{where}: 12-bit pulse record of {size2} bytes for {n_pulses} pulses")
            off += size2
        else:
            if size2 < 4:
                raise FormatError(f"{where}: packed pixel record of {size2} bytes (corrupted file)")
            packed = True
            if payloads is not None:
                payloads.append(off)
                payloads.append(off + ((size2 - 4) & 0xFFFF))  # the decoder walks a uint16 length
            off += size2 + (2 * n_pulses if n_pulses > 0 else 0)
        if off > limit:
            return -1, packed
    return off, packed


def index_bcf_rows(stream: SfsStream, rows: int, cols: int, path: Path) -> tuple[np.ndarray, bool]:
    """One pass over a hypermap stream: where each row starts, every pixel header checked.

    Parameters
    ----------
    stream : SfsStream
        The container's ``SpectrumData<i>`` file.
    rows, cols : int
        The map's size from the ``.bcf`` header.
    path : Path
        The file, for the messages.

    Returns
    -------
    offsets : numpy.ndarray
        int64 (rows + 1,): byte offset in the stream of each row's start, and of the end of the last.
    packed : bool
        True when some pixel is "instructed"-packed (its counts may need 32 bits).

    Raises
    ------
    FormatError
        The stream's size differs from the header's, or a record is damaged or runs past the stream
        (the message names the row).
    """
    head = stream.read(0, STREAM_HEADER_BYTES)
    if len(head) < STREAM_HEADER_BYTES:
        raise FormatError(f"{path}: hypermap stream truncated or corrupted (header of {len(head)} bytes)")
    height, width = struct.unpack_from("<ii", head, 0)
    if height != rows or width != cols:
        raise FormatError(
            f"{path}: hypermap stream is {height} x {width} but the header says {rows} x {cols}"
        )
    offsets = np.empty(rows + 1, np.int64)
    total = stream.size
    pos = STREAM_HEADER_BYTES
    window = _WINDOW
    buf, buf_at = b"", -1  # buf holds the stream's bytes buf_at ...
    packed = False
    r = 0
    while r < rows:
        end = -1
        if buf_at >= 0:
            end, row_packed = _walk_row(buf, pos - buf_at, len(buf), cols, f"{path}: hypermap row {r}", None)
        if end < 0:
            if buf_at >= 0 and buf_at + len(buf) >= total:
                raise FormatError(
                    f"{path}: hypermap stream truncated or corrupted (row {r} runs past its end at byte "
                    f"{total}); the file is damaged"
                )
            if buf_at == pos:
                window *= 2  # a row longer than the window
            buf, buf_at = stream.read(pos, window), pos
            continue
        packed = packed or row_packed
        offsets[r] = pos
        pos = buf_at + end
        r += 1
    offsets[rows] = pos
    return offsets, packed


def check_bcf_block(data: bytes, n_rows: int, cols: int, where: str, first_row: int = 0) -> None:
    """Check the records of ``n_rows`` rows of a pulse stream so the compiled decoder stays inside them.

    Every pixel header (column, record sizes) is checked, and the instructed bunches of the pixels
    whose bunches could make the decoder read past the rows' bytes and their padding: the decoder reads
    at most ``max(need)`` bytes (:func:`_bunch_tables`) from the start of a bunch, which lies before its
    payload's end, so only the pixels within that distance of the rows' end are walked (all at once, one
    bunch per pixel per step).

    Parameters
    ----------
    data : bytes or numpy.ndarray
        The rows' bytes (or a uint8 array of them), from the start of the first row to the end of the
        last.
    n_rows, cols : int
        Rows in ``data``; columns of the map.
    where : str
        The file, for the messages.
    first_row : int
        Map row of the first row in ``data``, for the messages.

    Raises
    ------
    FormatError
        A record is damaged or runs past the rows' bytes; the message names the row.
    """
    limit = len(data)
    payloads: list[int] = []
    marks = [0]
    off = 0
    view = memoryview(data)  # struct reads a memoryview faster than an array
    for r in range(n_rows):
        off, _ = _walk_row(view, off, limit, cols, f"{where}: hypermap row {first_row + r}", payloads)
        if off < 0:
            raise FormatError(
                f"{where}: hypermap row {first_row + r} is truncated or corrupted (its records run past the "
                "row's end)"
            )
        marks.append(len(payloads) // 2)
    if off != limit:
        raise FormatError(
            f"{where}: hypermap rows {first_row}-{first_row + n_rows - 1} changed since indexing"
        )
    if not payloads:
        return
    spans = np.asarray(payloads, np.intp).reshape(-1, 2)
    bound = limit + _PAD  # the decoder's buffer holds _PAD zero bytes after the rows
    need_of, step_of = _bunch_tables()
    # a bunch starts before its payload's end, so only the pixels whose end lies within the largest
    # reach of the rows' end (the last few of the block) can have a bunch whose reads leave the buffer:
    # the others are not walked (the same errors, for the same first pixel, as walking all)
    walked = (spans[:, 0] < spans[:, 1]) & (spans[:, 1] - 1 + int(need_of.max()) > bound)
    pixel = np.flatnonzero(walked)  # the pixels still walked, their position and end
    p, end = spans[pixel, 0], spans[pixel, 1]
    # every bunch walked starts before its payload's end, at least 4 bytes before the rows' end (the
    # record's trailer), so both header bytes read lie inside data
    buf = np.frombuffer(data, np.uint8)
    after = buf[1:]  # after[p] is buf[p + 1]
    # a bunch starts at least 4 bytes before the rows' end, so one whose decoder reads reach at most
    # _PAD + 4 bytes from its start (every bunch of the sizes Esprit writes: 0, 1, 2, 4) stays inside
    far = need_of > _PAD + 4
    while p.size:
        code = buf[p].astype(np.intp)
        code <<= 8
        code |= after[p]
        if far[code].any():
            reach = need_of[code]
            reach += p
            if reach.max() > bound:
                raise _bunch_error(where, first_row, marks, int(pixel[reach > bound][0]))
        p += step_of[code]
        more = p < end
        if not more.all():
            p, end, pixel = p[more], end[more], pixel[more]


@functools.cache
def _bunch_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per bunch header ``size << 8 | channels``: bytes the decoder may read from the bunch's start, and
    its step to the next bunch (the rules of rosettasciio's ``unpack_instructed``)."""
    size_b, n_ch = np.divmod(np.arange(1 << 16, dtype=np.int64), 256)
    plain = (size_b == 1) | (size_b == 2) | (size_b == 4)
    length = np.select(
        [size_b == 1, size_b == 2, size_b == 4], [(n_ch + 1) // 2, n_ch, 2 * n_ch], n_ch * size_b // 2
    )
    reach = np.where(plain, length, 2 * n_ch + 2)  # 32-bit values read at a 2-byte step
    gain = np.where(plain, size_b, 8)
    need = 2 + np.where(size_b == 0, 0, np.maximum(gain, size_b + np.maximum(length, reach)))
    step = 2 + np.where(size_b == 0, 0, size_b + length)
    return need.astype(np.intp), step.astype(np.intp)


def _bunch_error(where: str, first_row: int, marks: list[int], pixel: int) -> FormatError:
    row = first_row + int(np.searchsorted(np.asarray(marks), pixel, side="right")) - 1
    return FormatError(
        f"{where}: hypermap row {row}: a packed spectrum runs past its record (truncated or corrupted file)"
    )


class _OneChunk:
    """What rosettasciio's decoder reads a stream from: a virtual file yielding one chunk."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def get_iter_and_properties(self) -> tuple[Any, int, int]:
        return iter([self._data]), len(self._data), 1


def decode_bcf_block(data: bytes, n_rows: int, cols: int, n_channels: int, dtype: np.dtype) -> np.ndarray:
    """Decode ``n_rows`` checked rows of a pulse stream with rosettasciio's decoder.

    Parameters
    ----------
    data : bytes or numpy.ndarray
        The rows' bytes (checked by :func:`check_bcf_block`), or a uint8 array of them.
    n_rows, cols, n_channels : int
        The block's shape.
    dtype : numpy.dtype
        ``uint16`` or ``uint32``.

    Returns
    -------
    numpy.ndarray
        Counts (n_rows, cols, n_channels) of ``dtype``; pixels the stream skips are zero.
    """
    from rsciio.bruker import _api as bruker  # deferred: heavy (rosettasciio's Bruker reader)

    head = struct.pack("<ii", n_rows, cols) + bytes(STREAM_HEADER_BYTES - 8)
    vfile = _OneChunk(b"".join((head, data, bytes(_PAD))))  # one copy, whatever holds data
    shape = (n_rows, cols, n_channels)
    if bruker.fast_unbcf:
        return bruker.unbcf_fast.parse_to_numpy(vfile, shape, np.dtype(dtype))
    # pragma: no cover - rosettasciio built without its compiled decoder
    return bruker.py_parse_hypermap(vfile, shape, np.dtype(dtype)).astype(dtype, copy=False)


class BcfRows:
    """Lazy counts of a ``.bcf`` hypermap (rows, cols, channels): rows decoded when indexed.

    Supports what :class:`~xrfnb.core.spectrum.Scan` and the readers of a scan use: ``shape``, ``dtype``,
    ``ndim``, ``chunks`` (rows per decoded block, all columns, all channels), NumPy-style indexing
    (ints, slices, integer arrays on the rows, anything NumPy takes on columns and channels) and
    ``np.asarray`` (the whole map: only for maps that fit in memory). Thread-safe. Whole rows
    (``counts[a:b]``, how scans are streamed) are decoded straight into the array returned
    (:meth:`decode_rows`); other selections go through blocks of ``block_rows`` rows, the last one kept.

    Parameters
    ----------
    stream : SfsStream
        The map's pulse stream.
    offsets : numpy.ndarray
        Row start offsets from :func:`index_bcf_rows`.
    shape : tuple of int
        (rows, cols, channels).
    dtype : numpy.dtype
        Counts type.
    path : Path
        The file, for the messages.
    block_rows : int, optional
        Rows decoded at a time (default: about 48 MB of counts).
    """

    def __init__(
        self,
        stream: SfsStream,
        offsets: np.ndarray,
        shape: tuple[int, int, int],
        dtype: np.dtype,
        path: Path,
        block_rows: int | None = None,
    ) -> None:
        self._stream = stream
        self._offsets = offsets
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.path = path
        rows, cols, n_ch = self.shape
        if block_rows is None:
            block_rows = BLOCK_BYTES // max(1, cols * n_ch * self.dtype.itemsize)
        self.block_rows = int(min(max(1, block_rows), rows))
        self.chunks = (self.block_rows, cols, n_ch)
        self._lock = threading.Lock()
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def ndim(self) -> int:
        """3."""
        return 3

    @property
    def size(self) -> int:
        """Number of values."""
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded map."""
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"BcfRows({self.path.name}, shape={self.shape}, dtype={self.dtype}, block_rows={self.block_rows})"
        )

    def decode_rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` read, checked and decoded in one pass.

        Parameters
        ----------
        start, stop : int
            The rows.
        out : numpy.ndarray, optional
            An array of shape (stop - start, cols, channels) and this map's dtype to decode into (a
            buffer the caller reuses): the rows are then decoded a few MB at a time
            (:data:`GROUP_BYTES`) and copied into it, which costs less CPU than the decoder's output
            array of the whole range in fresh memory.

        Returns
        -------
        numpy.ndarray
            ``out``, or a new writable array.

        Raises
        ------
        FormatError
            The rows' records are damaged (the message names the file and row).
        """
        start, stop = int(start), int(stop)
        rows, cols, n_ch = stop - start, self.shape[1], self.shape[2]
        if out is not None and (out.shape != (rows, cols, n_ch) or out.dtype != self.dtype):
            raise ValueError(f"out has shape {out.shape} and dtype {out.dtype}, not {(rows, cols, n_ch)} "
                             f"and {self.dtype}")
        a, b = int(self._offsets[start]), int(self._offsets[stop])
        data = self._stream.read_array(a, b - a)
        if data.size != b - a:
            raise FormatError(f"{self.path}: hypermap rows {start}-{stop - 1} are truncated")
        check_bcf_block(data, rows, cols, str(self.path), first_row=start)
        if out is None:
            return decode_bcf_block(data, rows, cols, n_ch, self.dtype)
        group = max(1, GROUP_BYTES // max(1, cols * n_ch * self.dtype.itemsize))
        for r0 in range(start, stop, group):
            r1 = min(stop, r0 + group)
            lo, hi = int(self._offsets[r0]) - a, int(self._offsets[r1]) - a
            out[r0 - start : r1 - start] = decode_bcf_block(data[lo:hi], r1 - r0, cols, n_ch, self.dtype)
        return out

    def read_block(self, k: int) -> np.ndarray:
        """Decoded block ``k`` (rows ``k * block_rows`` ...), read-only; the last one is cached.

        Raises
        ------
        FormatError
            The block's records are damaged (the message names the file and row).
        """
        with self._lock:
            if self._cache is not None and self._cache[0] == k:
                return self._cache[1]
        r0 = k * self.block_rows
        block = self.decode_rows(r0, min(self.shape[0], r0 + self.block_rows))
        block.flags.writeable = False
        with self._lock:
            self._cache = (k, block)
        return block

    def read_rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Counts of rows ``start:stop``: a new array, or decoded into ``out`` (see :meth:`decode_rows`)."""
        if out is not None:
            start, stop, _ = slice(start, stop).indices(self.shape[0])
            return self.decode_rows(start, stop, out)
        return self[start:stop]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(n for n, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
        row_key, rest = (key[0] if key else slice(None)), key[1:]
        rows = self.shape[0]
        whole = all(isinstance(k, slice) and k == slice(None) for k in rest)
        if isinstance(row_key, slice) and row_key.step in (None, 1) and whole:
            # whole rows start:stop (how scans are streamed): decoded straight into the array returned, one
            # pass over the records whatever the blocks, no copy
            start, stop, _ = row_key.indices(rows)
            if stop > start:
                return self.decode_rows(start, stop)
        scalar = isinstance(row_key, (int, np.integer))
        if scalar:
            r = int(row_key)
            if not -rows <= r < rows:
                raise IndexError(f"row {r} is outside the {rows} rows of {self.path.name}")
            wanted = np.array([r % rows])
        elif isinstance(row_key, slice):
            wanted = np.arange(rows)[row_key]
        else:
            wanted = np.arange(rows)[np.asarray(row_key)]
        parts = []
        blocks = wanted // self.block_rows
        k = 0
        while k < wanted.size:  # consecutive wanted rows of one block: one decode
            j = k + 1
            while j < wanted.size and blocks[j] == blocks[k]:
                j += 1
            block = self.read_block(int(blocks[k]))
            sel = block[wanted[k:j] - blocks[k] * self.block_rows]
            parts.append(sel[(slice(None), *rest)])
            k = j
        if not parts:
            return np.empty((0, *self.shape[1:]), self.dtype)[(slice(None), *rest)]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return out[0] if scalar else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


# -- several detectors --------------------------------------------------------------------------------
class BcfSelection(NamedTuple):
    """The hypermaps of a ``.bcf`` that a request stands for (:func:`select_bcf_maps`).

    Attributes
    ----------
    indexes : tuple of int
        ``SpectrumData<i>`` numbers to read: one, or every detector's for a sum.
    detector : int, "sum" or None
        The detector (position among the file's detectors), ``"sum"``, or None when the file's
        hypermaps are not detectors of one map (one detector, or a stack of maps).
    n_detectors : int
        Detectors whose hypermaps the file holds (1 unless ``DetectorCount`` says more and the file
        holds that many hypermaps).
    """

    indexes: tuple[int, ...]
    detector: int | str | None
    n_detectors: int


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def select_bcf_maps(
    path: Path,
    indexes: Sequence[int],
    detector_count: int,
    index: int | None = None,
    detector: int | str | None = None,
) -> BcfSelection:
    """Which hypermaps of a ``.bcf`` to read for ``index=`` / ``detector=``.

    The file's hypermaps are its detectors when the header's ``DetectorCount`` is above 1 and the file
    holds that many ``SpectrumData`` files (detector ``k`` is the ``k``-th in number order); otherwise
    they are separate maps of one detector, chosen with ``index=``.

    Parameters
    ----------
    path : Path
        The file, for the messages.
    indexes : sequence of int
        Numbers of the file's ``SpectrumData<i>`` files.
    detector_count : int
        ``DetectorCount`` of the header.
    index : int, optional
        A hypermap by number (default: the first; on a multi-detector file, the sum of all).
    detector : int or "sum", optional
        A detector by position (negative counts from the end), or ``"sum"`` of all; default ``"sum"``
        on a multi-detector file, the only detector otherwise.

    Returns
    -------
    BcfSelection

    Raises
    ------
    DataError
        An index or detector the file does not hold, or ``index=`` and ``detector=`` naming different
        hypermaps; the message names the file and the valid choices.
    FormatError
        ``detector=`` on a file whose header declares several detectors but holds another number of
        hypermaps (which hypermap is which detector is then unknown).

    Examples
    --------
    >>> select_bcf_maps(Path("two.bcf"), [0, 1], 2)
    BcfSelection(indexes=(0, 1), detector='sum', n_detectors=2)
    >>> select_bcf_maps(Path("two.bcf"), [0, 1], 2, detector=-1)
    BcfSelection(indexes=(1,), detector=1, n_detectors=2)
    >>> select_bcf_maps(Path("one.bcf"), [0], 1)
    BcfSelection(indexes=(0,), detector=None, n_detectors=1)
    """
    indexes = sorted(int(i) for i in indexes)
    if not indexes:
        raise FormatError(f"{path}: the .bcf holds no hypermap (no EDSDatabase/SpectrumData file)")
    if detector is not None and not (_is_int(detector) or detector == "sum"):
        raise DataError(f"{path}: detector={detector!r}: give a detector number (0, 1, ...) or 'sum'")
    if index is not None and (not _is_int(index) or int(index) not in indexes):
        raise DataError(f"{path}: index={index!r}: the file holds hypermaps {indexes}")
    n_det = int(detector_count) if detector_count else 1
    if n_det > 1 and n_det == len(indexes):
        choices = f"detectors 0..{n_det - 1} or 'sum'"
        if index is not None:
            pos = indexes.index(int(index))
            agrees = _is_int(detector) and -n_det <= int(detector) < n_det and int(detector) % n_det == pos
            if detector is not None and not agrees:
                raise DataError(
                    f"{path}: index={index} is detector {pos}, not detector={detector!r}; give one of them "
                    f"(the file holds {choices})"
                )
            return BcfSelection((int(index),), pos, n_det)
        if detector is None or detector == "sum":
            return BcfSelection(tuple(indexes), "sum", n_det)
        if not -n_det <= int(detector) < n_det:
            raise DataError(f"{path}: detector={int(detector)}: the file holds {choices}")
        pos = int(detector) % n_det
        return BcfSelection((indexes[pos],), pos, n_det)
    if n_det > 1 and detector is not None:
        raise FormatError(
            f"{path}: the header declares {n_det} detectors but the file holds {len(indexes)} hypermaps "
            f"{indexes}: which hypermap belongs to which detector is not known; read them one at a time "
            "with index= instead of detector="
        )
    if detector is not None and detector != "sum" and int(detector) not in (0, -1):
        raise DataError(f"{path}: detector={int(detector)}: the file holds one detector (0, or 'sum')")
    return BcfSelection((indexes[0] if index is None else int(index),), None, 1)


def _same_axis(a: EnergyCalibration, b: EnergyCalibration, n_channels: int) -> bool:
    """Whether two calibrations put every channel within 1 % of a channel width of each other."""
    ch = np.array([0.0, n_channels - 1.0, (n_channels - 1.0) / 2])
    return bool(np.max(np.abs(a.energy_keV(ch) - b.energy_keV(ch))) <= 0.01 * a.gain_keV)


def rebin_rows(
    counts: np.ndarray, source: EnergyCalibration, target: EnergyCalibration, n_target: int
) -> np.ndarray:
    """Counts of many spectra (..., channels) moved onto another energy axis, conserving counts.

    The rule of :func:`xrfnb.io.mca.rebin_counts` (each source channel's counts spread evenly between
    its half-channel edges, counts outside the target axis dropped), vectorised over the leading axes.

    Parameters
    ----------
    counts : numpy.ndarray
        Counts (..., n_source), any numeric dtype.
    source, target : EnergyCalibration
        Calibrations of the source and target axes.
    n_target : int
        Channels of the target axis.

    Returns
    -------
    numpy.ndarray
        Counts (..., n_target), float32.
    """
    n_src = counts.shape[-1]
    edges = np.clip(source.channel(target.energy_keV(np.arange(n_target + 1) - 0.5)) + 0.5, 0.0, n_src)
    i = np.minimum(np.floor(edges).astype(np.intp), n_src - 1)
    t = edges - i
    cum = np.zeros((*counts.shape[:-1], n_src + 1), np.float64)
    np.cumsum(counts, axis=-1, dtype=np.float64, out=cum[..., 1:])
    at = cum[..., i] * (1.0 - t) + cum[..., i + 1] * t
    return np.diff(at, axis=-1).astype(np.float32)


class BcfDetectorSum:
    """Lazy sum of the hypermaps of several detectors of one ``.bcf`` (rows, cols, channels).

    Indexing it indexes every detector's :class:`BcfRows` and adds the results: counts of detectors on
    detector 0's energy axis add as integers (``uint32``); a detector whose calibration puts some
    channel more than 1 % of a channel width away from detector 0's is first rebinned onto detector
    0's axis (:func:`rebin_rows`, conserving counts) and the sum is ``float32``. Same interface as
    :class:`BcfRows`.

    Parameters
    ----------
    parts : sequence of BcfRows
        The detectors' hypermaps (same rows and columns).
    calibrations : sequence of EnergyCalibration
        Each detector's calibration.
    """

    def __init__(self, parts: Sequence[BcfRows], calibrations: Sequence[EnergyCalibration]) -> None:
        self.parts = tuple(parts)
        self.calibrations = tuple(calibrations)
        first = self.parts[0]
        if any(p.shape[:2] != first.shape[:2] for p in self.parts):
            raise FormatError(f"{first.path}: the detectors' hypermaps differ in size")
        n_ch = first.shape[2]
        self.rebinned = tuple(
            not (p.shape[2] == n_ch and _same_axis(self.calibrations[0], cal, n_ch))
            for p, cal in zip(self.parts, self.calibrations, strict=True)
        )
        self.shape = first.shape
        self.dtype = np.dtype(np.float32 if any(self.rebinned) else np.uint32)
        self.path = first.path
        self.block_rows = min(p.block_rows for p in self.parts)
        self.chunks = (self.block_rows, *self.shape[1:])

    @property
    def ndim(self) -> int:
        """3."""
        return 3

    @property
    def size(self) -> int:
        """Number of values."""
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of the summed map."""
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"BcfDetectorSum({self.path.name}, {len(self.parts)} detectors, shape={self.shape}, "
            f"dtype={self.dtype})"
        )

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Summed counts of rows ``start:stop`` (a new array)."""
        return self[start:stop]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(n for n, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (3 - len(key))
        out = None
        for part, cal, rebin in zip(self.parts, self.calibrations, self.rebinned, strict=True):
            if rebin:  # rebinning needs every channel of the part: the channel key applies after it
                piece = rebin_rows(part[key[:2]], cal, self.calibrations[0], self.shape[2])[..., key[2]]
            else:
                piece = part[key]
            out = piece.astype(self.dtype) if out is None else np.add(out, piece, out=out, casting="unsafe")
        assert out is not None
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)
