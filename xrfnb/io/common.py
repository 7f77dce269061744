"""Helpers shared by the readers: text decoding, number parsing, uncalibrated axes, validation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .._errors import CalibrationError, DataError, FormatError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..core.spectrum import Scan, Spectrum

__all__ = [
    "UNCALIBRATED",
    "calibration_from_axis",
    "calibration_from_points",
    "make_spectrum",
    "parse_float",
    "parse_floats",
    "read_text",
    "short_repr",
    "with_given_calibration",
]

#: Calibration used when a file states none: "energy" equals the channel number. Spectra loaded with it
#: carry ``metadata["calibrated"] = False``; calibrate them with :func:`xrfnb.calibrate` or pass
#: ``calibration=`` to :func:`xrfnb.load`.
UNCALIBRATED = EnergyCalibration(0.0, 1.0)


def read_text(path: Path, max_bytes: int = 512 * 1024 * 1024) -> str:
    """Whole file as text (UTF-8, falling back to Latin-1); FormatError for binary content."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise FormatError(f"{path}: {len(raw)} bytes is too large for a text spectrum")
    if b"\x00" in raw:
        raise FormatError(f"{path}: contains NUL bytes: binary data in a text format (corrupted file?)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def short_repr(value: object, n_chars: int = 40) -> str:
    """``repr(value)`` cut to about ``n_chars`` characters, for messages (header values can be huge)."""
    if isinstance(value, int) and value.bit_length() >= 128:
        return f"<{len(str(value))}-digit number>"
    text = repr(value)
    return text if len(text) <= n_chars else text[: n_chars - 3] + "..."


def parse_float(value: str, what: str, path: Path) -> float:
    """``float(value)`` (Fortran ``D`` exponents allowed) or FormatError naming the field and file."""
    try:
        out = float(str(value).strip().replace("D", "E").replace("d", "e"))
    except ValueError:
        raise FormatError(f"{path}: {what} is not a number: {value!r}") from None
    if not np.isfinite(out):
        raise FormatError(f"{path}: {what} is not finite: {value!r}")
    return out


def parse_floats(values: Sequence[str], what: str, path: Path) -> list[float]:
    """:func:`parse_float` over a sequence."""
    return [parse_float(v, what, path) for v in values]


def calibration_from_points(
    channels: Sequence[float], energies_keV: Sequence[float], path: Path, what: str = "calibration points"
) -> EnergyCalibration:
    """Least-squares linear (two or more points) calibration through (channel, energy) pairs."""
    ch = np.asarray(channels, dtype=float)
    e = np.asarray(energies_keV, dtype=float)
    if ch.size < 2 or np.unique(ch).size < 2:
        raise CalibrationError(f"{path}: {what} need at least two distinct channels, got {ch.tolist()}")
    gain, offset = np.polyfit(ch, e, 1)
    try:
        return EnergyCalibration(float(offset), float(gain))
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: {what}: {exc}") from None


def calibration_from_axis(energy_keV: np.ndarray, path: Path, what: str = "energy axis") -> EnergyCalibration:
    """Calibration (linear, or quadratic when needed) reproducing a per-channel energy axis in keV.

    Raises CalibrationError when no quadratic reproduces the axis within 1 % of a channel width.
    """
    e = np.asarray(energy_keV, dtype=float)
    if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)):
        raise CalibrationError(f"{path}: {what} must be a finite 1-D array of at least 2 energies")
    ch = np.arange(e.size, dtype=float)
    width = np.abs(np.diff(e)).min() if e.size > 1 else 1.0
    for deg in (1, 2):
        if e.size <= deg:
            break
        coef = np.polyfit(ch, e, deg)[::-1]
        if np.max(np.abs(np.polyval(coef[::-1], ch) - e)) <= 0.01 * max(width, 1e-12):
            q = float(coef[2]) if deg == 2 else 0.0
            try:
                return EnergyCalibration(float(coef[0]), float(coef[1]), q).check_monotonic(e.size)
            except CalibrationError as exc:
                raise CalibrationError(f"{path}: {what}: {exc}") from None
    raise CalibrationError(
        f"{path}: {what} is not a linear or quadratic function of the channel number; "
        "xrfnb needs a polynomial calibration"
    )


def make_spectrum(
    counts: ArrayLike,
    calibration: EnergyCalibration | None,
    path: Path,
    *,
    live_time_s: float | None = None,
    real_time_s: float | None = None,
    metadata: dict[str, Any] | None = None,
    calibration_source: str = "file header",
) -> Spectrum:
    """Validated :class:`Spectrum` from reader output; every error names the file."""
    meta = {"source": str(path), **(metadata or {})}
    if calibration is None:
        calibration = UNCALIBRATED
        meta["calibrated"] = False
        meta["calibration_source"] = "none in file: energy_keV equals the channel number until calibrated"
    else:
        meta.setdefault("calibrated", True)
        meta.setdefault("calibration_source", calibration_source)
    arr = np.asarray(counts)
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{path}: counts must be numeric, got dtype {arr.dtype}")
    try:
        return Spectrum(arr, calibration, live_time_s=live_time_s, real_time_s=real_time_s, metadata=meta)
    except XRFNBError as exc:
        msg = str(exc)
        if str(path) not in msg:
            msg = f"{path}: {msg}"
        raise type(exc)(msg) from None


def with_given_calibration(obj: Spectrum | Scan, calibration: EnergyCalibration) -> Spectrum | Scan:
    """The spectrum or scan with the calibration given to ``load()`` instead of the file's own."""
    return obj.with_calibration(calibration, source="given to load()")
