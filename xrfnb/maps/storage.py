"""Writing pigment maps safely: the guarded HDF5 writer, free-space checks and the maps file's datasets.

Everything that puts pigment maps on disk goes through here:

* :func:`h5_writer` opens an HDF5 file through a guard that never hands libhdf5 a failed write (a full
  disk then is a clean :class:`~xrfnb.FormatError`, not a crashed interpreter);
* :func:`check_free_space`, :func:`maps_file_bytes` and :func:`write_error` refuse up front, or explain,
  a disk too small for the maps;
* :func:`write_header`, :func:`create_map_datasets`, :func:`write_element_maps` and
  :func:`read_element_maps` are the layout of a pigment-maps file (format ``xrfnb-pigment-maps``);
* :func:`partial_dir`, :func:`check_output_path` and :func:`check_input_outside_working_folder` check an
  output path (and its ``OUT.partial/`` working folder) before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import FormatError, XRFNBError
from ..fitting.elements import ElementMaps

if TYPE_CHECKING:  # pragma: no cover
    import h5py

__all__ = [
    "MAPS_FORMAT",
    "check_free_space",
    "check_input_outside_working_folder",
    "check_output_path",
    "create_map_datasets",
    "format_bytes",
    "h5_writer",
    "maps_file_bytes",
    "partial_dir",
    "read_element_maps",
    "write_element_maps",
    "write_error",
    "write_header",
]

#: value of the ``format`` attribute of a pigment-maps file
MAPS_FORMAT = "xrfnb-pigment-maps"
_FORMAT_VERSION = 1
_H5_OVERHEAD_BYTES = 1 << 18  # HDF5 header, chunk index and attributes of a maps file (generous)


def _open_for_hdf5(path: Path) -> io.FileIO:
    """The raw, unbuffered file :class:`_GuardedFile` writes through (tests put a full disk here)."""
    return open(path, "w+b", buffering=0)  # closed by _GuardedFile.close


class _GuardedFile:
    """A binary file for h5py's ``fileobj`` driver that never hands libhdf5 a failed write.

    libhdf5 2.0 (h5py 3.16) does not survive a write that fails (``ENOSPC`` on a full disk): closing the
    file then raises "Can't decrement id ref count" and the interpreter segfaults when the dataset
    objects are freed. Here a failed write (or a Ctrl-C arriving inside one) is recorded in
    :attr:`error` and reported to libhdf5 as done; the writer stops writing (:meth:`failed`), the file
    is closed cleanly, and :func:`h5_writer` raises the recorded error and drops the file.
    """

    def __init__(self, path: Path) -> None:
        self._fh = _open_for_hdf5(path)
        self.error: BaseException | None = None

    def failed(self) -> bool:
        """True once a write failed (the rest of the file is then not written)."""
        return self.error is not None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    n = self._fh.write(view[done:])
                    if not n:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += n
            except BaseException as exc:  # must never propagate into libhdf5
                self.error = exc
        return len(view)

    def readinto(self, buffer: Any) -> int:
        return self._fh.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        return self._fh.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def truncate(self, size: int | None = None) -> int:
        try:
            return self._fh.truncate(size)
        except BaseException as exc:  # as write
            self.error = self.error or exc
            return self._fh.tell() if size is None else size

    def flush(self) -> None:
        """Nothing to do: the file is unbuffered (and synced by :meth:`close`)."""

    def close(self) -> None:
        """Sync to disk (a delayed ``ENOSPC`` shows here) and close."""
        try:
            if self.error is None:
                os.fsync(self._fh.fileno())
        except OSError as exc:
            self.error = exc
        finally:
            self._fh.close()


@contextlib.contextmanager
def h5_writer(
    tmp: Path, target: Path, needed_bytes: int, hint: str = ""
) -> Iterator[tuple[h5py.File, Callable[[], bool]]]:
    """Open ``tmp`` for writing with h5py through a :class:`_GuardedFile`.

    Yields ``(file, failed)``: ``failed()`` turns True after a failed write, and the caller then stops
    writing. On exit the file is closed; a recorded write error is raised as :class:`FormatError` (no
    space left: with ``needed_bytes`` and ``hint``), a Ctrl-C caught inside a write as KeyboardInterrupt.
    """
    import h5py

    try:
        guard = _GuardedFile(tmp)
    except OSError as exc:
        raise write_error(exc, target, needed_bytes, hint) from None
    try:
        f = h5py.File(guard, "w")
    except BaseException:
        guard.close()
        raise
    try:
        try:
            yield f, guard.failed
        finally:
            try:
                f.close()
            finally:
                guard.close()
    except BaseException:
        if isinstance(guard.error, OSError):  # a failure the body saw only as a consequence
            raise write_error(guard.error, target, needed_bytes, hint) from None
        raise
    if isinstance(guard.error, OSError):
        raise write_error(guard.error, target, needed_bytes, hint) from None
    if guard.error is not None:  # KeyboardInterrupt (or SystemExit) that arrived inside a write
        raise guard.error


def format_bytes(n: float) -> str:
    """A byte count for messages: ``"12.3 MB"``, ``"250 MB"`` or ``"1.5 GB"`` (decimal units)."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB" if n < 1e7 else f"{n / 1e6:.0f} MB"


def _no_space_error(folder: Path, target: Path, needed_bytes: int, hint: str = "") -> FormatError:
    try:
        free = f", {format_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = ""
    return FormatError(
        f"no space left on {folder} for {target.name} (about {format_bytes(needed_bytes)} needed{free})"
        + (hint or ": free some space or write elsewhere")
    )


def write_error(exc: OSError, target: Path, needed_bytes: int, hint: str = "") -> FormatError:
    """The one-line :class:`~xrfnb.FormatError` for a failed write of ``target``.

    Parameters
    ----------
    exc : OSError
        The error of the write; no space left (``ENOSPC``, ``EDQUOT``) says how much was needed and free.
    target : pathlib.Path
        The file being written.
    needed_bytes : int
        Bytes the whole write needs (for the no-space message).
    hint : str
        Appended to the message (what to do next); default for no space: free some space or write elsewhere.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _no_space_error(target.parent, target, needed_bytes, hint)
    reason = exc.strerror or str(exc)
    return FormatError(f"cannot write {target}: {reason}{hint}")


def check_free_space(folder: Path, needed_bytes: int, target: Path, hint: str = "") -> None:
    """Refuse up front when ``folder``'s file system has less than ``needed_bytes`` free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # cannot tell: the writes themselves still report a full disk cleanly
        return
    if free < needed_bytes:
        raise _no_space_error(folder, target, needed_bytes, hint)


def maps_file_bytes(rows: int, cols: int, k: int, element_maps: ElementMaps | None = None) -> int:
    """Upper estimate of a maps file's size: the uncompressed arrays (probabilities hardly compress),
    2 % for deflate's worst case, the HDF5 overhead and the element maps."""
    arrays = rows * cols * (8 * k + 4 + 1 + 1)
    em = 0
    if element_maps is not None:
        for name in ("intensity", "sigma", "detection_limit", "chi2", "residual"):
            value = getattr(element_maps, name, None)
            em += int(getattr(value, "nbytes", 0) or 0)
    return int(1.02 * (arrays + em)) + _H5_OVERHEAD_BYTES


def write_header(
    f: h5py.File,
    classes: Sequence[str],
    colors: Sequence[str],
    thresholds: np.ndarray,
    ood_threshold: float,
    metadata: Mapping[str, Any],
) -> None:
    """Write the attributes of a pigment-maps file and its ``thresholds`` dataset, shape (K,), float32.

    Attributes: ``format`` (:data:`MAPS_FORMAT`), ``format_version``, ``classes`` and ``colors`` (JSON lists),
    ``ood_threshold`` and ``metadata`` (JSON; arrays over 4096 values are summarised).
    """
    f.attrs["format"] = MAPS_FORMAT
    f.attrs["format_version"] = _FORMAT_VERSION
    f.attrs["classes"] = json.dumps(list(classes))
    f.attrs["colors"] = json.dumps(list(colors))
    f.attrs["ood_threshold"] = float(ood_threshold)
    f.attrs["metadata"] = json.dumps(_jsonable(metadata))
    f.create_dataset("thresholds", data=np.asarray(thresholds, dtype=np.float32))


def create_map_datasets(
    f: h5py.File, rows: int, cols: int, k: int, mask_codes: Mapping[int, str]
) -> dict[str, h5py.Dataset]:
    """Create the (empty, gzip-compressed, 64 x 64-pixel chunked) map datasets of a pigment-maps file.

    Parameters
    ----------
    f : h5py.File
        Open for writing.
    rows, cols, k : int
        Scan shape and number of classes.
    mask_codes : mapping of int to str
        Mask reason per code (:data:`xrfnb.maps.pigmentmaps.MASK_REASONS`), stored as the ``codes``
        attribute of ``mask_reason``.

    Returns
    -------
    dict of str to h5py.Dataset
        ``probability`` and ``buried_probability`` (rows, cols, K) float32 filled with NaN, ``ood_score``
        (rows, cols) float32 filled with NaN, ``mask`` (rows, cols) bool, ``mask_reason`` (rows, cols) uint8.
    """
    cr, cc = min(rows, 64), min(cols, 64)
    opts = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    d = {
        "probability": f.create_dataset(
            "probability", (rows, cols, k), np.float32, chunks=(cr, cc, k), fillvalue=np.nan, **opts
        ),
        "buried_probability": f.create_dataset(
            "buried_probability", (rows, cols, k), np.float32, chunks=(cr, cc, k), fillvalue=np.nan, **opts
        ),
        "ood_score": f.create_dataset(
            "ood_score", (rows, cols), np.float32, chunks=(cr, cc), fillvalue=np.nan, **opts
        ),
        "mask": f.create_dataset("mask", (rows, cols), bool, chunks=(cr, cc), **opts),
        "mask_reason": f.create_dataset("mask_reason", (rows, cols), np.uint8, chunks=(cr, cc), **opts),
    }
    d["probability"].attrs["long_name"] = "probability that the pigment class is present"
    d["buried_probability"].attrs["long_name"] = (
        "probability that the class is present only below the surface"
    )
    d["mask_reason"].attrs["codes"] = json.dumps({str(k): v for k, v in mask_codes.items()})
    return d


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 4096 else f"<array {obj.shape}>"
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def write_element_maps(f: h5py.File, em: ElementMaps) -> None:
    """Write element maps as the group ``element_maps`` (elements, families and metadata as JSON
    attributes; ``intensity``, ``sigma``, ``detection_limit``, ``chi2``, ``residual`` as gzip datasets)."""
    g = f.create_group("element_maps")
    g.attrs["elements"] = json.dumps(list(em.elements))
    g.attrs["families"] = json.dumps(list(getattr(em, "families", ())))
    g.attrs["metadata"] = json.dumps(_jsonable(getattr(em, "metadata", {})))
    for name in ("intensity", "sigma", "detection_limit", "chi2", "residual"):
        value = getattr(em, name, None)
        if value is not None:
            g.create_dataset(name, data=np.asarray(value), compression="gzip", compression_opts=1)


def read_element_maps(f: h5py.File, path: Path) -> ElementMaps:
    """The element maps stored by :func:`write_element_maps` in ``f`` (the file at ``path``, for
    messages); a :class:`~xrfnb.FormatError` when they cannot be read."""
    g = f["element_maps"]
    fields = {
        name: g[name][()]
        for name in ("intensity", "sigma", "detection_limit", "chi2", "residual")
        if name in g
    }
    try:
        return ElementMaps(
            elements=tuple(json.loads(g.attrs["elements"])),
            families=tuple(json.loads(g.attrs.get("families", "[]"))),
            metadata=json.loads(g.attrs.get("metadata", "{}")),
            **fields,
        )
    except (TypeError, ValueError, XRFNBError) as exc:
        raise FormatError(f"{path}: element maps cannot be read ({exc})") from None


def partial_dir(out: Path) -> Path:
    """The working folder of an output file: ``OUT.partial`` beside it."""
    return out.with_name(out.name + ".partial")


def check_output_path(out: Path) -> None:
    """Refuse, before anything is written, an output that cannot become a file."""
    if out.is_dir():
        raise FormatError(
            f"cannot write pigment maps to {out}: it is a folder; give a file name, e.g. {out / 'maps.h5'}"
        )
    if not out.parent.is_dir():
        raise FormatError(f"cannot write {out}: folder {out.parent} does not exist")
    work = partial_dir(out)
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise FormatError(
            f"cannot write {out}: its working folder {work} exists and is not a folder xrfnb made; "
            "move it away or choose another output"
        )


def check_input_outside_working_folder(out: Path, source: str | os.PathLike) -> None:
    """Refuse an input inside ``OUT.partial/``, which xrfnb clears and removes."""
    work = partial_dir(out).resolve()
    src = Path(source).resolve()
    if src == work or work in src.parents:
        raise FormatError(
            f"the input {source} lies inside {work}, the working folder of {out} (xrfnb clears it and "
            "removes it when the maps are complete): move the input elsewhere or choose another output"
        )
