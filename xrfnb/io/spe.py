"""SPEC / ORTEC ``.spe`` spectra (``$SPEC_ID:``, ``$DATA:`` blocks), with PyMca ``.cfg`` calibration."""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import CalibrationError, FormatError
from ..core.calibration import EnergyCalibration
from ..core.spectrum import Spectrum
from .common import make_spectrum, parse_float, parse_floats, read_text

__all__ = ["read_pymca_cfg_calibration", "read_spe"]


def _sections(text: str, path: Path) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("$"):
            current = s[1:].split(":", 1)[0].strip().upper()
            if current in sections:
                raise FormatError(f"{path}: block ${current}: appears twice")
            sections[current] = []
        elif current is not None:
            if s:
                sections[current].append(s)
        elif s:
            raise FormatError(f"{path}: text before the first $ block: {s[:60]!r}")
    return sections


def read_pymca_cfg_calibration(cfg_path: Path) -> EnergyCalibration:
    """Energy calibration from a PyMca fit configuration (``[detector] zero = ..., gain = ...``, keV)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(read_text(cfg_path))
    except configparser.Error as exc:
        raise FormatError(f"{cfg_path}: not a readable PyMca configuration: {exc}") from None
    if (
        not parser.has_section("detector")
        or "zero" not in parser["detector"]
        or "gain" not in parser["detector"]
    ):
        raise CalibrationError(f"{cfg_path}: no [detector] zero/gain calibration in this PyMca configuration")
    det = parser["detector"]
    zero = parse_float(det["zero"], "[detector] zero", cfg_path)
    gain = parse_float(det["gain"], "[detector] gain", cfg_path)
    try:
        return EnergyCalibration(zero, gain)
    except CalibrationError as exc:
        raise CalibrationError(f"{cfg_path}: {exc}") from None


def read_spe(path: Path) -> Spectrum:
    """Read a SPEC/ORTEC ``.spe`` spectrum.

    The ``$DATA:`` block starts with ``first last`` channel numbers, then the counts. Calibration, in
    order of preference: ``$MCA_CAL:`` (polynomial, keV), ``$ENER_FIT:`` (offset, gain, keV), a PyMca
    configuration with the same stem (``Steel.spe`` -> ``Steel.cfg``, ``[detector] zero/gain``); otherwise
    the spectrum is uncalibrated (``metadata["calibrated"] is False``). Live and real time come from
    ``$MEAS_TIM:`` (``live real``, seconds).
    """
    sections = _sections(read_text(path), path)
    if "DATA" not in sections:
        raise FormatError(f"{path}: no $DATA: block")
    block = " ".join(sections["DATA"]).split()
    if len(block) < 2:
        raise FormatError(f"{path}: the $DATA: block is empty (truncated file?)")
    first, last = (int(v) for v in parse_floats(block[:2], "$DATA: channel range", path))
    values = block[2:]
    expected = last - first + 1
    if expected < 1:
        raise FormatError(f"{path}: $DATA: channel range {first}..{last} is empty")
    if len(values) != expected:
        raise FormatError(
            f"{path}: $DATA: announces channels {first}..{last} ({expected}) but holds {len(values)} values "
            "(truncated file or mismatched channel counts)"
        )
    try:
        counts = np.array(values, dtype=float)
    except ValueError:
        raise FormatError(f"{path}: the $DATA: block holds non-numeric values") from None
    meta: dict[str, Any] = {"format": "spe", "first_channel": first}
    if sections.get("SPEC_ID"):
        meta["spec_id"] = " ".join(sections["SPEC_ID"])
    live = real = None
    if sections.get("MEAS_TIM"):
        times = parse_floats(" ".join(sections["MEAS_TIM"]).split()[:2], "$MEAS_TIM:", path)
        if len(times) == 2:
            live, real = times
    cal = None
    source = "file header"
    if sections.get("MCA_CAL"):
        parts = " ".join(sections["MCA_CAL"]).split()
        n = int(parse_float(parts[0], "$MCA_CAL: number of coefficients", path))
        coef = parse_floats(parts[1 : 1 + n], "$MCA_CAL: coefficient", path)
        unit = parts[1 + n].lower() if len(parts) > 1 + n else "kev"
        scale = 1e-3 if unit == "ev" else 1.0
        if len(coef) < 2:
            raise CalibrationError(f"{path}: $MCA_CAL: needs at least offset and gain, got {coef}")
        coef = [c * scale for c in coef] + [0.0]
        cal, source = _shifted(EnergyCalibration(coef[0], coef[1], coef[2]), first), "file header ($MCA_CAL:)"
    elif sections.get("ENER_FIT"):
        coef = parse_floats(" ".join(sections["ENER_FIT"]).split()[:2], "$ENER_FIT:", path)
        if len(coef) < 2:
            raise CalibrationError(f"{path}: $ENER_FIT: needs offset and gain, got {coef}")
        cal, source = _shifted(EnergyCalibration(coef[0], coef[1]), first), "file header ($ENER_FIT:)"
    else:
        for cfg in (path.with_suffix(".cfg"), path.with_suffix(".CFG")):
            if cfg.is_file():
                cal = read_pymca_cfg_calibration(cfg)
                cal = _shifted(cal, first)
                source = f"PyMca configuration {cfg.name} ([detector] zero/gain)"
                break
    if cal is not None:
        cal.check_monotonic(counts.size)
    return make_spectrum(
        counts, cal, path, live_time_s=live, real_time_s=real, metadata=meta, calibration_source=source
    )


def _shifted(cal: EnergyCalibration, first: int) -> EnergyCalibration:
    """Calibration in terms of array index when the file's first channel number is ``first``."""
    if first == 0:
        return cal
    q = cal.quadratic_keV
    return EnergyCalibration(
        cal.offset_keV + cal.gain_keV * first + q * first**2, cal.gain_keV + 2 * q * first, q
    )
