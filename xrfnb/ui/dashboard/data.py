"""The dashboard's "Data" section: the scan chooser, the upload dropper, the model chooser and the
progress bar, and the work behind them: opening a scan and mapping its pigments (off the event loop in a
server session, :mod:`.job`)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import panel as pn
import param

from ..._errors import DataError, XRFNBError
from ...core.spectrum import Scan
from ...io.load import load
from ...physics.scenes import render_scan
from .calibration import looks_uncalibrated
from .common import DEMO_LABEL, NO_MODEL, NO_SCAN, escape_html, guarded, size_text
from .files import (
    MAPS,
    SCANS,
    BoundedFileDropper,
    available_models,
    list_data_files,
    load_model_cached,
    resolve_inside,
    safe_filename,
    to_scan,
)
from .job import Cancelled, JobRunner, MappingJob, map_with_progress, read_with_progress, reraise_for_user

if TYPE_CHECKING:  # pragma: no cover
    from ...maps.pigmentmaps import PigmentMaps
    from .app import Dashboard

__all__ = ["DataPanel", "demo_scan", "file_key", "warm_up"]

log = logging.getLogger(__name__)

#: what a session waiting for another's maps of the same file says, by the other job's kind
_WAITING_FOR = {
    "warm-up": "the server maps this file since it started",
    "map": "another session maps this file",
}


def demo_scan() -> Scan:
    """The demo scene's scan, rendered once for all sessions (kept in ``SCANS`` under ``("demo",)``)."""
    return SCANS.get_or_make(("demo",), lambda: to_scan(render_scan("hidden-painting"), DEMO_LABEL))


def file_key(path: Path) -> tuple[str, int, int]:
    """The cache key of a file's scan: ``(path, mtime in ns, size in bytes)`` (a changed file is read
    anew)."""
    stat = path.stat()
    return (str(path), stat.st_mtime_ns, stat.st_size)


def warm_up(data_dir: Path | None, initial: str | None) -> threading.Thread:
    """Read and map, in a daemon thread, the scan the first session will open, so that it finds them ready.

    What a new session opens first (:func:`~xrfnb.ui.dashboard.app.make_app`): ``initial`` (a file in
    ``data_dir``), or the demo scene when no folder is served, or nothing. The scan goes into ``SCANS`` and
    its pigment and element maps, made with the first model offered (``"default"``), into ``MAPS``, under
    the keys a session uses; a session that opens it while this thread is still at work waits for it and
    shows its progress (:meth:`~.files.LRUCache.get_or_make`). Nothing is mapped without a model, or for a
    scan without a usable energy calibration (the session leads the user to the calibration card). Failures
    are logged: the session that opens the scan then meets them itself.

    Returns
    -------
    threading.Thread
        The started thread (``join()`` waits for the scan and its maps).
    """

    def work() -> None:
        if initial is not None and data_dir is not None:
            path = resolve_inside(data_dir, initial)
            key: Hashable = file_key(path)
            scan = SCANS.get_or_make(key, lambda: to_scan(load(path), initial))
        elif data_dir is None:
            key, scan = ("demo",), demo_scan()
        else:
            return
        models = available_models()
        if not models or looks_uncalibrated(scan):
            return
        job = MappingJob("warm-up", label=str(initial or DEMO_LABEL), scan=scan, stage="loading the model")

        def make() -> PigmentMaps:
            job.maps = map_with_progress(scan, load_model_cached(models[0]), job)
            return job.maps

        MAPS.get_or_make((key, models[0]), make, maker=job)

    def run() -> None:
        what = initial or DEMO_LABEL
        try:
            work()
        except XRFNBError as exc:  # the session opening it meets the same failure, in its own words
            log.warning("could not prepare %s at the server's start: %s", what, exc)
        except Exception:
            log.warning("could not prepare %s at the server's start", what, exc_info=True)

    thread = threading.Thread(target=run, name="xrfnb-warm-up", daemon=True)
    thread.start()
    return thread


class DataPanel(pn.viewable.Viewer):
    """Opening scans and mapping their pigments for a :class:`~xrfnb.ui.dashboard.Dashboard`.

    Parameters
    ----------
    dash : Dashboard
        The dashboard that shows what is opened.
    data_dir : pathlib.Path or None
        The served data folder (resolved), or None.
    max_upload_bytes : int
        Largest accepted upload.
    blocking : bool or None
        Run work in the caller's thread (None: when no server session is active).

    Attributes
    ----------
    upload_dir : pathlib.Path or None
        The session's private folder of uploads (removed with the session).
    jobs : JobRunner
        The background work of the session.
    """

    def __init__(
        self, dash: Dashboard, data_dir: Path | None, max_upload_bytes: int, blocking: bool | None
    ) -> None:
        super().__init__()
        self._dash = dash
        self._data_dir = data_dir
        self.max_upload_bytes = max_upload_bytes
        self._blocking = blocking
        self.upload_dir: Path | None = None
        self.jobs = JobRunner(self._on_job_progress, self.finish_job)
        self.progress_bar = pn.indicators.Progress(
            value=0, max=100, width=280, visible=False, bar_color="info"
        )
        #: what the background work is doing, how far it has got and for how long, under the bar
        self.progress_text = pn.pane.HTML(
            "", width=280, visible=False, styles={"font-size": "12px"}, css_classes=["xrfnb-progress"]
        )
        # the choices before the widgets: the model's first choice is set without events (no reload), which
        # a Select made earlier would never see (it showed the placeholder instead of "default")
        self.refresh_choices()
        self.source_w = pn.widgets.Select.from_param(
            dash.param.source, label="Scan (served folder)", width=280
        )
        self.upload = BoundedFileDropper(
            max_upload_bytes,
            self._on_upload_refused,
            max_file_size=f"{max(1, int(max_upload_bytes / 2**20))}MB",
            multiple=False,
            width=280,
            height=90,
        )
        self.upload.param.watch(self._on_upload, "value")
        self.model_w = pn.widgets.Select.from_param(dash.param.model_name, label="Model", width=280)

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self.source_w, self.upload, self.model_w, self.progress_bar, self.progress_text)

    def notify(self, message: str, level: str = "error") -> None:
        """Tell the user (the dashboard's status line and notifications)."""
        self._dash.notify(message, level)

    def refresh_choices(self) -> None:
        """The scans (demo and served folder) and models that can be chosen."""
        d = self._dash
        sources = [NO_SCAN, DEMO_LABEL]
        if self._data_dir is not None:
            sources.extend(list_data_files(self._data_dir))
        d.param.source.objects = sources
        if d.source not in sources:
            d.source = NO_SCAN
        models = available_models() if d.model_obj is None else ["(given model)"]
        d.param.model_name.objects = models or [NO_MODEL]
        if d.model_name not in d.param.model_name.objects:
            with param.parameterized.discard_events(d):
                d.model_name = d.param.model_name.objects[0]

    def __del__(self) -> None:
        if getattr(self, "upload_dir", None) is not None:
            shutil.rmtree(self.upload_dir, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------------
    @guarded
    def on_source(self, event: param.parameterized.Event) -> None:
        if event.new == NO_SCAN:
            return
        self.open(event.new)

    def open(self, name: str) -> None:
        """Open a scan: a path inside the served folder, or :data:`DEMO_LABEL`; then map it.

        In a server session the file is read (and its total-counts image made) in a worker thread, so
        that one large file never stalls the other sessions; the scan is shown when it is ready.
        """
        if name == DEMO_LABEL:
            self.load_in_background(demo_scan, DEMO_LABEL, ("demo",))
            return
        if self._data_dir is None:
            raise DataError(
                "no data folder is served: start the dashboard with a folder to open files from it"
            )
        path = resolve_inside(self._data_dir, name)
        self.open_path(path, label=name)

    def open_path(self, path: Path, label: str, cache: bool = True) -> None:
        key = file_key(path)

        def read() -> Scan:
            # two sessions opening the file at once read it once (the second waits for the first)
            if cache:
                return SCANS.get_or_make(key, lambda: to_scan(load(path), label))
            return to_scan(load(path), label)

        self.load_in_background(read, label, key if cache else None)

    def is_blocking(self) -> bool:
        """Whether work runs in the caller's thread (no server session: tests, notebooks)."""
        return self._blocking if self._blocking is not None else pn.state.curdoc is None

    def load_in_background(self, read: Callable[[], Scan], label: str, cache_key: Hashable | None) -> None:
        """``read()`` the scan and make its total-counts image off the event loop, then show and map it.

        Blocking (no server session): all at once, here. In a session: a worker thread does the
        reading; the session's periodic poll (:class:`~xrfnb.ui.dashboard.job.JobRunner`, on the
        document's event loop, so with the document lock held) shows the result. Opening something
        else meanwhile drops this job.
        """
        d = self._dash

        def work(job: MappingJob) -> None:
            job.loaded = read_with_progress(read, label, job)

        if self.is_blocking():
            scan = read()
            self.show_loaded(scan, label, scan.total_counts_image(), cache_key)
            return
        d.show_status(f"Opening {label} ...")
        self.start_job(MappingJob("load", label=label, key=cache_key, stage=f"reading {label}"), work)

    @guarded
    def _on_upload(self, event: param.parameterized.Event) -> None:
        value = event.new or {}
        if not value:
            return
        name, data = next(iter(value.items()))
        self.load_upload(name, data)

    def _on_upload_refused(self, filename: str, received_bytes: int) -> None:
        d = self._dash
        d.notify(
            f"upload {safe_filename(filename)!r} refused after {size_text(received_bytes)}: larger than "
            f"the {size_text(self.max_upload_bytes)} limit; copy it into the served data folder instead",
            "error",
        )

    def load_upload(self, filename: str, data: bytes | str) -> None:
        """Open an uploaded file (bytes) after checking its size; it is kept in a private temp folder."""
        if isinstance(data, str):
            data = data.encode()
        if len(data) > self.max_upload_bytes:
            raise DataError(
                f"upload {filename!r} is {size_text(len(data))}, larger than the "
                f"{size_text(self.max_upload_bytes)} limit: copy it into the served data folder instead"
            )
        if not data:
            raise DataError(f"upload {filename!r} is empty")
        if self.upload_dir is None:
            self.upload_dir = Path(tempfile.mkdtemp(prefix="xrfnb-upload-"))
            try:
                pn.state.on_session_destroyed(lambda ctx: shutil.rmtree(self.upload_dir, ignore_errors=True))
            except Exception:  # no session (tests): removed by __del__
                pass
        path = self.upload_dir / safe_filename(filename)
        path.write_bytes(data)
        self.open_path(path, label=f"upload: {safe_filename(filename)}", cache=False)

    # -- mapping ----------------------------------------------------------------------------------
    def map_current(self, cache_key: Hashable | None = None) -> None:
        """Run the model on the current scan (background thread in a server session) with progress."""
        d = self._dash
        if d.scan is None or d.maps is not None:
            return
        if not d.model_available():
            d.update_status()
            return
        if d.needs_calibration():  # the model would refuse it: lead the user to the calibration card
            d.calibration_panel.card.collapsed = False
            d.update_status()
            return
        name = d.model_name
        given = d.model_obj
        instrument = d.calibration_panel.used_instrument()  # None: the scan's (file's or preset's)
        key = self.maps_key(cache_key)
        cached = MAPS.get(key) if key is not None else None
        if cached is not None:
            d.set_maps(cached)
            d.update_status()
            return
        job = MappingJob("map", label=d.label, scan=d.scan, key=key, stage="loading the model")

        def make(job: MappingJob) -> PigmentMaps:
            job.set_stage("loading the model")
            model = given if given is not None else load_model_cached(name)
            return map_with_progress(job.scan, model, job, instrument=instrument)

        def work(job: MappingJob) -> None:
            if key is None:
                job.maps = make(job)
                return
            # a session opening the file while another maps it waits for those maps (one run of the
            # model and of the element fit per file), showing the other's progress; should the other
            # session drop its job (Cancelled), this one maps the file itself
            followed: list[MappingJob] = []

            def on_wait(other: object) -> None:
                if isinstance(other, MappingJob):
                    followed[:] = [other]
                what = (
                    _WAITING_FOR.get(followed[0].kind, _WAITING_FOR["map"])
                    if followed
                    else _WAITING_FOR["map"]
                )
                job.follow(followed[0] if followed else None, what)

            job.maps = MAPS.get_or_make(
                key, lambda: make(job), maker=job, on_wait=on_wait, retry_on=(Cancelled,)
            )
            if followed and followed[0].maps is job.maps and followed[0].warning:
                job.warning = followed[0].warning

        d.show_status(f"Mapping pigments in {d.label} ...", visible=None)
        if self.is_blocking():
            d.busy = True
            try:
                work(job)
            except Exception as exc:  # worded for the user by _finish_job, as from a worker
                job.error = exc
            job.finished = True
            self.finish_job(job)
            return
        self.start_job(job, work)

    def show_loaded(self, scan: Scan, label: str, total: np.ndarray, cache_key: Hashable | None) -> None:
        """Show a scan just read (``total``: its total counts per pixel) and map it. Maps already made
        (by another session, or at the server's start: :func:`warm_up`) come with the scan, so that the
        page is updated once, not for the scan and then again for its maps."""
        d = self._dash
        key = self.maps_key(cache_key) if d.model_available() else None
        cached = MAPS.get(key) if key is not None and not looks_uncalibrated(scan) else None
        d.set_scan(scan, maps=cached, label=label, total=total)
        self.map_current(cache_key=cache_key)

    def maps_key(self, cache_key: Hashable | None) -> Hashable | None:
        """The key of the open scan's maps in ``MAPS`` (shared by sessions): its scan's key and the model;
        None when they are not shared (no scan key, or maps made with this session's fitted instrument)."""
        d = self._dash
        if cache_key is None or d.calibration_panel.used_instrument() is not None:
            return None
        given = d.model_obj
        return (cache_key, d.model_name if given is None else id(given))

    def start_job(self, job: MappingJob, work: Callable[[MappingJob], None]) -> None:
        d = self._dash
        d.busy = True
        d.progress = 0
        self.progress_bar.visible = True
        self.progress_text.visible = True
        self.show_progress(job)
        self.jobs.start(job, work)

    def _on_job_progress(self, job: MappingJob) -> None:
        self.show_progress(job)

    def show_progress(self, job: MappingJob) -> None:
        """Show what ``job`` is doing: the bar (moving to and fro for a step with nothing to count) and
        the line under it (stage, how far, seconds so far)."""
        d = self._dash
        d.progress = job.percent
        value = job.percent if job.determinate else -1
        if self.progress_bar.value != value:
            self.progress_bar.value = value
        text = escape_html(job.describe())
        if self.progress_text.object != text:
            self.progress_text.object = text

    @guarded
    def finish_job(self, job: MappingJob) -> None:
        d = self._dash
        d.busy = False
        self.progress_bar.visible = False
        self.progress_text.visible = False
        d.progress = 100
        if job.kind == "load":
            if job.error is not None:
                d.update_status()
                reraise_for_user(job.error, "opening the scan failed")
            scan, total = job.loaded
            self.show_loaded(scan, job.label, total, job.key)
            return
        if isinstance(job.error, Cancelled) or job.scan is not d.scan:
            return  # the user opened something else meanwhile
        if job.error is not None:
            reraise_for_user(job.error, "pigment mapping failed")
        d.set_maps(job.maps)  # kept in MAPS by the worker (get_or_make) when it has a key
        d.update_status()
        if job.warning:
            d.notify(job.warning, "warning")

    @guarded
    def on_model(self, event: param.parameterized.Event) -> None:
        d = self._dash
        if d.scan is None or event.new == NO_MODEL:
            return
        d.set_maps(None)
        self.map_current(cache_key=None)
