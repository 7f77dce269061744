"""EPICS/XIA MCA text (one or several detector elements) and Amptek ``.mca`` spectra."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import CalibrationError, DataError, FormatError
from ..core.calibration import EnergyCalibration
from ..core.spectrum import Spectrum
from .common import calibration_from_points, make_spectrum, parse_float, parse_floats, read_text

__all__ = ["read_amptek_mca", "read_epics_mca", "rebin_counts", "write_epics_mca"]


def rebin_counts(
    counts: np.ndarray, source: EnergyCalibration, target: EnergyCalibration, n_target: int
) -> np.ndarray:
    """Redistribute counts from one energy axis onto another, conserving counts.

    Each source channel ``k`` covers energies ``E(k - 1/2) .. E(k + 1/2)``; its counts are spread
    uniformly over that interval and collected into the target channels' intervals. Counts falling
    outside the target range are dropped.

    Parameters
    ----------
    counts : numpy.ndarray
        Source counts, shape (n_source,).
    source, target : EnergyCalibration
        Calibrations of the source and target axes.
    n_target : int
        Number of target channels.

    Returns
    -------
    numpy.ndarray
        Target counts, shape (n_target,), float64.
    """
    c = np.asarray(counts, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(c)])
    edges_keV = target.energy_keV(np.arange(n_target + 1) - 0.5)
    # fractional source-edge index of each target edge (edge j of the source is at channel j - 1/2)
    src_edge = source.channel(edges_keV) + 0.5
    cum_at = np.interp(src_edge, np.arange(c.size + 1, dtype=float), cumulative)
    return np.diff(cum_at)


def _select_elements(
    counts: np.ndarray,  # (channels, n_el)
    cals: list[EnergyCalibration],
    live: list[float] | None,
    real: list[float] | None,
    element: int | str | None,
    path: Path,
) -> tuple[np.ndarray, EnergyCalibration, float | None, float | None, dict[str, Any]]:
    n_ch, n_el = counts.shape
    meta: dict[str, Any] = {"n_elements": n_el}
    if n_el > 1:
        meta["element_calibrations"] = [c.to_dict() for c in cals]
        if live is not None:
            meta["element_live_time_s"] = list(live)
        if real is not None:
            meta["element_real_time_s"] = list(real)
    if element is None:
        element = "sum" if n_el > 1 else 0
    if isinstance(element, str):
        if element != "sum":
            raise DataError(f"{path}: element must be an integer index or 'sum', got {element!r}")
        total = np.zeros(n_ch, dtype=float)
        for i in range(n_el):
            if cals[i] == cals[0]:
                total += counts[:, i]
            else:
                total += rebin_counts(counts[:, i], cals[i], cals[0], n_ch)
        meta["element"] = "sum"
        meta["sum_note"] = (
            "calibrated sum of all detector elements, each rebinned onto element 0's energy axis; "
            "live_time_s and real_time_s are the means over elements"
        )
        lt = float(np.mean(live)) if live is not None else None
        rt = float(np.mean(real)) if real is not None else None
        return total, cals[0], lt, rt, meta
    if isinstance(element, bool) or not isinstance(element, (int, np.integer)):
        raise DataError(f"{path}: element must be an integer index or 'sum', got {element!r}")
    i = int(element)
    if not -n_el <= i < n_el:
        raise DataError(
            f"{path}: element {i} does not exist: the file has {n_el} detector element(s) 0..{n_el - 1}"
        )
    i %= n_el
    meta["element"] = i
    return (
        counts[:, i],
        cals[i],
        None if live is None else live[i],
        None if real is None else real[i],
        meta,
    )


def read_epics_mca(path: Path, *, element: int | str | None = None) -> Spectrum:
    """Read an EPICS/XIA MCA text file (``VERSION: / ELEMENTS: / CHANNELS: / ... / DATA:``).

    Parameters
    ----------
    path : pathlib.Path
        The file.
    element : int, "sum" or None
        Detector element to return; ``None`` gives the calibrated sum for multi-element files.

    Returns
    -------
    Spectrum
        Counts (channels,), calibration ``CAL_OFFSET/CAL_SLOPE/CAL_QUAD`` (keV), live and real time (s).
    """
    text = read_text(path)
    lines = text.splitlines()
    header: dict[str, list[str]] = {}
    environment: list[str] = []
    data_start = None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise FormatError(f"{path}: line {i + 1} of the MCA header has no 'KEY:' prefix: {line[:60]!r}")
        key = key.strip().upper()
        if key == "DATA":
            data_start = i + 1
            break
        if key == "ENVIRONMENT":
            environment.append(value.strip())
        elif key.endswith("_LABEL"):
            header[key] = [s.strip() for s in value.split("&") if s.strip()]
        else:
            header[key] = value.split()
    if data_start is None:
        raise FormatError(f"{path}: no 'DATA:' line: the EPICS MCA file is truncated or not an MCA file")
    n_el = 1
    if "ELEMENTS" in header:
        n_el = int(parse_float(header["ELEMENTS"][0] if header["ELEMENTS"] else "", "ELEMENTS", path))
        if n_el < 1 or n_el > 1024:
            raise FormatError(f"{path}: ELEMENTS must be between 1 and 1024, got {n_el}")
    rows = [ln.split() for ln in lines[data_start:] if ln.strip()]
    if not rows:
        raise FormatError(f"{path}: the DATA block is empty (truncated file?)")
    bad = next((k for k, r in enumerate(rows) if len(r) != n_el), None)
    if bad is not None:
        raise FormatError(
            f"{path}: DATA row {bad + 1} has {len(rows[bad])} column(s) but ELEMENTS says {n_el} "
            "(truncated or corrupted file)"
        )
    try:
        counts = np.array(rows, dtype=float)
    except ValueError:
        raise FormatError(f"{path}: the DATA block holds non-numeric values") from None
    if "CHANNELS" in header:
        n_ch = int(parse_float(header["CHANNELS"][0] if header["CHANNELS"] else "", "CHANNELS", path))
        if n_ch != counts.shape[0]:
            raise FormatError(
                f"{path}: header says CHANNELS {n_ch} but the DATA block has {counts.shape[0]} rows "
                "(truncated file or mismatched channel counts)"
            )

    def per_element(key: str, default: float | None) -> list[float] | None:
        if key not in header:
            return None if default is None else [default] * n_el
        vals = parse_floats(header[key], key, path)
        if len(vals) == 1 and n_el > 1:
            vals = vals * n_el
        if len(vals) != n_el:
            raise FormatError(f"{path}: {key} has {len(vals)} value(s) for {n_el} detector element(s)")
        return vals

    offsets = per_element("CAL_OFFSET", None)
    slopes = per_element("CAL_SLOPE", None)
    quads = per_element("CAL_QUAD", 0.0)
    live = per_element("LIVE_TIME", None)
    real = per_element("REAL_TIME", None)
    calibrated = offsets is not None and slopes is not None
    cals: list[EnergyCalibration] = []
    for i in range(n_el):
        if calibrated:
            try:
                cals.append(
                    EnergyCalibration(offsets[i], slopes[i], quads[i]).check_monotonic(counts.shape[0])
                )
            except CalibrationError as exc:
                raise CalibrationError(f"{path}: detector element {i}: {exc}") from None
        else:
            cals.append(EnergyCalibration(0.0, 1.0))
    data, cal, lt, rt, meta = _select_elements(counts, cals, live, real, element, path)
    meta["format"] = "epics_mca"
    for key in ("VERSION", "DATE"):
        if key in header:
            meta[key.lower()] = " ".join(header[key])
    rois = _epics_rois(header)
    if rois:
        meta["rois"] = rois
    if environment:
        meta["environment"] = environment
    return make_spectrum(
        data,
        cal if calibrated else None,
        path,
        live_time_s=lt,
        real_time_s=rt,
        metadata=meta,
        calibration_source="file header (CAL_OFFSET/CAL_SLOPE/CAL_QUAD)",
    )


def _epics_rois(header: dict[str, list[str]]) -> list[dict[str, Any]]:
    rois = []
    for key, labels in header.items():
        m = re.fullmatch(r"ROI_(\d+)_LABEL", key)
        if not m:
            continue
        n = m.group(1)
        left, right = header.get(f"ROI_{n}_LEFT", []), header.get(f"ROI_{n}_RIGHT", [])
        try:
            rois.append({"label": labels[0] if labels else "", "left": int(left[0]), "right": int(right[0])})
        except (IndexError, ValueError):
            continue
    return rois


def write_epics_mca(spectrum: Spectrum, path: Path) -> None:
    """Write a single-element EPICS MCA file (the format :func:`read_epics_mca` reads)."""
    cal = spectrum.calibration
    lines = [
        "VERSION:    3.1",
        "ELEMENTS:   1",
        f"CHANNELS:   {spectrum.n_channels}",
    ]
    if spectrum.real_time_s is not None:
        lines.append(f"REAL_TIME:  {spectrum.real_time_s:.9g}")
    if spectrum.live_time_s is not None:
        lines.append(f"LIVE_TIME:  {spectrum.live_time_s:.9g}")
    if spectrum.metadata.get("calibrated", True):
        lines += [
            f"CAL_OFFSET: {cal.offset_keV!r}",
            f"CAL_SLOPE:  {cal.gain_keV!r}",
            f"CAL_QUAD:   {cal.quadratic_keV!r}",
        ]
    lines.append("DATA: ")
    counts = spectrum.counts
    if counts.dtype.kind in "iu":
        lines += [str(int(v)) for v in counts]
    else:
        lines += [repr(float(v)) for v in counts]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")


def read_amptek_mca(path: Path) -> Spectrum:
    """Read an Amptek ``.mca`` file (``<<PMCA SPECTRUM>>``, optional ``<<CALIBRATION>>``, ``<<DATA>>``).

    The calibration is the least-squares line through the ``<<CALIBRATION>>`` (channel, energy) points;
    the energy unit is taken from its ``LABEL`` (keV unless it says eV).
    """
    text = read_text(path)
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        s = line.strip()
        m = re.fullmatch(r"<<(.+?)>>", s)
        if m:
            current = m.group(1).strip().upper()
            sections.setdefault(current, [])
            continue
        if current is not None and s:
            sections[current].append(s)
    if "DATA" not in sections:
        raise FormatError(f"{path}: no <<DATA>> section: the Amptek MCA file is truncated")
    if "END" not in sections:
        raise FormatError(f"{path}: no <<END>> marker after <<DATA>>: the Amptek MCA file is truncated")
    try:
        counts = np.array([float(v) for v in sections["DATA"]])
    except ValueError:
        raise FormatError(f"{path}: the <<DATA>> section holds non-numeric values") from None
    head: dict[str, str] = {}
    for line in sections.get("PMCA SPECTRUM", []):
        key, sep, value = line.partition(" - ")
        if sep:
            head[key.strip().upper()] = value.strip()
    live = parse_float(head["LIVE_TIME"], "LIVE_TIME", path) if head.get("LIVE_TIME") else None
    real = parse_float(head["REAL_TIME"], "REAL_TIME", path) if head.get("REAL_TIME") else None
    cal = None
    if "CALIBRATION" in sections:
        scale = 1.0
        ch, e = [], []
        for line in sections["CALIBRATION"]:
            if line.upper().startswith("LABEL"):
                label = line.partition("-")[2].strip().lower()
                scale = 1e-3 if label in ("ev", "e v") else 1.0
                continue
            parts = line.split()
            if len(parts) != 2:
                raise FormatError(f"{path}: <<CALIBRATION>> line {line!r} is not 'channel energy'")
            ch.append(parse_float(parts[0], "calibration channel", path))
            e.append(parse_float(parts[1], "calibration energy", path) * scale)
        if ch:
            cal = calibration_from_points(ch, e, path, "Amptek <<CALIBRATION>> points")
    meta: dict[str, Any] = {"format": "amptek_mca", "header": head}
    return make_spectrum(
        counts,
        cal,
        path,
        live_time_s=live,
        real_time_s=real,
        metadata=meta,
        calibration_source="file header (<<CALIBRATION>>)",
    )
