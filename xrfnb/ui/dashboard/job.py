"""Work the dashboard does off the event loop: reading a scan and mapping its pigments.

A :class:`MappingJob` is what a worker thread and the session share: the worker writes what it is doing
(:attr:`MappingJob.stage`), its progress and the result into it; the session's periodic poll
(:class:`JobRunner`, on the document's event loop) shows the progress and hands the finished job back.
Setting :attr:`MappingJob.cancelled` makes the worker stop at its next progress report.

Every step that can take more than a second reports: reading the file (the rows read for the
total-counts image), loading the model, the pigment maps (pixels), and the element fit, which reads
the scan twice (sum spectrum, then the pixels: rows) with the element detection and the fit's set-up
between them (:class:`RowProgress` counts the rows a step reads).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import numpy as np
import panel as pn

from ..._errors import XRFNBError
from ...core.spectrum import Scan, is_dask
from ...fitting.elements import fit_elements
from ...maps.mapping import map_pigments
from ...maps.pigmentmaps import PigmentMaps
from ...physics.instrument import Instrument, resolve_instrument

if TYPE_CHECKING:  # pragma: no cover
    from ...fitting.elements import ElementMaps
    from ...model.model import PigmentModel

__all__ = [
    "Cancelled",
    "JobRunner",
    "MappingJob",
    "RowProgress",
    "fit_elements_with_progress",
    "map_with_progress",
    "read_with_progress",
    "reraise_for_user",
]

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised from the progress callback to stop a mapping job nobody waits for any more."""


@dataclasses.dataclass(eq=False)
class MappingJob:
    """One piece of background work of a dashboard session: reading a scan or mapping its pigments.

    Mutable on purpose: the worker thread writes its progress and result here while the session polls.

    Attributes
    ----------
    kind : str
        ``"load"`` (read a scan and make its total-counts image) or ``"map"`` (pigment and element maps).
    label : str
        The scan's name as the user knows it.
    key : hashable or None
        Cache key of the result (None: not cached).
    scan : Scan or None
        The scan being mapped (a "map" job), to tell whether its result is still wanted.
    done, total : int
        Progress of the current stage: pixels mapped of all pixels, rows read of all rows.
    determinate : bool
        Whether ``done`` of ``total`` measures the current stage (False: a step with no count, e.g. the
        element detection; a progress bar then only shows that something is happening).
    stage : str
        What the worker does now, for people ("pigment maps", "element maps: fitting the pixels").
    stage_started : float
        When the current stage began (``time.monotonic()``).
    loaded : (Scan, numpy.ndarray) or None
        A load's result: the scan and its total-counts image (rows, cols).
    maps : PigmentMaps or None
        A mapping's result.
    error : BaseException or None
        What the worker raised.
    warning : str or None
        A problem the result has (element maps that could not be fitted).
    finished : bool
        Whether the worker has ended (result or error set).
    cancelled : bool
        Set by the session: the worker stops at its next progress report.
    """

    kind: str
    label: str = ""
    key: Hashable | None = None
    scan: Scan | None = None
    done: int = 0
    total: int = 1
    determinate: bool = True
    stage: str = ""
    stage_started: float = dataclasses.field(default_factory=time.monotonic)
    loaded: tuple[Scan, np.ndarray] | None = None
    maps: PigmentMaps | None = None
    error: BaseException | None = None
    warning: str | None = None
    finished: bool = False
    cancelled: bool = False

    @property
    def percent(self) -> int:
        """Progress of the current stage in percent, 0 to 100 (0 while it is not determinate)."""
        return int(100 * self.done / max(self.total, 1)) if self.determinate else 0

    def set_stage(self, stage: str, total: int | None = None) -> None:
        """Begin a stage: ``stage`` says what the worker does, ``total`` how many units it counts
        (None: it counts nothing, see :attr:`determinate`).

        Raises
        ------
        Cancelled
            When the job was cancelled: the worker stops here.
        """
        self.stage, self.stage_started = stage, time.monotonic()
        self.determinate = total is not None
        self.done, self.total = 0, max(1, int(total or 1))
        if self.cancelled:
            raise Cancelled

    def describe(self, now: float | None = None) -> str:
        """The current stage for the progress line: what, how far, how long so far
        ("element maps: fitting the pixels, 64 of 128 rows (3 s)")."""
        elapsed = (time.monotonic() if now is None else now) - self.stage_started
        text = self.stage or "working"
        if self.determinate and self.unit:
            text += f", {self.done:,} of {self.total:,} {self.unit}"
        return f"{text} ({elapsed:.0f} s)" if elapsed >= 1 else f"{text} ..."

    @property
    def unit(self) -> str:
        """What :attr:`done` counts: "pixels" (mapping) or "rows" (reading)."""
        return "pixels" if self.stage.endswith("pigment maps") else "rows"

    def report(self, done: int, total: int) -> None:
        """Progress callback (``map_pigments(progress=job.report)``): record ``done`` of ``total`` pixels.

        Raises
        ------
        Cancelled
            When the job was cancelled: the worker stops here.
        """
        self.done, self.total = int(done), max(1, int(total))
        if self.cancelled:
            raise Cancelled

    def follow(self, other: MappingJob | None, what: str) -> None:
        """While waiting for ``other`` (another session's job making the result this one needs), show
        its stage and progress, saying ``what`` it does ("another session maps this file").

        Raises
        ------
        Cancelled
            When this job was cancelled: it stops waiting.
        """
        if self.cancelled:
            raise Cancelled
        if other is None:
            if not self.stage.startswith(what):
                self.set_stage(what)
            return
        self.stage = f"{what}: {other.stage}" if other.stage else what
        self.stage_started = other.stage_started
        self.determinate, self.done, self.total = other.determinate, other.done, other.total

    def run(self, work: Callable[[MappingJob], None]) -> None:
        """Run ``work(self)``, keeping what it raises in :attr:`error`; :attr:`finished` at the end."""
        try:
            work(self)
        except BaseException as exc:  # reported to the session by the poll
            self.error = exc
        finally:
            self.finished = True


class JobRunner:
    """Runs one :class:`MappingJob` at a time for a session: a daemon thread does the work, a periodic
    callback (every 250 ms, on the session's event loop) reports progress and the finished job.

    Parameters
    ----------
    on_progress : callable
        Called with the running job at each poll (its stage, progress and time so far).
    on_finished : callable
        Called with the finished job (on the event loop).
    """

    def __init__(
        self, on_progress: Callable[[MappingJob], None], on_finished: Callable[[MappingJob], None]
    ) -> None:
        self._on_progress = on_progress
        self._on_finished = on_finished
        self.job: MappingJob | None = None
        self._callback: pn.io.PeriodicCallback | None = None

    def start(self, job: MappingJob, work: Callable[[MappingJob], None]) -> None:
        """Drop the running job and run ``work(job)`` in a daemon thread."""
        self.drop()
        self.job = job
        threading.Thread(target=job.run, args=(work,), name=f"xrfnb-{job.kind}", daemon=True).start()
        self._callback = pn.state.add_periodic_callback(self.poll, period=250)

    def drop(self) -> None:
        """Forget the running job (its thread stops at its next progress report, or its result is
        ignored) and its poller."""
        if self.job is not None:
            self.job.cancelled = True
        self._stop_polling()
        self.job = None

    def poll(self) -> None:
        """Report the job's progress; hand it over when it has finished."""
        job = self.job
        if job is None:
            return
        self._on_progress(job)
        if job.finished:
            self._stop_polling()
            self.job = None
            self._on_finished(job)

    def _stop_polling(self) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None


def reraise_for_user(exc: BaseException, what: str) -> None:
    """Raise a worker's exception in the session: XRFNBError and MemoryError as they are (the guard
    words them), anything else logged with its traceback and raised as an XRFNBError saying ``what``."""
    if isinstance(exc, XRFNBError):
        raise exc
    if isinstance(exc, MemoryError):
        raise MemoryError
    log.error("%s", what, exc_info=exc)
    raise XRFNBError(f"{what} ({type(exc).__name__}: {exc}); see the server log")


class RowProgress:
    """A scan's counts that report the rows read: ``RowProgress(scan.counts, on_rows)`` reads like the
    counts and calls ``on_rows(n)`` after each block of ``n`` rows (a slice of the first axis) is read.

    Wrapped in a :class:`~xrfnb.core.spectrum.Scan` (``dataclasses.replace(scan, counts=...)``), it lets
    the dashboard show how far a step that reads the scan block by block has got without that step
    knowing (the element fit, the total-counts image). Dask counts are read through it unchunked.
    """

    def __init__(self, counts: Any, on_rows: Callable[[int], None]) -> None:
        self._counts, self._on_rows = counts, on_rows
        self.shape, self.dtype = tuple(counts.shape), np.dtype(counts.dtype)
        self.chunks = None if is_dask(counts) else getattr(counts, "chunks", None)

    def __getitem__(self, key: Any) -> np.ndarray:
        block = self._counts[key]
        block = block.compute() if is_dask(block) else np.asarray(block)
        if isinstance(key, slice):
            self._on_rows(len(range(*key.indices(self.shape[0]))))
        return block


def read_with_progress(read: Callable[[], Scan], label: str, job: MappingJob) -> tuple[Scan, np.ndarray]:
    """``(scan, total counts per pixel (rows, cols))``: ``read()`` the scan, then sum each pixel's
    counts, reporting both stages in ``job`` (the second in rows read)."""
    job.set_stage(f"reading {label}")
    scan = read()
    rows = scan.shape[0]
    job.set_stage("summing each pixel's counts", total=rows)

    def on_rows(n: int) -> None:
        job.report(job.done + n, rows)

    total = dataclasses.replace(scan, counts=RowProgress(scan.counts, on_rows)).total_counts_image()
    return scan, total


def fit_elements_with_progress(
    scan: Scan, job: MappingJob, instrument: Instrument | None = None
) -> ElementMaps:
    """Element maps of ``scan`` (:func:`xrfnb.fit_elements` with ``instrument``, default the scan's),
    reporting in ``job`` what the fit does.

    The fit reads the scan twice, block by block: once for the sum spectrum, once for the pixels; in
    between it detects the elements and builds its design matrix (seconds, with nothing to count). The
    rows it reads tell which of these it is doing.
    """
    rows = scan.shape[0]
    read = 0

    def on_rows(n: int) -> None:
        nonlocal read
        if read == rows:  # the second pass begins: the pixels
            job.set_stage("element maps: fitting the pixels", total=rows)
        read += n
        job.report(min(job.done + n, rows), rows)
        if read == rows:  # the sum spectrum is complete: detection and set-up follow, uncounted
            job.set_stage("element maps: detecting the elements, setting up the fit")

    job.set_stage("element maps: summing the spectra", total=rows)
    counted = dataclasses.replace(scan, counts=RowProgress(scan.counts, on_rows))
    inst = instrument if instrument is not None else resolve_instrument(None, scan.metadata)
    return fit_elements(counted, inst, progress=False)


def map_with_progress(
    scan: Scan,
    model: PigmentModel,
    job: MappingJob,
    *,
    chunk_pixels: int = 16384,
    element_maps: bool = True,
    instrument: Instrument | None = None,
) -> PigmentMaps:
    """Pigment maps of ``scan`` with :func:`xrfnb.map_pigments`, reporting progress in ``job``.

    ``job.done`` and ``job.total`` (pixels) follow map_pigments' progress callback, block by block;
    a cancelled job stops after the current block (:class:`Cancelled`). Element maps
    (:func:`fit_elements_with_progress`) follow in stages of their own (``job.stage``); a failing
    element fit is reported in ``job.warning`` and leaves ``element_maps`` None. ``instrument`` (default:
    the scan's, as :func:`xrfnb.map_pigments` resolves it) serves the physics check and the element fit.
    """
    rows, cols, _ = scan.shape
    job.set_stage("pigment maps", total=rows * cols)

    def on_pixels(done: int, total: int) -> None:
        job.report(done, total)
        if done >= total:  # every pixel identified: what map_pigments does next is not counted
            job.set_stage("pigment maps: finishing")

    maps = map_pigments(scan, model, chunk_pixels=chunk_pixels, progress=on_pixels, instrument=instrument)
    if not element_maps:
        return maps
    try:
        em = fit_elements_with_progress(scan, job, instrument=instrument)
    except XRFNBError as exc:
        # the fit's advice to API users ("pass elements=[...]") means nothing on the page
        why = re.sub(r": pass elements=\[.*$", "", str(exc))
        job.warning = f"no element maps for this scan: {why} (the pigment calls do not depend on them)"
        return maps
    return dataclasses.replace(maps, element_maps=em)
