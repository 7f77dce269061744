"""NumPy ``.npy`` / ``.npz`` arrays with a JSON side-car holding calibration, times and metadata.

Side-car: ``name.json`` next to ``name.npy`` (``name.npy.json`` is accepted too)::

    {"calibration": {"offset_keV": 0.0, "gain_keV": 0.01, "quadratic_keV": 0.0},
     "live_time_s": 1.0, "real_time_s": 1.2, "pixel_size_um": 100.0, "metadata": {...}}

A ``.npz`` holds ``counts`` and optionally ``live_time_s`` (per pixel) and ``xrfnb_json`` (the same
JSON as a string); a side-car file, if present, is used when ``xrfnb_json`` is absent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import CalibrationError, DataError, FormatError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..core.spectrum import Scan, Spectrum
from .common import make_spectrum, read_text, short_repr
from .hdf5 import json_default

__all__ = ["read_npy", "read_npz", "sidecar_json", "sidecar_path", "write_npy_sidecar", "write_npz"]


def sidecar_path(path: Path) -> Path | None:
    """The existing JSON side-car of ``path`` (``name.json`` or ``name.npy.json``), else None."""
    for cand in (path.with_suffix(".json"), path.with_name(path.name + ".json")):
        if cand.is_file():
            return cand
    return None


def _parse_sidecar(text: str, where: Path) -> dict[str, Any]:
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise FormatError(f"{where}: the JSON side-car is not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise FormatError(f"{where}: the JSON side-car must hold an object with 'calibration' etc.")
    return info


def _calibration(info: dict[str, Any], where: Path) -> EnergyCalibration | None:
    cal = info.get("calibration", info if "gain_keV" in info else None)
    if cal is None:
        return None
    if not isinstance(cal, dict):
        raise FormatError(f"{where}: 'calibration' must be an object with offset_keV and gain_keV")
    try:
        return EnergyCalibration.from_dict(cal)
    except (TypeError, ValueError, OverflowError):
        raise CalibrationError(
            f"{where}: calibration values must be numbers, got {short_repr(cal, 80)}"
        ) from None
    except CalibrationError as exc:
        raise CalibrationError(f"{where}: {exc}") from None


def _number(info: dict[str, Any], key: str, where: Path) -> float | None:
    value = info.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise FormatError(f"{where}: {key} must be a number, got {short_repr(value)}") from None


def _build(
    counts: np.ndarray,
    info: dict[str, Any],
    path: Path,
    live_array: np.ndarray | None,
    info_where: Path | None = None,
) -> Spectrum | Scan:
    cal = _calibration(info, info_where or path)
    meta = info.get("metadata", {})
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: side-car 'metadata' must be a JSON object")
    meta = {**meta, "format": path.suffix.lower().lstrip(".")}
    if counts.dtype.kind not in "iuf":
        raise DataError(f"{path}: counts must be numeric, got dtype {counts.dtype}")
    if counts.ndim == 1:
        return make_spectrum(
            counts,
            cal,
            path,
            live_time_s=_number(info, "live_time_s", path),
            real_time_s=_number(info, "real_time_s", path),
            metadata=meta,
            calibration_source="JSON side-car",
        )
    if counts.ndim == 3:
        live: np.ndarray | None = live_array
        if live is None and info.get("live_time_s") is not None:
            try:
                live = np.asarray(info["live_time_s"], dtype=float)
            except (TypeError, ValueError, OverflowError):
                raise FormatError(
                    f"{info_where or path}: live_time_s must be a number or a rows x cols array of numbers"
                ) from None
        meta.update(
            source=str(path),
            calibrated=cal is not None,
            calibration_source="JSON side-car" if cal is not None else "none in file",
        )
        try:
            return Scan(
                counts,
                cal or EnergyCalibration(0.0, 1.0),
                pixel_size_um=_number(info, "pixel_size_um", path),
                live_time_s=live,
                metadata=meta,
            )
        except XRFNBError as exc:
            raise type(exc)(f"{path}: {exc}") from None
    raise DataError(
        f"{path}: array of shape {counts.shape} is neither a spectrum (channels,) nor a scan "
        "(rows, cols, channels)"
    )


def read_npy(path: Path) -> Spectrum | Scan:
    """Load a ``.npy`` array (a 3-D scan stays memory-mapped, read-only) with its JSON side-car."""
    try:
        counts = np.load(path, mmap_mode="r", allow_pickle=False)
        if counts.ndim != 3:
            counts = np.array(counts)
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError, SyntaxError ... on bad headers
        raise FormatError(f"{path}: not a readable .npy array (truncated or corrupted?): {exc}") from None
    side = sidecar_path(path)
    info = _parse_sidecar(read_text(side), side) if side else {}
    return _build(counts, info, path, None, side)


def read_npz(path: Path) -> Spectrum | Scan:
    """Load a ``.npz`` archive holding ``counts`` (and optionally ``live_time_s``, ``xrfnb_json``)."""
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            if "counts" not in z.files:
                raise FormatError(f"{path}: the .npz archive has no 'counts' array (it has {z.files[:10]})")
            counts = np.asarray(z["counts"])
            live = np.asarray(z["live_time_s"], dtype=float) if "live_time_s" in z.files else None
            embedded = str(z["xrfnb_json"]) if "xrfnb_json" in z.files else None
    except XRFNBError:
        raise
    except Exception as exc:  # zipfile, zlib and numpy raise many types on a corrupted archive
        raise FormatError(f"{path}: not a readable .npz archive (truncated or corrupted?): {exc}") from None
    side = None
    if embedded is not None:
        info = _parse_sidecar(embedded, path)
    else:
        side = sidecar_path(path)
        info = _parse_sidecar(read_text(side), side) if side else {}
    if live is not None and live.ndim == 0:
        info["live_time_s"], live = float(live), None
    return _build(counts, info, path, live, side)


def sidecar_json(obj: Spectrum | Scan) -> str:
    """The JSON side-car text describing ``obj``."""
    info: dict[str, Any] = {"metadata": dict(obj.metadata)}
    if obj.metadata.get("calibrated", True):
        info["calibration"] = obj.calibration.to_dict()
    if isinstance(obj, Spectrum):
        info["live_time_s"] = obj.live_time_s
        info["real_time_s"] = obj.real_time_s
    else:
        info["pixel_size_um"] = obj.pixel_size_um
        info["live_time_s"] = obj.live_time_s
    return json.dumps(info, default=json_default, indent=1)


def _counts_array(obj: Spectrum | Scan) -> np.ndarray:
    if isinstance(obj, Spectrum):
        return np.asarray(obj.counts)
    out = np.empty(obj.shape, dtype=obj.counts.dtype)
    for sl, block in obj.iter_blocks():
        out[sl] = block
    return out


def write_npy_sidecar(obj: Spectrum | Scan, npy_path: Path, json_path: Path) -> None:
    """Write counts to ``npy_path`` and the side-car JSON to ``json_path``."""
    if isinstance(obj, Scan):  # block by block through a memory map: a lazy scan is never loaded whole
        out = np.lib.format.open_memmap(npy_path, mode="w+", dtype=obj.counts.dtype, shape=obj.shape)
        for sl, block in obj.iter_blocks():
            out[sl] = block
        out.flush()
        del out
    else:
        with open(npy_path, "wb") as fh:
            np.save(fh, np.asarray(obj.counts), allow_pickle=False)
    json_path.write_text(sidecar_json(obj), encoding="utf-8")


def write_npz(obj: Spectrum | Scan, path: Path) -> None:
    """Write a compressed ``.npz`` with ``counts`` and the side-car JSON embedded as ``xrfnb_json``."""
    with open(path, "wb") as fh:
        np.savez_compressed(fh, counts=_counts_array(obj), xrfnb_json=np.array(sidecar_json(obj)))
