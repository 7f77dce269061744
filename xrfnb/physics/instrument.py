"""XRF instruments: X-ray source, beam path, geometry and energy-dispersive detector.

An :class:`Instrument` is a frozen description of everything between the X-ray source and the
spectrum, except the sample: the tube (Ebel's spectrum, :mod:`xrfnb.physics.tube`) or a monochromatic beam,
windows and filters, optics, the atmosphere on both beam paths, the incidence and take-off angles, the
silicon drift detector (window, thickness, resolution, line shape, pile-up) and the channel calibration.
Presets ship as data in ``xrfnb/data/instruments.toml``; users define their own with
``Instrument(...)``, :meth:`Instrument.with_`, :meth:`Instrument.from_toml` (and save them with
:meth:`Instrument.to_toml`), or import a PyMca fit configuration with :meth:`Instrument.from_pymca`.

Example
-------
>>> import xrfnb
>>> m6 = xrfnb.Instrument.preset("bruker-m6")
>>> round(float(m6.fwhm_keV(5.8988)), 3)
0.142
>>> energy_keV, photons = m6.excitation()          # photons/s on the sample per bin or line
>>> wider = m6.with_(fwhm_scale=1.2, tube_voltage_kV=40.0)

Units are in the names. Angles are in degrees, measured from the sample (or anode) surface.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xraylib

from .._errors import CalibrationError, InstrumentError
from ..core.calibration import EnergyCalibration
from .detector import FWHM_PER_SIGMA, MN_KA_KEV, DetectorResponse, compton_escape_ratio
from .fp import scattering_angle_rad
from .instrument_files import (
    bruker_header,
    bruker_settings,
    preset_tables,
    pymca_settings,
    toml_settings,
    toml_text,
    write_toml,
)
from .materials import (
    STANDARD_PRESSURE_MBAR,
    Absorber,
    atmosphere_absorber,
    mass_attenuation_cm2_g,
)
from .tube import TubeSpectrum, anode_z, tube_spectrum

__all__ = ["DEFAULT_INSTRUMENT", "Instrument", "instruments", "resolve_instrument"]

#: the preset used where neither the user nor the file names an instrument (a Bruker M6 Jetstream)
DEFAULT_INSTRUMENT = "bruker-m6"


#: default channel calibration: 10 eV channels from -0.955 keV (Bruker M6 4096-channel spectra)
_DEFAULT_CALIBRATION = EnergyCalibration(-0.955, 0.01)

Atmosphere = Literal["air", "helium", "vacuum"]
Optics = Literal["none", "polycapillary"]


@dataclasses.dataclass(frozen=True)
class Instrument:
    """An XRF spectrometer: source, beam path, geometry and silicon drift detector.

    Parameters
    ----------
    name : str
        Free name (presets: ``"bruker-m6"``, ``"lab-mo"``, ``"synchrotron"``).
    anode : str or None
        Tube anode element symbol; ``None`` for a monochromatic (synchrotron) source.
    tube_voltage_kV : float
        Tube high voltage, kV (5-100); the highest photon energy of a tube source.
    tube_current_mA : float
        Tube current, mA.
    electron_incidence_deg, anode_takeoff_deg : float
        Electron-beam incidence and X-ray take-off angles at the anode, degrees from the anode surface.
    tube_window : Absorber or None
        Tube exit window (typically Be, 50-125 um).
    tube_filters : tuple of Absorber
        Primary-beam filters.
    optics : {"none", "polycapillary"}
        Focusing optics; ``"polycapillary"`` applies :meth:`optics_transmission`.
    polycapillary_cutoff_keV, polycapillary_slope, polycapillary_floor : float
        Shape of the polycapillary transmission (see :meth:`optics_transmission`): the energy at which
        the reflected part falls to half, keV; how steeply it falls above (``T ~ E^-slope``); and the
        energy-independent share that passes without reflection.
    polycapillary_low_keV : float
        Energy below which the polycapillary transmission falls again (absorption at each reflection),
        keV; 0: no low-energy loss.
    source_solid_angle_sr : float
        Solid angle of tube emission that reaches the sample spot, sr (with polycapillary optics, its
        capture solid angle).
    monochromatic_keV : float or None
        Energy of a monochromatic excitation beam, keV. With an anode it is a monochromatised tube and
        must lie below the tube voltage.
    flux_photons_s : float
        Monochromatic beam flux on the sample, photons/s.
    incidence_deg, takeoff_deg : float
        Angles of the incident beam and of the detected beam, degrees from the sample surface.
    detector_azimuth_deg : float
        Angle around the sample normal between the tube's and the detector's directions, degrees: 180
        (default) puts the detector opposite the tube in the plane of incidence (PyMca's and fisx's
        geometry, scattering angle ``incidence + takeoff``); 0 beside the tube. With the two angles it
        sets :attr:`scattering_angle_deg`, and so the Compton shift and the scatter cross-sections.
    atmosphere : {"air", "helium", "vacuum"}
        Gas on the beam paths.
    atmosphere_pressure_mbar : float
        Pressure of that gas, mbar (default 1013.25, one atmosphere); its density scales with it (a
        micro-XRF chamber pumped to 20 mbar holds 2 % of the air of an open path).
    beam_path_mm, detector_path_mm : float
        Gas path lengths source (window) -> sample and sample -> detector window, mm.
    detector_area_mm2 : float
        Active detector area, mm2 (with the distance: the detection solid angle).
    detector_distance_mm : float or None
        Sample-to-detector distance for the solid angle, mm; ``None``: ``detector_path_mm``.
    detector_thickness_um : float
        Active silicon thickness, um.
    detector_window : Absorber or None
        Detector entrance window (typically 8-25 um Be).
    detector_filters : tuple of Absorber
        Further absorbers in front of the detector.
    dead_layer_um : float
        Inactive silicon at the detector entrance, um.
    noise_keV : float
        Electronic-noise contribution to the FWHM, keV.
    fano : float
        Fano factor of silicon (0.10-0.12).
    pair_energy_eV : float
        Mean energy per electron-hole pair in silicon, eV (3.64 at room temperature, 3.85 in PyMca).
    icc_layer_um : float
        Effective thickness of the incomplete-charge-collection layer below the entrance, um: the
        fraction of photons absorbed in it forms the low-energy tail and shelf
        (see :class:`xrfnb.physics.detector.DetectorResponse`).
    shelf_share : float
        Share of the incomplete-charge-collection events in the flat shelf (the rest forms the
        exponential tail).
    tail_length_fwhm : float
        Decay length of the exponential tail in units of the FWHM at the line energy.
    partial_collection : float
        Share of absorbed photons of any energy that lose a random part of their charge (flat shelf from
        0 to E; see :mod:`xrfnb.physics.detector`).
    back_icc_layer_um : float
        Effective thickness of the layer at the back of the crystal whose absorbed photons lose a random
        part of their charge (flat shelf from 0 to E, from photons that reach the back: above about
        10 keV in 450 um Si; see :func:`xrfnb.physics.detector.back_icc_fraction`), um; 0: none.
    detector_compton : bool
        Record Compton scattering in the crystal whose scattered photon escapes: the recoil energy, from 0
        to the Compton edge (see :mod:`xrfnb.physics.detector`); off by default.
    chamber_walls_sr : tuple of (str, float)
        Fluorescence of the instrument itself (chamber, detector snout, lens tip) excited by the radiation
        the sample sends out: for each wall element, the effective solid angle, sr, of a thick wall of
        that element as seen from the beam spot (``{"Ni": 0.05}`` in ``from_dict`` and TOML; stored as
        ``(("Ni", 0.05),)``). Empty (default): no instrument lines. See
        :func:`xrfnb.physics.simulate.chamber_lines`.
    escape : bool
        Whether to model Si K escape peaks.
    pileup_time_s : float
        Pulse-pair resolving time of the pile-up rejector, s.
    calibration : EnergyCalibration
        Channel-to-energy relation of the spectra.
    n_channels : int
        Number of channels.
    description : str
        Free text.
    """

    name: str = "custom"
    anode: str | None = "Rh"
    tube_voltage_kV: float = 50.0
    tube_current_mA: float = 0.6
    electron_incidence_deg: float = 90.0
    anode_takeoff_deg: float = 20.0
    tube_window: Absorber | None = Absorber("Be", 100.0)
    tube_filters: tuple[Absorber, ...] = ()
    optics: Optics = "none"
    polycapillary_cutoff_keV: float = 20.0
    polycapillary_slope: float = 4.0
    polycapillary_floor: float = 0.0
    polycapillary_low_keV: float = 0.0
    source_solid_angle_sr: float = 1e-3
    monochromatic_keV: float | None = None
    flux_photons_s: float = 1e10
    incidence_deg: float = 45.0
    takeoff_deg: float = 45.0
    detector_azimuth_deg: float = 180.0
    atmosphere: Atmosphere = "air"
    atmosphere_pressure_mbar: float = STANDARD_PRESSURE_MBAR
    beam_path_mm: float = 10.0
    detector_path_mm: float = 10.0
    detector_area_mm2: float = 30.0
    detector_distance_mm: float | None = None
    detector_thickness_um: float = 450.0
    detector_window: Absorber | None = Absorber("Be", 12.5)
    detector_filters: tuple[Absorber, ...] = ()
    dead_layer_um: float = 0.0
    noise_keV: float = 0.0863
    fano: float = 0.114
    pair_energy_eV: float = 3.64
    icc_layer_um: float = 0.2
    shelf_share: float = 0.3
    tail_length_fwhm: float = 1.0
    partial_collection: float = 0.0
    back_icc_layer_um: float = 0.0
    detector_compton: bool = False
    chamber_walls_sr: tuple[tuple[str, float], ...] = ()
    escape: bool = True
    pileup_time_s: float = 5e-7
    calibration: EnergyCalibration = _DEFAULT_CALIBRATION
    n_channels: int = 4096
    description: str = ""

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def preset(cls, name: str) -> Instrument:
        """A shipped preset (see :func:`instruments`), e.g. ``Instrument.preset("bruker-m6")``."""
        table = preset_tables()
        key = str(name).strip().lower()
        if key not in table:
            raise InstrumentError(f"unknown instrument preset {name!r}; known presets: {', '.join(table)}")
        return cls.from_dict(table[key], name=key)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, name: str | None = None) -> Instrument:
        """Instrument from a plain mapping of field names (as in the TOML presets).

        Besides the fields, ``fwhm_mnka_eV`` (FWHM at Mn K-alpha in eV) may replace ``noise_keV``, and
        ``base`` names a preset whose values the others override.
        """
        d = dict(d)
        base = d.pop("base", None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"fwhm_mnka_eV"})
        if unknown:
            raise InstrumentError(
                f"instrument {name or d.get('name', '')!r}: unknown setting(s) {', '.join(unknown)}; "
                f"known settings: {', '.join(sorted(fields))}, fwhm_mnka_eV, base"
            )
        if name is not None:
            d.setdefault("name", name)
        # TOML has no null: false (or "none") switches an optional part off
        for key in ("anode", "tube_window", "detector_window", "monochromatic_keV", "detector_distance_mm"):
            if key in d and (d[key] is False or (isinstance(d[key], str) and d[key].lower() == "none")):
                d[key] = None
        for key in ("tube_filters", "detector_filters"):
            if key in d:
                d[key] = tuple(d[key])
        if base is not None:
            return cls.preset(base).with_(**d)
        fwhm = d.pop("fwhm_mnka_eV", None)
        if fwhm is not None:
            d["noise_keV"] = _noise_for_fwhm(
                fwhm / 1000.0, d.get("fano", 0.114), d.get("pair_energy_eV", 3.64)
            )
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path, name: str | None = None) -> Instrument:
        """Read an instrument from a TOML file.

        The file holds either the settings at top level, or one table per instrument (``[my-scanner]``);
        ``name`` picks a table. Keys are the :class:`Instrument` fields (absorbers as inline tables
        ``{material = "Be", thickness_um = 12.5}``, calibration as ``{offset_keV = ..., gain_keV = ...}``),
        plus ``fwhm_mnka_eV`` and ``base`` (a preset to start from).
        """
        settings, name = toml_settings(path, name)
        return cls.from_dict(settings, name=name)

    @classmethod
    def from_pymca(cls, path: str | Path, *, n_channels: int = 4096, name: str | None = None) -> Instrument:
        """Instrument from a PyMca fit configuration (``.cfg``), so PyMca users can reuse their set-up.

        Read: the excitation (one monochromatic energy from ``[fit] energy``; several energies mean a
        tube spectrum, taken from the ``[tube]`` section), beam filters, the atmosphere between sample and
        detector, detector window, dead layer and further absorbers, the Si detector thickness, the
        incidence and take-off angles (``Matrix``), noise, Fano factor and calibration (``[detector]``,
        with PyMca's 3.85 eV per electron-hole pair), flux, detector area and distance
        (``[concentrations]``) and the escape flag. PyMca's hypermet tail parameters describe a different
        line-shape model and are not converted (xrfnb's defaults are kept).

        Parameters
        ----------
        path : str or Path
            PyMca configuration file.
        n_channels : int, optional
            Channels of the spectra (a PyMca configuration does not store it).
        name : str, optional
            Instrument name (default: the file's stem).

        Raises
        ------
        InstrumentError
            Unreadable file, a non-Si detector, or settings xrfnb cannot represent.
        """
        return cls(**pymca_settings(path, n_channels=n_channels, name=name))

    @classmethod
    def from_file(
        cls, path: str | Path, *, preset: str = DEFAULT_INSTRUMENT, name: str | None = None
    ) -> Instrument:
        """Instrument from the XRF header of a Bruker ``.spx`` spectrum or ``.bcf`` hypermap.

        From the header (Esprit's ``TRTXrfHeader``, ``TRTDetectorHeader``, ``TRTSpectrumHeader``): anode,
        tube voltage and current (uA in the file), electron incidence and take-off angles at the anode,
        tube window, optics (``Lens``: polycapillary, otherwise none), primary filter layers, excitation
        and detection angles (``incidence_deg``, ``takeoff_deg``, from the sample surface), excitation and
        detection path lengths, atmosphere and chamber pressure, detector distance (from the detection
        solid angle and the preset's detector area), Si thickness, dead layer, detector window,
        resolution (Esprit's ``sigma^2 = SigmaAbs + SigmaLin E``: ``noise_keV = 2.3548 sqrt(SigmaAbs)``,
        ``fano = SigmaLin / pair energy``) and the channel calibration. Everything else, and every field
        the header lacks or states unusably, comes from ``preset``. ``description`` lists, field by
        field, where each value came from; the parsed header itself is
        :func:`xrfnb.load`'s ``metadata["bruker_header"]``.

        Parameters
        ----------
        path : str or Path
            A Bruker ``.spx`` or ``.bcf`` file with an XRF header (M4 Tornado, M6 Jetstream, ...).
        preset : str, optional
            Preset supplying what the header lacks (default ``"bruker-m6"``).
        name : str, optional
            Instrument name (default: the file's stem).

        Raises
        ------
        InstrumentError
            Not a Bruker file, no XRF header (an electron-microscope file), or a partially covering
            filter layer (``RelativeArea`` < 1), which xrfnb does not model.
        FormatError
            The file cannot be read or its header is damaged.
        """
        path = Path(path)
        header = bruker_header(path, preset)
        base = cls.preset(preset)
        settings = bruker_settings(path, header, base, name=name)
        try:
            return base.with_(**settings)
        except InstrumentError as exc:
            raise InstrumentError(f"{path}: the header gives an invalid instrument: {exc}") from None

    def with_(self, **changes: Any) -> Instrument:
        """Copy with some settings changed, validated (cheap: used to randomise instruments in training).

        Besides the fields, accepts ``fwhm_mnka_eV`` (sets ``noise_keV`` to give that FWHM at Mn Ka),
        ``fwhm_scale`` (multiplies the FWHM at every energy by scaling noise and Fano factor), and
        ``offset_keV`` / ``gain_keV`` (change the calibration).
        """
        if "fwhm_mnka_eV" in changes:
            fwhm = changes.pop("fwhm_mnka_eV") / 1000.0
            changes["noise_keV"] = _noise_for_fwhm(
                fwhm, changes.get("fano", self.fano), changes.get("pair_energy_eV", self.pair_energy_eV)
            )
        if "fwhm_scale" in changes:
            s = float(changes.pop("fwhm_scale"))
            if not s > 0:
                raise InstrumentError(f"fwhm_scale must be > 0, got {s}")
            changes["noise_keV"] = changes.get("noise_keV", self.noise_keV) * s
            changes["fano"] = changes.get("fano", self.fano) * s * s
        if "offset_keV" in changes or "gain_keV" in changes:
            cal = changes.get("calibration", self.calibration)
            changes["calibration"] = EnergyCalibration(
                changes.pop("offset_keV", cal.offset_keV),
                changes.pop("gain_keV", cal.gain_keV),
                cal.quadratic_keV,
            )
        for key in ("tube_filters", "detector_filters"):
            if key in changes:
                changes[key] = tuple(changes[key])
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as exc:
            raise InstrumentError(f"cannot change instrument {self.name!r}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary of all settings (inverse: :meth:`from_dict`)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("tube_window", "detector_window"):
            d[key] = d[key].to_dict() if d[key] is not None else None
        for key in ("tube_filters", "detector_filters"):
            d[key] = [a.to_dict() for a in d[key]]
        d["calibration"] = self.calibration.to_dict()
        d["chamber_walls_sr"] = dict(self.chamber_walls_sr)
        return d

    def to_toml(self, path: str | Path | None = None) -> str:
        """The settings as a TOML table ``[name]`` (read back with :meth:`from_toml`).

        Parameters
        ----------
        path : str or Path, optional
            If given, the text is also written there (atomically: a temporary file, then renamed).

        Returns
        -------
        str
            TOML text.
        """
        text = toml_text(self.name, self.to_dict())
        if path is not None:
            write_toml(path, text)
        return text

    def describe(self) -> str:
        """A short human-readable summary (source, geometry, detector, channels)."""
        def absorbers(items: tuple[Absorber | None, ...]) -> str:
            parts = [f"{a.thickness_um:g} um {a.material}" for a in items if a is not None]
            return ", ".join(parts) if parts else "none"

        if self.monochromatic_keV is not None:
            source = f"monochromatic {self.monochromatic_keV:g} keV, {self.flux_photons_s:.3g} photons/s"
        else:
            source = (
                f"{self.anode} tube {self.tube_voltage_kV:g} kV / {self.tube_current_mA:g} mA, "
                f"window {absorbers((self.tube_window,))}, optics {self.optics}"
            )
        cal = self.calibration
        pressure = ""
        if self.atmosphere != "vacuum" and self.atmosphere_pressure_mbar != STANDARD_PRESSURE_MBAR:
            pressure = f" at {self.atmosphere_pressure_mbar:g} mbar"
        return "\n".join(
            [
                f"Instrument {self.name!r}",
                f"  source:    {source}; filters {absorbers(self.tube_filters)}",
                f"  geometry:  incidence {self.incidence_deg:g} deg, take-off {self.takeoff_deg:g} deg, "
                f"scattering angle {self.scattering_angle_deg:.0f} deg, "
                f"{self.atmosphere}{pressure} {self.beam_path_mm:g} mm + {self.detector_path_mm:g} mm",
                f"  detector:  Si {self.detector_thickness_um:g} um, {self.detector_area_mm2:g} mm2, window "
                f"{absorbers((self.detector_window, *self.detector_filters))}, FWHM "
                f"{1000 * float(self.fwhm_keV(MN_KA_KEV)):.0f} eV at Mn Ka",
                f"  channels:  {self.n_channels} x {1000 * cal.gain_keV:g} eV from {cal.offset_keV:g} keV",
            ]
            + (
                ["  chamber:   " + ", ".join(f"{el} walls {sr:.3g} sr" for el, sr in self.chamber_walls_sr)]
                if self.chamber_walls_sr
                else []
            )
        )

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(self.describe())}</pre>"

    # ------------------------------------------------------------------ derived quantities
    @property
    def max_energy_keV(self) -> float:
        """Highest photon energy in the excitation beam, keV."""
        return self.monochromatic_keV if self.monochromatic_keV is not None else self.tube_voltage_kV

    @property
    def channel_energy_keV(self) -> np.ndarray:
        """Energy of every channel, keV, shape (n_channels,)."""
        return self.calibration.energies_keV(self.n_channels)

    @property
    def scattering_angle_deg(self) -> float:
        """Angle by which detected scatter turned, degrees (from incidence, take-off and azimuth; see
        :func:`xrfnb.physics.fp.scattering_angle_rad`)."""
        angle = scattering_angle_rad(self.incidence_deg, self.takeoff_deg, self.detector_azimuth_deg)
        return math.degrees(angle)

    @property
    def detector_solid_angle_sr(self) -> float:
        """Solid angle of a circular detector of ``detector_area_mm2`` on axis at its distance, sr."""
        r2 = self.detector_area_mm2 / math.pi
        d = self.detector_path_mm if self.detector_distance_mm is None else self.detector_distance_mm
        d = max(d, 1e-3)
        return 2.0 * math.pi * (1.0 - d / math.sqrt(d * d + r2))

    def fwhm_keV(self, energy_keV: np.ndarray | float) -> np.ndarray:
        """Detector resolution (FWHM) at ``energy_keV``, keV.

        ``FWHM = sqrt(noise^2 + 8 ln2 * fano * w * E)`` with the pair-creation energy ``w`` in keV: the
        electronic noise and the Fano-limited statistics of charge creation add in quadrature
        (Knoll, *Radiation detection and measurement*, 4th ed., ch. 13). Shape like ``energy_keV``.
        """
        e = np.maximum(np.asarray(energy_keV, dtype=float), 0.0)
        return np.sqrt(self.noise_keV**2 + FWHM_PER_SIGMA**2 * self.fano * self.pair_energy_eV * 1e-3 * e)

    def check_energy(self, energy_keV: np.ndarray | float, what: str = "energy") -> None:
        """Raise :class:`InstrumentError` if any energy lies above what the source can emit."""
        e = np.asarray(energy_keV, dtype=float)
        if e.size and float(np.max(e)) > self.max_energy_keV * (1 + 1e-9):
            raise InstrumentError(
                f"{what} {float(np.max(e)):g} keV lies above the highest excitation energy of instrument "
                f"{self.name!r} ({self.max_energy_keV:g} keV): raise the tube voltage or drop that energy"
            )

    def optics_transmission(self, energy_keV: np.ndarray) -> np.ndarray:
        """Relative transmission of the focusing optics (1 without optics), shape like ``energy_keV``.

        Polycapillary lenses guide X-rays by total external reflection below the critical angle
        ``theta_c ~ 30 mrad / E[keV]`` of glass, so the captured divergence, and with it the transmission,
        falls steeply at high energy, the more so the more reflections a photon needs (C.A. MacDonald,
        X-Ray Optics Instrum. 2010, 867049); a small share passes the channels without reflection
        whatever its energy. At low energy absorption at each reflection lowers it again, so measured
        transmission curves peak at a few keV. With ``E_c = polycapillary_cutoff_keV``,
        ``n = polycapillary_slope``, ``f = polycapillary_floor`` and ``E_l = polycapillary_low_keV``::

            T(E) = [(1 - f) / (1 + (E / E_c)^n) + f] / (1 + (E_l / E)^3)

        ``T`` is about 1 between ``E_l`` and ``E_c``; the absolute capture efficiency is part of
        ``source_solid_angle_sr``.
        The ``bruker-m4`` and ``bruker-m6`` presets carry ``E_c``, ``n`` and ``f`` fitted to the
        measured Bruker blanks (``benchmarks/bench_physics_real.py``, README "Physics against real
        spectra").
        """
        e = np.asarray(energy_keV, dtype=float)
        if self.optics == "none":
            return np.ones_like(e)
        f = self.polycapillary_floor
        t = (1.0 - f) / (1.0 + (e / self.polycapillary_cutoff_keV) ** self.polycapillary_slope) + f
        if self.polycapillary_low_keV > 0:
            t = t / (1.0 + (self.polycapillary_low_keV / np.maximum(e, 1e-6)) ** 3)
        return t

    def incident_transmission(self, energy_keV: np.ndarray) -> np.ndarray:
        """Transmission from the anode to the sample: tube window, filters, optics and gas path.

        For a monochromatic source (whose flux is given) only the beam filters and the gas path apply.
        """
        e = np.asarray(energy_keV, dtype=float)
        if self.monochromatic_keV is not None:
            return _filters_and_gas(self, e)
        t = self.optics_transmission(e)
        absorbers = [
            self.tube_window,
            *self.tube_filters,
            atmosphere_absorber(self.atmosphere, self.beam_path_mm, self.atmosphere_pressure_mbar),
        ]
        for a in absorbers:
            if a is not None:
                t = t * a.transmission(e)
        return t

    def tube_spectrum(self, *, step_keV: float = 0.05, min_energy_keV: float = 0.5) -> TubeSpectrum:
        """Spectrum leaving the anode (Ebel's model, :func:`xrfnb.physics.tube.tube_spectrum`), before the
        window."""
        if self.anode is None:
            raise InstrumentError(f"instrument {self.name!r} has a monochromatic source, not a tube")
        return tube_spectrum(
            self.anode,
            self.tube_voltage_kV,
            electron_incidence_deg=self.electron_incidence_deg,
            takeoff_deg=self.anode_takeoff_deg,
            step_keV=step_keV,
            min_energy_keV=min_energy_keV,
        )

    def excitation(
        self, *, step_keV: float = 0.05, min_energy_keV: float = 0.5
    ) -> tuple[np.ndarray, np.ndarray]:
        """Photon spectrum incident on the sample, discretised.

        For a tube: Ebel's continuum in bins of ``step_keV`` (centres) from ``min_energy_keV`` up to the
        tube voltage, plus the anode lines at their own energies, times the tube current, the source solid
        angle and the transmission of window, filters, optics and gas path. For a monochromatic source: one
        energy with ``flux_photons_s``.

        Parameters
        ----------
        step_keV : float, optional
            Continuum bin width, keV.
        min_energy_keV : float, optional
            Lowest energy considered, keV.

        Returns
        -------
        energy_keV : numpy.ndarray
            Energies, keV, sorted, shape (n,). Read-only (cached).
        photons : numpy.ndarray
            Photons per second reaching the sample at each energy (continuum bins: in the bin), shape (n,).
            Read-only.
        """
        return _excitation(self, float(step_keV), float(min_energy_keV))

    def detector_efficiency(self, energy_keV: np.ndarray | float) -> np.ndarray:
        """Probability that a photon leaving the sample towards the detector is photo-absorbed in active Si.

        ``T_gas * T_window * T_filters * T_dead * (tau/mu)(E) * (1 - exp(-mu rho t))`` with Si attenuation
        ``mu`` and photo-absorption ``tau`` from xraylib (photons Compton-scattered in the crystal are
        counted as lost), at normal incidence on the detector. With ``detector_compton`` the Compton
        events whose scattered photon escapes are recorded too: ``1 + r(E)`` times that
        (:func:`xrfnb.physics.detector.compton_escape_ratio`).

        Parameters
        ----------
        energy_keV : array_like
            Photon energies, keV, shape (n,).

        Returns
        -------
        numpy.ndarray
            Efficiency in [0, 1], shape like ``energy_keV``.
        """
        e = np.asarray(energy_keV, dtype=float)
        flat = np.atleast_1d(e).ravel()
        out = np.zeros_like(flat)
        ok = flat > 0
        if ok.any():
            eo = flat[ok]
            t = np.ones_like(eo)
            gas = atmosphere_absorber(self.atmosphere, self.detector_path_mm, self.atmosphere_pressure_mbar)
            for a in (gas, self.detector_window, *self.detector_filters):
                if a is not None:
                    t = t * a.transmission(eo)
            mu = mass_attenuation_cm2_g("Si", eo)
            tau = mass_attenuation_cm2_g("Si", eo, kind="photo")
            rho = 2.33
            if self.dead_layer_um > 0:
                t = t * np.exp(-mu * rho * self.dead_layer_um * 1e-4)
            out[ok] = t * (tau / mu) * -np.expm1(-mu * rho * self.detector_thickness_um * 1e-4)
            if self.detector_compton:  # Compton events whose photon escapes are recorded too
                out[ok] *= 1.0 + compton_escape_ratio(eo, self.detector_thickness_um)
        return out.reshape(e.shape)

    def detector_response(self, channel_energy_keV: np.ndarray | None = None) -> DetectorResponse:
        """The :class:`xrfnb.physics.detector.DetectorResponse` of this instrument."""
        return DetectorResponse(self, channel_energy_keV)


def _validate(inst: Instrument) -> None:
    """Check every setting of a new instrument and store them normalised (floats, absorbers, tuples, a
    calibration), raising :class:`InstrumentError` that names the instrument and the setting."""
    put = functools.partial(object.__setattr__, inst)
    floats = (
        "tube_voltage_kV", "tube_current_mA", "electron_incidence_deg", "anode_takeoff_deg",
        "polycapillary_cutoff_keV", "polycapillary_slope", "polycapillary_floor", "polycapillary_low_keV",
        "source_solid_angle_sr",
        "flux_photons_s", "incidence_deg", "takeoff_deg", "detector_azimuth_deg", "atmosphere_pressure_mbar",
        "beam_path_mm", "detector_path_mm", "detector_area_mm2",
        "detector_thickness_um",
        "dead_layer_um", "noise_keV", "fano", "pair_energy_eV", "icc_layer_um", "shelf_share",
        "tail_length_fwhm", "partial_collection", "back_icc_layer_um", "pileup_time_s",
    )  # fmt: skip
    for field in floats:
        value = getattr(inst, field)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise InstrumentError(
                f"instrument {inst.name!r}: {field} must be a number, got {value!r}"
            ) from None
        if not math.isfinite(value):
            raise InstrumentError(f"instrument {inst.name!r}: {field} must be finite, got {value!r}")
        put(field, value)

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise InstrumentError(f"instrument {inst.name!r}: {msg}")

    if inst.anode is not None:

        anode_z(inst.anode)
        need(
            5.0 <= inst.tube_voltage_kV <= 100.0,
            f"tube voltage must be 5-100 kV, got {inst.tube_voltage_kV}",
        )
    if inst.monochromatic_keV is not None:
        mono = float(inst.monochromatic_keV)
        need(math.isfinite(mono) and mono > 0, f"monochromatic energy must be > 0 keV, got {mono!r}")
        if inst.anode is not None:
            need(
                mono <= inst.tube_voltage_kV,
                f"monochromatic energy {mono:g} keV lies above the tube voltage "
                f"{inst.tube_voltage_kV:g} kV: a tube cannot emit photons above its voltage",
            )
        put("monochromatic_keV", mono)
        need(inst.flux_photons_s > 0, f"flux must be > 0 photons/s, got {inst.flux_photons_s}")
    elif inst.anode is None:
        raise InstrumentError(
            f"instrument {inst.name!r}: give an anode (tube source) or monochromatic_keV "
            "(monochromatic beam)"
        )
    put("tube_window", Absorber.coerce(inst.tube_window, "tube_window"))
    put("detector_window", Absorber.coerce(inst.detector_window, "detector_window"))
    put("tube_filters", tuple(Absorber.coerce(f, "tube_filters") for f in inst.tube_filters))
    put("detector_filters", tuple(Absorber.coerce(f, "detector_filters") for f in inst.detector_filters))
    need(inst.tube_current_mA > 0, f"tube current must be > 0 mA, got {inst.tube_current_mA}")
    for field in ("electron_incidence_deg", "anode_takeoff_deg", "incidence_deg", "takeoff_deg"):
        need(
            0.0 < getattr(inst, field) <= 90.0,
            f"{field} must be in (0, 90] degrees, got {getattr(inst, field)}",
        )
    need(
        0.0 <= inst.detector_azimuth_deg <= 180.0,
        f"detector_azimuth_deg must be in [0, 180] degrees, got {inst.detector_azimuth_deg}",
    )
    need(
        inst.optics in ("none", "polycapillary"),
        f"optics must be 'none' or 'polycapillary', got {inst.optics!r}",
    )
    need(inst.polycapillary_cutoff_keV > 0, "polycapillary_cutoff_keV must be > 0")
    need(0.5 <= inst.polycapillary_slope <= 20.0, "polycapillary_slope must be in [0.5, 20]")
    need(0.0 <= inst.polycapillary_floor < 1.0, "polycapillary_floor must be in [0, 1)")
    need(0.0 <= inst.polycapillary_low_keV < inst.polycapillary_cutoff_keV,
         "polycapillary_low_keV must be >= 0 and below polycapillary_cutoff_keV")
    need(0 < inst.source_solid_angle_sr <= 2 * math.pi, "source_solid_angle_sr must be in (0, 2 pi]")
    need(
        inst.atmosphere in ("air", "helium", "vacuum"),
        f"atmosphere must be 'air', 'helium' or 'vacuum', got {inst.atmosphere!r}",
    )
    for field in (
        "beam_path_mm", "detector_path_mm", "dead_layer_um", "icc_layer_um", "pileup_time_s",
        "atmosphere_pressure_mbar",
    ):  # fmt: skip
        need(getattr(inst, field) >= 0, f"{field} must be >= 0, got {getattr(inst, field)}")
    if inst.detector_distance_mm is not None:
        dist = float(inst.detector_distance_mm)
        need(math.isfinite(dist) and dist > 0, f"detector distance must be > 0 mm, got {dist!r}")
        put("detector_distance_mm", dist)
    need(inst.detector_area_mm2 > 0, f"detector area must be > 0 mm2, got {inst.detector_area_mm2}")
    need(
        inst.detector_thickness_um > 0,
        f"detector thickness must be > 0 um, got {inst.detector_thickness_um}",
    )
    need(
        0.0 <= inst.noise_keV <= 1.0, f"electronic noise (FWHM) must be 0-1 keV, got {inst.noise_keV} keV"
    )
    need(0.01 <= inst.fano <= 1.0, f"Fano factor must be 0.01-1 (silicon: ~0.114), got {inst.fano}")
    need(
        2.0 <= inst.pair_energy_eV <= 6.0,
        f"pair energy must be 2-6 eV (Si: 3.64), got {inst.pair_energy_eV}",
    )
    fwhm_mn = float(inst.fwhm_keV(MN_KA_KEV))
    need(
        0.06 <= fwhm_mn <= 1.0,
        f"FWHM at Mn Ka is {1000 * fwhm_mn:.0f} eV; a silicon detector has 60-1000 eV "
        "(the Fano limit of Si is ~115 eV): check noise_keV, fano and pair_energy_eV",
    )
    need(0.0 <= inst.shelf_share <= 1.0, f"shelf_share must be in [0, 1], got {inst.shelf_share}")
    need(
        0.0 <= inst.partial_collection <= 0.2,
        f"partial_collection must be in [0, 0.2], got {inst.partial_collection}",
    )
    need(inst.tail_length_fwhm > 0, f"tail_length_fwhm must be > 0, got {inst.tail_length_fwhm}")
    need(
        0.0 <= inst.back_icc_layer_um <= inst.detector_thickness_um,
        f"back_icc_layer_um must be in [0, detector thickness], got {inst.back_icc_layer_um}",
    )
    put("chamber_walls_sr", _chamber_walls(inst.chamber_walls_sr, need))
    if not isinstance(inst.calibration, EnergyCalibration):
        try:
            put("calibration", EnergyCalibration.from_dict(inst.calibration))
        except (CalibrationError, TypeError, AttributeError) as exc:
            raise InstrumentError(f"instrument {inst.name!r}: invalid calibration: {exc}") from None
    try:
        n_ch = int(inst.n_channels)
    except (TypeError, ValueError):
        raise InstrumentError(f"instrument {inst.name!r}: n_channels must be an integer") from None
    need(
        n_ch >= 16 and n_ch == inst.n_channels,
        f"n_channels must be an integer >= 16, got {inst.n_channels!r}",
    )
    put("n_channels", n_ch)
    try:
        inst.calibration.check_monotonic(n_ch)
    except CalibrationError as exc:
        raise InstrumentError(f"instrument {inst.name!r}: {exc}") from None
    put("escape", bool(inst.escape))
    put("detector_compton", bool(inst.detector_compton))


def _chamber_walls(walls: Any, need: Any) -> tuple[tuple[str, float], ...]:
    """``chamber_walls_sr`` as a tuple of (element symbol, solid angle in sr) sorted by atomic number,
    from a mapping or pairs; each solid angle finite and in [0, 2 pi] sr."""
    items = walls.items() if isinstance(walls, Mapping) else walls
    try:
        pairs = [(str(el).strip(), float(sr)) for el, sr in items]
    except (TypeError, ValueError):
        need(False, f"chamber_walls_sr must map element symbols to solid angles in sr, got {walls!r}")
    out = {}
    for el, sr in pairs:
        z = _element_z(el)
        need(z > 0, f"chamber_walls_sr: unknown element {el!r}")
        need(math.isfinite(sr) and 0.0 <= sr <= 2 * math.pi,
             f"chamber_walls_sr[{el!r}] must be in [0, 2 pi] sr, got {sr!r}")
        need(el not in out, f"chamber_walls_sr names {el!r} twice")
        out[el] = (z, sr)
    return tuple((el, sr) for el, (z, sr) in sorted(out.items(), key=lambda kv: kv[1][0]))


def _element_z(symbol: str) -> int:
    """Atomic number of an element symbol, 0 if it is none."""
    try:
        return int(xraylib.SymbolToAtomicNumber(symbol))
    except ValueError:
        return 0


def _noise_for_fwhm(fwhm_keV: float, fano: float, pair_energy_eV: float) -> float:
    """Electronic noise (FWHM, keV) giving ``fwhm_keV`` at Mn K-alpha."""
    fano_part = FWHM_PER_SIGMA**2 * float(fano) * float(pair_energy_eV) * 1e-3 * MN_KA_KEV
    fwhm = float(fwhm_keV)
    if not fwhm**2 > fano_part:
        raise InstrumentError(
            f"FWHM {1000 * fwhm:.0f} eV at Mn Ka is below the Fano limit {1000 * math.sqrt(fano_part):.0f} eV"
        )
    return math.sqrt(fwhm**2 - fano_part)


@functools.lru_cache(maxsize=64)
def _excitation(inst: Instrument, step_keV: float, min_energy_keV: float) -> tuple[np.ndarray, np.ndarray]:
    if inst.monochromatic_keV is not None:
        e = np.array([inst.monochromatic_keV])
        # the flux is that of the monochromatic beam; beam filters and the gas path still attenuate it
        photons = np.array([inst.flux_photons_s]) * inst.incident_transmission(e)
    else:
        ts = inst.tube_spectrum(step_keV=step_keV, min_energy_keV=min_energy_keV)
        e = np.concatenate([ts.continuum_energy_keV, ts.line_energy_keV])
        raw = np.concatenate([ts.continuum_photons, ts.line_photons])
        order = np.argsort(e, kind="stable")
        e, raw = e[order], raw[order]
        photons = raw * inst.tube_current_mA * inst.source_solid_angle_sr * inst.incident_transmission(e)
    e.setflags(write=False)
    photons.setflags(write=False)
    return e, photons


def _filters_and_gas(inst: Instrument, e: np.ndarray) -> np.ndarray:
    t = np.ones_like(e)
    for a in (
        *inst.tube_filters,
        atmosphere_absorber(inst.atmosphere, inst.beam_path_mm, inst.atmosphere_pressure_mbar),
    ):
        if a is not None:
            t = t * a.transmission(e)
    return t


def instruments() -> tuple[str, ...]:
    """Names of the shipped instrument presets (use with :meth:`Instrument.preset`)."""
    return tuple(preset_tables())



def resolve_instrument(
    instrument: Instrument | str | None = None, metadata: Mapping[str, Any] | None = None
) -> Instrument:
    """The one default-instrument rule: the instrument a piece of data is read with.

    Parameters
    ----------
    instrument : Instrument, str or None
        An instrument (returned as it is) or a preset name. None: the preset the data's ``metadata``
        names under ``"instrument"``, else :data:`DEFAULT_INSTRUMENT`.
    metadata : mapping, optional
        A spectrum's or scan's metadata.

    Returns
    -------
    Instrument

    Examples
    --------
    >>> resolve_instrument().name
    'bruker-m6'
    >>> resolve_instrument(None, {"instrument": "lab-mo"}).name
    'lab-mo'
    """
    if isinstance(instrument, Instrument):
        return instrument
    if instrument is None:
        named = (metadata or {}).get("instrument")
        if named:
            try:
                return Instrument.preset(str(named))
            except InstrumentError:
                raise InstrumentError(
                    f"the data's metadata names the instrument {named!r}, which is not a preset "
                    f"({', '.join(instruments())}): give the instrument (instrument= an Instrument or a "
                    "preset name; on the command line --instrument PRESET)") from None
        instrument = DEFAULT_INSTRUMENT
    return Instrument.preset(str(instrument))
