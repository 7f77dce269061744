"""EMSA/MAS spectral data files (``.msa``, ``.emsa``, ``.txt``), read through rosettasciio.

The EMSA/MAS format (ISO 22029; Microscopy Society of America) is a text file of ``#KEYWORD : value``
header lines, a ``#SPECTRUM`` line and the data: ``DATATYPE Y`` (counts only, ``NCOLUMNS`` values a
line, the energy axis from ``XPERCHAN`` and ``OFFSET`` in ``XUNITS``) or ``DATATYPE XY`` (energy, counts
pairs). Bruker, EDAX, Oxford, Thermo and NIST DTSA-II export it.

The file is checked here first, line by line, so that every defect is an error naming the file and
the line (rosettasciio's parser raises ``IndexError`` on a blank header line, ignores the X column of
XY files and never compares the data with ``NPOINTS``); rosettasciio's ``rsciio.msa`` then reads the
counts and types the header keywords.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import CalibrationError, FormatError
from ..core.calibration import EnergyCalibration
from ..core.spectrum import Spectrum
from .bruker import rsciio_read
from .common import calibration_from_axis, make_spectrum, read_text, short_repr

__all__ = ["looks_like_msa", "read_msa"]

#: the first line of every EMSA/MAS file (case and blanks vary between vendors)
_FORMAT_LINE = re.compile(rb"^\s*#\s*FORMAT\s*:\s*EMSA/MAS", re.IGNORECASE)
#: most values a Y data line may hold (EMSA: NCOLUMNS 1-5)
_MAX_COLUMNS = 5
#: most channels accepted (a corrupted NPOINTS must not look like a valid 10^9-channel spectrum)
_MAX_POINTS = 1 << 20
#: negative values below this energy (keV) are zero-peak processing residue and set to 0 (:func:`read_msa`)
_CLIP_BELOW_KEV = 1.0

#: EMSA detector keywords -> (metadata name, unit of the metadata value, the standard's default unit)
_DETECTOR_FIELDS: dict[str, tuple[str, str, str]] = {
    "BEAMKV": ("beam_kV", "kV", "kV"),
    "PROBECUR": ("probe_current_nA", "nA", "nA"),
    "ELEVANGLE": ("elevation_angle_deg", "deg", "dg"),
    "AZIMANGLE": ("azimuth_angle_deg", "deg", "dg"),
    "SOLIDANGLE": ("solid_angle_sr", "sr", "sr"),
    "FWHMMNKA": ("fwhm_mnka_eV", "eV", "eV"),
    "TACTLYR": ("active_layer_um", "um", "cm"),
    "TDEADLYR": ("dead_layer_um", "um", "cm"),
    "TBEWIND": ("be_window_um", "um", "cm"),
    "TAUWIND": ("au_window_um", "um", "cm"),
    "TALWIND": ("al_window_um", "um", "cm"),
    "TPYWIND": ("pyrolene_window_um", "um", "cm"),
    "TBNWIND": ("bn_window_um", "um", "cm"),
    "TDIWIND": ("diamond_window_um", "um", "cm"),
    "THCWIND": ("hydrocarbon_window_um", "um", "cm"),
    # Bruker's user-defined keywords (##FANO, ##MNFWHM -keV)
    "#MNFWHM": ("fwhm_mnka_eV", "eV", "eV"),
    "#FANO": ("fano", "1", "1"),
}
_UNIT_FACTORS: dict[str, dict[str, float]] = {
    "um": {"cm": 1e4, "mm": 1e3, "um": 1.0, "µm": 1.0, "nm": 1e-3, "m": 1e6},
    "deg": {
        "dg": 1.0,
        "deg": 1.0,
        "degree": 1.0,
        "degrees": 1.0,
        "rad": 180.0 / math.pi,
        "mrad": 0.18 / math.pi,
    },
    "kV": {"kv": 1.0, "v": 1e-3},
    "nA": {"na": 1.0, "pa": 1e-3, "ua": 1e3, "a": 1e9},
    "sr": {"sr": 1.0, "msr": 1e-3},
    "eV": {"ev": 1.0, "kev": 1e3},
    "1": {"1": 1.0},
    "s": {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6},
}


def looks_like_msa(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file, BOM and leading blanks removed) starts an EMSA file."""
    return bool(_FORMAT_LINE.match(head))


def _split_key(raw: str) -> tuple[str, str | None]:
    """``"LIVETIME  -s"`` -> ``("LIVETIME", "s")``; user keywords (``##MNFWHM -keV``) keep their name."""
    name, _, unit = raw.partition("-")
    return name.strip().upper(), (unit.strip() or None) if unit else None


def _number(value: str | None, key: str, path: Path, line: int) -> float:
    text = (value or "").strip()
    try:
        out = float(text.replace("D", "E").replace("d", "e"))
    except ValueError:
        raise FormatError(
            f"{path}: line {line}: #{key} is not a number: {short_repr(text)}; fix the header"
        ) from None
    if not math.isfinite(out):
        raise FormatError(f"{path}: line {line}: #{key} is not finite: {short_repr(text)}; fix the header")
    return out


Header = dict[str, tuple[str, str | None, int, str]]


def _scan(text: str, path: Path) -> tuple[Header, list[float], list[float], list[str]]:
    """Check the file line by line.

    Returns the header ``{KEY: (value, unit, line number, keyword as written)}``, the X values (XY files),
    the counts, and the lines in the form rosettasciio's parser expects (``#KEYWORD: value``, no blank
    lines, nothing after ``#ENDOFDATA``).
    """
    lines = text.splitlines()
    header: Header = {}
    normal: list[str] = []
    start = None
    for n, line in enumerate(lines, start=1):
        s = line.strip()
        if not s:
            continue
        if not s.startswith("#"):
            raise FormatError(
                f"{path}: line {n} comes before #SPECTRUM but is not a '#KEYWORD : value' header line "
                f"({short_repr(s)}); the EMSA header is damaged"
            )
        key_raw, sep, value = s.lstrip("#").partition(":")
        key, unit = _split_key(key_raw)
        if key == "SPECTRUM":
            start = n
            normal.append("#SPECTRUM: ")
            break
        if not sep:
            raise FormatError(
                f"{path}: line {n}: header line {short_repr(s)} has no ':' between keyword and value"
            )
        raw = key_raw.strip()
        if s.startswith("##"):  # user-defined keyword: kept apart from the standard ones
            key, raw = "#" + key, "#" + raw
        if key not in header:
            header[key] = (value.strip(), unit, n, raw)
            normal.append(f"#{raw}: {value.strip()}")
    if not header or "FORMAT" not in header or "EMSA/MAS" not in header["FORMAT"][0].upper():
        raise FormatError(
            f"{path}: not an EMSA/MAS file: the first line must be '#FORMAT : EMSA/MAS Spectral Data File'"
        )
    if start is None:
        raise FormatError(f"{path}: no #SPECTRUM line: the EMSA header never ends (truncated file?)")
    for key in ("NPOINTS", "DATATYPE"):
        if key not in header:
            raise FormatError(f"{path}: the EMSA header lacks the required #{key} keyword")
    datatype = header["DATATYPE"][0].strip().upper()
    if datatype not in ("Y", "XY"):
        raise FormatError(
            f"{path}: line {header['DATATYPE'][2]}: DATATYPE {short_repr(header['DATATYPE'][0])} is not "
            "supported; xrfnb reads EMSA spectra of DATATYPE Y (counts) or XY (energy, counts)"
        )
    npoints = _number(header["NPOINTS"][0], "NPOINTS", path, header["NPOINTS"][2])
    if not (npoints.is_integer() and 2 <= npoints <= _MAX_POINTS):
        raise FormatError(
            f"{path}: line {header['NPOINTS'][2]}: NPOINTS {header['NPOINTS'][0]!s:.40} must be a whole "
            f"number of channels between 2 and {_MAX_POINTS}"
        )
    ncolumns = 1.0
    if "NCOLUMNS" in header:
        ncolumns = _number(header["NCOLUMNS"][0], "NCOLUMNS", path, header["NCOLUMNS"][2])
        if not (ncolumns.is_integer() and 1 <= ncolumns <= _MAX_COLUMNS):
            raise FormatError(
                f"{path}: line {header['NCOLUMNS'][2]}: NCOLUMNS {header['NCOLUMNS'][0]!s:.40} must be "
                f"1 to {_MAX_COLUMNS}"
            )
    if datatype == "XY" and ncolumns > 2:
        raise FormatError(
            f"{path}: line {header['NCOLUMNS'][2]}: an XY file with NCOLUMNS {int(ncolumns)} is not "
            "supported (1 or 2 (energy, counts) pairs a line)"
        )
    per_line = int(ncolumns) if datatype == "Y" else 2 * int(ncolumns)
    xs: list[float] = []
    ys: list[float] = []
    for n in range(start + 1, len(lines) + 1):
        s = lines[n - 1].strip()
        if not s:
            continue
        if s.startswith("#"):
            if _split_key(s.lstrip("#").partition(":")[0])[0] == "ENDOFDATA":
                break
            continue
        normal.append(s)
        values = [v for v in re.split(r"[\s,]+", s) if v]
        if datatype == "XY" and len(values) % 2:
            raise FormatError(
                f"{path}: line {n} holds {len(values)} values; an XY file holds (energy, counts) pairs"
            )
        if len(values) > per_line:
            raise FormatError(
                f"{path}: line {n} holds {len(values)} values but NCOLUMNS says {int(ncolumns)} "
                f"{'value' if datatype == 'Y' else 'pair'}(s) a line: several spectra side by side (a "
                "multi-column file) are not supported; export one spectrum per file"
            )
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            bad = next(v for v in values if not _is_float(v))
            raise FormatError(
                f"{path}: line {n}: {short_repr(bad)} in the data is not a number (damaged file?)"
            ) from None
        if datatype == "XY":
            xs.extend(numbers[0::2])
            ys.extend(numbers[1::2])
        else:
            ys.extend(numbers)
        if len(ys) > npoints:
            break
    if len(ys) != int(npoints):
        raise FormatError(
            f"{path}: NPOINTS (line {header['NPOINTS'][2]}) says {int(npoints)} channels but the data "
            f"section holds {'more' if len(ys) > npoints else len(ys)} values (truncated or damaged file?)"
        )
    return header, xs, ys, normal


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _calibration(header: Header, xs: list[float], n: int, path: Path) -> tuple[EnergyCalibration | None, str]:
    """Calibration from XPERCHAN/OFFSET in XUNITS (checked against the X column of XY files)."""
    if "XPERCHAN" not in header:
        if xs:

            return calibration_from_axis(np.asarray(xs), path, "X column (energy)"), "X column of the file"
        return None, ""
    gain = _number(header["XPERCHAN"][0], "XPERCHAN", path, header["XPERCHAN"][2])
    offset = _number(header["OFFSET"][0], "OFFSET", path, header["OFFSET"][2]) if "OFFSET" in header else 0.0
    units = header["XUNITS"][0].strip() if "XUNITS" in header else ""
    if not units:
        # no XUNITS: an XRF/EDS channel is never 0.5 keV wide, so a large channel width means eV
        units = "eV" if abs(gain) >= 0.5 else "keV"
        source = f"file header (XPERCHAN/OFFSET; no XUNITS, taken as {units} from the channel width)"
    else:
        source = f"file header (XPERCHAN/OFFSET, {units})"
    scale = {"ev": 1e-3, "kev": 1.0}.get(units.lower())
    if scale is None:
        raise CalibrationError(
            f"{path}: XUNITS {short_repr(units)}: xrfnb needs an energy axis in eV or keV; pass calibration= "
            "to load() or fix the header"
        )
    try:
        cal = EnergyCalibration(offset * scale, gain * scale).check_monotonic(n)
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: XPERCHAN/OFFSET: {exc}") from None
    if xs:
        axis_keV = np.asarray(xs) * scale
        worst = float(np.max(np.abs(axis_keV - cal.energies_keV(n))))
        if worst > 0.5 * abs(cal.gain_keV):
            raise CalibrationError(
                f"{path}: the X column differs from XPERCHAN/OFFSET by up to {worst:.4g} keV (over half a "
                "channel): the file contradicts itself; fix XPERCHAN/OFFSET or the X column"
            )
    return cal, source


def _detector_metadata(header: Header) -> dict[str, float | str]:
    """Detector, beam and geometry keywords in xrfnb's unit-named fields (values that parse only)."""
    out: dict[str, float | str] = {}
    for key, (name, unit, default_unit) in _DETECTOR_FIELDS.items():
        if key not in header:
            continue
        value, given, _, _ = header[key]
        try:
            number = float(value)
        except ValueError:
            continue
        factor = _UNIT_FACTORS[unit].get((given or default_unit).lower().replace("μ", "µ"))
        if factor is None and given is not None:
            factor = _UNIT_FACTORS[unit].get(given)
        if factor is not None and math.isfinite(number):
            out.setdefault(name, float(f"{number * factor:.12g}"))
    for key, name in (("EDSDET", "detector_type"), ("#RTDET", "detector_name")):
        if key in header and header[key][0]:
            out[name] = header[key][0]
    return out


def _time_s(header: Header, key: str, path: Path) -> float | None:
    if key not in header or not header[key][0].strip():
        return None
    value, unit, line, _ = header[key]
    factor = _UNIT_FACTORS["s"].get((unit or "s").lower())
    if factor is None:
        raise FormatError(f"{path}: line {line}: #{key} in unknown time unit {short_repr(unit)} (expected s)")
    return _number(value, key, path, line) * factor


def read_msa(path: Path) -> Spectrum:
    """Read an EMSA/MAS spectrum.

    Calibration from ``XPERCHAN``/``OFFSET`` in ``XUNITS`` (eV or keV; without ``XUNITS`` the channel
    width decides), ``LIVETIME``/``REALTIME`` (seconds unless the keyword's unit says otherwise) as the
    spectrum's times, the detector keywords (``TACTLYR``, ``TDEADLYR``, ``TBEWIND``, ... in cm;
    ``ELEVANGLE``, ``AZIMANGLE`` in degrees; ``BEAMKV``, ``SOLIDANGLE``, ``FWHMMNKA``) converted into
    ``metadata["emsa_detector"]`` (``active_layer_um``, ``dead_layer_um``, ``be_window_um``,
    ``elevation_angle_deg`` ...), and every header keyword as written in ``metadata["emsa_header"]``.

    Vendor exports can hold negative values in the zero-peak region (Bruker subtracts its zero-peak
    model: -1 to -316 counts at 0.28-0.35 keV in NIST's spectra): negative values below 1 keV, where no
    line xrfnb uses lies, are set to 0 and listed with their channels in
    ``metadata["emsa_negative_counts"]``; a negative value at 1 keV or above is a :class:`DataError`.

    Raises
    ------
    FormatError
        Not an EMSA file, a damaged header, an unsupported ``DATATYPE``, a data line that is not
        numbers or holds more values than ``NCOLUMNS``, or fewer or more values than ``NPOINTS``.
    CalibrationError
        ``XUNITS`` not an energy, a non-increasing axis, or an X column contradicting the header.
    """
    from rsciio.msa import parse_msa_string


    text = read_text(path)
    header, xs, ys, lines = _scan(text, path)
    item = rsciio_read(
        lambda _name: parse_msa_string("\n".join(lines), filename=str(path)), path, "EMSA/MAS spectrum"
    )[0]
    counts = np.asarray(item["data"], dtype=float)
    if counts.shape != (len(ys),) or not np.array_equal(counts, np.asarray(ys), equal_nan=True):
        raise FormatError(  # pragma: no cover - the two parsers read the same numbers
            f"{path}: rosettasciio read {counts.size} values where the file holds {len(ys)}"
        )
    cal, source = _calibration(header, xs, counts.size, path)
    meta_extra: dict[str, Any] = {}
    negative = np.flatnonzero(counts < 0)
    if (
        negative.size
        and cal is not None
        and float(cal.energies_keV(counts.size)[negative].max()) < _CLIP_BELOW_KEV
    ):
        # vendor processing residue in the zero-peak region (Bruker's export subtracts its zero-peak
        # model: down to -316 counts at 0.28-0.35 keV in NIST's Zr spectrum); listed, set to 0
        meta_extra["emsa_negative_counts"] = {
            "channels": negative.tolist(),
            "values": counts[negative].tolist(),
            "note": f"negative values below {_CLIP_BELOW_KEV:g} keV in the file, set to 0 on loading",
        }
        counts = np.where(counts < 0, 0.0, counts)
    if np.all(np.isfinite(counts)) and np.all(counts == np.round(counts)) and np.all(np.abs(counts) < 2**53):
        counts = counts.astype(np.int64)
    meta: dict[str, Any] = {
        "format": "msa",
        "emsa_header": {raw: value for value, _, _, raw in header.values()},
        "emsa_detector": _detector_metadata(header),
        "rsciio_metadata": item.get("metadata", {}),
        **meta_extra,
    }
    for key, name in (("TITLE", "title"), ("DATE", "date"), ("TIME", "time"), ("SIGNALTYPE", "signal_type")):
        if header.get(key, ("",))[0]:
            meta[name] = header[key][0]
    return make_spectrum(
        counts,
        cal,
        path,
        live_time_s=_time_s(header, "LIVETIME", path),
        real_time_s=_time_s(header, "REALTIME", path),
        metadata=meta,
        calibration_source=source,
    )
