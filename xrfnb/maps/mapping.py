"""Whole-scan pigment maps: streaming and dask inference, masking of bad pixels, HDF5/TIFF output.

Memory model
------------
:func:`map_pigments` never holds the scan's spectra in memory. It reads one block of whole rows at a time
(aligned to the HDF5 chunks, about ``chunk_pixels`` pixels; the next block is read in a background thread
meanwhile), passes ``batch_pixels`` spectra at a time to the model, and writes the results:

* without ``out``: into preallocated in-memory maps, ``rows x cols x (2 K + 1) x 4`` bytes of float32 plus
  two bytes per pixel for the mask (a 1024 x 1024 scan with 30 classes: about 250 MB);
* with ``out``: block by block into ``OUT.partial/`` on disk (one small file per completed block, each written
  atomically), assembled into ``OUT`` at the end and opened *lazily* (h5py datasets, read row block by row
  block), so peak memory is independent of the scan size.

The dask path (a :class:`~xrfnb.Scan` whose counts are a :class:`dask.array.Array`) runs the same per-block
function with :func:`dask.array.blockwise`, locally or on a ``dask.distributed`` cluster; the client receives
only the maps.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import DataError, FitError, FormatError, ModelError
from ..core.calibration import EnergyCalibration
from ..core.spectrum import Scan, Spectrum, _is_dask
from ..fitting.elements import fit_elements
from ..io.atomic import atomic_path
from ..io.chunks import ChunkReader
from ..physics.instrument import resolve_instrument
from .pigmentmaps import MASK_DEAD, MASK_INVALID, MASK_OK, MASK_REASONS, MASK_SATURATED, PigmentMaps
from .storage import (
    check_free_space,
    check_input_outside_working_folder,
    check_output_path,
    create_map_datasets,
    format_bytes,
    h5_writer,
    maps_file_bytes,
    partial_dir,
    write_element_maps,
    write_error,
    write_header,
)

__all__ = ["classify_pixels", "dask_scan", "map_pigments"]

_PARTIAL_FORMAT = "xrfnb-pigment-maps-partial"
_DEFAULT_CHUNK_PIXELS = 8192
_DEFAULT_BATCH_PIXELS = 4096
#: files xrfnb writes in ``OUT.partial/`` (nothing else there is ever deleted)
_PARTIAL_ENTRY = re.compile(r"manifest\.json|\.manifest\.json\.tmp|\.?rows_(\d{7})_(\d{7})\.npz(\.tmp)?")
_BLOCK_FILE = re.compile(r"rows_(\d{7})_(\d{7})\.npz")
_BLOCK_ARRAYS = ("probability", "buried_probability", "ood_score", "mask_reason")
_NPZ_OVERHEAD_BYTES = 4096  # zip directory and .npy headers of one block file

_log = logging.getLogger("xrfnb.mapping")


def _block_file_bytes(n_pixels: int, k: int) -> int:
    """Size of one ``rows_*.npz`` block file of ``n_pixels`` pixels (uncompressed npz)."""
    return n_pixels * (8 * k + 4 + 1) + _NPZ_OVERHEAD_BYTES


# ------------------------------------------------------------------------------------------------------
# per-block computation (shared by the streaming and the dask paths)
# ------------------------------------------------------------------------------------------------------
def classify_pixels(counts: np.ndarray, saturation_counts: float | None) -> np.ndarray:
    """Mask reason per spectrum: 0 valid, 1 dead, 2 saturated, 3 invalid.

    Parameters
    ----------
    counts : numpy.ndarray, shape (n, channels)
        Raw counts in any numeric dtype.
    saturation_counts : float or None
        A channel at or above this value marks the pixel saturated (None: never).

    Returns
    -------
    numpy.ndarray, shape (n,), uint8
    """
    kind = counts.dtype.kind
    reason = np.zeros(counts.shape[0], dtype=np.uint8)
    if counts.shape[0] == 0:
        return reason
    mx = counts.max(axis=1)
    if kind == "u":
        invalid = np.zeros(counts.shape[0], dtype=bool)
    else:
        mn = counts.min(axis=1)
        with np.errstate(invalid="ignore"):
            invalid = (mn < 0) if kind in "iu" else ~(np.isfinite(mx) & np.isfinite(mn)) | (mn < 0)
    with np.errstate(invalid="ignore"):
        dead = mx == 0
        if saturation_counts is not None:
            reason[mx >= saturation_counts] = MASK_SATURATED
    reason[dead] = MASK_DEAD
    reason[invalid] = MASK_INVALID
    return reason


def _default_saturation(dtype: np.dtype) -> float | None:
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        return float(np.iinfo(dtype).max)
    return None


def _process_block(
    block: np.ndarray,
    model: Any,
    calibration: EnergyCalibration,
    live_time_s: float | np.ndarray | None,
    saturation_counts: float | None,
    batch_pixels: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Identify one block of pixels.

    Parameters
    ----------
    block : numpy.ndarray, shape (r, c, channels)
    live_time_s : float, numpy.ndarray of shape (r, c), or None

    Returns
    -------
    probability, buried_probability : (r, c, K) float32, NaN at masked pixels
    ood_score : (r, c) float32
    reason : (r, c) uint8 mask reasons
    """
    r, c, ch = block.shape
    k = len(model.classes)
    flat = block.reshape(r * c, ch)
    reason = classify_pixels(flat, saturation_counts)
    prob = np.full((r * c, k), np.nan, dtype=np.float32)
    bur = np.full((r * c, k), np.nan, dtype=np.float32)
    ood = np.full(r * c, np.nan, dtype=np.float32)
    valid_idx = np.flatnonzero(reason == MASK_OK)
    all_valid = valid_idx.size == r * c
    lt_flat = (
        None if live_time_s is None or np.ndim(live_time_s) == 0 else np.asarray(live_time_s).reshape(-1)
    )
    for s in range(0, valid_idx.size, batch_pixels):
        if all_valid:
            sel: Any = slice(s, min(s + batch_pixels, r * c))
        else:
            sel = valid_idx[s : s + batch_pixels]
        x = flat[sel]  # raw dtype: the model rebins any numeric dtype (no float copy of the block)
        lt = live_time_s if lt_flat is None else lt_flat[sel]
        res = model.identify_batch(x, calibration, live_time_s=lt)
        n = x.shape[0]
        p = np.asarray(res.probability, dtype=np.float32)
        b = np.asarray(res.buried_probability, dtype=np.float32)
        o = np.asarray(res.ood_score, dtype=np.float32).reshape(-1)
        if p.shape != (n, k) or b.shape != (n, k) or o.shape != (n,):
            raise ModelError(
                f"model returned probability {p.shape}, buried {b.shape}, ood {o.shape} for {n} spectra "
                f"and {k} classes"
            )
        prob[sel], bur[sel], ood[sel] = p, b, o
    return prob.reshape(r, c, k), bur.reshape(r, c, k), ood.reshape(r, c), reason.reshape(r, c)


def _dask_block(
    counts: np.ndarray,
    *maybe_lt: np.ndarray,
    model: Any,
    calibration: EnergyCalibration,
    live_time_s: float | None,
    saturation_counts: float | None,
    batch_pixels: int,
) -> np.ndarray:
    """Per-chunk function of the dask path: (r, c, channels) -> (r, c, 2 K + 2) float32 packed results."""
    lt = maybe_lt[0] if maybe_lt else live_time_s
    prob, bur, ood, reason = _process_block(
        np.asarray(counts), model, calibration, lt, saturation_counts, batch_pixels
    )
    return np.concatenate([prob, bur, ood[..., None], reason[..., None].astype(np.float32)], axis=-1)


# ------------------------------------------------------------------------------------------------------
# sinks: in memory, or completed blocks on disk with resume
# ------------------------------------------------------------------------------------------------------
class _MemorySink:
    def __init__(self, rows: int, cols: int, k: int) -> None:
        self.prob = np.full((rows, cols, k), np.nan, dtype=np.float32)
        self.bur = np.full((rows, cols, k), np.nan, dtype=np.float32)
        self.ood = np.full((rows, cols), np.nan, dtype=np.float32)
        self.reason = np.zeros((rows, cols), dtype=np.uint8)

    def done(self, sl: slice) -> bool:
        return False

    def write(self, sl: slice, prob, bur, ood, reason) -> None:
        self.prob[sl], self.bur[sl], self.ood[sl], self.reason[sl] = prob, bur, ood, reason


_RESUME_HINT = (
    ": the completed blocks are kept in {dir}; free some space, then rerun with --resume (resume=True) "
    "to continue from them"
)


class _PartialSink:
    """Completed blocks as ``OUT.partial/rows_<r0>_<r1>.npz`` files, each written atomically.

    The folder is xrfnb's when it holds a ``manifest.json`` of format ``xrfnb-pigment-maps-partial``
    (written first, before any block). Only the files xrfnb writes there (the manifest, ``rows_*.npz``
    and their ``.tmp`` files, recognised by name) are ever deleted; a folder of that name that is not
    xrfnb's is refused, and anything else found in xrfnb's folder is left alone (the folder then stays).
    """

    def __init__(self, out: Path, manifest: dict[str, Any], resume: bool, bytes_left: int = 0) -> None:
        self.out = out
        self.dir = partial_dir(out)
        self.manifest = manifest
        self.bytes_left = bytes_left  # still to write (blocks and final file), for the no-space message
        self.completed: set[tuple[int, int]] = set()
        exists = self.dir.is_dir() and not self.dir.is_symlink()
        if exists and resume and (self.dir / "manifest.json").exists():
            self._load_existing()
            return
        if exists:
            if not self._is_ours():
                raise FormatError(
                    f"{self.dir} exists and is not an xrfnb working folder (no xrfnb manifest.json; it "
                    f"holds {', '.join(sorted(p.name for p in self.dir.iterdir())[:5])}): xrfnb never "
                    f"deletes what it did not write; move that folder away or choose another output"
                )
            self._clear()
        else:
            try:
                self.dir.mkdir()
            except OSError as exc:
                raise write_error(exc, self.dir / "manifest.json", _NPZ_OVERHEAD_BYTES) from None
        try:
            _write_json_atomic(self.dir / "manifest.json", manifest)
        except OSError as exc:
            raise write_error(exc, self.dir / "manifest.json", _NPZ_OVERHEAD_BYTES) from None

    def _is_ours(self) -> bool:
        """The folder holds xrfnb's manifest, or nothing but xrfnb's files (a run killed before the
        manifest was in place), or nothing at all."""
        try:
            manifest = json.loads((self.dir / "manifest.json").read_text())
        except (OSError, ValueError):
            manifest = None
        if isinstance(manifest, dict) and manifest.get("format") == _PARTIAL_FORMAT:
            return True
        names = [p.name for p in self.dir.iterdir()]
        return all(n == ".manifest.json.tmp" for n in names)

    def _clear(self) -> None:
        """Delete the files xrfnb wrote in the folder (by name), nothing else."""
        for p in self.dir.iterdir():
            if _PARTIAL_ENTRY.fullmatch(p.name) and (p.is_file() or p.is_symlink()):
                p.unlink()

    def _load_existing(self) -> None:
        try:
            old = json.loads((self.dir / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(
                f"cannot resume: {self.dir / 'manifest.json'} is unreadable ({exc}); "
                f"delete {self.dir} or run "
                "without --resume to start over"
            ) from None
        if not isinstance(old, dict) or old.get("format") != _PARTIAL_FORMAT:
            raise FormatError(
                f"cannot resume: {self.dir} is not an xrfnb working folder (its manifest.json is not "
                "xrfnb's); move that folder away or choose another output"
            )
        for key in ("format", "input", "model", "shape", "block_rows"):
            if old.get(key) != self.manifest.get(key):
                raise DataError(
                    f"cannot resume: the partial results in {self.dir} were made with a different {key} "
                    f"({old.get(key)!r} != {self.manifest.get(key)!r}); run without --resume to start over"
                )
        for p in self.dir.iterdir():
            m = _BLOCK_FILE.fullmatch(p.name)
            if m is None:
                continue
            block = slice(int(m.group(1)), int(m.group(2)))
            problem = self._check_block(p, block)
            if problem is None:
                self.completed.add((block.start, block.stop))
                continue
            _log.warning(
                "damaged block file %s (%s): computing rows %d-%d again", p, problem, block.start, block.stop
            )
            with contextlib.suppress(OSError):
                p.unlink()

    def _check_block(self, path: Path, sl: slice) -> str | None:
        """Why a block file cannot be used (truncated, unreadable, wrong arrays), or None."""
        rows, cols = self.manifest["shape"]
        k = len(self.manifest["model"]["classes"])
        n = sl.stop - sl.start
        if not 0 <= sl.start < sl.stop <= rows:
            return f"rows outside the scan's {rows}"
        expect = {"probability": (n, cols, k), "buried_probability": (n, cols, k), "ood_score": (n, cols),
                  "mask_reason": (n, cols)}
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:  # fh: closed on errors too
                if sorted(z.files) != sorted(_BLOCK_ARRAYS):
                    return f"arrays {sorted(z.files)}"
                for name, shape in expect.items():
                    a = z[name]  # reads the whole member: a truncated file fails its CRC or its size here
                    if a.shape != shape:
                        return f"{name} has shape {a.shape}, expected {shape}"
        except Exception as exc:  # zipfile, zlib, numpy and OS errors alike: redo the block
            return f"{type(exc).__name__}: {exc}"
        return None

    def done(self, sl: slice) -> bool:
        return (sl.start, sl.stop) in self.completed

    def write(self, sl: slice, prob, bur, ood, reason) -> None:
        target = self.dir / f"rows_{sl.start:07d}_{sl.stop:07d}.npz"
        tmp = self.dir / f".{target.name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, probability=prob, buried_probability=bur, ood_score=ood, mask_reason=reason)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise write_error(exc, target, self.bytes_left, _RESUME_HINT.format(dir=self.dir)) from None
        self.completed.add((sl.start, sl.stop))
        with contextlib.suppress(OSError):
            self.bytes_left = max(0, self.bytes_left - target.stat().st_size)

    def read(self, sl: slice) -> dict[str, np.ndarray]:
        path = self.dir / f"rows_{sl.start:07d}_{sl.stop:07d}.npz"
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:  # fh: closed on errors too
                return {n: z[n] for n in z.files}
        except Exception as exc:  # damaged after it was checked: say which file
            raise FormatError(
                f"block file {path} is damaged ({type(exc).__name__}: {exc}); rerun with --resume "
                "(resume=True) to compute its rows again"
            ) from None

    def assemble(
        self, classes, colors, thresholds, ood_threshold, metadata, slices: list[slice], element_maps
    ) -> None:
        rows, cols = self.manifest["shape"]
        needed = maps_file_bytes(rows, cols, len(classes), element_maps)
        hint = _RESUME_HINT.format(dir=self.dir)
        check_free_space(self.out.parent, needed, self.out, hint)
        with atomic_path(self.out) as tmp, h5_writer(tmp, self.out, needed, hint) as (f, failed):
            write_header(f, classes, colors, thresholds, ood_threshold, metadata)
            d = create_map_datasets(f, rows, cols, len(classes), MASK_REASONS)
            for sl in slices:
                if failed():
                    break
                z = self.read(sl)
                d["probability"][sl] = z["probability"]
                d["buried_probability"][sl] = z["buried_probability"]
                d["ood_score"][sl] = z["ood_score"]
                d["mask_reason"][sl] = z["mask_reason"]
                d["mask"][sl] = z["mask_reason"] != MASK_OK
            if element_maps is not None and not failed():
                write_element_maps(f, element_maps)
        self.remove()

    def remove(self) -> None:
        """Delete xrfnb's files and then the folder, if nothing else is left in it."""
        with contextlib.suppress(OSError):
            self._clear()
            self.dir.rmdir()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ------------------------------------------------------------------------------------------------------
# the public entry point
# ------------------------------------------------------------------------------------------------------
def _model_identity(model: Any) -> dict[str, Any]:
    return {
        "name": str(getattr(model, "name", type(model).__name__)),
        "classes": list(model.classes),
        "thresholds": [round(float(t), 6) for t in np.asarray(model.thresholds).reshape(-1)],
        "ood_threshold": round(float(model.ood_threshold), 6),
        "precision": str(getattr(model, "precision", "float32")),
    }


def _input_identity(scan: Scan) -> dict[str, Any]:
    ident: dict[str, Any] = {
        "shape": list(scan.shape),
        "dtype": str(np.dtype(scan.counts.dtype)),
        "calibration": scan.calibration.to_dict(),
    }
    source = scan.metadata.get("source") or getattr(getattr(scan.counts, "file", None), "filename", None)
    if source:
        ident["source"] = str(Path(str(source)).resolve())
        with contextlib.suppress(OSError):
            st = os.stat(str(source))
            ident["size"] = st.st_size
            ident["mtime_ns"] = st.st_mtime_ns
    return ident


def _resolve_model(model: Any) -> Any:
    if model is None or isinstance(model, str | os.PathLike):
        # the model room loads torch (~2 s): imported when a model is named, so that reading maps
        # (PigmentMaps.from_hdf5, xrfnb info, reports) never pays for it
        from ..model.model import load_model

        return load_model("default" if model is None else model)
    for attr in ("classes", "colors", "thresholds", "ood_threshold", "identify_batch"):
        if not hasattr(model, attr):
            raise ModelError(f"model {model!r} has no {attr!r}: pass a PigmentModel or a model name")
    return model


def _as_scan(scan: Any) -> Scan:
    if isinstance(scan, Scan):
        return scan

    if isinstance(scan, Spectrum):
        return Scan.from_spectrum(scan)
    raise DataError(f"map_pigments needs a Scan (or a Spectrum), got {type(scan).__name__}")


def map_pigments(
    scan: Scan,
    model: Any = None,
    *,
    chunk_pixels: int = _DEFAULT_CHUNK_PIXELS,
    batch_pixels: int = _DEFAULT_BATCH_PIXELS,
    progress: bool | Callable[[int, int], object] = True,
    element_maps: bool = False,
    instrument: Any = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    saturation_counts: float | None = None,
    use_dask: bool | None = None,
) -> PigmentMaps:
    """Pigment maps of a whole scan, streamed block by block with bounded memory.

    Parameters
    ----------
    scan : Scan
        The scan, shape (rows, cols, channels); counts may be in memory, an open HDF5 dataset, or a
        :class:`dask.array.Array` (then the work runs with dask, on a ``dask.distributed`` cluster if a
        client is active).
    model : PigmentModel, str or path, optional
        The model, or a name/path for :func:`xrfnb.load_model`; default ``"default"``.
    chunk_pixels : int
        Pixels read per block (whole rows, aligned to the HDF5 chunks). Peak memory is about
        ``2 x chunk_pixels x channels x itemsize`` bytes for the spectra (one block in use, the next
        being read in a background thread) plus the model's working memory for ``batch_pixels`` spectra.
    batch_pixels : int
        Spectra passed to the model at once (in the scan's dtype; the model rebins them to its grid).
    progress : bool or callable
        True: a progress bar (tqdm) on stderr. A callable ``progress(done_pixels, total_pixels)`` is called
        instead of drawing a bar (a dashboard or notebook widget): once at the start, after every finished
        block (streaming; on the dask path after every finished dask task, as a share of the tasks), and with
        ``done_pixels == total_pixels`` when the pigment maps are complete. It runs in the thread that calls
        ``map_pigments``; an exception it raises stops the run (streaming: after the current block, whose
        results stay resumable; dask: once the running computation ends).
    element_maps : bool
        Also fit element maps (:func:`xrfnb.fit_elements`) and keep them alongside. If the fit is
        impossible (e.g. no element detected) the pigment maps are still returned, without element maps,
        and ``metadata["element_maps_error"]`` says why.
    instrument : Instrument or str, optional
        Instrument for the element fit (default: ``scan.metadata["instrument"]`` or ``"bruker-m6"``).
    out : path-like, optional
        Write the maps to this HDF5 file while mapping (completed blocks go to ``OUT.partial/`` first and
        the file appears atomically at the end); the returned maps then read from it lazily.
    resume : bool
        With ``out``: continue from the completed blocks of an interrupted run.
    saturation_counts : float, optional
        A channel at or above this value marks the pixel saturated; default: the maximum of an integer
        dtype (a clipped counter), none for float data.
    use_dask : bool, optional
        Run with dask on the active scheduler (a ``dask.distributed`` client if one exists, else local
        threads). Default: only when the counts already are a dask array. With True, an HDF5-backed scan
        is wrapped in a dask array whose tasks open the file by path (see :func:`dask_scan`), so workers of
        a cluster that share the file system can read it. The dask path ignores ``resume``; with ``out``
        the maps are written (atomically) when the computation ends.

    Returns
    -------
    PigmentMaps
        Probabilities (rows, cols, K); invalid pixels (all-zero, saturated, NaN/inf or negative counts) are
        masked and counted in ``metadata["masked"]`` and :meth:`PigmentMaps.summary`.
    """
    scan = _as_scan(scan)
    model = _resolve_model(model)
    chunk_pixels = int(chunk_pixels)
    batch_pixels = int(batch_pixels)
    if chunk_pixels < 1 or batch_pixels < 1:
        raise DataError(f"chunk_pixels and batch_pixels must be >= 1, got {chunk_pixels}, {batch_pixels}")
    if saturation_counts is None:
        saturation_counts = _default_saturation(scan.counts.dtype)
    rows, cols, _ = scan.shape
    classes = tuple(model.classes)
    k = len(classes)
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        _check_output(out_path, scan)
    t0 = time.perf_counter()
    metadata: dict[str, Any] = {
        "source": str(scan.metadata.get("source", "")),
        "model": str(getattr(model, "name", type(model).__name__)),
        "model_precision": str(getattr(model, "precision", "float32")),
        "pixel_size_um": scan.pixel_size_um,
        "calibration": scan.calibration.to_dict(),
        "shape": [rows, cols],
    }

    if use_dask or (use_dask is None and _is_dask(scan.counts)):
        # the client receives the whole maps: packed (2 K + 2 planes) and then split into their arrays
        _check_memory(2 * rows * cols * (2 * k + 2) * 4, rows, cols, k)
        if out_path is not None:
            check_free_space(out_path.parent, maps_file_bytes(rows, cols, k), out_path)
        scan = dask_scan(scan, rows_per_chunk=scan.block_rows(chunk_pixels))
        prob, bur, ood, reason = _map_dask(scan, model, saturation_counts, batch_pixels, progress)
        if callable(progress):
            progress(rows * cols, rows * cols)
        sink: Any = None
    else:
        step = scan.block_rows(chunk_pixels)
        slices = [slice(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
        if out_path is not None:
            manifest = {
                "format": _PARTIAL_FORMAT,
                "input": _input_identity(scan),
                "model": _model_identity(model),
                "shape": [rows, cols],
                "block_rows": step,
            }
            hint = _RESUME_HINT.format(dir=partial_dir(out_path))

            def needed(todo: list[slice]) -> int:  # bytes still to write: the blocks left, then the file
                blocks = sum(_block_file_bytes((sl.stop - sl.start) * cols, k) for sl in todo)
                return blocks + maps_file_bytes(rows, cols, k)

            if not (resume and partial_dir(out_path).is_dir()):  # nothing created before this check
                check_free_space(out_path.parent, needed(slices), out_path)
            sink = _PartialSink(out_path, manifest, resume)
            sink.bytes_left = needed([sl for sl in slices if not sink.done(sl)])
            if resume:
                check_free_space(out_path.parent, sink.bytes_left, out_path, hint)
        else:
            _check_memory(rows * cols * ((2 * k + 1) * 4 + 2), rows, cols, k)
            sink = _MemorySink(rows, cols, k)
        metadata["timing_s"] = _stream(scan, model, sink, slices, saturation_counts, batch_pixels, progress)

    elapsed = time.perf_counter() - t0
    em = None
    if element_maps:
        t_em = time.perf_counter()
        if progress is True:  # the sum spectrum and the element detection take seconds before the fit's bar
            _note("element maps: summing the scan's spectra, detecting its elements, setting up the fit ...")
        try:
            em = _element_maps(scan, instrument, progress is True)
        except FitError as exc:  # the pigment maps stand on their own: keep them, say why
            metadata["element_maps_error"] = str(exc)
        if progress is True and em is not None:
            elements = ", ".join(getattr(em, "elements", ()))
            _note(f"element maps: {elements} fitted in {time.perf_counter() - t_em:.1f} s")
    metadata["elapsed_s"] = round(elapsed, 3)
    metadata["spectra_per_s"] = round(rows * cols / max(elapsed, 1e-9), 1)

    if isinstance(sink, _PartialSink):
        masked = _count_reasons_blocks(sink, slices)
        metadata["masked"] = masked
        sink.assemble(classes, model.colors, model.thresholds, model.ood_threshold, metadata, slices, em)
        maps = PigmentMaps.from_hdf5(out_path, lazy=True)
        return dataclasses.replace(maps, element_maps=em) if em is not None else maps
    if isinstance(sink, _MemorySink):
        prob, bur, ood, reason = sink.prob, sink.bur, sink.ood, sink.reason
    metadata["masked"] = {name: int((reason == code).sum()) for code, name in MASK_REASONS.items()}
    maps = PigmentMaps(
        classes=classes,
        probability=prob,
        buried_probability=bur,
        ood_score=ood,
        thresholds=np.asarray(model.thresholds, dtype=np.float32),
        ood_threshold=float(model.ood_threshold),
        mask=reason != MASK_OK,
        colors=tuple(model.colors),
        element_maps=em,
        metadata=metadata,
        mask_reason=reason,
    )
    if out_path is not None:
        maps.to_hdf5(out_path)
    return maps


def _check_output(out: Path, scan: Scan) -> None:
    check_output_path(out)
    sources = {scan.metadata.get("source"), getattr(getattr(scan.counts, "file", None), "filename", None)}
    for source in filter(None, sources):
        check_input_outside_working_folder(out, str(source))
        same = out.resolve() == Path(str(source)).resolve()
        if not same and out.exists() and Path(str(source)).exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(out, str(source))
        if same:
            raise FormatError(f"refusing to overwrite the input file {source} with pigment maps")


def _available_memory_bytes() -> int | None:
    """Memory this process can still use: the smaller of the system's available memory (psutil, else
    ``MemAvailable`` of /proc/meminfo, else free pages) and what a cgroup limit leaves; None if unknown."""
    avail: int | None = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        if avail is None:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        with contextlib.suppress(OSError, ValueError):
            limit = int(Path(limit_file).read_text().strip())  # "max" (no limit) fails here
            left = max(0, limit - int(Path(usage_file).read_text().strip()))
            avail = left if avail is None else min(avail, left)
            break
    return avail


def _check_memory(needed_bytes: int, rows: int, cols: int, k: int) -> None:
    """Refuse up front maps that cannot fit in memory (instead of a MemoryError, or swapping for hours)."""
    avail = _available_memory_bytes()
    if avail is not None and needed_bytes > avail:
        raise DataError(
            f"pigment maps of {rows} x {cols} pixels with {k} classes need about "
            f"{format_bytes(needed_bytes)} of memory and about {format_bytes(avail)} is available: pass "
            "out='maps.h5' to map_pigments (the command line: xrfnb identify SCAN -o maps.h5) to stream them "
            "to disk instead"
        )


def _count_reasons_blocks(sink: _PartialSink, slices: list[slice]) -> dict[str, int]:
    counts = dict.fromkeys(MASK_REASONS.values(), 0)
    for sl in slices:
        reason = sink.read(sl)["mask_reason"]
        for code, name in MASK_REASONS.items():
            counts[name] += int((reason == code).sum())
    return counts


def _stream(
    scan: Scan,
    model: Any,
    sink: Any,
    slices: list[slice],
    saturation_counts: float | None,
    batch_pixels: int,
    progress: bool | Callable[[int, int], object],
) -> dict[str, float]:
    """Read -> identify -> write over the row blocks; returns seconds spent per stage.

    ``read`` is the time spent reading blocks (in the background thread), ``wait`` the part of it the
    main thread waited for, ``identify`` masking plus the model, ``write`` the sink.
    """
    from tqdm.auto import tqdm

    timing = {"read": 0.0, "wait": 0.0, "identify": 0.0, "write": 0.0}
    rows, cols, _ = scan.shape
    todo = [sl for sl in slices if not sink.done(sl)]
    lt_all = scan.live_time_s

    fast = ChunkReader.maybe(scan.counts)
    done_px = rows * cols - sum((s.stop - s.start) * cols for s in todo)  # finished before (resume)

    def read(sl: slice) -> np.ndarray:
        t = time.perf_counter()
        block = fast.read_rows(sl.start, sl.stop) if fast is not None else np.asarray(scan.counts[sl])
        timing["read"] += time.perf_counter() - t
        return block

    with (
        tqdm(
            total=rows * cols,
            initial=done_px,
            unit="px",
            unit_scale=True,
            desc="pigment maps",
            disable=progress is not True,
            smoothing=0.1,
        ) as bar,
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrfnb-read") as pool,
        contextlib.closing(fast) if fast is not None else contextlib.nullcontext(),
    ):
        report = progress if callable(progress) else None
        if report is not None:
            report(done_px, rows * cols)
        # read the next block in a background thread while the model works on this one
        pending = pool.submit(read, todo[0]) if todo else None
        for i, sl in enumerate(todo):
            t0 = time.perf_counter()
            block = pending.result()
            t1 = time.perf_counter()
            pending = pool.submit(read, todo[i + 1]) if i + 1 < len(todo) else None
            lt = lt_all[sl] if isinstance(lt_all, np.ndarray) else lt_all
            prob, bur, ood, reason = _process_block(
                block, model, scan.calibration, lt, saturation_counts, batch_pixels
            )
            del block
            t2 = time.perf_counter()
            sink.write(sl, prob, bur, ood, reason)
            t3 = time.perf_counter()
            timing["wait"] += t1 - t0
            timing["identify"] += t2 - t1
            timing["write"] += t3 - t2
            bar.update((sl.stop - sl.start) * cols)
            done_px += (sl.stop - sl.start) * cols
            if report is not None:
                report(done_px, rows * cols)
    return {k: round(v, 3) for k, v in timing.items()}


def _read_rows_by_path(path: str, dataset: str, r0: int, r1: int) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return np.asarray(f[dataset][r0:r1])


def dask_scan(scan: Scan, rows_per_chunk: int | None = None) -> Scan:
    """The same scan with its counts as a :class:`dask.array.Array` of whole-row blocks.

    An HDF5-backed scan becomes tasks that open the file read-only *by path* (they pickle, so they run on
    ``dask.distributed`` workers that see the same file system); an in-memory scan is wrapped with
    :func:`dask.array.from_array`; a dask scan is returned unchanged.

    Parameters
    ----------
    scan : Scan
        Shape (rows, cols, channels).
    rows_per_chunk : int, optional
        Rows per dask chunk (default: :meth:`Scan.block_rows`, aligned to the HDF5 chunks).
    """
    import dask
    import dask.array as da

    if _is_dask(scan.counts):
        return scan
    rows, cols, n_ch = scan.shape
    step = int(rows_per_chunk or scan.block_rows())
    counts = scan.counts
    try:
        import h5py

        is_h5 = isinstance(counts, h5py.Dataset)
    except ImportError:  # pragma: no cover
        is_h5 = False
    if is_h5:
        path, name = str(counts.file.filename), str(counts.name)
        read = dask.delayed(_read_rows_by_path, pure=True)
        blocks = [
            da.from_delayed(
                read(path, name, r0, min(rows, r0 + step)),
                shape=(min(rows, r0 + step) - r0, cols, n_ch),
                dtype=counts.dtype,
            )
            for r0 in range(0, rows, step)
        ]
        arr = da.concatenate(blocks, axis=0)
    else:
        arr = da.from_array(counts, chunks=(step, cols, n_ch))
    return dataclasses.replace(scan, counts=arr)


def _map_dask(
    scan: Scan,
    model: Any,
    saturation_counts: float | None,
    batch_pixels: int,
    progress: bool | Callable[[int, int], object],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import dask.array as da

    k = len(model.classes)
    counts = scan.counts.rechunk({2: -1})
    lt = scan.live_time_s
    fn = functools.partial(
        _dask_block,
        model=model,
        calibration=scan.calibration,
        live_time_s=None if isinstance(lt, np.ndarray) else lt,
        saturation_counts=saturation_counts,
        batch_pixels=batch_pixels,
    )
    args: list[Any] = [counts, "ijc"]
    if isinstance(lt, np.ndarray):
        args += [da.from_array(lt, chunks=(counts.chunks[0], counts.chunks[1])), "ij"]
    packed = da.blockwise(
        fn,
        "ijz",
        *args,
        new_axes={"z": 2 * k + 2},
        concatenate=True,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )
    total_px = int(scan.shape[0] * scan.shape[1])
    result = _compute(packed, progress, total_px)
    prob = result[..., :k]
    bur = result[..., k : 2 * k]
    ood = np.ascontiguousarray(result[..., 2 * k])
    reason = result[..., 2 * k + 1].astype(np.uint8)
    return np.ascontiguousarray(prob), np.ascontiguousarray(bur), ood, reason


def _compute(arr: Any, progress: bool | Callable[[int, int], object], total_px: int) -> np.ndarray:
    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if callable(progress):
        return _compute_reporting(arr, progress, total_px, client)
    if client is not None:
        if progress:
            from distributed import progress as dprogress

            fut = client.compute(arr)
            with contextlib.suppress(Exception):
                dprogress(fut, notebook=False)
            return np.asarray(fut.result())
        return np.asarray(client.compute(arr).result())
    if progress:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc="pigment maps"):
            return np.asarray(arr.compute())
    return np.asarray(arr.compute())


def _compute_reporting(
    arr: Any, report: Callable[[int, int], object], total_px: int, client: Any
) -> np.ndarray:
    """Compute a (rows, cols, z) dask array, calling ``report(done_pixels, total_pixels)`` as blocks finish.

    On a ``dask.distributed`` client the row-column blocks are submitted as futures and reported as they
    complete; with a local scheduler a :class:`dask.callbacks.Callback` reports the share of finished tasks.
    The callback always runs in the calling thread.
    """
    report(0, total_px)
    if client is not None:
        from distributed import as_completed

        blocks = arr.to_delayed()  # object array (n_row_blocks, n_col_blocks, 1) of delayed blocks
        futures = client.compute(list(blocks.ravel()))
        where = {f.key: i for i, f in enumerate(futures)}
        sizes = [r * c for r in arr.chunks[0] for c in arr.chunks[1]]
        results: list[Any] = [None] * len(futures)
        done = 0
        for fut in as_completed(futures):
            i = where[fut.key]
            results[i] = fut.result()
            done += sizes[i]
            report(done, total_px)
        grid = np.empty(blocks.shape[:2], dtype=object)
        for i, part in enumerate(results):
            grid[np.unravel_index(i, grid.shape)] = part
        return np.concatenate([np.concatenate(list(row), axis=1) for row in grid], axis=0)

    import queue

    from dask.callbacks import Callback

    finished: queue.SimpleQueue[int] = queue.SimpleQueue()

    class _Count(Callback):
        def _start_state(self, dsk: Any, state: Any) -> None:
            self.total = max(1, len(state["ready"]) + len(state["waiting"]) + len(state["running"]))

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            finished.put(len(state["finished"]))

    counter = _Count()
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            with counter:
                out["value"] = np.asarray(arr.compute())
        except BaseException as exc:  # re-raised in the calling thread
            out["error"] = exc
        finally:
            finished.put(-1)

    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrfnb-dask")
    with worker:
        worker.submit(run)
        while True:
            n = finished.get()
            if n < 0:
                break
            total = getattr(counter, "total", 0)
            if total:
                report(min(total_px - 1, total_px * n // total), total_px)
    if "error" in out:
        raise out["error"]
    return out["value"]


def _note(message: str) -> None:
    """A progress message on stderr that does not break a tqdm bar."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _element_maps(scan: Scan, instrument: Any, progress: bool) -> Any:
    return fit_elements(scan, resolve_instrument(instrument, scan.metadata), progress=progress)
