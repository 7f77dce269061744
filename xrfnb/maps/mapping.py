"""Whole-scan pigment maps (:func:`map_pigments`): streaming and dask inference, masking of bad pixels.

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

Calls checked by physics
------------------------
With ``check_physics`` (the default) the streaming path gathers each pixel's call pattern (the called set
and the count level, ``floor(log2 counts)``) while it maps, with the mean spectrum of up to 32 pixels of
each pattern (:class:`~xrfnb.model.physics_check.CallPatterns`), and then checks each pattern once by
paint-stack fits (:func:`~xrfnb.model.physics_check.check_calls`), the most frequent first: the cost grows
with the number of patterns, not of pixels. The maps carry the pattern of every pixel and the checks
(:attr:`PigmentMaps.pattern`, :attr:`PigmentMaps.patterns`); the network's probabilities are kept as
they are. The dask path does not check (its spectra never reach the client).

The parts live beside this module: :mod:`.blocks` (one block of pixels), :mod:`.sinks` (in memory, or
``OUT.partial/`` with resume), :mod:`.daskpath` (the dask path), :mod:`.pigmentmaps` (the result) and
:mod:`.storage` (writing it safely).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import DataError, FitError, FormatError, ModelError
from ..core.spectrum import Scan, Spectrum, is_dask
from ..fitting.elements import ElementMaps, fit_elements
from ..io.bcf import BcfRows
from ..io.chunks import ChunkReader
from ..model import physics_check
from ..model.physics_check import CRITERION, DEFAULT_MARGIN, CallPattern, CallPatterns
from ..physics.instrument import Instrument, resolve_instrument
from .blocks import default_saturation, process_block
from .daskpath import dask_scan, map_dask
from .pigmentmaps import MASK_OK, MASK_REASONS, PigmentMaps, write_call_patterns
from .sinks import PARTIAL_FORMAT, RESUME_HINT, MemorySink, PartialSink, block_file_bytes
from .storage import (
    check_free_space,
    check_input_outside_working_folder,
    check_output_path,
    format_bytes,
    maps_file_bytes,
    partial_dir,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model.model import PigmentModel

__all__ = ["map_pigments"]

_DEFAULT_CHUNK_PIXELS = 8192
_DEFAULT_BATCH_PIXELS = 4096
#: patterns with fewer pixels are not checked by physics while mapping
PHYSICS_MIN_PIXELS = 16
#: patterns fitted while mapping by default: this many, or one per this many pixels where that is more (the
#: others keep their mean spectrum, for PigmentMaps.check_pattern on demand); a fit costs 0.1-0.4 s, the
#: first about 0.3 s more (the simulator's set-up), against about 10 s of mapping per 131,072 pixels
PHYSICS_MIN_CHECKS = 2
PHYSICS_PIXELS_PER_CHECK = 131_072


# ------------------------------------------------------------------------------------------------------
# the public entry point
# ------------------------------------------------------------------------------------------------------
def _model_identity(model: PigmentModel) -> dict[str, Any]:
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


def _resolve_model(model: PigmentModel | str | os.PathLike | None) -> PigmentModel:
    if model is None or isinstance(model, str | os.PathLike):
        # deferred: the model room loads torch (~2 s): imported when a model is named, so that reading maps
        # (PigmentMaps.from_hdf5, xrfnb info, reports) never pays for it
        from ..model.model import load_model

        return load_model("default" if model is None else model)
    for attr in ("classes", "colors", "thresholds", "ood_threshold", "identify_batch"):
        if not hasattr(model, attr):
            raise ModelError(f"model {model!r} has no {attr!r}: pass a PigmentModel or a model name")
    return model


def _as_scan(scan: Scan | Spectrum) -> Scan:
    if isinstance(scan, Scan):
        return scan

    if isinstance(scan, Spectrum):
        return Scan.from_spectrum(scan)
    raise DataError(f"map_pigments needs a Scan (or a Spectrum), got {type(scan).__name__}")


def map_pigments(
    scan: Scan,
    model: PigmentModel | str | os.PathLike | None = None,
    *,
    chunk_pixels: int = _DEFAULT_CHUNK_PIXELS,
    batch_pixels: int = _DEFAULT_BATCH_PIXELS,
    progress: bool | Callable[[int, int], object] = True,
    element_maps: bool = False,
    instrument: Instrument | str | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    saturation_counts: float | None = None,
    use_dask: bool | None = None,
    check_physics: bool | int = True,
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
        Instrument for the element fit and the physics check (default: ``scan.metadata["instrument"]``
        or ``"bruker-m6"``; the scan's calibration and channel count replace the instrument's).
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
    check_physics : bool or int
        Check call patterns (called set and count level) by paint-stack fits against their merge, split,
        drop and swap alternatives (see the module docstring), each once: the maps then carry ``pattern``
        and ``patterns``, and ``metadata["physics_check"]`` says how many patterns there were, how many
        were checked and changed, and the seconds it took. True fits the most frequent
        :data:`PHYSICS_MIN_CHECKS` patterns with alternatives (or one per :data:`PHYSICS_PIXELS_PER_CHECK`
        pixels where that is more) while mapping; an int fits that many (0: none, every pattern waits);
        the others keep their mean spectrum and say so, and :meth:`PigmentMaps.check_pattern` checks one
        on demand (0.1-0.4 s). Patterns of fewer than :data:`PHYSICS_MIN_PIXELS` pixels are never
        checked. False: no patterns at all. Not on the dask path.

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
        saturation_counts = default_saturation(scan.counts.dtype)
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

    if use_dask or (use_dask is None and is_dask(scan.counts)):
        # the client receives the whole maps: packed (2 K + 2 planes) and then split into their arrays
        _check_memory(2 * rows * cols * (2 * k + 2) * 4, rows, cols, k)
        if out_path is not None:
            check_free_space(out_path.parent, maps_file_bytes(rows, cols, k), out_path)
        scan = dask_scan(scan, rows_per_chunk=scan.block_rows(chunk_pixels))
        prob, bur, ood, reason = map_dask(scan, model, saturation_counts, batch_pixels, progress)
        if callable(progress):
            progress(rows * cols, rows * cols)
        sink: MemorySink | PartialSink | None = None
        tally: CallPatterns | None = None
        pattern_map: np.ndarray | None = None
        if check_physics:
            metadata["physics_check"] = {"note": "not run on the dask path (its spectra stay on the workers)"}
    else:
        step = scan.block_rows(chunk_pixels)
        slices = [slice(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
        if out_path is not None:
            manifest = {
                "format": PARTIAL_FORMAT,
                "input": _input_identity(scan),
                "model": _model_identity(model),
                "shape": [rows, cols],
                "block_rows": step,
            }
            hint = RESUME_HINT.format(dir=partial_dir(out_path))

            def needed(todo: list[slice]) -> int:  # bytes still to write: the blocks left, then the file
                blocks = sum(block_file_bytes((sl.stop - sl.start) * cols, k) for sl in todo)
                return blocks + maps_file_bytes(rows, cols, k)

            if not (resume and partial_dir(out_path).is_dir()):  # nothing created before this check
                check_free_space(out_path.parent, needed(slices), out_path)
            sink = PartialSink(out_path, manifest, resume)
            sink.bytes_left = needed([sl for sl in slices if not sink.done(sl)])
            if resume:
                check_free_space(out_path.parent, sink.bytes_left, out_path, hint)
        else:
            _check_memory(rows * cols * ((2 * k + 1) * 4 + 2), rows, cols, k)
            sink = MemorySink(rows, cols, k)
        tally = _pattern_tally(scan, model) if check_physics else None
        pattern_map = np.full((rows, cols), -1, np.int32) if tally is not None else None
        if check_physics and tally is None:
            metadata["physics_check"] = {"note": "the model names no key elements per class: not checked"}
        metadata["timing_s"] = _stream(
            scan, model, sink, slices, saturation_counts, batch_pixels, progress, tally, pattern_map
        )

    patterns: tuple[CallPattern, ...] = ()
    if tally is not None:
        t_check = time.perf_counter()
        if progress is True and len(tally):
            _note(f"physics check: {len(tally)} call patterns, the most frequent fitted once each ...")
        inst = resolve_instrument(instrument, scan.metadata).with_(
            calibration=scan.calibration, n_channels=int(scan.shape[2])
        )
        if check_physics is True:
            max_checks = max(PHYSICS_MIN_CHECKS, rows * cols // PHYSICS_PIXELS_PER_CHECK)
        else:
            max_checks = max(0, int(check_physics))
        patterns = tally.check(
            inst,
            model.class_elements,
            min_pixels=PHYSICS_MIN_PIXELS,
            max_checks=max_checks,
            margin=DEFAULT_MARGIN,
            check=physics_check.check_calls,
        )
        metadata["physics_check"] = {
            "criterion": CRITERION,
            "margin": DEFAULT_MARGIN,
            "patterns": len(patterns),
            "checked": sum(p.check is not None for p in patterns),
            "max_checks": max_checks,
            "changed": sum(p.changed for p in patterns),
            "pixels_changed": sum(p.n_pixels for p in patterns if p.changed),
            "seconds": round(time.perf_counter() - t_check, 3),
            "instrument": inst.to_dict(),
            "class_elements": {c: list(v) for c, v in model.class_elements.items()},
        }

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

    if isinstance(sink, PartialSink):
        masked = _count_reasons_blocks(sink, slices)
        metadata["masked"] = masked
        sink.assemble(classes, model.colors, model.thresholds, model.ood_threshold, metadata, slices, em)
        if pattern_map is not None:
            _add_call_patterns(out_path, pattern_map, patterns)
        maps = PigmentMaps.from_hdf5(out_path, lazy=True)
        return dataclasses.replace(maps, element_maps=em) if em is not None else maps
    if isinstance(sink, MemorySink):
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
        pattern=pattern_map,
        patterns=patterns,
    )
    if out_path is not None:
        maps.to_hdf5(out_path)
    return maps


def _pattern_tally(scan: Scan, model: PigmentModel) -> CallPatterns | None:
    """The call-pattern gatherer of a run, or None for a model without key elements per class."""
    if not isinstance(getattr(model, "class_elements", None), dict):
        return None
    return CallPatterns(model.classes, model.thresholds, model.ood_threshold, int(scan.shape[2]))


def _add_call_patterns(path: Path, pattern_map: np.ndarray, patterns: tuple[CallPattern, ...]) -> None:
    """Add the pattern map and the checks to a maps file just assembled (a few bytes per pixel)."""
    import h5py

    check_free_space(path.parent, pattern_map.nbytes + (1 << 20), path)
    try:
        with h5py.File(path, "r+") as f:
            write_call_patterns(f, pattern_map, patterns)
    except OSError as exc:
        raise FormatError(f"{path}: could not add the call patterns ({exc})") from None


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


def _count_reasons_blocks(sink: PartialSink, slices: list[slice]) -> dict[str, int]:
    counts = dict.fromkeys(MASK_REASONS.values(), 0)
    for sl in slices:
        reason = sink.read(sl)["mask_reason"]
        for code, name in MASK_REASONS.items():
            counts[name] += int((reason == code).sum())
    return counts


def _stream(
    scan: Scan,
    model: PigmentModel,
    sink: MemorySink | PartialSink,
    slices: list[slice],
    saturation_counts: float | None,
    batch_pixels: int,
    progress: bool | Callable[[int, int], object],
    tally: CallPatterns | None = None,
    pattern_map: np.ndarray | None = None,
) -> dict[str, float]:
    """Read -> identify -> write over the row blocks; returns seconds spent per stage.

    ``read`` is the time spent reading blocks (in the background thread), ``wait`` the part of it the
    main thread waited for, ``identify`` masking plus the model, ``write`` the sink, ``patterns`` the
    call patterns gathered into ``tally`` and ``pattern_map`` (blocks done by an interrupted run that is
    resumed are read again for them).
    """
    from tqdm.auto import tqdm

    timing = {"read": 0.0, "wait": 0.0, "identify": 0.0, "write": 0.0, "patterns": 0.0}
    rows, cols, _ = scan.shape
    todo = [sl for sl in slices if not sink.done(sl)]
    lt_all = scan.live_time_s

    fast = ChunkReader.maybe(scan.counts)
    done_px = rows * cols - sum((s.stop - s.start) * cols for s in todo)  # finished before (resume)
    # a .bcf map decodes into two arrays used in turn (the block identified, the next one being read):
    # fresh arrays of this size would be fresh pages from the kernel for every block
    into = isinstance(scan.counts, BcfRows) and fast is None
    buffers: list[np.ndarray] = []

    def read(sl: slice, turn: int | None = None) -> np.ndarray:
        t = time.perf_counter()
        if fast is not None:
            block = fast.read_rows(sl.start, sl.stop)
        elif into and turn is not None:
            if len(buffers) <= turn % 2:  # read in one thread, one block at a time
                step = max(s.stop - s.start for s in todo)
                buffers.append(np.empty((step, *scan.shape[1:]), scan.counts.dtype))
            buf = buffers[turn % 2]
            block = scan.counts.read_rows(sl.start, sl.stop, out=buf[: sl.stop - sl.start])
        else:
            block = np.asarray(scan.counts[sl])
        timing["read"] += time.perf_counter() - t
        return block

    recorder = _TotalsRecorder(model) if tally is not None else model

    def gather(sl: slice, block: np.ndarray, prob: np.ndarray, bur: np.ndarray, ood: np.ndarray,
               reason: np.ndarray) -> None:
        if tally is None or pattern_map is None:
            return
        t = time.perf_counter()
        n, k = block.shape[0] * block.shape[1], prob.shape[-1]
        valid = reason.reshape(n) == MASK_OK
        totals = recorder.take(valid) if isinstance(recorder, _TotalsRecorder) else None
        ids = tally.add(block.reshape(n, -1), prob.reshape(n, k), bur.reshape(n, k), ood.reshape(n), valid,
                        totals)
        pattern_map[sl] = ids.reshape(block.shape[:2])
        timing["patterns"] += time.perf_counter() - t

    if tally is not None and isinstance(sink, PartialSink):  # blocks of the interrupted run: their patterns
        for sl in slices:
            if sink.done(sl) and sl not in todo:
                z = sink.read(sl)
                gather(sl, read(sl), z["probability"], z["buried_probability"], z["ood_score"],
                       z["mask_reason"])

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
        pending = pool.submit(read, todo[0], 0) if todo else None
        for i, sl in enumerate(todo):
            t0 = time.perf_counter()
            block = pending.result()
            t1 = time.perf_counter()
            pending = pool.submit(read, todo[i + 1], i + 1) if i + 1 < len(todo) else None
            lt = lt_all[sl] if isinstance(lt_all, np.ndarray) else lt_all
            prob, bur, ood, reason = process_block(
                block, recorder, scan.calibration, lt, saturation_counts, batch_pixels
            )
            t2 = time.perf_counter()
            gather(sl, block, prob, bur, ood, reason)  # timed as "patterns"
            del block
            t2b = time.perf_counter()
            sink.write(sl, prob, bur, ood, reason)
            t3 = time.perf_counter()
            timing["wait"] += t1 - t0
            timing["identify"] += t2 - t1
            timing["write"] += t3 - t2b
            bar.update((sl.stop - sl.start) * cols)
            done_px += (sl.stop - sl.start) * cols
            if report is not None:
                report(done_px, rows * cols)
    return {k: round(v, 3) for k, v in timing.items()}


class _TotalsRecorder:
    """The model as :func:`process_block` sees it, keeping the counts each ``identify_batch`` returns
    (``BatchIdentification.total_counts``, the model's grid counts), so the call patterns' count levels
    cost no second pass over the spectra."""

    def __init__(self, model: PigmentModel) -> None:
        self._model = model
        self._totals: list[np.ndarray | None] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def identify_batch(self, counts: np.ndarray, calibration: Any = None, live_time_s: Any = None) -> Any:
        res = self._model.identify_batch(counts, calibration, live_time_s=live_time_s)
        self._totals.append(getattr(res, "total_counts", None))
        return res

    def take(self, valid: np.ndarray) -> np.ndarray | None:
        """The block's counts per spectrum (0 where masked); None when the model returned none (the
        patterns then sum the counts). The model saw the valid spectra, or every spectrum of the block
        (:func:`process_block` with few masked pixels)."""
        parts, self._totals = self._totals, []
        n = sum(len(p) for p in parts) if all(p is not None for p in parts) else -1
        if n not in (int(valid.sum()), valid.size):
            return None
        out = np.zeros(valid.size, np.float64)
        if parts and n == valid.size:
            out[:] = np.concatenate(parts)
            out[~valid] = 0.0
        elif parts:
            out[valid] = np.concatenate(parts)
        return out


def _note(message: str) -> None:
    """A progress message on stderr that does not break a tqdm bar."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _element_maps(scan: Scan, instrument: Instrument | str | None, progress: bool) -> ElementMaps:
    return fit_elements(scan, resolve_instrument(instrument, scan.metadata), progress=progress)
