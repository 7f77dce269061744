"""Atomic writes: a temporary file in the destination folder renamed into place."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from .._errors import FormatError

log = logging.getLogger(__name__)

__all__ = ["atomic_path", "publish"]


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create a new empty file with a random name in ``folder``, mode 0666 less the umask.

    Unlike :func:`tempfile.mkstemp` (mode 0600), the kernel applies the process's umask, so the file
    ends up with the permissions the user expects of a file a program writes.
    """
    for _ in range(100):
        name = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return name
    raise FileExistsError(f"{folder}: no free temporary file name after 100 tries")  # pragma: no cover


def _owner_tag() -> str:
    """``host-pid`` of this process, for temporary names (sanitised: a file name on any filesystem)."""
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def _remove_stale_temporaries(folder: Path, target: Path) -> None:
    """Remove temporary files of ``target`` that a killed xrfnb process on this machine left behind.

    Only names :func:`atomic_path` makes (``.NAME.HOST-PID-RANDOM.tmpSUFFIX``) are considered, and only
    those of this host whose process no longer exists: a run still writing, or a run on another machine
    sharing the folder, is never touched.
    """
    host, pid_now = _owner_tag().rsplit("-", 1)
    pattern = re.compile(
        rf"^\.{re.escape(target.name)}\.{re.escape(host)}-(\d+)-[0-9a-f]{{12}}\.tmp{re.escape(target.suffix)}$"
    )
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or m.group(1) == pid_now or not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:  # that process is gone: its temporary file can never be renamed
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                log.info("removed %s, left by an interrupted xrfnb run", entry.path)
        except (PermissionError, OverflowError, ValueError):  # alive (another user's), or not a pid
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success rename it to ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was (absent or the
    previous version). The temporary name keeps ``path``'s suffix, so libraries that look at it
    (``np.save``, h5py) behave. The file gets the permissions any program's new file gets (0666 less
    the umask: 0644 with the usual umask 022), or, when it replaces a file, that file's permissions.

    Examples
    --------
    >>> import tempfile
    >>> import h5py
    >>> import numpy as np
    >>> folder = tempfile.TemporaryDirectory()
    >>> target = Path(folder.name) / "maps.h5"
    >>> with atomic_path(target) as tmp:
    ...     with h5py.File(tmp, "w") as f:
    ...         f["counts"] = np.arange(3)
    >>> sorted(p.name for p in target.parent.iterdir())  # renamed into place, no temporary file left
    ['maps.h5']
    >>> folder.cleanup()
    """
    target = Path(os.fspath(path))
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FormatError(f"{target}: the folder {folder} does not exist")
    _remove_stale_temporaries(folder, target)
    tmp = _new_file(folder, f".{target.name}.{_owner_tag()}-", f".tmp{target.suffix}")
    try:
        _keep_mode(tmp, target)
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _keep_mode(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the permissions of the regular file ``target`` it will replace (if any)."""
    with contextlib.suppress(OSError):
        old = os.stat(target)
        if stat.S_ISREG(old.st_mode):  # replacing a file keeps its permissions, as open(path, "w") does
            os.chmod(tmp, stat.S_IMODE(old.st_mode) & 0o777)


def publish(done: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename a finished file ``done`` to ``path`` atomically, as :func:`atomic_path` does at its end.

    ``done`` is flushed to disk first and gets the permissions of the file it replaces (if any); after the
    rename its folder is flushed too, so ``path`` is either the old file or the whole new one, even after a
    power loss. For files written in place over several runs (``xrfnb convert``'s ``OUT.partial``).

    Parameters
    ----------
    done : path-like
        The finished file, in the same folder as ``path``.
    path : path-like
        Its final name.
    """
    src, target = Path(os.fspath(done)), Path(os.fspath(path))
    with open(src, "rb") as fh:
        os.fsync(fh.fileno())
    _keep_mode(src, target)
    os.replace(src, target)
    with contextlib.suppress(OSError):  # a folder cannot be opened for fsync on every system
        fd = os.open(target.parent if str(target.parent) else ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
