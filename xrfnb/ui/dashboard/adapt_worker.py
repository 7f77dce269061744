"""The process that adapts a model for the dashboard: ``python -m xrfnb.ui.dashboard.adapt_worker FOLDER``.

The dashboard (:mod:`.adaptation`) starts it so that the fine-tuning (:func:`xrfnb.model.adapt.adapt_model`,
minutes of torch on every core it is given) runs outside the server's process: the server's sessions keep
their event loop and their torch threads, the process runs at a lower priority, and cancelling it is a
signal (SIGINT: the training loop saves its checkpoint and stops, as at Ctrl-C).

``FOLDER`` is the dashboard's private folder for this run (made by the server, readable by its user only).
It holds the request, ``request.pkl``, a pickle the server wrote there: the base model's folder, the
:class:`~xrfnb.fitting.instrument_fit.InstrumentFit`, the minutes, the adapted model's name, the hidden
folder to write it in (``MODELS/.NAME.adapting-XXXX``, beside its final place), the final folder and
whether to resume the training checkpoint already in the hidden folder (an adaptation cancelled or
interrupted before, :data:`RESUME_DIR`). The process writes the model into the hidden folder, removes the
training checkpoint and the resume record and renames the folder to its final name (another name,
``NAME-2``, ..., should that exist by then: an existing model is never replaced), then writes
``result.json`` (``{"path": ..., "name": ...}``) into ``FOLDER``; a failure writes ``error.json``
(``{"message": ...}``, in words for the page) and exits with status 1; SIGINT exits with 130 and leaves
the hidden folder, with its checkpoint, to the dashboard, which keeps it to be resumed. A model folder
therefore appears under its final name complete or not at all.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from ..._errors import XRFNBError
from ...model.adapt import adapt_model

__all__ = [
    "ERROR_FILE",
    "REQUEST_FILE",
    "RESULT_FILE",
    "RESUME_DIR",
    "RESUME_FIT",
    "RESUME_PID",
    "RESUME_RECORD",
    "final_folder",
    "main",
    "run_request",
]

#: the request, in the run's folder
REQUEST_FILE = "request.pkl"
#: written into the run's folder when the model is in place
RESULT_FILE = "result.json"
#: written into the run's folder when the adaptation failed
ERROR_FILE = "error.json"
#: in the hidden folder, private to the server's user (0700): what a kept adaptation needs to be resumed
RESUME_DIR = "resume"
#: in :data:`RESUME_DIR`: what the page shows and matches (JSON: base model, scan, minutes, name, sizes)
RESUME_RECORD = "adaptation.json"
#: in :data:`RESUME_DIR`: the process id of the worker training in the folder (a folder whose worker still
#: runs, left by a server that was killed, is not offered to be resumed)
RESUME_PID = "worker.pid"
#: in :data:`RESUME_DIR`: the instrument fit adapted to (a pickle, 0600, loaded only when owned by the
#: server's user and writable by nobody else)
RESUME_FIT = "instrument-fit.pkl"


def final_folder(models: Path, name: str) -> Path:
    """``models / name``, or ``name-2``, ``name-3``, ... : the first that does not exist yet."""
    folder, k = models / name, 1
    while folder.exists():
        k += 1
        folder = models / f"{name}-{k}"
    return folder


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def _put_in_place(staging: Path, models: Path, name: str) -> Path:
    """Rename the finished ``staging`` folder to its final name under ``models`` (never over a model)."""
    while True:
        final = final_folder(models, name)
        try:
            os.rename(staging, final)
        except OSError as exc:  # made meanwhile by someone else: the next free name
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and final.exists():
                continue
            raise
        return final


def run_request(request: dict[str, Any]) -> dict[str, Any]:
    """Adapt the model as ``request`` says and put its folder in place; the result's ``path`` and
    ``name``.

    Parameters
    ----------
    request : dict
        ``base`` (the base model's folder), ``fit`` (InstrumentFit), ``minutes``, ``name``, ``staging``
        (the hidden folder to write in), ``models`` (the folder the model goes into), ``n_val`` and
        ``validation_n_per_cell`` (as :func:`xrfnb.model.adapt.adapt_model`); ``resume`` (optional, default
        False): continue from the training checkpoint in ``staging``.

    Returns
    -------
    dict
        ``{"path": final folder, "name": its name}``.
    """
    staging = Path(request["staging"])
    if (staging / RESUME_DIR).is_dir():
        _write_json(staging / RESUME_DIR / RESUME_PID, {"pid": os.getpid()})
    adapt_model(
        request["base"], request["fit"], staging, minutes=float(request["minutes"]), progress=False,
        name=str(request["name"]), n_val=int(request["n_val"]), resume=bool(request.get("resume", False)),
        validation_n_per_cell=int(request["validation_n_per_cell"]),
    )  # fmt: skip
    # a finished model needs no checkpoint (three times the weights: the optimiser's state) and nothing to
    # resume it from (the record's pickle would make the folder a model that refuses to load)
    shutil.rmtree(staging / "checkpoint", ignore_errors=True)
    shutil.rmtree(staging / RESUME_DIR, ignore_errors=True)
    final = _put_in_place(staging, Path(request["models"]), str(request["name"]))
    return {"path": str(final), "name": final.name}


def _os_error_text(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"the disk is full{where}: free some space in the models folder and try again"
    what = exc.strerror or str(exc)
    return f"cannot write the adapted model: {what}" + (f" ({exc.filename})" if exc.filename else "")


def main(argv: list[str] | None = None) -> int:
    """Run one adaptation (the module's docstring); the exit status: 0 done, 1 failed, 130 cancelled."""
    args = sys.argv[1:] if argv is None else argv
    run_dir = Path(args[0])
    if hasattr(os, "nice"):
        try:
            os.nice(10)  # the server's sessions come first
        except OSError:
            pass
    try:
        request = pickle.loads((run_dir / REQUEST_FILE).read_bytes())
        result = run_request(request)
    except KeyboardInterrupt:
        return 130
    except XRFNBError as exc:
        _write_json(run_dir / ERROR_FILE, {"message": str(exc)})
        return 1
    except MemoryError:
        _write_json(run_dir / ERROR_FILE, {"message": "not enough memory to adapt the model"})
        return 1
    except OSError as exc:
        _write_json(run_dir / ERROR_FILE, {"message": _os_error_text(exc)})
        return 1
    except Exception as exc:  # a bug: its traceback goes to the run's log, the page gets words
        traceback.print_exc()
        _write_json(run_dir / ERROR_FILE, {"message": f"internal error ({type(exc).__name__}: {exc})"})
        return 1
    _write_json(run_dir / RESULT_FILE, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
