"""What the dashboard reads and keeps: the served folder (only files inside it open), uploads bounded
in size as the bytes arrive, and the caches of scans, maps, models and fits shared by the sessions.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Generic, TypeVar

import panel as pn

from ..._errors import DataError, FormatError, XRFNBError
from ...core.spectrum import Scan, Spectrum
from ...fitting.stackfit import StackFit
from ...io.detect import detect_format
from ...maps.pigmentmaps import PigmentMaps
from ...model.folders import model_folders, model_names, user_models_folder
from ...model.model import DEFAULT_MODEL, PigmentModel, load_model
from ...physics.instrument import Instrument

__all__ = [
    "FITS",
    "INSTRUMENTS",
    "MAPS",
    "MAX_LISTED_FILES",
    "MODELS",
    "SCANS",
    "BoundedFileDropper",
    "LRUCache",
    "adapted_models_folder",
    "available_models",
    "list_data_files",
    "load_model_cached",
    "model_folders",
    "readable_format",
    "resolve_inside",
    "safe_filename",
    "serve_target",
    "serve_target_from_args",
    "to_scan",
    "user_models_folder",
]

log = logging.getLogger(__name__)

#: at most this many files are listed from the served folder
MAX_LISTED_FILES = 500

V = TypeVar("V")


def resolve_inside(root: Path, name: str | os.PathLike[str]) -> Path:
    """Resolve ``name`` relative to ``root`` and refuse anything outside ``root``.

    Parameters
    ----------
    root : pathlib.Path
        The served data folder.
    name : str or path-like
        A path relative to ``root`` (absolute paths are accepted only if they lie inside ``root``).

    Returns
    -------
    pathlib.Path
        The resolved path (symlinks followed), guaranteed to lie inside ``root``.

    Raises
    ------
    DataError
        If the path escapes the folder (``..``, absolute path elsewhere, symlink out), is a symlink
        loop, or is not a file.
    """
    root = Path(root).resolve()
    text = os.fspath(name)
    if "\x00" in text:
        raise DataError(f"refused to open {text!r}: invalid character in the file name")
    try:
        path = (root / text).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        raise DataError(
            f"cannot open {text!r}: it is a symbolic link that points back to itself (a link loop); "
            f"fix or remove the link in the served data folder {root}"
        ) from None
    if not path.is_relative_to(root):
        raise DataError(
            f"refused to open {text!r}: only files inside the served data folder {root} can be opened"
        )
    if not path.is_file():
        raise DataError(f"cannot open {text!r}: no such file in the served data folder {root}")
    return path


def readable_format(path: Path) -> str | None:
    """The xrfnb reader format of ``path`` sniffed from its first bytes, or None when no reader fits.

    A ripple ``.raw`` data file is not listed on its own when its ``.rpl`` header is beside it (the
    header opens both).
    """
    try:
        fmt = detect_format(path)
    except (XRFNBError, OSError, ValueError):
        return None
    if fmt == "rpl" and path.suffix.lower() == ".raw":
        return None
    return fmt


def list_data_files(root: Path, max_files: int = MAX_LISTED_FILES, readable_only: bool = True) -> list[str]:
    """Regular, non-hidden files under ``root`` that xrfnb can read (relative POSIX paths, sorted).

    Parameters
    ----------
    root : pathlib.Path
        The served data folder; nothing outside it is listed (symlinks pointing out are skipped).
    max_files : int, optional
        Stop after this many files.
    readable_only : bool, optional
        List only files whose content one of xrfnb's readers recognises (sniffed from the first bytes,
        the readers' content sniffing): notes, configuration files and images are left out.

    Returns
    -------
    list of str

    Notes
    -----
    An entry that cannot be resolved (a symbolic link loop such as ``a.h5 -> b.h5 -> a.h5``, a link
    into an unreadable folder) is skipped with a one-line warning in the server log; it never stops the
    listing of the other files.
    """
    root = Path(root).resolve()
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            try:
                if not p.resolve().is_relative_to(root) or not p.is_file():
                    continue
            except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on Python < 3.13
                log.warning("skipped %s in the served folder: %s", p, _unresolvable_reason(exc))
                continue
            if readable_only and readable_format(p) is None:
                continue
            out.append(p.relative_to(root).as_posix())
            if len(out) >= max_files:
                return out
    return out


def _unresolvable_reason(exc: BaseException) -> str:
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return "symbolic link loop"
    return getattr(exc, "strerror", None) or str(exc)


def safe_filename(name: str) -> str:
    """A file name stripped of folders and unusual characters (keeps the suffix for format detection)."""
    base = Path(str(name).replace("\\", "/")).name
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".")
    return base[:120] or "upload.bin"


def to_scan(obj: object, source: str) -> Scan:
    """Accept what a reader returns (Scan, Spectrum, or a tuple starting with one) as a Scan; a spectrum
    becomes a one-pixel scan whose metadata names ``source``."""
    if isinstance(obj, tuple) and obj:
        obj = obj[0]
    if isinstance(obj, Scan):
        return obj
    if isinstance(obj, Spectrum):
        return Scan.from_spectrum(obj, metadata={"source": source})
    raise FormatError(f"{source}: the reader returned {type(obj).__name__}, not a scan or spectrum")


def serve_target(path: str | os.PathLike[str] | None) -> tuple[Path | None, str | None]:
    """(served data folder, file to open first) for ``xrfnb serve [FILE_OR_DIR]``."""
    if path is None:
        return None, None
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        return p, None
    if p.is_file():
        return p.parent, p.name
    raise DataError(f"cannot serve {path}: no such file or folder")


def serve_target_from_args(argv: Sequence[str] | None = None) -> tuple[Path | None, str | None]:
    """:func:`serve_target` of ``panel serve dashboards/xrfnb_app.py [--args FILE_OR_DIR]``: the first
    argument (``sys.argv[1:]`` by default), else ``$XRFNB_DATA``, else none (the demo scene)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return serve_target(args[0] if args else os.environ.get("XRFNB_DATA") or None)


# --------------------------------------------------------------------------------------------------
# caches shared by sessions (read-only data only; per-session state lives on the Dashboard)
# --------------------------------------------------------------------------------------------------
class LRUCache(Generic[V]):
    """A small thread-safe least-recently-used cache whose entries are made once.

    :meth:`get_or_make` makes a missing entry in the calling thread; another thread asking for the same
    key meanwhile waits for that result instead of making it again (two sessions opening the same file
    at the same moment read it, map it and fit its elements once).

    Parameters
    ----------
    size : int
        Entries kept.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        #: entries being made: key -> (the result to come, what the maker gave as ``maker``)
        self._pending: dict[Hashable, tuple[Future[V], object]] = {}
        self._waiting: dict[Hashable, int] = {}

    def get(self, key: Hashable) -> V | None:
        """The value under ``key``, or None."""
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        return None

    def put(self, key: Hashable, value: V) -> None:
        """Keep ``value`` under ``key``, dropping the least recently used entry when full."""
        with self._lock:
            self._put(key, value)

    def _put(self, key: Hashable, value: V) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry (entries being made are kept when they are done)."""
        with self._lock:
            self._d.clear()

    def waiting(self, key: Hashable) -> int:
        """How many threads are waiting now for another thread to make the entry ``key``."""
        with self._lock:
            return self._waiting.get(key, 0)

    def get_or_make(
        self,
        key: Hashable,
        make: Callable[[], V],
        *,
        maker: object = None,
        on_wait: Callable[[object], None] | None = None,
        retry_on: tuple[type[BaseException], ...] = (),
        poll_s: float = 0.25,
    ) -> V:
        """The value under ``key``; made by ``make()`` here when missing, and kept.

        When another thread is making it, this one waits for that thread's result rather than making
        it a second time, calling ``on_wait(maker)`` (the other thread's ``maker``) every ``poll_s``
        seconds: to show the other's progress, or to stop waiting by raising. Should the other thread
        fail with one of ``retry_on`` (it was cancelled: its session no longer wants the result), the
        entry is asked for again (made here, or waited for from a third thread); any other failure is
        raised here too.

        Parameters
        ----------
        key : hashable
            The entry.
        make : callable
            Makes the value (in the calling thread); what it raises is raised, nothing is kept.
        maker : object, optional
            Given to the threads that wait for this one (e.g. the job whose progress they show).
        on_wait : callable, optional
            Called with the other thread's ``maker`` while waiting for it.
        retry_on : tuple of exception types, optional
            The other thread's failures after which the entry is asked for again.
        poll_s : float, optional
            Seconds between calls of ``on_wait``.

        Returns
        -------
        object
            The value.
        """
        while True:
            with self._lock:
                if key in self._d:
                    self._d.move_to_end(key)
                    return self._d[key]
                entry = self._pending.get(key)
                if entry is None:
                    future: Future[V] = Future()
                    self._pending[key] = (future, maker)
                else:
                    self._waiting[key] = self._waiting.get(key, 0) + 1
            if entry is None:
                return self._make(key, future, make)
            try:
                done, value = self._wait(entry, on_wait, retry_on, poll_s)
            finally:
                with self._lock:
                    self._waiting[key] -= 1
                    if not self._waiting[key]:
                        del self._waiting[key]
            if done:
                return value

    def _make(self, key: Hashable, future: Future[V], make: Callable[[], V]) -> V:
        try:
            value = make()
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            future.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            self._put(key, value)
        future.set_result(value)
        return value

    @staticmethod
    def _wait(
        entry: tuple[Future[V], object],
        on_wait: Callable[[object], None] | None,
        retry_on: tuple[type[BaseException], ...],
        poll_s: float,
    ) -> tuple[bool, V | None]:
        """``(True, value)`` when the other thread made it, ``(False, None)`` when it failed with one of
        ``retry_on``; what ``on_wait`` raises, and the other's other failures, are raised."""
        future, other = entry
        while True:
            if on_wait is not None:
                on_wait(other)
            try:
                return True, future.result(timeout=poll_s)
            except TimeoutError:
                continue
            except retry_on:
                return False, None


#: scans read, by (path, mtime, size) or ("demo",)
SCANS: LRUCache[Scan] = LRUCache(4)
#: pigment maps, by (scan key, model)
MAPS: LRUCache[PigmentMaps] = LRUCache(8)
#: trained models, by name
MODELS: LRUCache[PigmentModel] = LRUCache(3)
#: instruments matched to a scan's calibration, by (preset, calibration, channels)
INSTRUMENTS: LRUCache[Instrument] = LRUCache(4)
#: stack fits of the called pigments, by (pigments, instrument, spectrum)
FITS: LRUCache[StackFit] = LRUCache(256)


def adapted_models_folder() -> Path:
    """Where the dashboard writes the models it adapts: the first of :func:`model_folders` (the first
    folder of ``$XRFNB_MODELS`` when it is set, else :func:`user_models_folder`; never the served data
    folder unless ``$XRFNB_MODELS`` names it), so that :func:`xrfnb.load_model` finds them by name. Not
    created here."""
    return model_folders()[0]


def available_models() -> list[str]:
    """Names of the trained models that can be chosen (``"default"`` first when it exists): every name
    :func:`xrfnb.load_model` finds (:func:`xrfnb.model.folders.model_names`: the shipped models, those in
    the folders of ``$XRFNB_MODELS``, those in the user's models folder, where the dashboard writes the
    models it adapts without ``$XRFNB_MODELS``); an empty list means no model has been trained or shipped.
    Hidden folders (an adaptation being written, or kept to be resumed) are not listed.
    """
    names = model_names()
    if DEFAULT_MODEL in names:
        names.remove(DEFAULT_MODEL)
        names.insert(0, "default")
    return names


def load_model_cached(name: str) -> PigmentModel:
    """The trained model ``name`` (:func:`xrfnb.load_model`, which finds every listed model by name),
    loaded once for all sessions (a session asking while another loads it waits for that one)."""
    return MODELS.get_or_make(name, lambda: load_model(name))


class BoundedFileDropper(pn.widgets.FileDropper):
    """A FileDropper that enforces the upload size limit on the server, chunk by chunk, as bytes arrive.

    Panel's FileDropper checks ``max_file_size`` only in the browser and buffers every chunk a client
    sends until the last one; a client that ignores the browser check could fill the server's memory.
    Here the bytes buffered for the widget (all files together) never exceed ``max_bytes`` by more than
    the one chunk that crosses the limit: that chunk drops the file's buffer, the rest of the file is
    ignored as it arrives, and ``on_refused(name, received_bytes)`` is called once.

    Parameters
    ----------
    max_bytes : int
        Largest accepted upload in bytes (all files of one upload together).
    on_refused : callable
        Called as ``on_refused(name, received_bytes)`` when a file is refused.
    **params
        FileDropper parameters.
    """

    def __init__(self, max_bytes: int, on_refused: Callable[[str, int], None], **params: object) -> None:
        super().__init__(**params)
        self._max_bytes = int(max_bytes)
        self._on_refused = on_refused
        self._received: dict[str, int] = {}
        self._refused: set[str] = set()

    @property
    def buffered_bytes(self) -> int:
        """Bytes of unfinished uploads held on the server now."""
        return sum(len(piece) for pieces in self._file_buffer.values() for piece in pieces)

    def _process_event(self, event: object) -> None:
        data = getattr(event, "data", None)
        if getattr(event, "event_name", None) != "upload_event":
            return super()._process_event(event)
        if not isinstance(data, dict) or not {"name", "chunk", "total_chunks", "data", "type"} <= set(data):
            log.warning("ignored a malformed upload message (fields: %s)", sorted(data or ()))
            return
        name, chunk, piece = str(data["name"]), data["chunk"], data["data"]
        if chunk == 1:  # a new file (or the same name again): start counting afresh
            self._refused.discard(name)
            self._file_buffer.pop(name, None)
            self._received[name] = 0
        elif name in self._refused or name not in self._file_buffer:
            return  # the rest of a refused file, or chunks without a first one
        self._received[name] = self._received.get(name, 0) + len(piece or b"")
        if sum(self._received.values()) > self._max_bytes:
            self._file_buffer.pop(name, None)
            received = self._received.pop(name)
            self._refused.add(name)
            self._on_refused(name, received)
            return
        if chunk == data["total_chunks"]:
            self._received.pop(name, None)
        super()._process_event(event)
