"""Work the dashboard does off the event loop: reading a scan and mapping its pigments.

A :class:`MappingJob` is what a worker thread and the session share: the worker writes progress and the
result into it; the session's periodic poll (:class:`JobRunner`, on the document's event loop) shows the
progress and hands the finished job back. Setting :attr:`MappingJob.cancelled` makes the worker stop at
its next progress report.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import numpy as np
import panel as pn

from ..._errors import XRFNBError
from ...core.spectrum import Scan
from ...fitting.elements import fit_elements
from ...maps.mapping import map_pigments
from ...maps.pigmentmaps import PigmentMaps
from ...physics.instrument import resolve_instrument

if TYPE_CHECKING:  # pragma: no cover
    from ...model.model import PigmentModel

__all__ = ["Cancelled", "JobRunner", "MappingJob", "map_with_progress", "reraise_for_user"]

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
        Progress: pixels mapped of all pixels (1 of 1 for a load).
    stage : str
        What the worker does now ("pigment maps", "element maps").
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
    stage: str = ""
    loaded: tuple[Scan, np.ndarray] | None = None
    maps: PigmentMaps | None = None
    error: BaseException | None = None
    warning: str | None = None
    finished: bool = False
    cancelled: bool = False

    @property
    def percent(self) -> int:
        """Progress in percent, 0 to 100."""
        return int(100 * self.done / max(self.total, 1))

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
        Called with the percentage done at each poll.
    on_finished : callable
        Called with the finished job (on the event loop).
    """

    def __init__(self, on_progress: Callable[[int], None], on_finished: Callable[[MappingJob], None]) -> None:
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
        self._on_progress(job.percent)
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


def map_with_progress(
    scan: Scan, model: PigmentModel, job: MappingJob, *, chunk_pixels: int = 16384, element_maps: bool = True
) -> PigmentMaps:
    """Pigment maps of ``scan`` with :func:`xrfnb.map_pigments`, reporting progress in ``job``.

    ``job.done`` and ``job.total`` (pixels) follow map_pigments' progress callback, block by block;
    a cancelled job stops after the current block (:class:`Cancelled`). Element maps
    (:func:`xrfnb.fit_elements`, with the scan's instrument) follow as a second stage (``job.stage``);
    a failing element fit is reported in ``job.warning`` and leaves ``element_maps`` None.
    """
    rows, cols, _ = scan.shape
    job.total = rows * cols
    job.stage = "pigment maps"
    maps = map_pigments(scan, model, chunk_pixels=chunk_pixels, progress=job.report)
    if not element_maps:
        return maps
    job.stage = "element maps"
    try:
        em = fit_elements(scan, resolve_instrument(None, scan.metadata))
    except XRFNBError as exc:
        job.warning = f"element maps could not be fitted: {exc}"
        return maps
    return dataclasses.replace(maps, element_maps=em)
