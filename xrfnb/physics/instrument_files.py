"""Instrument files: the readers and writers behind :class:`~xrfnb.physics.instrument.Instrument`'s
``from_file`` (Bruker ``.spx``/``.bcf`` XRF headers), ``from_pymca`` (PyMca ``.cfg``), ``from_toml`` /
``to_toml`` and the shipped presets (``xrfnb/data/instruments.toml``).

Each reader returns plain settings (a dictionary of :class:`Instrument` field names) that the
classmethods of :class:`Instrument` turn into an instrument, so this module does not import the class
(it would be an import cycle) except for type checking.
"""

from __future__ import annotations

import configparser
import dataclasses
import functools
import math
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xraylib

from .._errors import CalibrationError, InstrumentError
from ..core.calibration import EnergyCalibration
from ..io.bruker import read_xrf_header
from ..io.detect import detect_format
from .detector import FWHM_PER_SIGMA
from .materials import Absorber

if TYPE_CHECKING:
    from .instrument import Instrument

__all__ = [
    "bruker_header",
    "bruker_settings",
    "preset_tables",
    "pymca_settings",
    "toml_settings",
    "toml_text",
    "write_toml",
]


@functools.cache
def preset_tables() -> dict[str, dict[str, Any]]:
    """The shipped presets (``xrfnb/data/instruments.toml``), cached.

    Returns
    -------
    dict
        Lower-case preset name -> its settings (field names as in the TOML file, before
        :meth:`Instrument.from_dict`).
    """
    text = resources.files("xrfnb").joinpath("data/instruments.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    return {k.lower(): v for k, v in data.items()}


def toml_settings(path: str | Path, name: str | None = None) -> tuple[dict[str, Any], str]:
    """The settings of one instrument in a TOML file (read by :meth:`Instrument.from_toml`).

    Parameters
    ----------
    path : str or Path
        TOML file with the settings at top level or one table per instrument.
    name : str, optional
        The table to take; needed when the file defines several.

    Returns
    -------
    settings : dict
        Field names -> values, for :meth:`Instrument.from_dict`.
    name : str
        The instrument's name (the table's; for top-level settings their ``name`` or the file's stem).

    Raises
    ------
    InstrumentError
        Unreadable file, invalid TOML, or no (single) instrument to take.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InstrumentError(f"cannot read instrument file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InstrumentError(f"{path} is not valid TOML: {exc}") from None
    tables = {k: v for k, v in data.items() if isinstance(v, dict) and k not in ("calibration",)}
    tables = {k: v for k, v in tables.items() if k not in ("tube_window", "detector_window")}
    if name is None and (not tables or set(data) - set(tables)):
        return data, data.get("name", path.stem)
    if name is None:
        if len(tables) != 1:
            raise InstrumentError(f"{path} defines instruments {', '.join(tables)}: pass name=")
        name = next(iter(tables))
    if name not in tables:
        raise InstrumentError(f"{path} has no instrument {name!r}; it defines {', '.join(tables)}")
    return tables[name], name


def toml_text(name: str, settings: Mapping[str, Any]) -> str:
    """Settings as a TOML table ``["name"]`` (None written as ``false``, which TOML lacks).

    Parameters
    ----------
    name : str
        Table name.
    settings : mapping
        Field names -> plain values (:meth:`Instrument.to_dict`); ``"name"`` is left out.

    Returns
    -------
    str
        TOML text ending in a newline.
    """

    def value(v: Any) -> str:
        if v is None:
            return "false"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(float(v)) if isinstance(v, float) else str(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, Mapping):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items() if x is not None) + " }"
        return "[" + ", ".join(value(x) for x in v) + "]"

    lines = [f'["{name}"]'] + [f"{k} = {value(v)}" for k, v in settings.items() if k != "name"]
    return "\n".join(lines) + "\n"


def write_toml(path: str | Path, text: str) -> None:
    """Write an instrument file atomically (a temporary file beside it, then renamed).

    Raises
    ------
    InstrumentError
        The file cannot be written.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise InstrumentError(f"cannot write instrument file {path}: {exc}") from None


def _floats(text: str) -> list[float | None]:
    """The comma-separated numbers of a PyMca setting, None where a field is not a number."""
    out: list[float | None] = []
    for tok in text.split(","):
        try:
            out.append(float(tok))
        except ValueError:
            out.append(None)
    return out


def pymca_settings(path: str | Path, *, n_channels: int = 4096, name: str | None = None) -> dict[str, Any]:
    """Instrument settings from a PyMca fit configuration (``.cfg``); see :meth:`Instrument.from_pymca`.

    Parameters
    ----------
    path : str or Path
        PyMca configuration file.
    n_channels : int, optional
        Channels of the spectra (a PyMca configuration does not store it).
    name : str, optional
        Instrument name (default: the file's stem).

    Returns
    -------
    dict
        :class:`Instrument` field names -> values (absorbers as :class:`Absorber`, the calibration as
        :class:`EnergyCalibration`).

    Raises
    ------
    InstrumentError
        Unreadable file, a non-Si detector, or settings xrfnb cannot represent.
    """
    path = Path(path)
    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    cfg.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            cfg.read_file(fh)
    except (OSError, configparser.Error) as exc:
        raise InstrumentError(f"cannot read PyMca configuration {path}: {exc}") from None
    where = f"PyMca configuration {path.name}"

    def items(section: str) -> Mapping[str, str]:
        return cfg[section] if cfg.has_section(section) else {}

    def absorber(material: str, density: float, thickness_cm: float, what: str) -> Absorber:
        section = f"materials.{material}"
        if cfg.has_section(section) and "CompoundList" in cfg[section]:
            formulas = [f.strip() for f in cfg[section]["CompoundList"].split(",")]
            fractions = [f.strip() for f in cfg[section]["CompoundFraction"].split(",")]
            material = ", ".join(f"{f}:{x}" for f, x in zip(formulas, fractions, strict=False))
        try:
            return Absorber(material, round(thickness_cm * 1e4, 9), density)
        except InstrumentError as exc:
            raise InstrumentError(f"{where}: {what}: {exc}") from None

    settings: dict[str, Any] = {"name": name or path.stem, "n_channels": n_channels, "optics": "none"}
    settings["description"] = f"read from PyMca configuration {path.name}"
    settings["atmosphere"] = "vacuum"
    settings["beam_path_mm"] = 0.0
    settings["detector_window"] = None
    tube_filters: list[Absorber] = []
    det_filters: list[Absorber] = []
    for key, value in items("attenuators").items():
        parts = [p.strip() for p in value.split(",")]
        if len(parts) < 4 or _floats(parts[0])[0] != 1 or parts[1] in ("-", ""):
            continue
        material = parts[1]
        density, thickness = [*_floats(",".join(parts[2:4])), None, None][:2]
        if key == "Matrix":
            angles = _floats(",".join(parts[4:6]))
            if len(angles) == 2 and None not in angles:
                settings["incidence_deg"], settings["takeoff_deg"] = angles
            continue
        if density is None or thickness is None or thickness <= 0:
            continue
        funny = _floats(parts[4])[0] if len(parts) > 4 else 1.0
        if funny is not None and abs(funny - 1.0) > 1e-9:
            raise InstrumentError(
                f"{where}: attenuator {key!r} has a 'funny factor' {funny:g} (a partially covering "
                "filter), which xrfnb does not model: set it to 1 in PyMca or adjust the thickness"
            )
        if key == "atmosphere":
            kind = material.lower()
            if kind.startswith("air"):
                settings["atmosphere"] = "air"
            elif kind.startswith("he"):
                settings["atmosphere"] = "helium"
            else:
                det_filters.append(absorber(material, density, thickness, key))
                continue
            settings["detector_path_mm"] = thickness * 10.0
        elif key.startswith("BeamFilter"):
            tube_filters.append(absorber(material, density, thickness, key))
        elif key == "Detector":
            if not material.startswith("Si") or material.rstrip("1") != "Si":
                raise InstrumentError(
                    f"{where}: detector material {material!r}: xrfnb models silicon detectors only"
                )
            settings["detector_thickness_um"] = round(thickness * 1e4, 9)
        elif key == "window":
            settings["detector_window"] = absorber(material, density, thickness, key)
        elif key == "deadlayer" and material.rstrip("1") == "Si":
            settings["dead_layer_um"] = round(thickness * 1e4, 9)
        else:
            det_filters.append(absorber(material, density, thickness, key))
    settings["tube_filters"] = tuple(tube_filters)
    settings["detector_filters"] = tuple(det_filters)

    fit = items("fit")
    energies = _floats(fit.get("energy", ""))
    flags = _floats(fit.get("energyflag", ""))
    weights = _floats(fit.get("energyweight", ""))
    used = [
        (e, w)
        for e, f, w in zip(
            energies, flags + [None] * len(energies), weights + [1.0] * len(energies), strict=False
        )
        if e is not None and f == 1 and (w is None or w > 0)
    ]
    tube = items("tube")
    if len(used) == 1:
        settings["anode"] = None
        settings["monochromatic_keV"] = used[0][0]
    elif tube:
        try:
            settings["anode"] = tube["anode"].strip()
            settings["tube_voltage_kV"] = float(tube["voltage"])
            settings["electron_incidence_deg"] = float(tube.get("alphae", 90.0))
            settings["anode_takeoff_deg"] = float(tube.get("alphax", 90.0))
            win_t = float(tube.get("windowthickness", 0.0))
            settings["tube_window"] = (
                absorber(tube["window"].strip(), float(tube["windowdensity"]), win_t, "tube window")
                if win_t > 0
                else None
            )
        except (KeyError, ValueError) as exc:
            raise InstrumentError(f"{where}: incomplete [tube] section ({exc})") from None
    else:
        raise InstrumentError(
            f"{where}: {len(used)} excitation energies and no [tube] section: xrfnb needs one "
            "monochromatic energy or a tube (anode and voltage)"
        )
    if "escapeflag" in fit:
        settings["escape"] = _floats(fit["escapeflag"])[0] == 1

    det = items("detector")
    try:
        settings["noise_keV"] = float(det["noise"])
        settings["fano"] = float(det["fano"])
        settings["calibration"] = EnergyCalibration(float(det["zero"]), float(det["gain"]))
    except (KeyError, ValueError) as exc:
        raise InstrumentError(f"{where}: incomplete [detector] section ({exc})") from None
    except CalibrationError as exc:
        raise InstrumentError(f"{where}: {exc}") from None
    settings["pair_energy_eV"] = 3.85  # PyMca's FWHM convention
    conc = items("concentrations")
    flux = _floats(conc.get("flux", ""))[0] if conc else None
    if flux and flux > 0:
        settings["flux_photons_s"] = flux
    area = _floats(conc.get("area", ""))[0] if conc else None
    distance = _floats(conc.get("distance", ""))[0] if conc else None
    if area and area > 0 and distance and distance > 0:
        settings["detector_area_mm2"] = area * 100.0
        settings["detector_distance_mm"] = distance * 10.0
    return settings


def bruker_header(path: Path, preset: str) -> dict[str, Any]:
    """The parsed XRF header of a Bruker ``.spx`` or ``.bcf`` file (:func:`xrfnb.io.bruker.read_xrf_header`).

    Parameters
    ----------
    path : Path
        The file.
    preset : str
        The preset :meth:`Instrument.from_file` falls back on (named in the error without a header).

    Returns
    -------
    dict
        The header's fields (``anode_z``, ``tube_voltage_kV``, ``filter_layers``, ...).

    Raises
    ------
    InstrumentError
        No such file, not a Bruker ``.spx``/``.bcf`` file, or no XRF header.
    FormatError
        The file cannot be read or its header is damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise InstrumentError(f"{path}: no such file (give a Bruker .spx or .bcf file)")
    fmt = detect_format(path)
    if fmt not in ("spx", "bcf"):
        raise InstrumentError(
            f"{path}: Instrument.from_file reads Bruker .spx/.bcf XRF headers; this is a {fmt} file "
            "(use Instrument.preset(...).with_(...) for it)"
        )
    h = read_xrf_header(path, fmt)
    if not h:
        raise InstrumentError(
            f"{path}: holds no XRF instrument header (no TRTXrfHeader: an electron-microscope file?); "
            f"use Instrument.preset({preset!r}) instead"
        )
    return h


def bruker_settings(path: Path, h: Mapping[str, Any], base: Instrument, *, name: str | None = None
                    ) -> dict[str, Any]:
    """The settings a Bruker XRF header gives, to override ``base`` with (see :meth:`Instrument.from_file`).

    Parameters
    ----------
    path : Path
        The file the header came from (for messages, the default name and the description).
    h : mapping
        Its header (:func:`bruker_header`).
    base : Instrument
        The preset supplying what the header lacks: its detector area turns the detection solid angle
        into a distance, its pair energy the resolution into a Fano factor.
    name : str, optional
        Instrument name (default: the file's stem).

    Returns
    -------
    dict
        Field names -> values for ``base.with_(...)``, with a ``description`` that lists, field by field,
        where each value came from.

    Raises
    ------
    InstrumentError
        A partially covering filter layer (``RelativeArea`` < 1), which xrfnb does not model.
    """
    settings: dict[str, Any] = {}
    origin: dict[str, str] = {}
    notes: list[str] = []

    def take(field: str, value: Any, where: str) -> None:
        settings[field] = value
        origin[field] = f"header {where}"

    def element(z: int, what: str) -> str | None:
        try:
            return str(xraylib.AtomicNumberToSymbol(int(z)))
        except (ValueError, TypeError):
            notes.append(f"{what}: atomic number {z} unknown, left out")
            return None

    def absorbers(layers: list[dict[str, float]], what: str) -> list[Absorber]:
        out = []
        for layer in layers:
            if layer.get("relative_area", 1.0) < 1.0:
                raise InstrumentError(
                    f"{path}: {what} layer Z={layer['Z']} covers {layer['relative_area']:g} of the beam "
                    "(RelativeArea); xrfnb models only full-area filters"
                )
            symbol = element(layer["Z"], what)
            if symbol is not None and layer["thickness_um"] > 0:
                out.append(Absorber(symbol, layer["thickness_um"]))
        return out

    if "anode_z" in h and (symbol := element(int(h["anode_z"]), "Anode")) is not None:
        take("anode", symbol, "TRTXrfHeader/Anode")
    for field, key, tag in (
        ("tube_voltage_kV", "tube_voltage_kV", "Voltage"),
        ("electron_incidence_deg", "tube_incidence_deg", "TubeIncidentAngle"),
        ("anode_takeoff_deg", "tube_takeoff_deg", "TubeTakeOffAngle"),
        ("incidence_deg", "excitation_angle_deg", "ExcitationAngle"),
        ("takeoff_deg", "detection_angle_deg", "DetectionAngle"),
        ("beam_path_mm", "excitation_path_mm", "ExcitationPathLength"),
        ("detector_path_mm", "detection_path_mm", "DetectionPathLength"),
        ("atmosphere_pressure_mbar", "chamber_pressure_mbar", "ChamberPressure"),
    ):
        if key in h:
            take(field, h[key], f"TRTXrfHeader/{tag}")
    if h.get("tube_current_uA", 0) > 0:
        take("tube_current_mA", h["tube_current_uA"] / 1000.0, "TRTXrfHeader/Current (uA)")
    if "tube_window_layers" in h:
        window = absorbers(h["tube_window_layers"], "TubeWindow")
        take("tube_window", window[0] if window else None, "TRTXrfHeader/TubeWindow")
        extra_filters = window[1:]
    else:
        extra_filters = []
    if "filter_layers" in h:
        filters = absorbers(h["filter_layers"], "ExcitationFilter")
        take(
            "tube_filters",
            tuple(extra_filters + filters),
            f"TRTXrfHeader/ExcitationFilter {h.get('filter_name') or ''!r}".strip(),
        )
    if "optic" in h:
        optic = h["optic"].strip().lower()
        take(
            "optics",
            "polycapillary" if optic in ("lens", "polycapillary") else "none",
            f"TRTXrfHeader/Optic {h['optic']!r}",
        )
    if "atmosphere" in h:
        gas = {"air": "air", "helium": "helium", "he": "helium", "vacuum": "vacuum"}.get(
            h["atmosphere"].strip().lower()
        )
        if gas is None:
            notes.append(f"Atmosphere {h['atmosphere']!r} unknown: preset's {base.atmosphere!r} kept")
        else:
            take("atmosphere", gas, f"TRTXrfHeader/Atmosphere {h['atmosphere']!r}")
    if h.get("detector_thickness_um", 0) > 0:
        take(
            "detector_thickness_um",
            h["detector_thickness_um"],
            "TRTDetectorHeader/DetectorThickness (mm)",
        )
    if "dead_layer_um" in h:
        take("dead_layer_um", h["dead_layer_um"], "TRTDetectorHeader/SiDeadLayerThickness")
    if "detector_window_layers" in h:
        window = absorbers(h["detector_window_layers"], "WindowLayers")
        take("detector_window", window[0] if window else None, "TRTDetectorHeader/WindowLayers")
        if window[1:]:
            take("detector_filters", tuple(window[1:]), "TRTDetectorHeader/WindowLayers")
    omega = h.get("detection_solid_angle_sr", 0.0)
    if 0 < omega < 2 * math.pi:
        c = 1.0 - omega / (2 * math.pi)  # on-axis disc: omega = 2 pi (1 - d / sqrt(d^2 + r^2))
        r = math.sqrt(base.detector_area_mm2 / math.pi)
        take(
            "detector_distance_mm",
            round(r * c / math.sqrt(1.0 - c * c), 6),
            f"TRTXrfHeader/SolidAngleDetection ({omega:.4g} sr: the header's fraction of 4 pi), "
            f"preset area {base.detector_area_mm2:g} mm2",
        )
    sig_abs, sig_lin = h.get("sigma_abs_keV2"), h.get("sigma_lin_keV")
    if sig_abs is not None and sig_lin is not None and sig_abs >= 0 and sig_lin > 0:
        noise = FWHM_PER_SIGMA * math.sqrt(sig_abs)
        fano = sig_lin / (base.pair_energy_eV * 1e-3)
        if 0.01 <= fano <= 1.0 and noise <= 1.0:
            take("noise_keV", noise, "TRTSpectrumHeader/SigmaAbs")
            take(
                "fano",
                fano,
                f"TRTSpectrumHeader/SigmaLin with the preset's {base.pair_energy_eV:g} eV/pair",
            )
        else:
            notes.append(
                f"SigmaAbs {sig_abs:g} keV2 / SigmaLin {sig_lin:g} keV give Fano {fano:.3g} and noise "
                f"{noise:.3g} keV, outside what a Si detector has: the preset's resolution kept"
            )
    if "calibration_offset_keV" in h and h.get("calibration_gain_keV", 0) > 0:
        take(
            "calibration",
            EnergyCalibration(h["calibration_offset_keV"], h["calibration_gain_keV"]),
            "TRTSpectrumHeader/CalibAbs, CalibLin",
        )
    if h.get("n_channels", 0) >= 16:
        take("n_channels", int(h["n_channels"]), "TRTSpectrumHeader/ChannelCount")
    for layer_key, what in (("detector_layers", "DetLayers"), ("optic_params", "OpticParam")):
        if h.get(layer_key):
            notes.append(
                f"{what} in the header is not modelled (kept in load()'s metadata['bruker_header'])"
            )
    fields = [f.name for f in dataclasses.fields(base) if f.name not in ("name", "description")]
    lines = [
        f"Instrument from the XRF header of {path.name} "
        f"({h.get('tube_type', 'tube ?')}, {h.get('detector_type', 'detector ?')}); "
        f"what it lacks from preset {base.name}.",
        *(f"  {f}: {origin.get(f, 'preset ' + base.name)}" for f in fields),
        *(f"  note: {n}" for n in notes),
    ]
    settings["name"] = name or path.stem
    settings["description"] = "\n".join(lines)
    return settings
