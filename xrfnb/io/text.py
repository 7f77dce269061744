"""Plain-text spectra: one column of counts (or two: channel or energy in keV, counts), ``#`` comments."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import CalibrationError, FormatError
from ..core.calibration import EnergyCalibration
from ..core.spectrum import Spectrum
from .common import calibration_from_axis, make_spectrum, parse_float, read_text

__all__ = ["read_text_spectrum", "write_text_spectrum"]

_KEY = re.compile(r"^[#%;]\s*([A-Za-z_][\w .()-]*?)\s*[:=]\s*(\S.*?)\s*$")
_ALIASES = {
    "offset_kev": "offset_keV",
    "cal_offset": "offset_keV",
    "zero": "offset_keV",
    "gain_kev": "gain_keV",
    "cal_slope": "gain_keV",
    "gain": "gain_keV",
    "quadratic_kev": "quadratic_keV",
    "cal_quad": "quadratic_keV",
    "live_time_s": "live_time_s",
    "live_time": "live_time_s",
    "real_time_s": "real_time_s",
    "real_time": "real_time_s",
}


def read_text_spectrum(path: Path) -> Spectrum:
    """Read a text spectrum.

    Data lines hold one number (counts of consecutive channels) or two (channel number or energy in
    keV, then counts), separated by blanks, commas, semicolons or tabs. Comment lines start with ``#``
    (also ``%`` or ``;``); comments of the form ``# offset_keV = ...``, ``# gain_keV = ...``,
    ``# quadratic_keV = ...``, ``# live_time_s = ...``, ``# real_time_s = ...`` set the calibration
    and times (``CAL_OFFSET``/``CAL_SLOPE``/``LIVE_TIME`` spellings are accepted too). A two-column
    file whose first column is not the channel number gives its calibration through that energy axis.
    """
    text = read_text(path)
    header: dict[str, str] = {}
    comments: list[str] = []
    rows: list[list[str]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s:
            continue
        if s[0] in "#%;":
            comments.append(s[1:].strip())
            m = _KEY.match(s)
            if m and m.group(1).strip().lower() in _ALIASES:
                header[_ALIASES[m.group(1).strip().lower()]] = m.group(2)
            continue
        parts = re.split(r"[\s,;]+", s)
        if len(parts) not in (1, 2):
            raise FormatError(f"{path}: line {n} has {len(parts)} columns; a text spectrum has 1 or 2")
        if rows and len(parts) != len(rows[0]):
            raise FormatError(
                f"{path}: line {n} has {len(parts)} column(s) but line 1 of the data has {len(rows[0])}"
            )
        rows.append(parts)
    if not rows:
        raise FormatError(f"{path}: no data lines (only comments or blank lines)")
    try:
        data = np.array([[float(v.replace("D", "E").replace("d", "e")) for v in r] for r in rows])
    except ValueError:
        raise FormatError(f"{path}: non-numeric value in the data lines") from None
    counts = data[:, -1]
    cal: EnergyCalibration | None = None
    source = "file header comments"
    if "offset_keV" in header and "gain_keV" in header:
        try:
            cal = EnergyCalibration(
                parse_float(header["offset_keV"], "offset_keV", path),
                parse_float(header["gain_keV"], "gain_keV", path),
                parse_float(header.get("quadratic_keV", "0"), "quadratic_keV", path),
            ).check_monotonic(counts.size)
        except CalibrationError as exc:
            raise CalibrationError(f"{path}: {exc}") from None
    elif data.shape[1] == 2:
        x = data[:, 0]
        if not np.array_equal(x, np.arange(x[0], x[0] + x.size)) or not float(x[0]).is_integer():
            cal = calibration_from_axis(x, path, "first column (energy, keV)")
            source = "energy column of the file"
        elif x[0] != 0:
            raise FormatError(f"{path}: channel numbers start at {x[0]:g}; xrfnb expects channel 0 first")
    live = parse_float(header["live_time_s"], "live time", path) if "live_time_s" in header else None
    real = parse_float(header["real_time_s"], "real time", path) if "real_time_s" in header else None
    meta: dict[str, Any] = {"format": "text"}
    if comments:
        meta["comments"] = "\n".join(comments)
    return make_spectrum(
        counts, cal, path, live_time_s=live, real_time_s=real, metadata=meta, calibration_source=source
    )


def write_text_spectrum(spectrum: Spectrum, path: Path) -> None:
    """Write a two-column text spectrum (energy in keV, counts) with calibration comments."""
    cal = spectrum.calibration
    lines = ["# xrfnb spectrum: energy_keV counts"]
    if spectrum.metadata.get("calibrated", True):
        lines += [
            f"# offset_keV = {cal.offset_keV!r}",
            f"# gain_keV = {cal.gain_keV!r}",
            f"# quadratic_keV = {cal.quadratic_keV!r}",
        ]
    if spectrum.live_time_s is not None:
        lines.append(f"# live_time_s = {spectrum.live_time_s!r}")
    if spectrum.real_time_s is not None:
        lines.append(f"# real_time_s = {spectrum.real_time_s!r}")
    integer = spectrum.counts.dtype.kind in "iu"
    for e, c in zip(spectrum.energy_keV, spectrum.counts, strict=True):
        lines.append(f"{float(e)!r} {int(c)}" if integer else f"{float(e)!r} {float(c)!r}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
