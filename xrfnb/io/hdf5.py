"""xrfnb's HDF5 layout (NeXus NXdata style), and reading foreign HDF5/NeXus spectra and scans.

Layout written by :func:`write_scan` / :func:`write_spectrum` into an HDF5 group (see
``docs/hdf5-layout.md``)::

    /                         attrs NX_class="NXroot", default="entry", xrfnb_layout="xrfnb-hdf5",
                                    xrfnb_layout_version=1
    /entry                    attrs NX_class="NXentry", default="data"
    /entry/data               attrs NX_class="NXdata", xrfnb_kind="scan"|"spectrum", signal="counts",
                                    axes=[...,"energy"], energy_indices, calibration_offset_keV,
                                    calibration_gain_keV, calibration_quadratic_keV, pixel_size_um (scan),
                                    metadata_json
        counts                (rows, cols, channels) or (channels,), chunks (1, c, channels), gzip + shuffle
        energy                (channels,) float64, units="keV"
        live_time             scalar or (rows, cols) float64, units="s"  (absent when unknown)
        real_time             scalar float64, units="s" (spectra; absent when unknown)
        y, x                  (rows,), (cols,) pixel centre positions, units="um" (when pixel size known)

A scan loaded from this layout keeps ``counts`` as the open, read-only :class:`h5py.Dataset` (lazy).
The dataset holds its file open; ``scan.counts.file.close()`` closes it, and it closes by itself once
the scan (and every spectrum or dataset taken from it) is garbage collected.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5d, h5l

from .._errors import CalibrationError, DataError, FormatError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..core.spectrum import Scan, Spectrum
from .atomic import publish
from .common import UNCALIBRATED, calibration_from_axis, make_spectrum, with_given_calibration

__all__ = [
    "LAYOUT_NAME",
    "LAYOUT_VERSION",
    "MAX_COMPRESSION_RATIO",
    "PARTIAL_CONVERSION_FORMAT",
    "WRITE_BLOCK_BYTES",
    "CheckedDataset",
    "check_self_contained",
    "check_stored_size",
    "chunk_text",
    "json_default",
    "partial_path",
    "preflight",
    "read_hdf5",
    "read_scan",
    "read_spectrum",
    "scan_identity",
    "trust_written_file",
    "write_block_pixels",
    "write_hdf5",
    "write_hdf5_resumable",
    "write_scan",
    "write_spectrum",
]

LAYOUT_NAME = "xrfnb-hdf5"
LAYOUT_VERSION = 1
#: target size of one storage chunk of counts, bytes
CHUNK_BYTES = 1 << 20
#: largest ratio of uncompressed to stored bytes that deflate (the strongest built-in HDF5 filter) reaches
MAX_COMPRESSION_RATIO = 1032
#: chunked or virtual datasets claiming less than this are never refused for their claimed size (unwritten
#: chunks read as the fill value; a small unfinished dataset is harmless)
_CLAIM_FLOOR_BYTES = 64 << 20


def json_default(obj: object) -> Any:
    """JSON form of what :func:`json.dumps` cannot write (its ``default=``): numpy scalars and arrays,
    sets and tuples as lists, paths as text, an :class:`EnergyCalibration` as its dict, else its repr."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, EnergyCalibration):
        return obj.to_dict()
    return repr(obj)


def _metadata_json(metadata: dict[str, Any]) -> str:
    return json.dumps(dict(metadata), default=json_default, allow_nan=True)


def _write_common(
    group: h5py.Group, kind: str, calibration: EnergyCalibration, n_channels: int, metadata: dict[str, Any]
) -> None:
    group.attrs["NX_class"] = "NXdata"
    group.attrs["xrfnb_kind"] = kind
    group.attrs["xrfnb_layout_version"] = LAYOUT_VERSION
    group.attrs["signal"] = "counts"
    for name, value in calibration.to_dict().items():
        group.attrs[f"calibration_{name}"] = float(value)
    group.attrs["metadata_json"] = _metadata_json(metadata)
    energy = group.create_dataset("energy", data=calibration.energies_keV(n_channels))
    energy.attrs["units"] = "keV"
    energy.attrs["long_name"] = "photon energy (keV) of each channel"


def write_scan(
    group: h5py.Group, scan: Scan, *, compression: str = "gzip", chunk_bytes: int = CHUNK_BYTES
) -> None:
    """Write a :class:`Scan` into an (empty) HDF5 group in xrfnb's NXdata layout.

    Counts are written block by block (a lazy scan is never loaded whole: about
    :data:`WRITE_BLOCK_BYTES` at a time), stored with chunks of shape ``(1, c, channels)`` (about
    ``chunk_bytes`` each) so a pixel row reads without the rest.

    Parameters
    ----------
    group : h5py.Group
        Destination group, opened writable; becomes an ``NXdata`` group.
    scan : Scan
        The scan.
    compression : {"gzip", "lzf"}, optional
        HDF5 filter for counts (gzip level 4 with byte shuffle by default).
    chunk_bytes : int, optional
        Target chunk size in bytes.
    """
    dset = _create_scan_layout(group, scan, compression, chunk_bytes)
    for sl, block in scan.iter_blocks(write_block_pixels(scan)):
        dset[sl] = block


#: bytes of counts read and written at a time by :func:`write_scan` and :func:`write_hdf5_resumable`
WRITE_BLOCK_BYTES = 64 << 20


def write_block_pixels(scan: Scan) -> int:
    """Pixels per block of about :data:`WRITE_BLOCK_BYTES` of ``scan``'s counts (at least one)."""
    return max(1, WRITE_BLOCK_BYTES // max(1, scan.n_channels * np.dtype(scan.counts.dtype).itemsize))


def _create_scan_layout(group: h5py.Group, scan: Scan, compression: str, chunk_bytes: int) -> h5py.Dataset:
    """Everything of :func:`write_scan` but the counts' values; returns the (unwritten) counts dataset."""
    rows, cols, n_ch = scan.shape
    dtype = np.dtype(scan.counts.dtype)
    per_chunk = int(np.clip(chunk_bytes // max(1, n_ch * dtype.itemsize), 1, cols))
    opts: dict[str, Any] = {"compression": compression, "shuffle": True}
    if compression == "gzip":
        opts["compression_opts"] = 4
    meta = dict(scan.metadata)
    _write_common(group, "scan", scan.calibration, n_ch, meta)
    group.attrs["axes"] = ["y", "x", "energy"] if scan.pixel_size_um is not None else [".", ".", "energy"]
    group.attrs["energy_indices"] = 2
    dset = group.create_dataset(
        "counts", shape=(rows, cols, n_ch), dtype=dtype, chunks=(1, per_chunk, n_ch), **opts
    )
    dset.attrs["units"] = "counts"
    if scan.pixel_size_um is not None:
        group.attrs["pixel_size_um"] = float(scan.pixel_size_um)
        group.attrs["y_indices"] = 0
        group.attrs["x_indices"] = 1
        for name, n in (("y", rows), ("x", cols)):
            pos = group.create_dataset(name, data=(np.arange(n) + 0.5) * scan.pixel_size_um)
            pos.attrs["units"] = "um"
    if scan.live_time_s is not None:
        lt = group.create_dataset("live_time", data=np.asarray(scan.live_time_s, dtype=float))
        lt.attrs["units"] = "s"
    return dset


def write_spectrum(group: h5py.Group, spectrum: Spectrum) -> None:
    """Write a :class:`Spectrum` into an (empty) HDF5 group in xrfnb's NXdata layout."""
    _write_common(group, "spectrum", spectrum.calibration, spectrum.n_channels, dict(spectrum.metadata))
    group.attrs["axes"] = ["energy"]
    group.attrs["energy_indices"] = 0
    dset = group.create_dataset("counts", data=spectrum.counts, compression="gzip", shuffle=True)
    dset.attrs["units"] = "counts"
    for name, value in (("live_time", spectrum.live_time_s), ("real_time", spectrum.real_time_s)):
        if value is not None:
            d = group.create_dataset(name, data=float(value))
            d.attrs["units"] = "s"



# -- crash isolation ------------------------------------------------------------------------------------
#
# libhdf5 is not hardened against corrupted metadata: some damaged files crash the process that opens them
# (a segmentation fault, not an exception), which would kill a user's Jupyter kernel or the dashboard
# server. Before a file is opened here, a child process walks its whole metadata (every group, dataset
# and attribute, small datasets read, one element of large ones; never the data of a dataset stored in
# other files, which the reader refuses after opening); if the child dies from a signal, the
# file is refused with a FormatError and this process never touches it. Files are checked once per
# (path, size, mtime); files this process wrote itself are trusted. XRFNB_HDF5_PREFLIGHT=0 turns the
# check off for trusted data.

_PREFLIGHT_CHILD = r"""
import sys, h5py
from h5py import h5d
def visit(name, obj):
    dict(obj.attrs)
    if isinstance(obj, h5py.Dataset):
        obj.shape, obj.dtype, obj.chunks, obj.compression
        plist = obj.id.get_create_plist()
        if plist.get_external_count() or plist.get_layout() == h5d.VIRTUAL:
            return  # data in other files: never read (the reader refuses such files)
        if obj.size <= 100000:
            obj[()]
        elif obj.ndim:
            obj[(0,) * obj.ndim]
with h5py.File(sys.argv[1], "r") as f:
    dict(f.attrs)
    f.visititems(visit)
"""

_CHECKED: dict[tuple[str, int, int], bool] = {}


def _file_key(path: Path) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def trust_written_file(path: Path) -> None:
    """Mark a file this process has just written as safe to open without the crash check."""
    key = _file_key(path)
    if key is not None:
        _CHECKED[key] = True


def preflight(path: Path, timeout_s: float = 120.0) -> None:
    """Refuse an HDF5 file whose metadata crashes the HDF5 library, checking it in a child process.

    Raises
    ------
    FormatError
        The child process was killed by a signal while reading the file's metadata (corrupted file).
    """
    if os.environ.get("XRFNB_HDF5_PREFLIGHT", "1") == "0":
        return
    key = _file_key(path)
    if key is None or _CHECKED.get(key):
        return
    try:
        proc = subprocess.run([sys.executable, "-c", _PREFLIGHT_CHILD, os.fspath(path)], capture_output=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise FormatError(f"{path}: reading the HDF5 metadata took more than {timeout_s:.0f} s "
                          "(corrupted file?)") from None
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        raise FormatError(
            f"{path}: the HDF5 library crashed ({name}) reading this file's metadata: the file is corrupted; "
            "re-export or re-copy it from the instrument")
    # a Python-level error in the child is reported by the in-process reader with its own message
    _CHECKED[key] = True


def write_hdf5(obj: Scan | Spectrum, path: Path) -> None:
    """Write a whole xrfnb HDF5 file (``/entry/data``) at ``path`` (not atomic: use :func:`xrfnb.save`)."""
    with h5py.File(path, "w") as f:
        data = _root_groups(f)
        if isinstance(obj, Scan):
            write_scan(data, obj)
        else:
            write_spectrum(data, obj)


def _root_groups(f: h5py.File) -> h5py.Group:
    """The NXroot attributes and ``/entry`` of a new xrfnb file; returns the empty ``/entry/data``."""
    f.attrs["NX_class"] = "NXroot"
    f.attrs["default"] = "entry"
    f.attrs["xrfnb_layout"] = LAYOUT_NAME
    f.attrs["xrfnb_layout_version"] = LAYOUT_VERSION
    entry = f.create_group("entry")
    entry.attrs["NX_class"] = "NXentry"
    entry.attrs["default"] = "data"
    return entry.create_group("data")


# -- resumable conversion ---------------------------------------------------------------------------------
#
# ``xrfnb convert SCAN OUT.h5`` writes OUT.h5.partial, an xrfnb HDF5 file whose root attribute
# ``xrfnb_partial`` (JSON) says what it is being made from and ``xrfnb_partial_rows`` how many rows of counts
# are complete (updated after each block's data is flushed to the file). An interrupted conversion leaves
# it; ``--resume`` checks that it belongs to the same input and continues after its last complete block;
# the finished file loses the two attributes and is renamed to OUT.h5 atomically. HDF5's metadata cache
# does not evict between flushes, so the file on disk is the state of the last flush even after a hard
# kill (SIGKILL, power loss: checked when resuming, refused if damaged).

#: ``format`` of the ``xrfnb_partial`` attribute of an unfinished conversion
PARTIAL_CONVERSION_FORMAT = "xrfnb-convert-partial"
#: identity entries compared when resuming, in the order the messages name them
_IDENTITY_KEYS = (
    "format", "input", "shape", "dtype", "calibration", "pixel_size_um", "live_time", "metadata"
)


def partial_path(out: Path) -> Path:
    """The unfinished file of a conversion to ``out``: ``OUT.partial`` beside it."""
    return out.with_name(out.name + ".partial")


def scan_identity(scan: Scan) -> dict[str, Any]:
    """What a scan is, for telling whether unfinished output was made from it.

    Parameters
    ----------
    scan : Scan
        The scan.

    Returns
    -------
    dict
        JSON-able: ``input`` (the source file's resolved path, size and modification time, when the scan
        names one in ``metadata["source"]``), ``shape``, ``dtype``, ``calibration``, ``pixel_size_um``,
        ``live_time`` (the value, or a SHA-256 of a per-pixel array) and ``metadata`` (a SHA-256 of the
        metadata's JSON: the load options, such as the ``.bcf`` detector, are in it).
    """
    source = scan.metadata.get("source")
    ident: dict[str, Any] = {"input": None}
    if source:
        p = Path(str(source))
        try:
            st = os.stat(p)
            ident["input"] = {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except OSError:
            ident["input"] = {"path": str(p)}
    lt = scan.live_time_s
    if isinstance(lt, np.ndarray):
        lt = "sha256:" + hashlib.sha256(np.ascontiguousarray(lt, dtype="<f8").tobytes()).hexdigest()
    ident.update(
        shape=list(scan.shape),
        dtype=np.dtype(scan.counts.dtype).str,
        calibration=scan.calibration.to_dict(),
        pixel_size_um=scan.pixel_size_um,
        live_time=lt,
        metadata="sha256:" + hashlib.sha256(_metadata_json(dict(scan.metadata)).encode()).hexdigest(),
    )
    return ident


def _no_evictions(f: h5py.File) -> None:
    """Keep dirty metadata in HDF5's cache until a flush, so a killed process leaves the last flush's file."""
    try:
        config = f.id.get_mdc_config()
        config.evictions_enabled = False
        config.incr_mode = config.decr_mode = config.flash_incr_mode = 0  # required with evictions off
        f.id.set_mdc_config(config)
    except Exception:  # an HDF5 build that refuses: the file is still right after a clean interruption
        pass


def _open_partial(part: Path, ident: dict[str, Any], resume: bool) -> tuple[h5py.File, int] | None:
    """An existing ``OUT.partial`` opened for resuming, with its rows done; None to start over (it is then
    deleted). Refuses a file that is not xrfnb's, or (resuming) one made from other input."""
    if part.is_symlink() or not part.is_file():
        raise FormatError(
            f"{part} exists and is not a file xrfnb made; xrfnb never deletes what it did not write: move it "
            "away or choose another output"
        )
    how = "rerun without --resume (resume=False) to start over"
    try:
        preflight(part)
        f = h5py.File(part, "r+" if resume else "r")
    except (OSError, FormatError) as exc:
        if not _hdf5_magic(part):
            raise FormatError(
                f"{part} exists and is not an unfinished xrfnb conversion (not an HDF5 file); xrfnb never "
                "deletes what it did not write: move it away or choose another output"
            ) from None
        raise FormatError(
            f"cannot {'resume from' if resume else 'replace'} {part}: it cannot be read "
            f"({_one_line(str(exc))}; a conversion killed hard?); delete it, then convert again"
        ) from None
    try:
        raw = f.attrs.get("xrfnb_partial")
        old = json.loads(raw) if isinstance(raw, (str, bytes)) else None
        if not isinstance(old, dict) or old.get("format") != PARTIAL_CONVERSION_FORMAT:
            raise FormatError(
                f"{part} exists and is not an unfinished xrfnb conversion (no xrfnb_partial attribute); "
                "xrfnb never deletes what it did not write: move it away or choose another output"
            )
        if not resume:
            f.close()
            part.unlink()
            return None
        for key in _IDENTITY_KEYS:
            if old.get(key) != ident.get(key):
                raise DataError(
                    f"cannot resume: {part} was made from a different {key} ({old.get(key)!r} != "
                    f"{ident.get(key)!r}); {how}"
                )
        done = int(f.attrs.get("xrfnb_partial_rows", 0))
        counts = f.get("entry/data/counts")
        if not isinstance(counts, h5py.Dataset) or list(counts.shape) != ident["shape"]:
            raise FormatError(f"cannot resume: {part} has no counts of shape {ident['shape']}; {how}")
        if not 0 <= done <= ident["shape"][0]:
            raise FormatError(f"cannot resume: {part} says {done} rows are done; {how}")
    except BaseException:
        if f.id.valid:
            f.close()
        raise
    return f, done


def _hdf5_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def write_hdf5_resumable(
    scan: Scan,
    out: Path,
    *,
    resume: bool = False,
    progress: Callable[[int, int], object] | None = None,
) -> Path:
    """Write a scan as xrfnb's HDF5 file ``out``, block by block through ``OUT.partial``, resumably.

    The rows are written a block (about :data:`WRITE_BLOCK_BYTES` of counts) at a time into
    ``OUT.partial`` (:func:`partial_path`), each block flushed to disk before it counts as done. An
    interruption (Ctrl-C, SIGTERM, an error) leaves ``OUT.partial``; called again with ``resume=True`` on
    the same input it continues after the last complete block. When every row is written the file is
    renamed to ``out`` atomically, so ``out`` is either absent, the previous file, or complete. The file
    is the same, value for value, as an uninterrupted conversion's (and as :func:`xrfnb.save` writes).

    Parameters
    ----------
    scan : Scan
        The scan (lazy scans are read a block at a time).
    out : Path
        The HDF5 file to write.
    resume : bool
        Continue from ``OUT.partial`` when it exists (else start over, replacing an unfinished
        conversion's ``OUT.partial``).
    progress : callable, optional
        ``progress(rows_done, rows)``: once at the start (with the rows already done when resuming) and
        after every block.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    DataError
        Resuming from ``OUT.partial`` made from other input (another file, or the same file changed since,
        another shape, dtype, calibration, pixel size, live time or load options).
    FormatError
        ``OUT.partial`` is not xrfnb's (never deleted), or is damaged; no space left (the message says that
        the completed rows are kept and how to continue).
    """
    out = Path(out)
    part = partial_path(out)
    ident = {"format": PARTIAL_CONVERSION_FORMAT, **scan_identity(scan)}
    rows = scan.shape[0]
    opened = _open_partial(part, ident, resume) if (part.exists() or part.is_symlink()) else None
    hint = f"the completed rows are kept in {part}: free some space, then rerun with --resume to continue"
    try:
        if opened is None:
            f, done = h5py.File(part, "w"), 0
        else:
            f, done = opened
        with f:
            _no_evictions(f)
            if opened is None:
                dset = _create_scan_layout(_root_groups(f), scan, "gzip", CHUNK_BYTES)
                f.attrs["xrfnb_partial"] = json.dumps(ident, default=json_default)
                f.attrs["xrfnb_partial_rows"] = 0
                f.flush()
            else:
                dset = f["entry/data/counts"]
                _check_last_block(scan, dset, done, part)
            if progress is not None:
                progress(done, rows)
            step = scan.block_rows(write_block_pixels(scan))
            for r0 in range(done, rows, step):
                sl = slice(r0, min(rows, r0 + step))
                block = np.asarray(scan.counts[sl])
                dset[sl] = block
                f.flush()  # the block's chunks on disk before it counts as done
                f.attrs["xrfnb_partial_rows"] = sl.stop
                f.flush()
                if progress is not None:
                    progress(sl.stop, rows)
            del f.attrs["xrfnb_partial"]
            del f.attrs["xrfnb_partial_rows"]
        publish(part, out)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc):
            raise FormatError(f"{out}: no space left on the device; {hint}") from None
        raise
    trust_written_file(out)
    return out


def _check_last_block(scan: Scan, dset: h5py.Dataset, done: int, part: Path) -> None:
    """Resuming: the last complete block of ``OUT.partial`` reads back and equals the input's rows."""
    if done == 0:
        return
    r0 = max(0, done - scan.block_rows(write_block_pixels(scan)))
    try:
        same = np.array_equal(dset[r0:done], np.asarray(scan.counts[r0:done]))
    except (OSError, RuntimeError) as exc:
        raise FormatError(
            f"cannot resume: rows {r0}-{done - 1} of {part} cannot be read ({_one_line(str(exc))}); rerun "
            "without --resume (resume=False) to start over"
        ) from None
    if not same:
        raise DataError(
            f"cannot resume: rows {r0}-{done - 1} of {part} differ from the input's; rerun without --resume "
            "(resume=False) to start over"
        )


# -- containment --------------------------------------------------------------------------------------
#
# HDF5 lets a file show the bytes of other files: external raw storage (a dataset whose data are any
# byte range of any file, /etc/passwd included), external links (a group or dataset of another HDF5 file,
# also reachable through the NeXus ``default`` chain) and virtual datasets (data mapped from datasets of
# other files). A file handed to xrfnb (uploaded to the dashboard, say) must never make it read other
# files of the machine, so such files are refused before anything in them is resolved. The walk reads
# metadata only (link table and dataset creation properties): about 10 us per object.


def _size_text(n_bytes: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes} bytes"


def _same_file(path: Path, other: str) -> bool:
    if other == ".":
        return True
    candidate = Path(other) if os.path.isabs(other) else Path(path).parent / other
    try:
        return os.path.samefile(candidate, path)
    except OSError:
        return False


def check_self_contained(f: h5py.File, path: Path) -> None:
    """Refuse an HDF5 file whose content is stored in, or linked to, other files.

    Parameters
    ----------
    f : h5py.File
        The open file (nothing in it resolved yet).
    path : pathlib.Path
        Its path, for messages and to resolve virtual-dataset sources.

    Raises
    ------
    FormatError
        An external link, a user-defined link, a dataset with external raw storage, or a virtual dataset
        with a source in another file: the message names the link or dataset and the other file.
    """
    advice = ("xrfnb reads only data stored inside the file itself; copy the data into the file (for example "
              "with h5py: f2.create_dataset(name, data=f1[name][()])) or load the other file directly")
    problem: list[str] = []

    def link(name: bytes, info: h5l.LinkInfo) -> bool | None:
        where = "/" + name.decode("utf-8", "replace")
        if info.type == h5l.TYPE_EXTERNAL:
            target = f.get(where, getlink=True)
            problem.append(f"{path}:{where} is an external link to {target.path} in the file "
                           f"{target.filename}: refused; {advice}")
        elif info.type not in (h5l.TYPE_HARD, h5l.TYPE_SOFT):
            problem.append(f"{path}:{where} is a user-defined link (type {info.type}) that may point outside "
                           f"the file: refused; {advice}")
        return True if problem else None

    f.id.links.visit(link, info=True)  # exceptions raised inside h5py's visit callbacks are mangled
    if problem:
        raise FormatError(problem[0])

    def dataset(name: str, obj: h5py.HLObject) -> bool | None:
        if not isinstance(obj, h5py.Dataset):
            return None
        plist = obj.id.get_create_plist()
        if plist.get_external_count():
            other = plist.get_external(0)[0].decode("utf-8", "replace")
            problem.append(f"{path}:/{name}: the dataset's data are stored in another file ({other}; HDF5 "
                           f"external storage): refused; {advice}")
        elif plist.get_layout() == h5d.VIRTUAL:
            for i in range(plist.get_virtual_count()):
                other = plist.get_virtual_filename(i)
                if not _same_file(path, other):
                    problem.append(f"{path}:/{name}: a virtual dataset mapping "
                                   f"{plist.get_virtual_dsetname(i)} of another file ({other}): refused; "
                                   f"{advice}")
                    break
        return True if problem else None

    f.visititems(dataset)
    if problem:
        raise FormatError(problem[0])


def check_stored_size(dset: h5py.Dataset, path: Path) -> h5py.Dataset:
    """Refuse a dataset claiming more data than the file can hold (a corrupted or forged shape).

    A contiguous dataset's bytes must fit in the file; a chunked one's claimed bytes must not exceed its
    stored chunks' bytes times :data:`MAX_COMPRESSION_RATIO` (deflate's maximum), a virtual one's the
    file's size times that ratio. Chunked and virtual datasets under 64 MiB are let through (unwritten
    chunks read as the fill value). Only metadata is read.

    Returns
    -------
    h5py.Dataset
        ``dset`` itself.

    Raises
    ------
    FormatError
        The claimed size (shape x item size) is impossible for this file.
    """
    claimed = math.prod(int(n) for n in dset.shape) * dset.dtype.itemsize
    try:
        file_bytes = os.path.getsize(path)
    except OSError:
        return dset
    layout = dset.id.get_create_plist().get_layout()
    shape_text = f"shape {tuple(int(n) for n in dset.shape)} of {dset.dtype} ({_size_text(claimed)})"
    tail = "a corrupted header or an unfinished file; re-export or re-copy it from the instrument"
    if layout == h5d.CONTIGUOUS and claimed > file_bytes:
        raise FormatError(f"{path}:{dset.name}: the dataset claims {shape_text} but the whole file holds "
                          f"{_size_text(file_bytes)}: {tail}")
    if layout == h5d.CHUNKED:
        stored = dset.id.get_storage_size()
        if claimed > max(stored * MAX_COMPRESSION_RATIO, _CLAIM_FLOOR_BYTES):
            grid = math.prod(-(-int(n) // int(c)) for n, c in zip(dset.shape, dset.chunks, strict=True))
            most = _size_text(stored * MAX_COMPRESSION_RATIO)
            raise FormatError(
                f"{path}:{dset.name}: the dataset claims {shape_text} but stores {_size_text(stored)} in "
                f"{dset.id.get_num_chunks()} of its {grid} chunks, at most {most} even at deflate's maximum "
                f"compression: {tail}")
    if layout == h5d.VIRTUAL and claimed > max(file_bytes * MAX_COMPRESSION_RATIO, _CLAIM_FLOOR_BYTES):
        raise FormatError(f"{path}:{dset.name}: the virtual dataset claims {shape_text}, more than a file of "
                          f"{_size_text(file_bytes)} can hold: {tail}")
    return dset


# -- reading -----------------------------------------------------------------------------------------
def _where(group: h5py.Group | h5py.Dataset) -> str:
    return f"{group.file.filename}:{group.name}"


def _attr_str(obj: h5py.HLObject, name: str) -> str | None:
    value = obj.attrs.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return str(value)


def _read_calibration(group: h5py.Group) -> EnergyCalibration:
    try:
        return EnergyCalibration(
            float(group.attrs["calibration_offset_keV"]),
            float(group.attrs["calibration_gain_keV"]),
            float(group.attrs.get("calibration_quadratic_keV", 0.0)),
        )
    except KeyError as exc:
        raise FormatError(f"{_where(group)}: calibration attribute {exc.args[0]!r} is missing") from None
    except (TypeError, ValueError, OverflowError):
        raise FormatError(f"{_where(group)}: calibration attributes are not numbers") from None
    except CalibrationError as exc:
        raise CalibrationError(f"{_where(group)}: {exc}") from None


def _read_metadata(group: h5py.Group) -> dict[str, Any]:
    raw = _attr_str(group, "metadata_json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise FormatError(f"{_where(group)}: attribute metadata_json is not valid JSON") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{_where(group)}: attribute metadata_json is not a JSON object")
    return meta


def _dataset(group: h5py.Group, name: str) -> h5py.Dataset:
    obj = group.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise FormatError(f"{_where(group)}: dataset {name!r} is missing")
    return obj


def _check_energy(group: h5py.Group, n_channels: int) -> None:
    energy = group.get("energy")
    if isinstance(energy, h5py.Dataset) and energy.shape != (n_channels,):
        raise DataError(
            f"{_where(group)}: energy axis has shape {energy.shape} but counts have {n_channels} channels "
            "(mismatched channel counts)"
        )


class CheckedDataset(h5py.Dataset):
    """An :class:`h5py.Dataset` whose reads turn HDF5 errors (a corrupted chunk) into DataError.

    It is the same open dataset (same HDF5 identifier), so everything h5py offers still works. When a
    read fails, the chunks it covers are read one by one to name the damaged one.
    """

    #: at most this many chunks are tried, one by one, to find the damaged one
    MAX_CHUNKS_SEARCHED = 4096

    def __getitem__(self, args, new_dtype=None):  # type: ignore[override]
        try:
            return super().__getitem__(args, new_dtype=new_dtype)
        except (OSError, RuntimeError) as exc:
            raise DataError(self._damage_message(args, exc)) from None

    def _damage_message(self, args: object, exc: BaseException) -> str:
        where = f"{self.file.filename}:{self.name}"
        bad = self._find_bad_chunk(args)
        what = (f"reading {args!r} failed" if bad is None
                else f"{chunk_text(bad, self.chunks, self.shape)} is damaged")
        return (f"{where}: {what}: the compressed data cannot be decoded ({exc}); the file is corrupted "
                "(other chunks may still read): re-copy it from the instrument or a backup")

    def _find_bad_chunk(self, args: object) -> tuple[int, ...] | None:
        if self.chunks is None:
            return None
        bounds = _selection_bounds(args, self.shape)
        grid = [range(lo - lo % c, hi, c) for (lo, hi), c in zip(bounds, self.chunks, strict=True)]
        if math.prod(len(r) for r in grid) > self.MAX_CHUNKS_SEARCHED:
            return None
        for offset in itertools.product(*grid):
            box = tuple(
                slice(o, min(o + c, n)) for o, c, n in zip(offset, self.chunks, self.shape, strict=True)
            )
            try:
                super().__getitem__(box)
            except (OSError, RuntimeError):
                return tuple(int(o) for o in offset)
        return None


def chunk_text(offset: tuple[int, ...], chunks: tuple[int, ...] | None, shape: tuple[int, ...]) -> str:
    """Words for the storage chunk starting at ``offset``: pixel row and columns for a 3-D scan."""
    if len(offset) == 3 and chunks is not None:
        r, c, ch = offset
        last = min(c + chunks[1], shape[1]) - 1
        cols = f"column {c}" if last == c else f"columns {c}-{last}"
        chans = "" if ch == 0 else f", channels from {ch}"
        return f"the storage chunk at offset {offset} (pixel row {r}, {cols}{chans})"
    return f"the storage chunk at offset {offset}"


def _selection_bounds(args: object, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Per-axis [lo, hi) bounds of an index expression (the whole axis where it is not a plain slice/int)."""
    items = list(args) if isinstance(args, tuple) else [args]
    if Ellipsis in items:
        i = items.index(Ellipsis)
        items[i : i + 1] = [slice(None)] * (len(shape) - len(items) + 1)
    items += [slice(None)] * (len(shape) - len(items))
    bounds = []
    for item, n in zip(items, shape, strict=False):
        if isinstance(item, (int, np.integer)) and -n <= int(item) < n:
            i = int(item) % n
            bounds.append((i, i + 1))
        elif isinstance(item, slice) and item.step in (None, 1):
            lo, hi, _ = item.indices(n)
            bounds.append((lo, max(lo, hi)))
        else:
            bounds.append((0, n))
    return bounds


def read_scan(group: h5py.Group) -> Scan:
    """:class:`Scan` from a group written by :func:`write_scan`; counts stay the lazy h5py dataset."""
    path = Path(group.file.filename)
    counts = CheckedDataset(check_stored_size(_dataset(group, "counts"), path).id)
    if counts.ndim != 3:
        raise DataError(
            f"{_where(group)}: scan counts must be 3-D (rows, cols, channels), got shape {counts.shape}"
        )
    if counts.dtype.kind not in "iuf":
        raise DataError(f"{_where(group)}: counts must be numeric, got dtype {counts.dtype}")
    _check_energy(group, counts.shape[2])
    cal = _read_calibration(group)
    live = group.get("live_time")
    live_time = None
    if isinstance(live, h5py.Dataset):
        live_time = CheckedDataset(check_stored_size(live, path).id)[()]
        live_time = float(live_time) if np.ndim(live_time) == 0 else np.asarray(live_time, dtype=float)
    pixel = group.attrs.get("pixel_size_um")
    meta = _read_metadata(group)
    meta.update(source=str(group.file.filename), hdf5_group=group.name)
    try:
        return Scan(
            counts,
            cal,
            pixel_size_um=None if pixel is None else float(pixel),
            live_time_s=live_time,
            metadata=meta,
        )
    except XRFNBError as exc:
        raise type(exc)(f"{_where(group)}: {exc}") from None


def read_spectrum(group: h5py.Group) -> Spectrum:
    """:class:`Spectrum` from a group written by :func:`write_spectrum` (read into memory)."""
    path = Path(group.file.filename)
    counts = CheckedDataset(check_stored_size(_dataset(group, "counts"), path).id)
    if counts.ndim != 1:
        raise DataError(f"{_where(group)}: spectrum counts must be 1-D, got shape {counts.shape}")
    _check_energy(group, counts.shape[0])
    cal = _read_calibration(group)
    times = {}
    for name in ("live_time", "real_time"):
        d = group.get(name)
        times[name] = float(CheckedDataset(d.id)[()]) if isinstance(d, h5py.Dataset) and d.ndim == 0 else None
    meta = _read_metadata(group)
    meta.update(source=str(group.file.filename), hdf5_group=group.name)
    return make_spectrum(
        counts[()],
        cal,
        Path(group.file.filename),
        live_time_s=times["live_time"],
        real_time_s=times["real_time"],
        metadata=meta,
    )


def _candidates(f: h5py.File) -> tuple[list[str], list[str], list[str]]:
    """(xrfnb groups, NXdata groups, plausible 1-D/3-D numeric datasets) in the file."""
    ours: list[str] = []
    nxdata: list[str] = []
    datasets: list[str] = []

    def visit(name: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Group):
            if _attr_str(obj, "xrfnb_kind") in ("scan", "spectrum"):
                ours.append("/" + name)
            elif _attr_str(obj, "NX_class") == "NXdata" and _attr_str(obj, "signal"):
                nxdata.append("/" + name)
        elif isinstance(obj, h5py.Dataset) and obj.ndim in (1, 3) and obj.dtype.kind in "iuf":
            if obj.shape[-1] >= 2:
                datasets.append("/" + name)

    f.visititems(visit)
    return ours, nxdata, datasets


def _default_target(f: h5py.File, path: Path) -> h5py.HLObject:
    obj: h5py.HLObject = f
    for _ in range(4):  # follow NeXus "default" attributes root -> entry -> data
        name = _attr_str(obj, "default")
        if not name or not isinstance(obj, h5py.Group) or name not in obj:
            break
        obj = obj[name]
    if isinstance(obj, h5py.Group) and (_attr_str(obj, "xrfnb_kind") or _attr_str(obj, "signal")):
        return obj
    ours, nxdata, datasets = _candidates(f)
    for found in (ours, nxdata):
        if len(found) == 1:
            return f[found[0]]
        if len(found) > 1:
            raise FormatError(
                f"{path}: the file holds several spectra/scans ({', '.join(found[:10])}); "
                "choose one with load(path, dataset=...)"
            )
    if len(datasets) == 1:
        return f[datasets[0]]
    if datasets:
        raise FormatError(
            f"{path}: no xrfnb or NXdata group, and several candidate datasets ({', '.join(datasets[:10])}); "
            "choose one with load(path, dataset=...)"
        )
    raise FormatError(f"{path}: an HDF5 file without any spectrum or scan (no numeric 1-D or 3-D dataset)")


def _read_foreign(obj: h5py.HLObject, path: Path, calibration: EnergyCalibration | None) -> Spectrum | Scan:
    """A NeXus NXdata group (signal + energy axis) or a bare dataset."""
    energy = None
    if isinstance(obj, h5py.Group):
        signal = _attr_str(obj, "signal")
        if not signal or signal not in obj or not isinstance(obj[signal], h5py.Dataset):
            raise FormatError(f"{_where(obj)}: NXdata group without a readable 'signal' dataset")
        axes = obj.attrs.get("axes")
        axes_list = [axes] if isinstance(axes, (str, bytes)) else list(axes) if axes is not None else []
        axes_list = [a.decode() if isinstance(a, bytes) else str(a) for a in axes_list]
        counts = obj[signal]
        if counts.ndim not in (1, 3):
            raise DataError(
                f"{_where(counts)}: counts of shape {counts.shape} are neither a spectrum (channels,) "
                "nor a scan (rows, cols, channels)"
            )
        if axes_list and axes_list[-1] in obj and isinstance(obj[axes_list[-1]], h5py.Dataset):
            axis = CheckedDataset(check_stored_size(obj[axes_list[-1]], path).id)
            if axis.ndim == 1:
                units = (_attr_str(axis, "units") or "keV").strip()
                energy = np.asarray(axis[()], dtype=float) * (1e-3 if units.lower() == "ev" else 1.0)
                if energy.size != counts.shape[-1]:
                    raise DataError(
                        f"{_where(obj)}: energy axis has {energy.size} values but the signal has "
                        f"{counts.shape[-1]} channels (mismatched channel counts)"
                    )
    else:
        counts = obj
    counts = CheckedDataset(check_stored_size(counts, path).id)
    if counts.dtype.kind not in "iuf":
        raise DataError(f"{_where(counts)}: counts must be numeric, got dtype {counts.dtype}")
    source = "given to load()"
    if calibration is None and energy is not None:
        calibration = calibration_from_axis(energy, path, f"energy axis of {counts.name}")
        source = "NXdata energy axis"
    meta = {"format": "hdf5", "hdf5_dataset": counts.name}
    if counts.ndim == 1:
        return make_spectrum(counts[()], calibration, path, metadata=meta, calibration_source=source)
    if counts.ndim == 3:
        meta.update(
            source=str(path),
            calibrated=calibration is not None,
            calibration_source=source if calibration is not None else "none in file",
        )
        try:
            return Scan(counts, calibration or UNCALIBRATED, metadata=meta)
        except XRFNBError as exc:
            raise type(exc)(f"{path}: {exc}") from None
    raise DataError(
        f"{_where(counts)}: counts of shape {counts.shape} are neither a spectrum (channels,) "
        "nor a scan (rows, cols, channels)"
    )


def read_hdf5(
    path: Path,
    *,
    dataset: str | None = None,
    calibration: EnergyCalibration | None = None,
) -> Spectrum | Scan:
    """Load a spectrum or scan from an HDF5 file opened read-only.

    Parameters
    ----------
    path : pathlib.Path
        The file.
    dataset : str, optional
        Path inside the file of an xrfnb group, an NXdata group or a dataset. By default the NeXus
        ``default`` chain, else the only spectrum/scan in the file.
    calibration : EnergyCalibration, optional
        Replaces the calibration stored in the file.
    """
    preflight(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: not a readable HDF5 file (truncated or corrupted?): {exc}") from None
    keep_open = False
    try:
        try:
            check_self_contained(f, path)
            if dataset is not None:
                if dataset not in f:
                    ours, nxdata, datasets = _candidates(f)
                    raise FormatError(
                        f"{path}: no {dataset!r} in the file; candidates: "
                        f"{', '.join((ours + nxdata + datasets)[:10]) or 'none'}"
                    )
                obj = f[dataset]
            else:
                obj = _default_target(f, path)
            kind = _attr_str(obj, "xrfnb_kind") if isinstance(obj, h5py.Group) else None
            if kind == "scan":
                result: Spectrum | Scan = read_scan(obj)
                keep_open = True
            elif kind == "spectrum":
                result = read_spectrum(obj)
            else:
                result = _read_foreign(obj, path, calibration)
                keep_open = isinstance(result, Scan)
                calibration = None  # already applied
        except XRFNBError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise FormatError(f"{path}: cannot read the HDF5 content (corrupted file?): {exc}") from None
        if calibration is not None:
            result = with_given_calibration(result, calibration)
        return result
    finally:
        if not keep_open:
            f.close()
