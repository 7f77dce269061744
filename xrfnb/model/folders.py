"""Where pigment models are found by name (no torch: the dashboard and the CLI list models cheaply).

A model is a folder holding ``model.json`` and ``model.safetensors``. A name given to
:func:`xrfnb.load_model` is looked for, in this order, in:

1. the models shipped with the package (:func:`package_models_folder`);
2. each folder of ``$XRFNB_MODELS`` (``os.pathsep``-separated: ``:`` on Linux and macOS, ``;`` on
   Windows), in the order given;
3. the user's models folder (:func:`user_models_folder`), where the dashboard writes the models it adapts
   when ``$XRFNB_MODELS`` is not set.

The first folder holding ``NAME/model.json`` wins. :func:`model_folders` lists 2 and 3 (the folders the
dashboard offers models from and writes adapted models into), :func:`search_folders` all three, and
:func:`model_names` every name found in them. Hidden folders (``.NAME.adapting-...``: an adaptation being
written, or one kept to be resumed) are never models.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path

__all__ = [
    "META_FILE",
    "find_model",
    "listed_models",
    "model_folders",
    "model_names",
    "package_models_folder",
    "search_folders",
    "user_models_folder",
]

#: the file that makes a folder a model (its metadata; the weights are ``model.safetensors``)
META_FILE = "model.json"


def package_models_folder() -> Path:
    """The folder of the models shipped with the package (``xrfnb/data/models``)."""
    return Path(str(importlib.resources.files("xrfnb").joinpath("data", "models")))


def user_models_folder() -> Path:
    """The models folder in the user's data folder. Not created here.

    Returns
    -------
    pathlib.Path
        ``$XDG_DATA_HOME/xrfnb/models`` (default ``~/.local/share/xrfnb/models``) on Linux and other
        POSIX systems, ``~/Library/Application Support/xrfnb/models`` on macOS,
        ``%LOCALAPPDATA%\\xrfnb\\models`` (default ``~/AppData/Local/xrfnb/models``) on Windows.
    """
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "xrfnb" / "models"


def model_folders() -> list[Path]:
    """The folders of models found by name besides the shipped ones, in search order: those of
    ``$XRFNB_MODELS`` (``~`` expanded, empty entries skipped), then :func:`user_models_folder`; each once.
    The first is where the dashboard writes the models it adapts. None is created here.

    Returns
    -------
    list of pathlib.Path
    """
    roots = [Path(root).expanduser() for root in os.environ.get("XRFNB_MODELS", "").split(os.pathsep) if root]
    return list(dict.fromkeys([*roots, user_models_folder()]))


def search_folders() -> list[Path]:
    """Every folder a model name is looked for in, in order: the shipped models, then
    :func:`model_folders`.

    Returns
    -------
    list of pathlib.Path
    """
    return list(dict.fromkeys([package_models_folder(), *model_folders()]))


def listed_models(folder: Path) -> list[str]:
    """The names of the model folders directly under ``folder`` (those holding a ``model.json``), sorted;
    hidden folders (an adaptation being written or kept to be resumed) are left out; a folder that does
    not exist or cannot be read lists nothing.

    Parameters
    ----------
    folder : pathlib.Path

    Returns
    -------
    list of str
    """
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return []
    return [d.name for d in entries if not d.name.startswith(".") and (d / META_FILE).is_file()]


def find_model(name: str) -> Path | None:
    """The folder of the model called ``name``: the first ``FOLDER/name`` holding a ``model.json`` among
    :func:`search_folders`, or None.

    Parameters
    ----------
    name : str
        A model's name (a folder name: no path separator, not hidden).

    Returns
    -------
    pathlib.Path or None
    """
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        return None
    for folder in search_folders():
        if (folder / name / META_FILE).is_file():
            return folder / name
    return None


def model_names() -> list[str]:
    """Every model name :func:`find_model` finds, in search order (the shipped models first, sorted
    within each folder), each once.

    Returns
    -------
    list of str
    """
    names: list[str] = []
    for folder in search_folders():
        names += listed_models(folder)
    return list(dict.fromkeys(names))
