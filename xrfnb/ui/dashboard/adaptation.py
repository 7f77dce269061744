"""The dashboard's "Adapt the model to this scanner" action (issue #18 item 2).

When more than :data:`~.info.ADAPT_OOD_SHARE` of the open scan's pixels are out of distribution, a button
under the banner offers to adapt the model to the scanner; the same action is always available under the
model chooser. It fits the instrument from the scan (or takes the fit the calibration card has already
made of it), then fine-tunes the model in use on simulated spectra of that instrument
(:func:`xrfnb.model.adapt.adapt_model`, as ``xrfnb adapt``) in a separate process
(:mod:`.adapt_worker`), so that the server's sessions keep their speed; the page shows the training's
steps and the minutes left and can cancel it. The model is written under a hidden name beside its final
place and renamed when complete, into :func:`~.files.adapted_models_folder` (``$XRFNB_MODELS``'s first
folder, else the user's models folder, where :func:`xrfnb.load_model` finds it by name too), under a name
no model has yet. When it is done it joins the model
list, the maps are made again with it, and the page says what happened: the steps and minutes, where the
model is, its validation on simulated spectra of the instrument beside the original model's, and the share
of this scan's pixels out of distribution before and after.

One adaptation runs at a time per server (:func:`running_adaptation`); a second request, from any
session, is refused in words while it runs, and that session then shows the running adaptation's progress
(and can cancel it) as the session that started it does.

Closing pages: every session that shows a running adaptation watches it (the one that started it, and each
whose request was refused while it ran). A page closed, or its connection lost for good, ends its session
(the server's session-destroyed callback, :meth:`AdaptationPanel.session_destroyed`): while another session
still watches, the adaptation goes on (a 15-minute run followed from a second page or browser is not
killed by one tab closing); when the last one watching it has gone, it is cancelled as by the cancel
button, so that no run goes on unseen. A Dashboard outside a server (a notebook) has no session to end:
its adaptation runs until done or cancelled. Stopping the server stops the worker the same way.

Cancelled or interrupted adaptations are kept to be resumed: the worker stops as at Ctrl-C, saving its
training checkpoint, and the hidden folder (``.NAME.adapting-XXXX``, which no model list shows) stays in
the models folder with its checkpoint and, in its private ``resume/`` folder, what the run needs to go on
(the base model, the instrument fit, the minutes; written when it starts, so that a server stopped or
killed leaves it too). A page with the same scan (name and size) and the same base model open offers
"Resume the adaptation (N of M steps done)" (:meth:`AdaptationPanel.resume`): the worker continues from
the checkpoint (``xrfnb adapt --resume``: the same data, the learning-rate schedule and the minutes left)
and the folder becomes the model when complete, its checkpoint and resume record removed. "Discard it"
removes a kept folder; a completed adaptation of the same model to the same scan removes the kept ones it
supersedes. A run stopped before its first checkpoint leaves nothing to resume and its folder is removed.
"""

from __future__ import annotations

import atexit
import dataclasses
import html
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import panel as pn
import param

from ..._errors import CalibrationError, DataError, ModelError, XRFNBError
from ...fitting.instrument_fit import InstrumentFit, fit_instrument
from ...model.folders import find_model
from ...model.model import DEFAULT_MODEL
from .adapt_worker import (
    ERROR_FILE,
    REQUEST_FILE,
    RESULT_FILE,
    RESUME_DIR,
    RESUME_FIT,
    RESUME_PID,
    RESUME_RECORD,
    final_folder,
)
from .common import escape_html, guarded
from .files import adapted_models_folder, available_models, load_model_cached
from .info import ADAPT_LABEL, ADAPT_OOD_SHARE
from .job import Cancelled, JobRunner, MappingJob, RowProgress, reraise_for_user

if TYPE_CHECKING:  # pragma: no cover
    from ...core.spectrum import Scan
    from ...model.model import PigmentModel
    from .app import Dashboard

__all__ = [
    "ADAPT_LABEL",
    "CANCEL_LABEL",
    "DEFAULT_MINUTES",
    "DISCARD_LABEL",
    "RESUME_LABEL",
    "AdaptJob",
    "AdaptationPanel",
    "KeptAdaptation",
    "kept_adaptations",
    "running_adaptation",
]

log = logging.getLogger(__name__)

#: the label of the button that stops it
CANCEL_LABEL = "Cancel the adaptation"
#: the label of the button that continues a kept adaptation (with its steps done)
RESUME_LABEL = "Resume the adaptation"
#: the label of the button that removes a kept adaptation
DISCARD_LABEL = "Discard it"
#: optimisation minutes offered (as ``xrfnb adapt``)
DEFAULT_MINUTES = 15.0
#: what the progress line says while a cancelled worker stops
_CANCELLING = "cancelling: stopping the training, saving its checkpoint ..."
#: seconds a cancelled worker gets to save its checkpoint and stop before it is killed
STOP_GRACE_S = 20.0
#: what the worker needs on disk besides the base model's weights, bytes
_DISK_MARGIN = 50 * 2**20

#: the adaptation running on this server (one at a time), under its lock
_SLOT_LOCK = threading.Lock()
_SLOT: list[AdaptJob] = []


def running_adaptation() -> AdaptJob | None:
    """The adaptation this server runs now (from any session), or None."""
    with _SLOT_LOCK:
        return _SLOT[0] if _SLOT else None


def _claim(job: AdaptJob) -> AdaptJob | None:
    """Take the server's one adaptation slot for ``job``; the job holding it instead, if any."""
    with _SLOT_LOCK:
        if _SLOT:
            return _SLOT[0]
        _SLOT.append(job)
        return None


def _release(job: AdaptJob) -> None:
    with _SLOT_LOCK:
        if _SLOT and _SLOT[0] is job:
            _SLOT.clear()


def _minutes_text(minutes: float) -> str:
    return f"{minutes:.1f} minutes" if minutes < 10 else f"{minutes:.0f} minutes"


@dataclasses.dataclass(eq=False)
class AdaptJob(MappingJob):
    """An adaptation run off the event loop: the instrument fit (when the calibration card has none) and
    the worker process's fine-tuning, followed through its training log.

    Attributes
    ----------
    minutes : float
        The optimisation budget.
    fit : InstrumentFit or None
        The instrument adapted to (given, or fitted by the job).
    base_name : str
        The model adapted.
    name : str
        The adapted model's name (its folder's name unless that was taken meanwhile).
    models : pathlib.Path or None
        The folder it goes into.
    steps : int
        Training steps done (from the training log, every 25 steps).
    train_s : float
        Training seconds so far.
    path : pathlib.Path or None
        The adapted model's folder, once in place.
    ood_before : float or None
        The scan's share of out-of-distribution pixels with the base model (None: no maps).
    session : str
        Which session started it (for the words of a refusal in another).
    base_path : pathlib.Path or None
        The base model's folder.
    staging : pathlib.Path or None
        The hidden folder the model is written in (given: a kept adaptation resumed).
    resumed_from : int
        The training step a resumed adaptation continues from (0: a new one).
    kept : bool
        Whether the adaptation stopped before its end with its checkpoint kept to be resumed.
    watchers : set of int
        The sessions that show it (``id`` of their :class:`AdaptationPanel`); when the last one has gone,
        it is cancelled (:meth:`AdaptationPanel.session_destroyed`).
    proc : subprocess.Popen or None
        The worker process while it runs.
    started_at : float
        When the job began (``time.time()``).
    """

    minutes: float = DEFAULT_MINUTES
    fit: InstrumentFit | None = None
    base_name: str = ""
    name: str = ""
    models: Path | None = None
    steps: int = 0
    train_s: float = 0.0
    path: Path | None = None
    ood_before: float | None = None
    session: str = ""
    base_path: Path | None = None
    staging: Path | None = None
    resumed_from: int = 0
    kept: bool = False
    watchers: set[int] = dataclasses.field(default_factory=set)
    proc: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)
    started_at: float = dataclasses.field(default_factory=time.time)

    @property
    def training(self) -> bool:
        """Whether the job is in its training stage (its progress counts seconds of the budget)."""
        return self.stage == "training"

    def describe(self, now: float | None = None) -> str:
        """The progress line: the stage, and while training the steps, the minutes done and left."""
        if not self.training:
            return super().describe(now)
        left = max(0.0, 60.0 * self.minutes - self.train_s) / 60.0
        return (
            f"training the adapted model: {self.steps:,} steps, {self.train_s / 60:.1f} of "
            f"{_minutes_text(self.minutes)}, about {left:.1f} minutes left (then about a minute of "
            "calibration and validation)"
        )

    @property
    def unit(self) -> str:
        """What :attr:`done` counts outside training: rows summed for the instrument fit."""
        return "rows"


def _follow_training(job: AdaptJob, staging: Path) -> None:
    """Read where the worker is from what it has written in ``staging``: the training log (steps and
    seconds, every 25 steps), then the model's weights (calibration done: the validation runs)."""
    budget_s = 60.0 * job.minutes
    if (staging / "model.safetensors").exists():
        what = "checking the adapted model against the original on simulated spectra of this instrument"
        if job.stage != what:
            job.set_stage(what)
        return
    log_path = staging / "train_log.jsonl"
    try:
        lines = log_path.read_text(encoding="utf-8").splitlines()
        last = json.loads(lines[-1]) if lines else None
        # seconds since the last record: not before this job began (a resumed run's log is older)
        since = time.time() - max(log_path.stat().st_mtime, job.started_at)
    except (OSError, ValueError):
        last = None
    if last is None:
        return
    job.steps = int(last.get("step", 0))
    job.train_s = min(float(last.get("elapsed_s", 0.0)) + max(0.0, since), budget_s)
    if job.train_s >= budget_s:
        what = "calibrating the adapted model: temperature, thresholds, out-of-distribution statistics"
        if job.stage != what:
            job.set_stage(what)
        return
    if not job.training:
        job.set_stage("training", total=int(budget_s))
    job.done, job.total = int(job.train_s), max(1, int(budget_s))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the worker as Ctrl-C would (it saves its checkpoint), killing it if it does not stop."""
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=STOP_GRACE_S)
    except (subprocess.TimeoutExpired, OSError, ValueError):  # ValueError: no SIGINT (Windows)
        proc.kill()
        proc.wait()


def _worker_env() -> dict[str, str]:
    """The worker's environment: this one, with this copy of xrfnb first on the import path."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _log_tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_adaptation(
    job: AdaptJob, scan: Scan, base_path: Path, n_val: int, validation_n_per_cell: int
) -> None:
    """The job's work (in a worker thread): fit the instrument unless given, then run the worker process
    and follow it until the model is in place (:attr:`AdaptJob.path`); releases the server's slot.

    A new adaptation gets a hidden folder in :attr:`AdaptJob.models` with its resume record
    (:func:`_write_resume_record`); a kept one (:attr:`AdaptJob.staging` given) is resumed from its
    checkpoint. When the worker stops before its end (cancelled, failed, or the server stopping), the
    hidden folder is kept to be resumed if it holds a checkpoint past step 0 (:attr:`AdaptJob.kept`),
    else removed.

    Raises
    ------
    Cancelled
        The job was cancelled: the worker was stopped (its checkpoint saved).
    XRFNBError
        The instrument could not be fitted or the adaptation failed (in words for the page).
    """
    staging = job.staging
    resume = staging is not None
    run_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        if job.fit is None:
            rows = scan.shape[0]

            def on_rows(n: int) -> None:
                job.report(min(job.done + n, rows), rows)
                if job.done >= rows:
                    job.set_stage(
                        "fitting the instrument: peaks, calibration, resolution, tube, scatter, air"
                    )

            job.set_stage("fitting the instrument: summing the spectra", total=rows)
            fit = fit_instrument(dataclasses.replace(scan, counts=RowProgress(scan.counts, on_rows)))
            if fit.calibration_blind:
                raise CalibrationError(
                    "the instrument fit had to guess the energy calibration blind (the scan has none): "
                    "calibrate the scan in the 'Energy calibration' card first"
                )
            job.fit = fit
        if resume:
            job.set_stage(
                f"resuming the adaptation from step {job.resumed_from:,}: loading the model and its "
                "checkpoint, simulating the next spectra"
            )
        else:
            job.set_stage("starting the adaptation: loading the model, simulating the first spectra")
        assert job.models is not None
        if staging is None:
            staging = Path(tempfile.mkdtemp(dir=job.models, prefix=f".{job.name}.adapting-"))
            staging.chmod(0o755)  # made 0700: the model folder it becomes is readable like any other
            job.staging = staging
            _write_resume_record(job, scan, base_path, n_val, validation_n_per_cell)
        run_dir = Path(tempfile.mkdtemp(prefix="xrfnb-adapt-"))  # private (0700): the request's pickle
        request = {
            "base": str(base_path), "fit": job.fit, "minutes": job.minutes, "name": job.name,
            "staging": str(staging), "models": str(job.models), "n_val": int(n_val),
            "validation_n_per_cell": int(validation_n_per_cell), "resume": resume,
        }  # fmt: skip
        (run_dir / REQUEST_FILE).write_bytes(pickle.dumps(request))
        with open(run_dir / "worker.log", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "xrfnb.ui.dashboard.adapt_worker", str(run_dir)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=_worker_env(),
            )  # fmt: skip
        job.proc = proc
        while proc.poll() is None:
            try:
                if job.cancelled:
                    raise Cancelled
                _follow_training(job, staging)
            except Cancelled:
                _stop(proc)
                break
            time.sleep(0.25)
        result = run_dir / RESULT_FILE
        if result.exists():  # done, even when the cancel came too late to stop it
            done = json.loads(result.read_text(encoding="utf-8"))
            job.path, job.name = Path(done["path"]), str(done["name"])
            return
        if job.cancelled:
            raise Cancelled
        error = run_dir / ERROR_FILE
        if error.exists():
            raise ModelError(json.loads(error.read_text(encoding="utf-8"))["message"])
        log.error("the adaptation worker stopped with status %s:\n%s", proc.returncode,
                  _log_tail(run_dir / "worker.log"))  # fmt: skip
        raise ModelError(
            f"the adaptation stopped unexpectedly (status {proc.returncode}); see the server log"
        )
    except OSError as exc:  # the models folder or the private folder cannot be written
        raise DataError(
            f"cannot adapt the model: {exc.strerror or exc} ({exc.filename or job.models})"
        ) from None
    finally:
        if proc is not None and proc.poll() is None:  # a failure here while it runs: stop it
            _stop(proc)
        job.proc = None
        # gone when the model was put in place; else kept to be resumed, or removed (nothing to resume)
        if staging is not None and staging.exists():
            if read_kept(staging) is not None:
                job.kept = True
            else:
                shutil.rmtree(staging, ignore_errors=True)
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        _release(job)


# -- kept adaptations -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KeptAdaptation:
    """An adaptation stopped before its end (cancelled, failed, or its server stopped) whose training
    checkpoint is kept in its hidden folder to be resumed.

    Attributes
    ----------
    folder : pathlib.Path
        The hidden folder (``MODELS/.NAME.adapting-XXXX``).
    base_name, base_path : str
        The model adapted (its name and folder).
    label : str
        The scan's name as the page showed it.
    shape : tuple of int
        The scan's (rows, cols, channels).
    minutes : float
        The optimisation budget.
    name : str
        The adapted model's name.
    n_val, validation_n_per_cell : int
        As :func:`xrfnb.model.adapt.adapt_model` (the resumed run needs the same).
    steps : int
        Training steps done (the checkpoint's).
    planned_steps : int or None
        Steps the run planned to fit its minutes (fixed at step 400; None before).
    elapsed_s : float
        Training seconds done.
    """

    folder: Path
    base_name: str
    base_path: str
    label: str
    shape: tuple[int, ...]
    minutes: float
    name: str
    n_val: int
    validation_n_per_cell: int
    steps: int
    planned_steps: int | None
    elapsed_s: float

    @property
    def done_text(self) -> str:
        """How far it got: ``"1,200 of 4,800 steps done"`` (``"of about"`` while the run had not fixed its
        plan: steps at the speed so far for the whole budget)."""
        if self.planned_steps:
            return f"{self.steps:,} of {self.planned_steps:,} steps done"
        if self.elapsed_s > 0:
            about = max(self.steps, round(self.steps * 60.0 * self.minutes / self.elapsed_s))
            return f"{self.steps:,} of about {about:,} steps done"
        return f"{self.steps:,} steps done"

    def matches(self, label: str, shape: tuple[int, ...], base_path: Path | None) -> bool:
        """Whether it adapts the model in ``base_path`` to the scan ``label`` of ``shape``."""
        if base_path is None or label != self.label or tuple(shape) != self.shape:
            return False
        try:
            return Path(self.base_path).resolve() == Path(base_path).resolve()
        except OSError:
            return False


def read_kept(folder: Path) -> KeptAdaptation | None:
    """The kept adaptation in the hidden ``folder``, or None when it holds none to resume: no resume
    record, no checkpoint, a checkpoint at step 0, or files that cannot be read."""
    try:
        record = json.loads((folder / RESUME_DIR / RESUME_RECORD).read_text(encoding="utf-8"))
        state = json.loads((folder / "checkpoint" / "state.json").read_text(encoding="utf-8"))
        if not (folder / RESUME_DIR / RESUME_FIT).is_file() or int(state.get("step", 0)) <= 0:
            return None
        planned = state.get("planned_steps")
        return KeptAdaptation(
            folder=folder, base_name=str(record["base_name"]), base_path=str(record["base_path"]),
            label=str(record["label"]), shape=tuple(int(n) for n in record["shape"]),
            minutes=float(record["minutes"]), name=str(record["name"]), n_val=int(record["n_val"]),
            validation_n_per_cell=int(record["validation_n_per_cell"]), steps=int(state["step"]),
            planned_steps=int(planned) if planned else None, elapsed_s=float(state.get("elapsed_s", 0.0)),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kept_adaptations(models: Path) -> list[KeptAdaptation]:
    """The adaptations kept to be resumed in the models folder ``models``, the most recently stopped
    first; the one this server is running is not among them."""
    running = running_adaptation()
    busy = running.staging if running is not None else None
    try:
        hidden = [p for p in Path(models).iterdir() if p.name.startswith(".") and ".adapting-" in p.name]
    except OSError:
        return []
    kept = [k for p in hidden if p != busy and not _worker_alive(p) and (k := read_kept(p)) is not None]

    def stopped(k: KeptAdaptation) -> float:
        try:
            return (k.folder / "checkpoint" / "state.json").stat().st_mtime
        except OSError:
            return 0.0

    return sorted(kept, key=stopped, reverse=True)


def _worker_alive(folder: Path) -> bool:
    """Whether the worker that trained in ``folder`` still runs (a server killed without stopping it:
    the worker finishes on its own). Never on Windows, where this is not checked."""
    try:
        pid = int(json.loads((folder / RESUME_DIR / RESUME_PID).read_text(encoding="utf-8"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if sys.platform == "win32" or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process of that number: not our worker
        return False
    return True


def _write_resume_record(
    job: AdaptJob, scan: Scan, base_path: Path, n_val: int, validation_n_per_cell: int
) -> None:
    """Write into the job's hidden folder (``resume/``, 0700) what resuming it needs: the record the page
    matches (JSON) and the instrument fit (a pickle, 0600)."""
    assert job.staging is not None
    folder = job.staging / RESUME_DIR
    folder.mkdir(mode=0o700)
    record = {
        "base_name": job.base_name, "base_path": str(base_path), "label": job.label,
        "shape": [int(n) for n in scan.shape], "minutes": float(job.minutes), "name": job.name,
        "n_val": int(n_val), "validation_n_per_cell": int(validation_n_per_cell),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    (folder / RESUME_RECORD).write_text(json.dumps(record), encoding="utf-8")
    fd = os.open(folder / RESUME_FIT, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        pickle.dump(job.fit, f)


#: what loading a pickle that cannot be used raises
_UNREADABLE_PICKLE = (
    OSError,
    pickle.UnpicklingError,
    EOFError,
    AttributeError,
    ImportError,
    ValueError,
    TypeError,
)


def _load_kept_fit(kept: KeptAdaptation) -> InstrumentFit:
    """The instrument fit a kept adaptation was adapted to (its pickle, loaded only when the server's
    user owns it and its folders and nobody else can write them).

    Raises
    ------
    DataError
        The pickle is not the server user's own private file, or cannot be read.
    """
    path = kept.folder / RESUME_DIR / RESUME_FIT
    try:
        if hasattr(os, "getuid"):
            for p in (kept.folder, path.parent, path):
                st = p.stat()
                if st.st_uid != os.getuid() or st.st_mode & 0o022:
                    raise DataError(
                        f"the kept adaptation in {kept.folder} is not this server's own ({p} is owned by "
                        "another user or writable by others): it is not loaded; remove the folder"
                    )
        with open(path, "rb") as f:
            fit = pickle.load(f)
    except _UNREADABLE_PICKLE as exc:
        raise DataError(
            f"cannot resume the adaptation kept in {kept.folder}: its instrument fit cannot be read ({exc}); "
            f"remove it with '{DISCARD_LABEL}'"
        ) from None
    if not isinstance(fit, InstrumentFit):
        raise DataError(
            f"cannot resume the adaptation kept in {kept.folder}: {path} holds no instrument fit; remove it "
            f"with '{DISCARD_LABEL}'"
        )
    return fit


@atexit.register
def _stop_at_exit() -> None:
    """The server stops: stop its adaptation's worker as the cancel button does (its checkpoint saved
    and its folder kept to be resumed) rather than leave it training unseen."""
    job = running_adaptation()
    proc = job.proc if job is not None else None
    if job is not None and proc is not None and proc.poll() is None:
        job.cancelled = True
        _stop(proc)


def validation_rows(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The adapted model's validation beside the original's, from its ``model.json`` (``adapted``).

    Returns
    -------
    list of dict
        Per set and count level: ``set``, ``counts``, ``before`` and ``after`` (macro F1 of the original
        and the adapted model on the same simulated spectra of the instrument; None where undefined),
        ``ood_rate`` (the adapted model's share of those spectra out of distribution).
    """
    record = meta.get("adapted") or {}
    rows = []
    for b, a in zip(record.get("validation_before", []), record.get("validation", []), strict=False):
        rows.append({"set": a["set"], "counts": a["counts"], "before": b.get("macro_f1"),
                     "after": a.get("macro_f1"), "ood_rate": a.get("ood_rate")})  # fmt: skip
    return rows


class _AdaptRunner(JobRunner):
    """The panel's :class:`~.job.JobRunner`, which can also follow a job another session runs
    (:meth:`watch`: the same polls, no thread of its own)."""

    def watch(self, job: AdaptJob) -> None:
        """Show ``job``'s progress and hand it over when it has finished, as if it ran here."""
        self._stop_polling()
        self.job = job
        self._callback = pn.state.add_periodic_callback(self.poll, period=250)

    def forget(self) -> None:
        """Stop following the job without cancelling it (its session has gone)."""
        self._stop_polling()
        self.job = None


class AdaptationPanel(pn.viewable.Viewer):
    """The adaptation action of a :class:`~xrfnb.ui.dashboard.Dashboard`: a button under the model
    chooser, an offer under the out-of-distribution banner when more than
    :data:`~.info.ADAPT_OOD_SHARE` of the pixels are unfamiliar, the progress of the running adaptation
    with its cancel button, what came of it, and the offer to resume (or discard) an adaptation of the
    model in use to the open scan that was stopped before its end.

    Parameters
    ----------
    owner : Dashboard
        The dashboard whose scan and model are adapted.

    Attributes
    ----------
    n_val, validation_n_per_cell : int
        As :func:`xrfnb.model.adapt.adapt_model` (the defaults of ``xrfnb adapt``; tests make them small).
    job : AdaptJob or None
        The running adaptation this session shows: started here, or another session's, whose progress is
        shown here since this session asked for one while it ran.
    """

    def __init__(self, owner: Dashboard) -> None:
        super().__init__()
        self._owner = owner
        self.n_val = 2048
        self.validation_n_per_cell = 100
        self.job: AdaptJob | None = None
        #: the adapted model whose maps, once made, get their out-of-distribution share said
        self._awaiting: AdaptJob | None = None
        #: the kept adaptation the resume button offers
        self._kept: KeptAdaptation | None = None
        #: whether the session's end is registered (:meth:`session_destroyed`)
        self._on_destroy_registered = False
        self.jobs = _AdaptRunner(self._on_progress, self.finish)
        self.minutes = pn.widgets.FloatInput(
            label="minutes", value=DEFAULT_MINUTES, start=0.01, end=600.0, step=1.0, width=80,
            css_classes=["xrfnb-adapt-minutes"],
        )  # fmt: skip
        self.adapt_button = pn.widgets.Button(
            label=ADAPT_LABEL, width=190, css_classes=["xrfnb-adapt"], align="end"
        )
        self.offer_button = pn.widgets.Button(
            label=f"{ADAPT_LABEL} ({_minutes_text(DEFAULT_MINUTES)})", color="primary", visible=False,
            css_classes=["xrfnb-adapt-offer"],
        )  # fmt: skip
        self.resume_button = pn.widgets.Button(
            label=RESUME_LABEL, width=200, visible=False, color="primary", css_classes=["xrfnb-adapt-resume"]
        )
        self.discard_button = pn.widgets.Button(
            label=DISCARD_LABEL, width=80, visible=False, css_classes=["xrfnb-adapt-discard"]
        )
        self.cancel_button = pn.widgets.Button(
            label=CANCEL_LABEL, color="warning", visible=False, css_classes=["xrfnb-adapt-cancel"]
        )
        self.progress_bar = pn.indicators.Progress(
            value=0, max=100, width=400, visible=False, bar_color="info"
        )
        self.progress_text = pn.pane.HTML(
            "", visible=False, styles={"font-size": "12px"}, css_classes=["xrfnb-adapt-progress"]
        )
        self.result = pn.pane.Markdown(
            "", visible=False, sizing_mode="stretch_width", css_classes=["xrfnb-adapt-result"]
        )
        self.adapt_button.on_click(lambda event: self._guarded(self.start))
        self.offer_button.on_click(lambda event: self._guarded(self.start))
        self.resume_button.on_click(lambda event: self._guarded(self.resume))
        self.discard_button.on_click(lambda event: self._guarded(self.discard))
        self.cancel_button.on_click(lambda event: self.cancel())
        self.minutes.param.watch(self._on_minutes, ["value"])
        owner.param.watch(self._on_data, ["data_version"])
        #: under the model chooser
        self.controls = pn.Column(
            pn.Row(self.minutes, self.adapt_button, width=290),
            pn.Row(self.resume_button, self.discard_button, width=290),
            width=290,
        )
        #: under the out-of-distribution banner
        self.section = pn.Column(
            self.offer_button, self.progress_bar, self.progress_text, self.cancel_button, self.result,
            sizing_mode="stretch_width",
        )  # fmt: skip
        self._refresh_offers()

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self.controls, self.section)

    def notify(self, message: str, level: str = "error") -> None:
        """Tell the user (the dashboard's status line and notifications)."""
        self._owner.notify(message, level)

    @guarded
    def _guarded(self, fn: Any) -> Any:
        return fn()

    def _on_minutes(self, event: param.parameterized.Event) -> None:
        value = event.new if event.new else DEFAULT_MINUTES
        self.offer_button.label = f"{ADAPT_LABEL} ({_minutes_text(float(value))})"

    # -- the offers -------------------------------------------------------------------------------
    def offered(self) -> bool:
        """Whether the page offers the adaptation under the banner: more than
        :data:`~.info.ADAPT_OOD_SHARE` of the open scan's pixels out of distribution, and none running
        in this session."""
        summary = self._owner.ood_summary()
        return bool(summary is not None and summary["fraction"] > ADAPT_OOD_SHARE and self.job is None)

    def kept(self) -> KeptAdaptation | None:
        """The adaptation of the model in use to the open scan that was stopped before its end and kept to
        be resumed (the most recent, in the folder adapted models go into), or None."""
        d = self._owner
        if d.scan is None:
            return None
        base_path = self._base_folder_now()
        for kept in kept_adaptations(adapted_models_folder()):
            if kept.matches(d.label, tuple(d.scan.shape), base_path):
                return kept
        return None

    def _base_folder_now(self) -> Path | None:
        """The folder of the model in use (without loading it), or None."""
        d = self._owner
        if d.model_obj is not None:
            path = getattr(d.model_obj, "path", None)
            return None if path is None else Path(path)
        name = d.model_name
        return find_model(DEFAULT_MODEL if name == "default" else str(name)) if name else None

    def _refresh_offers(self) -> None:
        """Show the offers that apply now: to adapt (under the banner) and to resume a kept adaptation."""
        self.offer_button.visible = self.offered()
        kept = None if self.job is not None else self.kept()
        self._kept = kept
        self.resume_button.visible = self.discard_button.visible = kept is not None
        if kept is not None:
            self.resume_button.label = f"{RESUME_LABEL} ({kept.done_text})"

    def _on_data(self, *events: Any) -> None:
        self._refresh_offers()
        pending = self._awaiting
        maps = self._owner.maps
        if pending is not None and maps is not None and maps.metadata.get("model") == pending.name:
            self._awaiting = None
            self.say_done(pending, ood_after=float(self._owner.ood_summary()["fraction"]))

    # -- starting and stopping --------------------------------------------------------------------
    def _base_model(self) -> PigmentModel:
        d = self._owner
        if not d.model_available():
            raise ModelError(
                "no pigment model to adapt: none is shipped, in $XRFNB_MODELS or in the user's models folder"
            )
        return d.model_obj if d.model_obj is not None else load_model_cached(d.model_name)

    def _open_scan(self) -> Scan:
        d = self._owner
        if d.scan is None:
            raise DataError("no scan open: open a scan of the scanner to adapt the model to")
        if d.needs_calibration():
            raise CalibrationError(
                "the scan has no energy calibration: calibrate it in the 'Energy calibration' card first"
            )
        return d.scan

    def start(self, minutes: float | None = None) -> None:
        """Adapt the model in use to the open scan's instrument for ``minutes`` (default: the minutes
        field): in a server session in the background, with progress, until done or :meth:`cancel`.

        Raises
        ------
        XRFNBError
            No scan or model, a scan to calibrate first, a blind calibration not yet checked, another
            adaptation running on this server, or a models folder that cannot take the model.
        """
        d = self._owner
        scan = self._open_scan()
        minutes = float(self.minutes.value if minutes is None else minutes)
        if not minutes > 0:
            raise ModelError(f"the adaptation needs a positive number of minutes, not {minutes:g}")
        base = self._base_model()
        base_path = getattr(base, "path", None)
        if base_path is None or not (Path(base_path) / "model.json").is_file():
            raise ModelError(f"the model {base.name} has no folder on this server: it cannot be adapted here")
        if not isinstance(base.meta.get("training"), dict):
            raise ModelError(
                f"the model {base.name} has no training record in its model.json: it cannot be adapted"
            )
        fit = d.calibration_panel.fit_of_open_scan()
        if fit is not None and fit.calibration_blind and not d.calibration_panel.blind_confirm.value:
            raise CalibrationError(
                "the instrument fitted to this scan has a calibration found blind: check it in the "
                "'Energy calibration' card and tick the confirmation first"
            )
        models = adapted_models_folder()
        self._check_folder(models, Path(base_path))
        summary = d.ood_summary()
        job = AdaptJob(
            "adapt", label=d.label, scan=scan, stage="starting", minutes=minutes, fit=fit,
            base_name=base.name, base_path=Path(base_path), name=self._new_name(models, base.name),
            models=models, ood_before=None if summary is None else float(summary["fraction"]),
            session=str(id(d)),
        )  # fmt: skip
        self._launch(
            job, Path(base_path), self.n_val, self.validation_n_per_cell,
            f"Adapting {base.name} to this scanner for {_minutes_text(minutes)}: the instrument is "
            + ("the one fitted in the calibration card" if fit is not None else "fitted from the scan first")
            + f"; the model will be written to {models}. The page stays usable meanwhile.",
        )  # fmt: skip

    def resume(self) -> None:
        """Continue the adaptation of the model in use to the open scan that was kept (:meth:`kept`) from
        its checkpoint, with its instrument fit and minutes, in the background as :meth:`start` does.

        Raises
        ------
        XRFNBError
            No scan, none kept for this scan and model, a kept record that cannot be used, the model it
            adapted gone, another adaptation running on this server, or a full disk.
        """
        d = self._owner
        scan = self._open_scan()
        kept = self.kept()
        if kept is None:
            raise ModelError(
                "no adaptation of the model in use to this scan is kept to be resumed (it was completed, "
                f"discarded, or never reached its first checkpoint): use '{ADAPT_LABEL}'"
            )
        base_path = Path(kept.base_path)
        if not (base_path / "model.json").is_file():
            raise ModelError(
                f"the model {kept.base_name} this adaptation started from is no longer in {base_path}: it "
                f"cannot be resumed; '{DISCARD_LABEL}' removes it"
            )
        fit = _load_kept_fit(kept)
        self._check_folder(kept.folder.parent, base_path)
        summary = d.ood_summary()
        job = AdaptJob(
            "adapt", label=d.label, scan=scan, stage="starting", minutes=kept.minutes, fit=fit,
            base_name=kept.base_name, base_path=base_path, name=kept.name, models=kept.folder.parent,
            staging=kept.folder,
            resumed_from=kept.steps, steps=kept.steps, train_s=kept.elapsed_s,
            ood_before=None if summary is None else float(summary["fraction"]), session=str(id(d)),
        )  # fmt: skip
        left = max(0.0, 60.0 * kept.minutes - kept.elapsed_s) / 60.0
        self._launch(
            job, base_path, kept.n_val, kept.validation_n_per_cell,
            f"Resuming the adaptation of {kept.base_name} to this scanner from its checkpoint "
            f"({kept.done_text}; about {left:.1f} of {_minutes_text(kept.minutes)} left): the model will be "
            f"written to {kept.folder.parent}. The page stays usable meanwhile.",
        )  # fmt: skip

    def discard(self) -> None:
        """Remove the kept adaptation the page offers to resume (its hidden folder and checkpoint)."""
        kept = self._kept
        if kept is None:
            return
        running = running_adaptation()
        if running is not None and running.staging == kept.folder:
            raise ModelError("this adaptation is running again now: cancel it first")
        try:
            shutil.rmtree(kept.folder)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DataError(
                f"cannot remove the kept adaptation {kept.folder}: {exc.strerror or exc}; remove the folder "
                "by hand"
            ) from None
        self._refresh_offers()
        self.notify(f"The unfinished adaptation of {kept.base_name} ({kept.done_text}) was removed.", "info")

    def _launch(self, job: AdaptJob, base_path: Path, n_val: int, n_cell: int, told: str) -> None:
        """Take the server's adaptation slot for ``job`` and run it (in the background in a server
        session), saying ``told``; refused in words when another runs, which this session then shows."""
        d = self._owner
        running = _claim(job)
        if running is not None:
            who = "this page" if running.session == str(id(d)) else "another page"
            self._watch(running)
            raise ModelError(
                f"an adaptation is already running on this server (started from {who}: "
                f"{running.base_name} for {running.label}, {running.describe()}): one at a time; its "
                "progress is shown here, where it can be cancelled too"
            )
        scan = job.scan
        assert scan is not None

        def work(job: AdaptJob) -> None:
            run_adaptation(job, scan, base_path, n_val, n_cell)

        self._show_running(job)
        d.notify(told, "info")
        if d.data_panel.is_blocking():
            self.job = job
            job.run(work)
            self.finish(job)
            return
        try:
            self.jobs.start(job, work)
        except BaseException:
            _release(job)
            self.job = None
            raise
        self._watch(job)

    def _show_running(self, job: AdaptJob) -> None:
        self.job = job
        self.result.visible = False
        self.offer_button.visible = self.resume_button.visible = self.discard_button.visible = False
        self.adapt_button.disabled = True
        self.cancel_button.disabled = job.cancelled
        self.progress_bar.visible = self.progress_text.visible = self.cancel_button.visible = True
        self._on_progress(job)

    def _watch(self, job: AdaptJob) -> None:
        """Show ``job`` in this session until it ends, and count this session among those watching it
        (:meth:`session_destroyed` cancels it when the last one has gone)."""
        with _SLOT_LOCK:
            job.watchers.add(id(self))
        if self.job is not job:
            self._show_running(job)
            self.jobs.watch(job)
        if not self._on_destroy_registered:
            doc = pn.state.curdoc
            if doc is not None and doc.session_context is not None:  # not in a notebook or a test
                try:
                    doc.on_session_destroyed(self.session_destroyed)
                    self._on_destroy_registered = True
                except (ValueError, RuntimeError):  # never stops the adaptation from being shown
                    log.warning("the adaptation cannot follow the end of this session", exc_info=True)

    def session_destroyed(self, session_context: Any) -> None:
        """The server's callback when this page's session ends (closed, or its connection lost for good):
        it no longer watches its adaptation; when no other session does, the adaptation is cancelled as by
        :meth:`cancel` (the worker saves its checkpoint; the run is kept to be resumed)."""
        job = self.job
        self.jobs.forget()
        self.job = None
        if job is None or job.finished:
            return
        with _SLOT_LOCK:
            job.watchers.discard(id(self))
            alone = not job.watchers
        if alone and not job.cancelled:
            log.info(
                "the last page showing the adaptation of %s to %s has closed: cancelling it (its checkpoint "
                "is kept to be resumed)", job.base_name, job.label,
            )  # fmt: skip
            job.cancelled = True

    @staticmethod
    def _check_folder(models: Path, base_path: Path) -> None:
        """The models folder exists (made here) and has room for the run (weights, the optimiser's
        checkpoint, the copy the validation loads, and a margin)."""
        try:
            models.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(models).free
        except OSError as exc:
            raise DataError(
                f"cannot write the adapted model into {models}: {exc.strerror or exc}; set XRFNB_MODELS to "
                "a folder you can write"
            ) from None
        weights = base_path / "model.safetensors"
        need = 4 * (weights.stat().st_size if weights.is_file() else 0) + _DISK_MARGIN
        if free < need:
            raise DataError(
                f"the disk holding {models} is full ({free / 2**20:.0f} MiB free, the adaptation needs about "
                f"{need / 2**20:.0f} MiB): free some space or set XRFNB_MODELS to another folder"
            )

    def _new_name(self, models: Path, base_name: str) -> str:
        """``BASE-SCAN-adapted`` (the scan's name in letters, digits, dashes), unique in ``models``."""
        label = Path(self._owner.label.replace("upload: ", "")).stem
        word = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")[:40].strip("-") or "scan"
        return final_folder(models, f"{base_name}-{word}-adapted").name

    def cancel(self) -> None:
        """Stop the adaptation this session shows: the worker stops as at Ctrl-C, saving its training
        checkpoint, and its hidden folder is kept to be resumed (removed when it had not reached its first
        checkpoint); the page says so when the worker has stopped."""
        job = self.job
        if job is None:
            return
        job.cancelled = True
        self.cancel_button.disabled = True
        self.progress_text.object = escape_html(_CANCELLING)

    # -- progress and the end -----------------------------------------------------------------------
    def _on_progress(self, job: MappingJob) -> None:
        value = job.percent if job.determinate else -1
        if self.progress_bar.value != value:
            self.progress_bar.value = value
        if job.cancelled and not self.cancel_button.disabled:  # cancelled from another page
            self.cancel_button.disabled = True
            self.progress_text.object = escape_html(_CANCELLING)
        if not job.cancelled:
            text = escape_html(job.describe())
            if self.progress_text.object != text:
                self.progress_text.object = text

    def finish(self, job: AdaptJob) -> None:
        """Show how the adaptation ended (on the event loop): cancelled (kept to be resumed, or not),
        failed (in words), or done: the model listed, chosen and the maps made again with it (when the
        scan adapted to is still open)."""
        d = self._owner
        self.job = None
        with _SLOT_LOCK:
            job.watchers.discard(id(self))
        self.progress_bar.visible = self.progress_text.visible = self.cancel_button.visible = False
        self.cancel_button.disabled = False
        self.adapt_button.disabled = False
        self._refresh_offers()
        if job.path is None and (job.cancelled or isinstance(job.error, Cancelled)):
            kept = read_kept(job.staging) if job.kept and job.staging is not None else None
            if kept is not None:
                self._say(
                    f"**Adaptation cancelled** after {kept.steps:,} training steps. No model was written; "
                    f"its checkpoint is kept: *{RESUME_LABEL}* continues it from there ({kept.done_text}), "
                    f"*{DISCARD_LABEL}* removes it. {escape_html(job.base_name)} is still the model it "
                    "adapts.",
                    "warning",
                )
            else:
                removed = " the half-written folder was removed" if job.staging is not None else ""
                self._say(
                    "**Adaptation cancelled** before its first checkpoint. No model was written, nothing is "
                    f"kept to be resumed{':' + removed if removed else ''}. {escape_html(job.base_name)} is "
                    "unchanged.",
                    "warning",
                )
            return
        if job.error is not None:
            kept_note = (
                f" Its checkpoint is kept: *{RESUME_LABEL}* tries again from there, *{DISCARD_LABEL}* "
                "removes it."
                if job.kept
                else ""
            )
            try:
                reraise_for_user(job.error, "the adaptation failed")
            except (XRFNBError, MemoryError) as exc:
                why = str(exc) if isinstance(exc, XRFNBError) else "not enough memory"
                self._say(f"**The model could not be adapted:** {escape_html(why)}{kept_note}", "error")
                return
        assert job.path is not None
        self._remove_superseded(job)
        d.data_panel.refresh_choices()
        same_scan = d.scan is not None and job.scan is not None and d.scan.counts is job.scan.counts
        if job.path.name not in available_models():  # a folder no model list holds: say where
            self._say(self.done_text(job) + f"\n\nChoose it with `--model {job.path}`.", "success")
            return
        if not same_scan:
            self._say(self.done_text(job) + "\n\nAnother scan is open now: choose the model in the list "
                      "for scans from that scanner.", "success")  # fmt: skip
            return
        self._awaiting = job
        self.say_done(job, ood_after=None)
        d.use_model(job.path.name)  # the maps are made again with it; _on_data says the OOD share

    def _remove_superseded(self, job: AdaptJob) -> None:
        """Remove the kept adaptations of the same model to the same scan that ``job``, complete, makes
        needless (a run started over rather than resumed)."""
        if job.models is None or job.scan is None:
            return
        for kept in kept_adaptations(job.models):
            if kept.matches(job.label, tuple(job.scan.shape), job.base_path):
                log.info("removed the kept adaptation %s: superseded by %s", kept.folder, job.path)
                shutil.rmtree(kept.folder, ignore_errors=True)
        self._refresh_offers()

    def done_text(self, job: AdaptJob) -> str:
        """What the page says of a finished adaptation: what was done, where the model is, and its
        validation beside the original's."""
        try:
            meta = json.loads((job.path / "model.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            meta = {}
        record = meta.get("adapted") or {}
        steps = int(record.get("steps", job.steps))
        train_min = float(record.get("train_time_s", job.train_s)) / 60.0
        lines = [
            f"**Adapted {job.base_name} to this scanner**: fine-tuned for {train_min:.1f} minutes ({steps:,} "
            f"steps) on spectra simulated for the instrument fitted to {escape_html(job.label)}; saved as "
            f"**{escape_html(job.path.name)}** in `{job.path.parent}`, listed under Model from now on.",
        ]
        rows = validation_rows(meta)
        if rows:

            def f1(x: Any) -> str:
                return "-" if x is None else f"{x:.2f}"

            lines += ["", "Validation on held-out simulated spectra of this instrument (macro F1):", "",
                      "| spectra | counts | original | adapted |", "|---|---:|---:|---:|"]  # fmt: skip
            lines += [
                f"| {r['set']} | {r['counts']:,} | {f1(r['before'])} | {f1(r['after'])} |" for r in rows
            ]
            lines += ["", "These say the model learned the simulated instrument, not that the simulation "
                      "matches the real scanner: check the calls against the element maps."]  # fmt: skip
        return "\n".join(lines)

    def say_done(self, job: AdaptJob, ood_after: float | None) -> None:
        """Say the adaptation is done; with the scan's out-of-distribution share under the adapted model
        once its maps are made (``ood_after``)."""
        text = self.done_text(job)
        before = "" if job.ood_before is None else f" ({100 * job.ood_before:.1f} % with {job.base_name})"
        if ood_after is None:
            text += "\n\nThe maps are being made again with the adapted model."
        else:
            text += (
                f"\n\nThe maps now come from **{escape_html(job.path.name)}**: "
                f"{100 * ood_after:.1f} % of this scan's pixels are out of distribution{before}."
            )
            if ood_after > ADAPT_OOD_SHARE:
                text += (
                    " **Still too many**: the adaptation did not make this scan familiar to the model, so "
                    "treat its calls on those pixels as unreliable."
                )
        self._say(text, "success")

    def _say(self, text: str, level: str) -> None:
        self.result.object = text
        self.result.visible = True
        self._owner.notify(html.unescape(text.split("\n\n")[0].replace("**", "")), level)
