"""Element detection, background estimation, element maps (fast linear fit) and ROI maps.

This is the "expert" route from spectra to elements, the one conservators use today (PyMca's fast
linear fit, Bruker's element maps):

* :func:`snip_background` -- SNIP background (Ryan et al. 1988; Morháč et al. 1997) with the
  log-log-square-root (LLS) transform.
* :func:`detect_elements` -- peak search on a (sum) spectrum, peaks matched to K/L/M line families,
  with escape, sum and scatter peaks and setup lines (argon of the air path) explained away.
* :func:`fit_elements` -- non-negative linear least squares over line-family templates built from the
  detector response, plus scatter and background terms, solved for every pixel of a scan with one
  design matrix (block by block, bounded memory).
* :func:`roi_maps` -- region-of-interest integration with background subtraction.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any

import numpy as np
import scipy.optimize
import xraylib
import xraylib_np

from .._errors import FitError, XRFNBError
from ..core.lines import atomic_number, element_symbol
from ..core.spectrum import Scan, Spectrum
from ..physics.detector import DetectorResponse, escape_fraction, si_ka_keV
from ..physics.fp import scattering_angle_rad

__all__ = [
    "COMMON_ELEMENTS",
    "DetectedElement",
    "DetectedPeak",
    "ElementMaps",
    "detect_elements",
    "fit_elements",
    "roi_maps",
    "snip_background",
]

FAMILIES = ("K", "L", "M")
_log = logging.getLogger("xrfnb.fit")


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ElementMaps:
    """Per-pixel element intensities from :func:`fit_elements` or :func:`roi_maps`.

    Attributes
    ----------
    elements : tuple of str
        Chemical symbols, one per map (``("Fe", "Pb")``).
    families : tuple of str
        Line family fitted for each element (``"K"``, ``"L"`` or ``"M"``).
    intensity : numpy.ndarray
        Fitted counts of the whole line family (all its lines, detected photons, escape peaks
        included), shape (rows, cols, n_elements), float32.
    sigma : numpy.ndarray
        1-sigma uncertainty of ``intensity`` from Poisson statistics, counts, same shape, float32.
    detection_limit : numpy.ndarray
        Detection limit in counts (3 sigma of the fit with the element absent), same shape, float32.
    chi2 : numpy.ndarray
        Reduced chi-square of the fit per pixel, shape (rows, cols), float32 (NaN for ROI maps).
    residual : numpy.ndarray
        Residual (data minus model) of the summed spectrum, counts per channel, shape (channels,).
    metadata : dict
        Free-form details: energy range, background method, scatter terms, setup elements ...

    Notes
    -----
    A single spectrum gives ``rows = cols = 1``. ``maps["Pb"]`` is the (rows, cols) intensity map of
    lead; ``maps["Pb L"]`` names the family explicitly.
    """

    elements: tuple[str, ...]
    families: tuple[str, ...]
    intensity: np.ndarray
    sigma: np.ndarray
    detection_limit: np.ndarray
    chi2: np.ndarray
    residual: np.ndarray
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        elements = tuple(str(e) for e in self.elements)
        families = tuple(str(f) for f in self.families)
        if len(elements) != len(families):
            raise FitError(f"ElementMaps: {len(elements)} elements but {len(families)} families")
        bad = [f for f in families if f not in FAMILIES]
        if bad:
            raise FitError(f"ElementMaps: unknown line families {bad}; use 'K', 'L' or 'M'")
        if len(set(elements)) != len(elements):
            raise FitError(f"ElementMaps: elements must be unique, got {elements}")
        arrays = {}
        for name in ("intensity", "sigma", "detection_limit"):
            a = np.asarray(getattr(self, name), dtype=np.float32)
            if a.ndim != 3 or a.shape[2] != len(elements):
                raise FitError(
                    f"ElementMaps: {name} must have shape (rows, cols, {len(elements)}), got {a.shape}"
                )
            arrays[name] = a
        shape = arrays["intensity"].shape
        for name in ("sigma", "detection_limit"):
            if arrays[name].shape != shape:
                raise FitError(f"ElementMaps: {name} has shape {arrays[name].shape}, expected {shape}")
        chi2 = np.asarray(self.chi2, dtype=np.float32)
        if chi2.shape != shape[:2]:
            raise FitError(f"ElementMaps: chi2 must have shape {shape[:2]}, got {chi2.shape}")
        residual = np.asarray(self.residual, dtype=np.float64)
        if residual.ndim != 1:
            raise FitError(f"ElementMaps: residual must be 1-D (channels,), got {residual.shape}")
        for name, a in (*arrays.items(), ("chi2", chi2), ("residual", residual)):
            a.flags.writeable = False
            object.__setattr__(self, name, a)
        object.__setattr__(self, "elements", elements)
        object.__setattr__(self, "families", families)
        object.__setattr__(self, "metadata", dict(self.metadata))

    # -- shape and naming ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the maps."""
        return (int(self.intensity.shape[0]), int(self.intensity.shape[1]))

    @property
    def labels(self) -> tuple[str, ...]:
        """``"Fe K"``, ``"Pb L"`` ... one per element."""
        return tuple(f"{e} {f}" for e, f in zip(self.elements, self.families, strict=True))

    def index(self, key: str) -> int:
        """Position of an element (``"Pb"``) or element family (``"Pb L"``) in :attr:`elements`."""
        k = str(key).strip()
        parts = k.replace("-", " ").replace("_", " ").split()
        if len(parts) == 2 and (parts[0], parts[1]) in zip(self.elements, self.families, strict=True):
            return self.labels.index(f"{parts[0]} {parts[1]}")
        if len(parts) == 1 and parts[0] in self.elements:
            return self.elements.index(parts[0])
        raise FitError(f"no map for {key!r}: the maps hold {', '.join(self.labels) or 'no elements'}")

    def __contains__(self, key: object) -> bool:
        try:
            self.index(str(key))
        except FitError:
            return False
        return True

    def __getitem__(self, key: str) -> np.ndarray:
        """Intensity map of one element, shape (rows, cols), counts."""
        return self.intensity[:, :, self.index(key)]

    def __len__(self) -> int:
        return len(self.elements)

    # -- derived maps ----------------------------------------------------------------------------
    def significance(self) -> np.ndarray:
        """``intensity / sigma`` (0 where sigma is 0), shape (rows, cols, n_elements)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(self.sigma > 0, self.intensity / self.sigma, 0.0)
        return s.astype(np.float32)

    def present(self) -> np.ndarray:
        """True where an element's intensity exceeds its detection limit, shape (rows, cols, n_el), bool."""
        return (self.intensity > self.detection_limit) & (self.intensity > 0)

    def __repr__(self) -> str:
        rows, cols = self.shape
        return f"ElementMaps({rows} x {cols} pixels, {', '.join(self.labels)})"


@dataclasses.dataclass(frozen=True)
class DetectedPeak:
    """One peak of the spectrum used as evidence for an element.

    Attributes
    ----------
    energy_keV : float
        Measured peak position in keV.
    line : str
        Line group it was matched to (``"Ka"``, ``"Kb"``, ``"La"``, ``"Lb"``, ``"Ma"`` ...).
    line_energy_keV : float
        Reference energy of that line group (xraylib), keV.
    significance : float
        Net peak height over its Poisson noise, in sigma.
    net_counts : float
        Net (background-subtracted) counts of the peak, about +/- 1 FWHM.
    """

    energy_keV: float
    line: str
    line_energy_keV: float
    significance: float
    net_counts: float


@dataclasses.dataclass(frozen=True)
class DetectedElement:
    """An element found in a spectrum by :func:`detect_elements`.

    Attributes
    ----------
    element : str
        Chemical symbol.
    family : str
        Line family it was found by (``"K"``, ``"L"``, ``"M"``).
    peaks : tuple of DetectedPeak
        The spectrum's peaks explained by this element (main line first).
    score : float
        Significance of the element's fitted family intensity, in sigma.
    origin : str
        ``"sample"``, or ``"setup"`` when the lines come from the measuring set-up (argon of the air
        path, fluorescence of the tube anode) rather than from the object.
    note : str
        Human-readable explanation (e.g. ``"explained by setup: argon in the air path"``).
    """

    element: str
    family: str
    peaks: tuple[DetectedPeak, ...]
    score: float
    origin: str = "sample"
    note: str = ""

    @property
    def label(self) -> str:
        """``"Fe K"``."""
        return f"{self.element} {self.family}"


# ------------------------------------------------------------------------------------------------
# SNIP background
# ------------------------------------------------------------------------------------------------
def _lls(y: np.ndarray) -> np.ndarray:
    return np.log(np.log(np.sqrt(y + 1.0) + 1.0) + 1.0)


def _lls_inv(v: np.ndarray) -> np.ndarray:
    return (np.exp(np.exp(v) - 1.0) - 1.0) ** 2 - 1.0


def snip_background(
    counts: Any,
    *,
    width_keV: float | None = None,
    iterations: int | None = None,
    gain_keV: float | None = None,
    lls: bool = True,
    decreasing: bool = True,
    smooth_channels: int = 0,
) -> np.ndarray:
    """Background of XRF spectra by SNIP (Statistics-sensitive Non-linear Iterative Peak-clipping).

    Each iteration ``p`` replaces every channel by ``min(v[i], (v[i-p] + v[i+p]) / 2)``; peaks
    narrower than the clipping window are removed while the smooth continuum stays.

    Parameters
    ----------
    counts : array-like or Spectrum or Scan-like
        Counts, shape (channels,) or (n, channels) (any leading shape); a :class:`~xrfnb.Spectrum`
        is accepted and gives its own calibration for ``width_keV``.
    width_keV : float, optional
        Largest clipping half-window in keV (needs ``gain_keV`` or a Spectrum). About 2-3 times the
        detector FWHM removes single peaks; default 0.4 keV.
    iterations : int, optional
        Largest clipping half-window in channels; overrides ``width_keV``.
    gain_keV : float, optional
        keV per channel, to convert ``width_keV`` to channels (default: the spectrum's calibration,
        or 0.01 keV/channel for bare arrays).
    lls : bool, optional
        Apply the log-log-square-root transform before clipping (Morháč et al. 1997): compresses
        the dynamic range so weak peaks beside strong ones are clipped correctly. Default True.
    decreasing : bool, optional
        Run the window from largest to smallest (Morháč's decreasing-window variant, fewer artefacts
        near steep edges); False runs it increasing as in Ryan et al. 1988.
    smooth_channels : int, optional
        Width of a moving-average smoothing applied before clipping (0 = none). Smoothing keeps
        SNIP from following the downward Poisson fluctuations of low-count spectra.

    Returns
    -------
    numpy.ndarray
        Background, float64, same shape as ``counts``; never above the (smoothed) input.

    References
    ----------
    C.G. Ryan et al., Nucl. Instrum. Meth. B 34 (1988) 396-402.
    M. Morháč et al., Nucl. Instrum. Meth. A 401 (1997) 113-132.
    """
    cal = getattr(counts, "calibration", None)
    data = getattr(counts, "counts", counts)
    y = np.array(data, dtype=np.float64)
    if y.ndim == 0 or y.shape[-1] < 3:
        raise FitError(f"snip_background needs spectra of at least 3 channels, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise FitError("snip_background: counts contain NaN or infinite values")
    shape = y.shape
    y = y.reshape(-1, shape[-1])
    n = y.shape[1]
    if iterations is None:
        if gain_keV is None:
            gain_keV = float(cal.gain_keV) if cal is not None else 0.01
        if gain_keV <= 0:
            raise FitError(f"snip_background: gain_keV must be > 0, got {gain_keV}")
        w = 0.4 if width_keV is None else float(width_keV)
        if not w > 0:
            raise FitError(f"snip_background: width_keV must be > 0, got {width_keV}")
        iterations = round(w / gain_keV)
    iterations = int(iterations)
    if iterations < 1:
        raise FitError(f"snip_background: the clipping window must be at least 1 channel, got {iterations}")
    iterations = min(iterations, (n - 1) // 2)
    y = np.maximum(y, 0.0)
    if smooth_channels and smooth_channels > 1:
        k = int(smooth_channels)
        kernel = np.ones(k) / k
        pad = k // 2
        yp = np.pad(y, ((0, 0), (pad, k - 1 - pad)), mode="edge")
        y = np.stack([np.convolve(row, kernel, mode="valid") for row in yp])
    v = _lls(y) if lls else y.copy()
    order = range(iterations, 0, -1) if decreasing else range(1, iterations + 1)
    for p in order:
        mid = 0.5 * (v[:, : n - 2 * p] + v[:, 2 * p :])
        np.minimum(v[:, p : n - p], mid, out=v[:, p : n - p])
    bg = _lls_inv(v) if lls else v
    bg = np.minimum(np.maximum(bg, 0.0), y)
    return bg.reshape(shape)



# ------------------------------------------------------------------------------------------------
# Line families and their templates
# ------------------------------------------------------------------------------------------------
_IUPAC_RE = re.compile(r"^(K|L[1-3]|M[1-5])([K-P][1-7]?)_LINE$")
_EDGE = {"K": "K_SHELL", "L": "L3_SHELL", "M": "M5_SHELL"}
#: elements never reported from a sample: noble gases other than argon, short-lived radioactive elements
_NEVER = frozenset({2, 10, 36, 54, 86, 43, 61, 84, 85, 87, 88, 89, 91})
#: elements detect_elements considers by default: those found in paintings, grounds, substrates, metal
#: leaf, conservation materials and reference standards (pigments: Pb Hg Cd Se As Cr Co Cu Zn Ti Ba Sn Sb
#: Fe Mn Ca K Sr Zr Bi ...; leaf and alloys: Au Ag Pt Pd Ni W Mo; fillers and glass: Na Mg Al Si P S Cl
#: Rb Br I Ga Ge Y Nb In; setup: Ar). Rarer elements (lanthanides, Cs, Te, Th, U ...) have L lines on top of
#: these elements' K lines (cerium, praseodymium and neodymium pigments included): pass
#: ``candidates="all"`` to consider them too.
COMMON_ELEMENTS = (
    "Na", "Mg", "Al", "Si", "P", "S", "Cl", "Ar", "K", "Ca", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu",
    "Zn", "Ga", "Ge", "As", "Se", "Br", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Pd", "Ag", "Cd", "In", "Sn", "Sb",
    "I", "Ba", "W", "Pt", "Au", "Hg", "Pb", "Bi",
)
#: main line group of each family
_MAIN = {"K": "Ka", "L": "La", "M": "Ma"}
#: second line group checked for consistency where it should be visible
_SECOND = {"K": "Kb", "L": "Lb", "M": ""}
#: 2 * Compton profile FWHM of light matrices in atomic units of momentum (C, O: ~1.3-1.6 a.u.)
_COMPTON_PROFILE_FWHM_AU = 1.5
_SI_ESCAPE_KEV = 1.74
#: parent-line energy separating the two free escape terms (the escape excess varies with energy)
_ESCAPE_SPLIT_KEV = 5.0
#: share of a model term treated as systematic error in detection (peak shape, tail and ratio errors)
_SYSTEMATIC = 0.02
#: relative model error of the lines of other elements in the free-ratio test of detect_elements: peak
#: shape (tail, shelf, FWHM) errors that freed line ratios cannot absorb
_MODEL_ERROR = 0.02
#: spacing, in detector FWHMs, of the triangular background terms of detect_elements
_HATS_FWHM = 3.0
#: hats are used only for spectra with at least this many counts in the fitted range (an empirical
#: threshold): below, Poisson noise covers the model's smooth errors and the hats would only cost
#: sensitivity (the broad peaks of a 0.3 keV-FWHM detector at 4e5 counts look like humps to them)
_HATS_MIN_COUNTS = 5e5
#: free the L families by (subshell, line group) rather than by subshell in the free-ratio test; off:
#: group-level freedom let the L lines of one element absorb a neighbour's K line (I Lg1 and V Ka)
_FINE_L_GROUPS = False


@functools.lru_cache(maxsize=1)
def _iupac_macros() -> tuple[tuple[str, int], ...]:
    out = []
    for name in dir(xraylib):
        m = _IUPAC_RE.match(name)
        if m:
            out.append((name[: -len("_LINE")], int(getattr(xraylib, name))))
    return tuple(out)


def _group_of(iupac: str) -> str:
    """Spectroscopist's line group of an IUPAC line (``"KL3"`` -> ``"Ka"``, ``"L2M4"`` -> ``"Lb"``)."""
    init, final = (iupac[0], iupac[1:]) if iupac[0] == "K" else (iupac[:2], iupac[2:])
    if init == "K":
        return "Ka" if final.startswith("L") else "Kb"
    if init == "L3":
        if final in ("M4", "M5"):
            return "La"
        return "Ll" if final == "M1" else "Lb"
    if init == "L2":
        if final == "M1":
            return "Ln"
        return "Lb" if final.startswith("M") else "Lg"
    if init == "L1":
        return "Lb" if final.startswith("M") else "Lg"
    if init == "M5":
        return "Ma" if final in ("N6", "N7") else "Mz"
    if init == "M4":
        return "Mb" if final == "N6" else "Mz"
    return "Mg"


@functools.lru_cache(maxsize=2048)
def _family_lines(z: int, family: str) -> tuple[tuple[str, int, float], ...]:
    """(iupac, xraylib macro, energy keV) of every radiative line of one family of element ``z``."""
    out = []
    for iupac, macro in _iupac_macros():
        if not iupac.startswith(family):
            continue
        try:
            energy = xraylib.LineEnergy(z, macro)
            rate = xraylib.RadRate(z, macro)
        except ValueError:
            continue
        if energy > 0.25 and rate > 0:  # below 0.25 keV nothing reaches an SDD
            out.append((iupac, macro, float(energy)))
    return tuple(out)


def _edge_keV(z: int, family: str) -> float:
    try:
        return float(xraylib.EdgeEnergy(z, getattr(xraylib, _EDGE[family])))
    except ValueError:
        return np.inf


@dataclasses.dataclass(frozen=True, eq=False)
class _FamilyModel:
    """Lines of one element family as seen by one instrument (thin-sample approximation)."""

    element: str
    z: int
    family: str
    energies_keV: np.ndarray  # (lines,)
    weights: np.ndarray  # (lines,) sum 1: share of the family's detected photons
    groups: tuple[str, ...]  # line group per line
    relative_yield: float
    subshells: tuple[str, ...] = ()  # initial vacancy subshell per line ("K", "L1", "L2", "L3", "M5" ...)

    def group_energy(self, group: str) -> tuple[float, float]:
        """(weighted mean energy keV, share of the family) of one line group; (nan, 0) if absent."""
        sel = np.array([g == group for g in self.groups])
        share = float(self.weights[sel].sum()) if sel.any() else 0.0
        if share <= 0:
            return float("nan"), 0.0
        return float(np.average(self.energies_keV[sel], weights=self.weights[sel])), share

    @property
    def main_energy_keV(self) -> float:
        return self.group_energy(_MAIN[self.family])[0]


def _max_excitation_keV(instrument: Any) -> float:
    mono = getattr(instrument, "monochromatic_keV", None)
    if mono:
        return float(mono)
    return float(instrument.tube_voltage_kV)


def _excitation_grid(instrument: Any, max_points: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Incident spectrum (energy keV, photons) rebinned to at most ``max_points`` points."""
    mono = getattr(instrument, "monochromatic_keV", None)
    if mono:
        return np.array([float(mono)]), np.array([1.0])
    energy, photons = instrument.excitation()
    energy = np.asarray(energy, dtype=float).ravel()
    photons = np.asarray(photons, dtype=float).ravel()
    keep = (photons > 0) & np.isfinite(photons) & (energy > 0)
    energy, photons = energy[keep], photons[keep]
    if energy.size == 0:
        raise FitError(f"instrument {getattr(instrument, 'name', '?')!r} has an empty excitation spectrum")
    if energy.size > max_points:
        # keep the strongest (line) points, rebin the rest into equal-energy bins
        n_lines = max_points // 4
        top = np.argsort(photons)[-n_lines:]
        rest = np.setdiff1d(np.arange(energy.size), top)
        edges = np.linspace(energy.min(), energy.max() + 1e-9, max_points - n_lines + 1)
        idx = np.digitize(energy[rest], edges) - 1
        ph_bins = np.bincount(idx, weights=photons[rest], minlength=edges.size - 1)
        e_bins = np.bincount(idx, weights=photons[rest] * energy[rest], minlength=edges.size - 1)
        ok = ph_bins > 0
        energy = np.concatenate([energy[top], e_bins[ok] / ph_bins[ok]])
        photons = np.concatenate([photons[top], ph_bins[ok]])
    return energy, photons / photons.sum()


def _instrument_key(instrument: Any) -> tuple:
    try:
        return ("h", hash(instrument))
    except TypeError:
        return ("id", id(instrument))


_FAMILY_CACHE: dict[tuple, _FamilyModel | None] = {}


def _matrix_mu(matrix: str, energy_keV: np.ndarray) -> np.ndarray:
    """Mass attenuation coefficient (cm2/g) of a compound formula, xraylib."""
    try:
        xraylib.CompoundParser(matrix)
    except ValueError:
        raise FitError(
            f"cannot read matrix {matrix!r}: give a chemical formula xraylib understands, e.g. "
            "'Fe0.65Cr0.18Ni0.12Mn0.02Mo0.02' or '2PbCO3.Pb(OH)2'"
        ) from None
    return np.array([xraylib.CS_Total_CP(matrix, float(e)) for e in np.ravel(energy_keV)])


def _family_model(
    element: str | int, family: str, instrument: Any, matrix: str | None = None
) -> _FamilyModel | None:
    """Template lines of one element family under ``instrument``; None when the family is not excited.

    Line weights are the fluorescence cross sections (xraylib ``CS_FluorLine_Kissel_Cascade``:
    photo-ionisation, Coster-Kronig and cascade effects, fluorescence yield, radiative rate) averaged
    over the incident spectrum, times the detector efficiency at the line energy. Without ``matrix``
    absorption in the sample is ignored (thin-sample approximation; the fit's free intensity per family
    absorbs its overall effect). With a ``matrix`` formula each incident energy ``E`` and line ``l`` are
    weighted by the thick-sample factor ``1 / (mu(E) / sin(incidence) + mu(E_l) / sin(takeoff))``, which
    sets the line ratios of a bulk sample (Kb/Ka of Cr in steel rises by ~20 %).
    """
    z = atomic_number(element)
    key = (z, family, _instrument_key(instrument), matrix)
    if key in _FAMILY_CACHE:
        return _FAMILY_CACHE[key]
    result = None
    e_max = _max_excitation_keV(instrument)
    if _edge_keV(z, family) < e_max:
        lines = _family_lines(z, family)
        if lines:
            exc_e, exc_ph = _excitation_grid(instrument)
            macros = np.array([ln[1] for ln in lines], dtype=np.int64)
            cs = xraylib_np.CS_FluorLine_Kissel_Cascade(
                np.array([z], dtype=np.int64), macros, np.asarray(exc_e, dtype=np.float64)
            )[0]  # (lines, energies); 0 below the edge
            cs = np.nan_to_num(cs, nan=0.0)
            energies = np.array([ln[2] for ln in lines])
            if matrix:
                sin_in = np.sin(np.radians(float(getattr(instrument, "incidence_deg", 45.0))))
                sin_out = np.sin(np.radians(float(getattr(instrument, "takeoff_deg", 45.0))))
                mu_in = _matrix_mu(matrix, exc_e) / sin_in  # (energies,)
                mu_out = _matrix_mu(matrix, energies) / sin_out  # (lines,)
                cs = cs / (mu_in[None, :] + mu_out[:, None])
            sigma = cs @ exc_ph
            eff = np.asarray(instrument.detector_efficiency(energies), dtype=float).reshape(-1)
            w = sigma * eff
            if w.sum() > 0:
                keep = w >= 1e-4 * w.max()
                w, energies = w[keep], energies[keep]
                kept = [ln[0] for ln, k in zip(lines, keep, strict=True) if k]
                groups = tuple(_group_of(name) for name in kept)
                subshells = tuple(name[0] if name[0] == "K" else name[:2] for name in kept)
                result = _FamilyModel(
                    element_symbol(z), z, family, energies, w / w.sum(), groups, float(w.sum()), subshells
                )
    _FAMILY_CACHE[key] = result
    return result


def _compton_keV(energy_keV: np.ndarray | float, angle_deg: float) -> np.ndarray:
    e = np.asarray(energy_keV, dtype=float)
    return e / (1.0 + e / 510.998950 * (1.0 - np.cos(np.radians(angle_deg))))


def _scatter_angle_deg(instrument: Any) -> float:
    inc = float(getattr(instrument, "incidence_deg", 45.0))
    out = float(getattr(instrument, "takeoff_deg", 45.0))
    return float(np.degrees(scattering_angle_rad(inc, out)))


# ------------------------------------------------------------------------------------------------
# Design matrix: element templates, scatter, pile-up and background columns
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Column:
    name: str
    kind: str  # "element", "secondary", "scatter", "pileup", "background"
    element: str | None = None
    family: str | None = None


def _response(instrument: Any, energy_axis_keV: np.ndarray) -> Any:
    return DetectorResponse(instrument, channel_energy_keV=energy_axis_keV)


def _family_template(fm: _FamilyModel, response: Any) -> np.ndarray:
    return np.asarray(fm.weights, dtype=float) @ np.asarray(response.matrix(fm.energies_keV), dtype=float)


#: thick paint matrices whose absorption sets the range of Kb/Ka ratios (see _kb_bounds): binder, chalk,
#: gypsum, lead white, chrome yellow, vermilion, cadmium yellow, iron oxide, zinc white, smalt-like glass
_RATIO_MATRICES = (
    "C18H32O2", "CaCO3", "CaSO4H4O2", "Pb3C2O8H2", "PbCrO4", "HgS", "CdS", "Fe2O3", "ZnO", "SiO2",
)
#: margin on the Kb/Ka range for fundamental-parameter and detector-efficiency uncertainty
_KB_MARGIN = 0.1


def _kb_bounds(fm: _FamilyModel, instrument: Any) -> tuple[float, float]:
    """Range of a K family's Kb/Ka ratio relative to its thin-sample value, over paint matrices.

    Self-absorption in a thick paint changes Kb/Ka: a heavy matrix absorbs Ka more than Kb (ratio up,
    Cr in chrome yellow ~ +20 %), an absorption edge between Ka and Kb absorbs Kb more (ratio down, Fe
    beside Mn). The range is the min/max over :data:`_RATIO_MATRICES` and the element's own thick
    oxide-free form, from xraylib cross sections as :func:`_family_model` computes them, widened by
    :data:`_KB_MARGIN`.
    """
    key = ("kb-bounds", fm.z, _instrument_key(instrument))
    if key in _FAMILY_CACHE:
        return _FAMILY_CACHE[key]  # type: ignore[return-value]

    def ratio(m: _FamilyModel | None) -> float:
        if m is None:
            return np.nan
        ka = np.array([g == "Ka" for g in m.groups])
        return float(m.weights[~ka].sum() / max(m.weights[ka].sum(), 1e-300))

    thin = ratio(fm)
    values = [1.0]
    for matrix in (*_RATIO_MATRICES, fm.element):
        r = ratio(_family_model(fm.z, "K", instrument, matrix)) / thin
        if np.isfinite(r):
            values.append(r)
    bounds = (min(values) * (1 - _KB_MARGIN), max(values) * (1 + _KB_MARGIN))
    _FAMILY_CACHE[key] = bounds  # type: ignore[assignment]
    return bounds


def _family_parts(
    fm: _FamilyModel, free_kb: bool = False, split_l: bool = True, fine: bool = False,
    instrument: Any = None,
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Parts of a family fitted with free intensities: (part name, line energies keV, line weights).

    K and M families are one template with fixed line ratios. L families get one template per
    initial vacancy subshell (L3: La, Ll, Lb2,15; L2: Lb1, Lg1, Ln; L1: Lb3,4, Lg2,3), as PyMca's
    "L1, L2, L3" option: the subshell vacancy shares depend on the incident spectrum inside the paint
    (Coster-Kronig transitions, edges of Pb and Hg between the lines), so fixed L-line ratios bias the
    family total by 5-10 %. Subshells holding less than 3 % of the family join the nearest one.
    With ``free_kb`` K families get separate Ka and Kb templates (for buried layers, whose Kb/Ka ratio
    grows with the absorption above them).

    ``fine`` frees the line ratios that matrix effects change (used by :func:`detect_elements` to test
    whether another element is needed): K families get two templates, Kb/Ka at the low and at the high
    end of the range paint matrices produce (:func:`_kb_bounds`; non-negative sums of the two span
    exactly that range), L families one part per
    (vacancy subshell, line group) -- La, Lb2,15 and Ll of L3 apart, since an absorption edge of the
    matrix between them (Hg L3 at 12.28 keV between Pb La and Pb Lb2) changes their ratio -- with
    parts below 3 % of the family joined to the largest part of their subshell.
    """
    e = np.asarray(fm.energies_keV, dtype=float)
    w = np.asarray(fm.weights, dtype=float)
    if fine and fm.family == "L" and fm.subshells and _FINE_L_GROUPS:
        key = np.array([f"{s} {g}" for s, g in zip(fm.subshells, fm.groups, strict=True)])
        shares = {k: float(w[key == k].sum()) for k in dict.fromkeys(key)}
        for k in sorted(shares, key=shares.__getitem__):
            if shares[k] >= 0.03:
                continue
            rest = [o for o in shares if o != k]
            same = [o for o in rest if o.split()[0] == k.split()[0]] or rest
            if not same:
                continue
            into = max(same, key=shares.__getitem__)
            key[key == k] = into
            shares[into] += shares.pop(k)
        return [(k, e[key == k], w[key == k]) for k in shares if w[key == k].sum() > 0]
    if fine and fm.family == "K" and instrument is not None:
        ka = np.array([g == "Ka" for g in fm.groups])
        if ka.any() and (~ka).any():
            m_lo, m_hi = _kb_bounds(fm, instrument)
            return [(f"Kb x{m:.2f}", e, w * np.where(ka, 1.0, m)) for m in (m_lo, m_hi)]
    if fm.family == "K" and free_kb:
        ka = np.array([g == "Ka" for g in fm.groups])
        return [(g, e[s], w[s]) for g, s in (("Ka", ka), ("Kb", ~ka)) if s.any() and w[s].sum() > 0]
    if fm.family != "L" or not fm.subshells or not (split_l or fine):
        return [(fm.family, e, w)]
    sub = np.array(fm.subshells)
    shares = {s: float(w[sub == s].sum()) for s in ("L3", "L2", "L1")}
    for small, into in (("L1", "L2"), ("L2", "L3"), ("L1", "L3")):
        if 0 < shares.get(small, 0.0) < 0.03 and shares.get(into, 0.0) > 0:
            sub[sub == small] = into
            shares[into] += shares.pop(small)
    parts = []
    for s in ("L3", "L2", "L1"):
        sel = sub == s
        if sel.any() and w[sel].sum() > 0:
            parts.append((s, e[sel], w[sel]))
    return parts


def _escape_template(
    energies_keV: np.ndarray, weights: np.ndarray, instrument: Any, energy_axis_keV: np.ndarray
) -> np.ndarray:
    """The Si escape peaks alone of a set of lines, as the detector response models them."""
    e = np.asarray(energies_keV, dtype=float)
    f = np.asarray(escape_fraction(e), dtype=float) * (e > 1.84)
    out = np.zeros_like(energy_axis_keV)
    width = np.gradient(energy_axis_keV)
    for e_l, w_l, f_l in zip(e, weights, f, strict=True):
        if w_l * f_l <= 0:
            continue
        e_esc = e_l - si_ka_keV()
        s = max(float(np.asarray(instrument.fwhm_keV(e_esc))) / 2.3548, 1e-3)
        u = (energy_axis_keV - e_esc) / s
        near = np.abs(u) < 6
        out[near] += w_l * f_l * np.exp(-0.5 * u[near] ** 2) / (np.sqrt(2 * np.pi) * s) * width[near]
    return out


def _doppler_template(
    response: Any, energies_keV: np.ndarray, weights: np.ndarray, angle_deg: float, profile_fwhm_au: float
) -> np.ndarray:
    """Compton-scattered lines: each line shifted to its Compton energy and Doppler-broadened."""
    shifted = _compton_keV(energies_keV, angle_deg)
    theta = np.radians(angle_deg)
    q_keV = np.sqrt(energies_keV**2 + shifted**2 - 2 * energies_keV * shifted * np.cos(theta))
    sigma_keV = profile_fwhm_au * q_keV / 137.036 / 2.3548
    offsets = np.linspace(-3.0, 3.0, 13)
    g = np.exp(-0.5 * offsets**2)
    g /= g.sum()
    e_all = (shifted[:, None] + offsets[None, :] * sigma_keV[:, None]).ravel()
    w_all = (weights[:, None] * g[None, :]).ravel()
    keep = e_all > 0.1
    return w_all[keep] @ np.asarray(response.matrix(e_all[keep]), dtype=float)


def _scatter_columns(
    instrument: Any, response: Any
) -> list[tuple[_Column, np.ndarray]]:
    """Rayleigh and Compton scatter of the incident line(s): tube anode lines or the monochromatic beam."""
    angle = _scatter_angle_deg(instrument)
    mono = getattr(instrument, "monochromatic_keV", None)
    groups: list[tuple[str, np.ndarray, np.ndarray]] = []
    if mono:
        groups.append(("beam", np.array([float(mono)]), np.array([1.0])))
    else:
        anode = getattr(instrument, "anode", None)
        if anode:
            z = atomic_number(anode)
            kv = float(instrument.tube_voltage_kV)
            for family in ("K", "L"):
                if _edge_keV(z, family) >= kv:
                    continue
                lines = _family_lines(z, family)
                if not lines:
                    continue
                e = np.array([ln[2] for ln in lines])
                w = np.array([xraylib.RadRate(z, ln[1]) for ln in lines])
                eff = np.asarray(instrument.detector_efficiency(e), dtype=float).reshape(-1)
                w = w * eff
                if w.sum() <= 0:
                    continue
                if family == "K":
                    # Ka and Kb apart: their scattered ratio depends on the sample's absorption
                    ka = np.array([_group_of(ln[0]) == "Ka" for ln in lines])
                    for label, sel in (("Ka", ka), ("Kb", ~ka)):
                        if w[sel].sum() > 0:
                            groups.append((f"{element_symbol(z)} {label}", e[sel], w[sel] / w[sel].sum()))
                else:
                    # tube L lines per subshell: their ratios depend on the tube's electron excitation
                    sub = np.array([ln[0][:2] for ln in lines])
                    for s in ("L3", "L2", "L1"):
                        sel = sub == s
                        if sel.any() and w[sel].sum() > 0.02 * w.sum():
                            groups.append((f"{element_symbol(z)} {s}", e[sel], w[sel] / w[sel].sum()))
    out = []
    for name, e, w in groups:
        rayleigh = w @ np.asarray(response.matrix(e), dtype=float)
        out.append((_Column(f"{name} Rayleigh", "scatter"), rayleigh))
        if e.max() > 5.0:  # Compton shift of low-energy lines is below the resolution: Rayleigh covers it
            # three widths: at back-scatter angles (a beam normal to the painting, 130 deg) the Doppler
            # width exceeds the detector's, and two fixed shapes leave a residual at 1e6 counts where Rh
            # Kb Compton sits on Pd Ka (21.1 keV)
            for label, fwhm_au in (("Compton", _COMPTON_PROFILE_FWHM_AU),
                                   ("Compton mid", 5 / 3 * _COMPTON_PROFILE_FWHM_AU),
                                   ("Compton broad", 3 * _COMPTON_PROFILE_FWHM_AU)):
                template = _doppler_template(response, e, w, angle, fwhm_au)
                out.append((_Column(f"{name} {label}", "scatter"), template))
    return out


def _pileup_column(sum_counts: np.ndarray, calibration: Any, lo: int) -> np.ndarray:
    """Sum (pile-up) peaks: the self-convolution of the measured spectrum above the fit range start."""
    y = np.where(np.arange(sum_counts.size) >= lo, sum_counts, 0.0)
    if y.sum() <= 0:
        return np.zeros_like(y)
    conv = np.convolve(y, y)  # index k: channel sum ci + cj -> energy 2*offset + gain*k (linear part)
    k = np.arange(conv.size)
    shift = calibration.offset_keV / calibration.gain_keV
    return np.interp(np.arange(y.size) - shift, k, conv, left=0.0, right=0.0)


def _background_columns(
    sum_counts: np.ndarray, lo: int, hi: int, width_keV: float, gain_keV: float, smooth_channels: int
) -> list[tuple[_Column, np.ndarray]]:
    # SNIP inside the fitted range only: empty channels below the detector threshold would drag it down
    bg = np.zeros_like(sum_counts, dtype=float)
    bg[lo:hi] = snip_background(
        sum_counts[lo:hi], width_keV=width_keV, gain_keV=gain_keV, smooth_channels=smooth_channels
    )
    x = np.zeros_like(bg)
    x[lo:hi] = np.linspace(0.0, 1.0, hi - lo)
    return [
        (_Column("background low", "background"), bg * (1.0 - x)),
        (_Column("background high", "background"), bg * x),
    ]


def _hat_columns(
    energy_keV: np.ndarray, lo: int, hi: int, instrument: Any, spacing_fwhm: float
) -> list[tuple[_Column, np.ndarray]]:
    """Triangular (linear B-spline) background terms, ``spacing_fwhm`` detector FWHMs apart.

    Non-negative sums of them are smooth curves that follow broad excesses over the SNIP background
    (continuum scatter structure, detector tails and shelves that differ from the model) but cannot
    form a peak of one FWHM: a candidate line must then explain a peak, not a hump.
    """
    e = energy_keV[lo:hi]
    fwhm = np.asarray(instrument.fwhm_keV(np.clip(e, 0.1, None)), dtype=float)
    pos = np.concatenate([[0.0], np.cumsum(np.diff(e) / (spacing_fwhm * fwhm[1:]))])
    n_knots = int(np.floor(pos[-1])) + 1
    out = []
    for k in range(n_knots + 1):
        t = np.zeros(energy_keV.size)
        t[lo:hi] = np.clip(1.0 - np.abs(pos - k), 0.0, None)
        if t.sum() > 0:
            out.append((_Column(f"background hat {k}", "background"), t))
    return out


@dataclasses.dataclass(eq=False)
class _Design:
    columns: list[_Column]
    A: np.ndarray  # (n_range, k): columns normalised to unit sum over the whole spectrum
    lo: int
    hi: int
    E: np.ndarray | None = None  # (n_range, k, 2): Si escape part of each column, parents < / >= 5 keV

    @property
    def k(self) -> int:
        return len(self.columns)

    def subset(self, keep: np.ndarray) -> _Design:
        idx = np.nonzero(keep)[0]
        E = None if self.E is None else self.E[:, idx, :]
        return _Design([self.columns[i] for i in idx], self.A[:, idx], self.lo, self.hi, E)

    def with_escape(self, coef: np.ndarray) -> _Design:
        """This design plus one free term for escape peaks beyond the modelled escape fraction.

        The term is the escape-peak spectrum of the fitted lines (``E @ coef``). Real detectors show
        escape fractions up to twice the textbook value (geometry, detector edges); an unexplained
        escape peak would otherwise be claimed by an element (Zr L for the escape of Ca Ka).
        """
        if self.E is None or any(c.kind == "escape" for c in self.columns):
            return self
        cols, A = list(self.columns), self.A
        for i, label in enumerate(("below", "above")):
            t = self.E[:, :, i] @ np.maximum(coef, 0.0)
            if t.sum() > 0:
                name = f"escape peaks (extra, parents {label} {_ESCAPE_SPLIT_KEV:g} keV)"
                cols.append(_Column(name, "escape"))
                A = np.concatenate([A, (t / t.sum())[:, None]], axis=1)
        if len(cols) == len(self.columns):
            return self
        E = np.concatenate([self.E, np.zeros((self.E.shape[0], len(cols) - len(self.columns), 2))], axis=1)
        return _Design(cols, A, self.lo, self.hi, E)


def _build_design(
    columns: list[tuple[_Column, np.ndarray, np.ndarray | None]], lo: int, hi: int
) -> _Design:
    cols, mats, escs = [], [], []
    for col, t, esc in columns:
        t = np.asarray(t, dtype=float)
        total = t.sum()
        part = t[lo:hi]
        if total <= 0 or part.sum() <= 1e-6 * total:
            continue
        cols.append(col)
        mats.append(part / total)
        escs.append(np.zeros((hi - lo, 2)) if esc is None else np.asarray(esc, dtype=float)[lo:hi] / total)
    if not mats:
        return _Design(cols, np.zeros((hi - lo, 0)), lo, hi, np.zeros((hi - lo, 0, 2)))
    return _Design(cols, np.stack(mats, axis=1), lo, hi, np.stack(escs, axis=1))


# ------------------------------------------------------------------------------------------------
# Linear algebra: weighted NNLS for one spectrum, a shared projector for many
# ------------------------------------------------------------------------------------------------
def _moving_average(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1:
        return y
    pad = k // 2
    yp = np.pad(y, (pad, k - 1 - pad), mode="edge")
    return np.convolve(yp, np.ones(k) / k, mode="valid")


def _nnls_weighted(A: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    sw = np.sqrt(w)
    scale = np.sqrt((A**2 * w[:, None]).sum(axis=0))
    scale[scale <= 0] = 1.0
    coef, _ = scipy.optimize.nnls(A * (sw / 1.0)[:, None] / scale[None, :], y * sw, maxiter=50 * A.shape[1])
    return coef / scale


def _fit_one(design: _Design, y: np.ndarray, passes: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poisson-weighted NNLS of one spectrum (range part): (coef (k,), model (n_range,), weights)."""
    w = 1.0 / np.maximum(_moving_average(y, 5), 1.0)
    coef = np.zeros(design.k)
    model = np.zeros_like(y)
    for _ in range(passes):
        coef = _nnls_weighted(design.A, y, w)
        model = design.A @ coef
        w = 1.0 / np.maximum(model, max(1e-6 * float(model.max(initial=0.0)), 1e-3))
    return coef, model, w


@dataclasses.dataclass(eq=False)
class _Projector:
    """Weighted least-squares solution shared by all pixels: C = Y @ Aw @ Ninv (unconstrained)."""

    Aw: np.ndarray  # (n_range, k) float32: A * weights
    N: np.ndarray  # (k, k) normal matrix
    Ninv: np.ndarray  # (k, k)
    G: np.ndarray  # (k, k): var(C_j) = sum_a C_a G[a, j] (Poisson, model variance)
    P: np.ndarray  # (k, n_range): the unconstrained estimator C = P y

    @classmethod
    def build(cls, A: np.ndarray, w: np.ndarray) -> _Projector:
        """Projector of the weighted least-squares problem with design ``A`` (n_range, k), weights ``w``."""
        Aw = A * w[:, None]
        AwT = np.ascontiguousarray(Aw.T)  # (k, n_range); C-contiguous products are much faster
        N = AwT @ A
        N = 0.5 * (N + N.T)
        d = np.sqrt(np.clip(np.diag(N), 1e-300, None))
        Ns = N / np.outer(d, d)
        Ninv = np.linalg.pinv(Ns, rcond=1e-10, hermitian=True) / np.outer(d, d)
        P = Ninv @ AwT  # (k, n_range)
        G = ((P * P) @ A).T  # G[a, j] = sum_c A[c, a] P[j, c]^2
        return cls(Aw.astype(np.float32), N, Ninv, G, P)

    def report(self, A: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Variance matrices of reported sums ``C @ R.T`` (R: (n_el, k) 0/1 membership).

        Returns ``(GR, GR_own)``, both (k, n_el): ``var = C @ GR`` and, with the element's own terms
        removed (a blank at that pixel), ``var_blank = var - C @ GR_own``.
        """
        PR = R @ self.P  # (n_el, n_range)
        GR = ((PR * PR) @ A).T
        return GR, GR * R.T


def _sum_variance(A: np.ndarray, w: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Variance of sums ``R @ c`` (R: (m, k)) of weighted least-squares coefficients: ``r N^-1 r``.

    ``A`` (n, k) design, ``w`` (n,) channel weights (inverse variances); ``N = A^T W A``, solved with
    a tiny ridge on its unit-diagonal form (columns no channel constrains get no variance from it).
    """
    N = (A * w[:, None]).T @ A
    d = np.sqrt(np.clip(np.diag(N), 1e-300, None))
    Ns = N / np.outer(d, d) + 1e-9 * np.eye(N.shape[0])
    Rs = R / d[None, :]
    X = np.linalg.solve(Ns, Rs.T)
    return np.einsum("mk,km->m", Rs, X)


def _nnls_batch(
    C: np.ndarray, b: np.ndarray, N: np.ndarray, chunk: int = 2048, sweeps: int = 4
) -> np.ndarray:
    """Make per-pixel solutions non-negative: refit with negative terms removed, then polish.

    ``C`` (n, k) unconstrained least-squares solutions of ``N c = b``; pixels with a negative term are
    refitted with that term fixed at zero (batched, until none is negative), then a few
    coordinate-descent sweeps of the exact NNLS problem release terms fixed too eagerly.
    """
    rows = np.nonzero((C < 0).any(axis=1))[0]
    if rows.size == 0:
        return C
    k = N.shape[0]
    d = np.sqrt(np.clip(np.diag(N), 1e-300, None))
    Ns = N / np.outer(d, d)
    eye = np.eye(k)
    for start in range(0, rows.size, chunk):
        r = rows[start : start + chunk]
        c = C[r] * d  # scaled variables: Ns c' = b / d
        bb = b[r] / d
        clamped = c < 0
        for _ in range(k):
            free = ~clamped
            M = Ns[None] * (free[:, :, None] & free[:, None, :]) + eye[None] * clamped[:, :, None]
            M += 1e-10 * eye[None]
            c = np.linalg.solve(M, np.where(free, bb, 0.0)[..., None])[..., 0]
            newneg = (c < 0) & free
            if not newneg.any():
                break
            clamped |= newneg
        c = np.maximum(c, 0.0)
        for _ in range(sweeps):
            for j in range(k):
                c[:, j] = np.maximum(0.0, c[:, j] + (bb[:, j] - c @ Ns[:, j]))
        C[r] = c / d
    return C


# ------------------------------------------------------------------------------------------------
# Inputs: spectra, scans, energy range, element lists
# ------------------------------------------------------------------------------------------------
def _fit_range(
    calibration: Any, n_channels: int, instrument: Any, energy_range_keV: tuple[float, float] | None
) -> tuple[int, int, float, float]:
    """Channel slice [lo, hi) and energies of the fitted range; FitError when it holds too few channels."""
    energy = calibration.energies_keV(n_channels)
    if energy_range_keV is None:
        e_lo = 0.9
        e_hi = _max_excitation_keV(instrument) + 1.0
    else:
        e_lo, e_hi = (float(v) for v in energy_range_keV)
        if not e_hi > e_lo:
            raise FitError(f"energy_range_keV must be (low, high) with low < high, got {energy_range_keV}")
    sel = np.nonzero((energy >= e_lo) & (energy <= e_hi))[0]
    if sel.size < 20:
        raise FitError(
            f"the spectrum's calibration puts {sel.size} of its {n_channels} channels inside the fitted "
            f"range {e_lo:.2f}-{e_hi:.2f} keV (channels span {energy[0]:.2f}-{energy[-1]:.2f} keV): "
            "check the energy calibration (offset/gain) or pass energy_range_keV"
        )
    lo, hi = int(sel[0]), int(sel[-1]) + 1
    return lo, hi, float(energy[lo]), float(energy[hi - 1])


def _parse_element(entry: Any) -> tuple[str, str | None]:
    if isinstance(entry, DetectedElement):
        return entry.element, entry.family
    text = str(entry).strip().replace("-", " ").replace("_", " ")
    m = re.fullmatch(r"([A-Z][a-z]?)\s*([KLM])?", text)
    if not m:
        raise FitError(f"cannot read element {entry!r}: write 'Fe', 'Pb' or with a family 'Pb L', 'Ba K'")
    try:
        symbol = element_symbol(atomic_number(m.group(1)))
    except XRFNBError as exc:
        raise FitError(str(exc)) from None
    return symbol, m.group(2)


def _describe_families(z: int, instrument: Any) -> str:
    parts = []
    for fam in FAMILIES:
        edge = _edge_keV(z, fam)
        if np.isfinite(edge):
            parts.append(f"{fam} edge {edge:.2f} keV")
    return ", ".join(parts) or "no K/L/M lines in xraylib"


def _choose_family(options: list[_FamilyModel], e_max: float) -> _FamilyModel:
    """The family an expert maps: the highest-energy family that is well excited (overvoltage >= 1.25).

    High-energy lines come from the whole paint depth and are not absorbed away by the matrix, which
    the thin-sample yields of :func:`_family_model` ignore (they favour Pb M over Pb L). Families
    excited only near their edge fall back to the largest yield.
    """
    order = {"K": 0, "L": 1, "M": 2}
    well = [f for f in options if _edge_keV(f.z, f.family) * 1.25 <= e_max]
    if well:
        return min(well, key=lambda f: order[f.family])
    return max(options, key=lambda f: f.relative_yield)


def _resolve_elements(
    elements: Any, instrument: Any, e_lo: float, e_hi: float, matrix: str | None = None
) -> list[tuple[_FamilyModel, list[_FamilyModel], str]]:
    """(main family, secondary families, origin) per requested element; FitError for bad requests."""
    if isinstance(elements, str):
        elements = [elements]
    entries = list(elements)
    if not entries:
        raise FitError("the element list is empty: name at least one element (e.g. ['Fe', 'Pb']) or pass "
                       "elements=None to detect them")
    e_max = _max_excitation_keV(instrument)
    out: list[tuple[_FamilyModel, list[_FamilyModel], str]] = []
    seen: set[str] = set()
    for entry in entries:
        symbol, family = _parse_element(entry)
        if symbol in seen:
            raise FitError(f"element {symbol} is listed twice: give each element once (one family each)")
        seen.add(symbol)
        z = atomic_number(symbol)
        usable = {}
        for fam in FAMILIES:
            fm = _family_model(z, fam, instrument, matrix)
            if fm is not None and e_lo <= fm.main_energy_keV <= e_hi:
                usable[fam] = fm
        name = getattr(instrument, "name", "the instrument")
        if family is not None:
            if family not in usable:
                fm = _family_model(z, family, instrument, matrix)
                if fm is None:
                    raise FitError(
                        f"{symbol} {family} lines are not excited by {name!r}: the {symbol} {family} edge "
                        f"({_edge_keV(z, family):.2f} keV) is above the excitation energy ({e_max:g} keV)"
                    )
                raise FitError(
                    f"{symbol} {family} lines ({fm.main_energy_keV:.2f} keV) lie outside the fitted range "
                    f"{e_lo:.2f}-{e_hi:.2f} keV"
                )
            main = usable[family]
        else:
            if not usable:
                raise FitError(
                    f"{symbol} cannot be measured with {name!r}: no line family is both excited by the "
                    f"{e_max:g} keV excitation and inside the fitted range {e_lo:.2f}-{e_hi:.2f} keV "
                    f"({_describe_families(z, instrument)})"
                )
            main = _choose_family(list(usable.values()), e_max)
        secondary = [
            f for f in usable.values() if f is not main and f.relative_yield > 1e-3 * main.relative_yield
        ]
        origin = "setup" if symbol == "Ar" else "sample"
        if isinstance(entry, DetectedElement):
            origin = entry.origin
        out.append((main, secondary, origin))
    return out


def _counts_and_kind(data: Any) -> tuple[str, Any]:
    if isinstance(data, Spectrum):
        return "spectrum", data
    if isinstance(data, Scan):
        return "scan", data
    raise FitError(
        f"expected a Spectrum or a Scan, got {type(data).__name__}: wrap arrays with "
        "xrfnb.Spectrum(counts, calibration) or xrfnb.Scan(counts, calibration)"
    )


# ------------------------------------------------------------------------------------------------
# fit_elements
# ------------------------------------------------------------------------------------------------
def _make_design(
    resolved: list[tuple[_FamilyModel, list[_FamilyModel], str]],
    instrument: Any,
    calibration: Any,
    total: np.ndarray,
    lo: int,
    hi: int,
    snip_width_keV: float | None,
    pileup: bool,
    free_kb: bool = False,
    split_l: bool = True,
    fine: frozenset[str] = frozenset(),
    hats_fwhm: float | None = None,
    cache: dict | None = None,
) -> _Design:
    n_ch = total.size
    energy = calibration.energies_keV(n_ch)
    cache = {} if cache is None else cache
    if "response" not in cache:
        cache["response"] = _response(instrument, energy)
    response = cache["response"]
    cols: list[tuple[_Column, np.ndarray, np.ndarray | None]] = []

    def lines(e: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = (e.tobytes(), w.tobytes())
        if key not in cache:
            t = w @ np.asarray(response.matrix(e), dtype=float)
            low = e < _ESCAPE_SPLIT_KEV  # escape of low- and high-energy parents apart: (channels, 2)
            esc = np.stack([_escape_template(e, w * sel, instrument, energy) for sel in (low, ~low)], axis=1)
            cache[key] = (t, esc)
        return cache[key]

    for main, _, _ in resolved:
        for part, e, w in _family_parts(main, free_kb, split_l, main.element in fine, instrument):
            name = f"{main.element} {main.family}" + ("" if part == main.family else f" ({part})")
            cols.append((_Column(name, "element", main.element, main.family), *lines(e, w)))
    for _, secondary, _ in resolved:
        for fm in secondary:
            col = _Column(f"{fm.element} {fm.family}", "secondary", fm.element, fm.family)
            cols.append((col, *lines(fm.energies_keV, fm.weights)))
    if "scatter" not in cache:
        cache["scatter"] = _scatter_columns(instrument, response)
    cols.extend((c, t, None) for c, t in cache["scatter"])
    if pileup:
        if "pileup" not in cache:
            cache["pileup"] = _pileup_column(total, calibration, lo)
        cols.append((_Column("pile-up", "pileup"), cache["pileup"], None))
    bg_key = ("background", hats_fwhm)
    if bg_key not in cache:
        fwhm_mid = float(np.asarray(instrument.fwhm_keV(0.5 * (energy[lo] + energy[hi - 1]))))
        width = snip_width_keV if snip_width_keV is not None else max(0.3, 3.0 * fwhm_mid)
        smooth = max(1, round(0.5 * fwhm_mid / calibration.gain_keV)) if total.sum() < 1e6 else 0
        background = _background_columns(total, lo, hi, width, calibration.gain_keV, smooth)
        if hats_fwhm:
            background = background + _hat_columns(energy, lo, hi, instrument, hats_fwhm)
        cache[bg_key] = background
    cols.extend((c, t, None) for c, t in cache[bg_key])
    design = _build_design(cols, lo, hi)
    have = {c.element for c in design.columns if c.kind == "element"}
    lost = sorted(
        {f"{c.element} {c.family}" for c, _, _ in cols if c.kind == "element" and c.element not in have}
    )
    if lost:
        raise FitError(f"no detector response inside the fitted range for {', '.join(lost)}")
    return design


def _chi2_floor() -> float:
    return 0.01


def fit_elements(
    spectrum_or_scan: Any,
    instrument: Any,
    elements: Any = None,
    *,
    energy_range_keV: tuple[float, float] | None = None,
    snip_width_keV: float | None = None,
    pileup: bool = True,
    free_kb: bool = False,
    escape: bool = True,
    matrix: str | None = None,
    max_pixels: int | None = None,
    progress: bool = True,
) -> ElementMaps:
    """Element maps by a fast linear fit (non-negative least squares over line-family templates).

    Each element line family is one template: its lines (xraylib energies, weights from the
    fluorescence cross sections averaged over the instrument's excitation spectrum, times detector
    efficiency) drawn through the detector response (Gaussian of the instrument's FWHM, Si escape
    peak, low-energy tail). Further terms: Rayleigh and Compton scatter of the tube's anode lines (or
    of the monochromatic beam), a pile-up term (self-convolution of the sum spectrum), and the SNIP
    background of the sum spectrum split into a low- and a high-energy ramp so each pixel can scale
    and tilt it.

    As in PyMca's fast linear fit, the sum spectrum is fitted first (Poisson-weighted NNLS); its
    model sets the channel weights and the active set of non-element terms. Every pixel is then solved
    with the same weighted least-squares projector (one matrix product per block of pixels), and
    pixels with negative terms are refitted with those terms removed (batched active-set NNLS).

    Parameters
    ----------
    spectrum_or_scan : Spectrum or Scan
        One spectrum, or a scan (lazy HDF5/dask scans are read block by block).
    instrument : Instrument
        Measuring set-up: excitation, detector response, geometry. The data's own energy calibration
        is used, not the instrument's.
    elements : sequence of str or DetectedElement, optional
        ``"Fe"`` (the family giving most counts is chosen) or ``"Pb L"``. Default: elements found by
        :func:`detect_elements` on the (sum) spectrum.
    energy_range_keV : (float, float), optional
        Fitted range; default 0.9 keV to 1 keV above the excitation maximum (clipped to the spectrum).
    snip_width_keV : float, optional
        SNIP clipping window for the background (default 3 FWHM at mid-range, at least 0.3 keV).
    pileup : bool, optional
        Include the pile-up (sum peak) term.
    free_kb : bool, optional
        Fit Ka and Kb of K families with independent intensities (their sum is reported). Use it for
        buried layers, whose Kb/Ka ratio exceeds the thin-layer ratio because the paint above absorbs
        Ka more; the default fixed ratio separates overlaps better (Mn Ka under Cr Kb). L families are
        always fitted per subshell (L3, L2, L1).
    escape : bool, optional
        Add one free term for Si escape peaks beyond the detector model's escape fraction (the escape
        spectrum of the sum fit's lines).
    matrix : str, optional
        Chemical formula of a thick, homogeneous sample (xraylib syntax, e.g. ``"2PbCO3.Pb(OH)2"``):
        line ratios within each family then include absorption in it (PyMca's "matrix"). Default:
        thin-sample ratios.
    max_pixels : int, optional
        Pixels read per block (bounded memory); default ~32 M counts per block.
    progress : bool, optional
        Show a progress bar (tqdm) over the scan's blocks.

    Returns
    -------
    ElementMaps
        Family intensities (counts), 1-sigma uncertainties, 3-sigma detection limits, reduced
        chi-square per pixel, and the residual of the summed spectrum. ``metadata`` holds the energy
        range, the fitted terms, the sum spectrum and its model, secondary-family sum intensities and
        the detection evidence when ``elements`` was None.

    Raises
    ------
    FitError
        Elements the instrument cannot excite, an empty element list, a calibration that puts no
        channels in the fitted range, or nothing detected when ``elements`` is None.

    Notes
    -----
    Uncertainties use Poisson statistics with the fitted model as variance: for the linear estimator
    ``C = P y``, ``var(C_j) = sum_c P_jc^2 m_c`` (computed for all pixels at once as ``C @ G``). The
    detection limit is 3 times the same standard deviation with the element's own counts removed
    (the noise of a blank at that pixel).
    """
    kind, data = _counts_and_kind(spectrum_or_scan)
    cal = data.calibration
    n_ch = data.n_channels
    lo, hi, e_lo, e_hi = _fit_range(cal, n_ch, instrument, energy_range_keV)
    if kind == "scan":
        rows, cols = data.shape[:2]
        total = np.asarray(data.sum_spectrum(max_pixels or max(1024, 2**25 // n_ch)).counts, dtype=float)
    else:
        rows = cols = 1
        total = np.asarray(data.counts, dtype=float)
    detected = None
    if elements is None:
        detected = detect_elements(
            Spectrum(total, cal), instrument, energy_range_keV=(e_lo, e_hi), matrix=matrix
        )
        if not detected:
            raise FitError(
                "no element was detected in the (sum) spectrum: pass elements=[...] to fit chosen elements"
            )
        elements = detected
    resolved = _resolve_elements(elements, instrument, e_lo, e_hi, matrix)
    design = _make_design(resolved, instrument, cal, total, lo, hi, snip_width_keV, pileup, free_kb)
    coef_sum, model_sum, w = _fit_one(design, total[lo:hi])
    if escape:
        design = design.with_escape(coef_sum)
        coef_sum, model_sum, w = _fit_one(design, total[lo:hi])
    keep = np.array([c.kind == "element" or coef_sum[i] > 0 for i, c in enumerate(design.columns)])
    design = design.subset(keep)
    coef_sum = coef_sum[keep]
    proj = _Projector.build(design.A, w)
    el_names = list(dict.fromkeys(c.element for c in design.columns if c.kind == "element"))
    n_el = len(el_names)
    Rm = np.array([[float(c.kind == "element" and c.element == e) for c in design.columns] for e in el_names])
    GR, GR_own = proj.report(design.A, Rm)
    n_pix = rows * cols
    intensity = np.zeros((n_pix, n_el), np.float32)
    sigma = np.zeros((n_pix, n_el), np.float32)
    dl = np.zeros((n_pix, n_el), np.float32)
    chi2 = np.zeros(n_pix, np.float32)
    resid = np.zeros(hi - lo)
    dof = max(1, (hi - lo) - design.k)
    A32 = design.A.astype(np.float32)

    def solve(Y: np.ndarray, start: int, exact: np.ndarray | None = None) -> None:
        Yf = Y.astype(np.float32, copy=False)
        b = (Yf @ proj.Aw).astype(np.float64)
        if exact is None:
            C = _nnls_batch(b @ proj.Ninv, b, proj.N)
        else:
            C = exact[None, :].copy()
        Cp = np.maximum(C, 0.0)
        var = Cp @ GR
        var_blank = np.maximum(var - Cp @ GR_own, 0.0)
        sl = slice(start, start + Y.shape[0])
        intensity[sl] = Cp @ Rm.T
        sigma[sl] = np.sqrt(np.maximum(var, 0.0))
        dl[sl] = 3.0 * np.sqrt(var_blank)
        M = C.astype(np.float32) @ A32.T
        R = Yf - M
        chi2[sl] = (R * R / np.maximum(M, _chi2_floor())).sum(axis=1) / dof
        resid[:] += R.sum(axis=0, dtype=np.float64)

    if kind == "spectrum":
        solve(total[None, lo:hi], 0, exact=coef_sum)
    else:
        from tqdm.auto import tqdm

        per = max_pixels or max(1024, 2**25 // n_ch)
        sub = 4096
        with tqdm(total=rows, unit="row", desc="fit_elements", disable=not progress) as bar:
            for row_slice, block in data.iter_blocks(per):
                flat = block.reshape(-1, n_ch)
                base = row_slice.start * cols
                for s in range(0, flat.shape[0], sub):
                    solve(flat[s : s + sub, lo:hi], base + s)
                bar.update(row_slice.stop - row_slice.start)
    residual = np.zeros(n_ch)
    residual[lo:hi] = resid
    model_full = np.zeros(n_ch)
    model_full[lo:hi] = model_sum
    names = [c.name for c in design.columns]
    metadata = {
        "method": "fast linear fit (weighted NNLS, shared design matrix)",
        "instrument": getattr(instrument, "name", None),
        "energy_range_keV": (e_lo, e_hi),
        "channels": (lo, hi),
        "terms": names,
        "sum_fit_counts": dict(zip(names, (float(v) for v in coef_sum), strict=True)),
        "secondary_families": [c.name for c in design.columns if c.kind == "secondary"],
        "setup_elements": [m.element for m, _, o in resolved if o == "setup"],
        "sum_spectrum": total,
        "sum_model": model_full,
        "sum_chi2": float(((total[lo:hi] - model_sum) ** 2 / np.maximum(model_sum, 1.0)).sum() / dof),
    }
    if detected is not None:
        metadata["detected"] = detected
    fam_of = {c.element: c.family for c in design.columns if c.kind == "element"}
    return ElementMaps(
        elements=tuple(el_names),
        families=tuple(fam_of[e] for e in el_names),
        intensity=intensity.reshape(rows, cols, n_el),
        sigma=sigma.reshape(rows, cols, n_el),
        detection_limit=dl.reshape(rows, cols, n_el),
        chi2=chi2.reshape(rows, cols),
        residual=residual,
        metadata=metadata,
    )


# ------------------------------------------------------------------------------------------------
# Peak search and element detection
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Peak:
    channel: float
    energy_keV: float
    significance: float
    net_counts: float


def _find_peaks(
    y: np.ndarray,
    energy: np.ndarray,
    instrument: Any,
    lo: int,
    hi: int,
    threshold: float,
    bg: np.ndarray,
    variance: np.ndarray | None = None,
) -> list[_Peak]:
    """Peaks by a zero-area top-hat filter matched to the local FWHM; significance in Poisson sigma.

    The filter's central lobe is one FWHM wide (weight +1/w), flanked by lobes of half that width
    (weights -1/w each), so a smooth background cancels; ``f / sqrt(sum k^2 y)`` is the peak's
    significance.
    """
    gain = np.gradient(energy)
    fwhm_ch = np.asarray(instrument.fwhm_keV(np.clip(energy, 0.1, None)), dtype=float) / gain
    widths = np.clip(np.round(fwhm_ch).astype(int) | 1, 3, None)
    sig = np.zeros_like(y)
    filt = np.zeros_like(y)
    for w in np.unique(widths[lo:hi]):
        s = max(1, w // 2)
        kernel = np.concatenate([np.full(s, -0.5 / s), np.full(w, 1.0 / w), np.full(s, -0.5 / s)])
        f = np.convolve(y, kernel[::-1], mode="same")
        v = np.convolve(y if variance is None else variance, (kernel**2)[::-1], mode="same")
        sel = widths == w
        filt[sel] = f[sel]
        sig[sel] = f[sel] / np.sqrt(np.maximum(v[sel], 1e-12))
    sig[:lo] = 0
    sig[hi:] = 0
    net = y - bg
    peaks = []
    for c in range(max(lo, 1), min(hi, y.size - 1)):
        if sig[c] < threshold:
            continue
        half = max(1, int(widths[c]) // 2)
        window = sig[max(lo, c - half) : c + half + 1]
        first_max = max(lo, c - half) + int(np.argmax(window))
        if sig[c] < window.max() or c != first_max:
            continue
        f0, f1, f2 = filt[c - 1], filt[c], filt[c + 1]
        denom = f0 - 2 * f1 + f2
        delta = float(np.clip(0.5 * (f0 - f2) / denom, -0.5, 0.5)) if denom < 0 else 0.0
        ch = c + delta
        e = float(np.interp(ch, np.arange(energy.size), energy))
        w_ch = int(widths[c])
        netc = float(net[max(0, c - w_ch) : c + w_ch + 1].sum())
        peaks.append(_Peak(ch, e, float(sig[c]), netc))
    return peaks


def _candidate_energy_table(e_lo: float, e_hi: float, e_max: float) -> list[tuple[int, str, float]]:
    """(z, family, main-line energy keV) for every element family excited below ``e_max`` in range."""
    out = []
    main_line = {"K": xraylib.KL3_LINE, "L": xraylib.L3M5_LINE, "M": xraylib.M5N7_LINE}
    for z in range(11, 93):
        if z in _NEVER:
            continue
        for fam in FAMILIES:
            if _edge_keV(z, fam) >= e_max:
                continue
            try:
                e = xraylib.LineEnergy(z, main_line[fam])
            except ValueError:
                continue
            if e_lo <= e <= e_hi:
                out.append((z, fam, float(e)))
    return out


def _window_sum(t: np.ndarray, energy: np.ndarray, center: float, half: float) -> np.ndarray:
    sel = np.abs(energy - center) <= half
    return t[sel].sum(axis=0)


def detect_elements(
    spectrum: Any,
    instrument: Any,
    *,
    min_significance: float = 5.0,
    peak_threshold: float = 3.0,
    energy_range_keV: tuple[float, float] | None = None,
    tolerance_keV: float | None = None,
    candidates: Any = "common",
    matrix: str | None = None,
) -> list[DetectedElement]:
    """Elements present in a spectrum (a sum or max-pixel spectrum of a scan, or one point).

    1. Peaks: a top-hat filter matched to the detector FWHM finds peaks more than ``peak_threshold``
       sigma above the background.
    2. Candidates: every element family (K, L, M) excited by the instrument whose main line
       (Ka, La, Ma; xraylib energies) lies within ``tolerance_keV`` of a peak.
    3. Explanation: all candidates are fitted together with the Rayleigh and Compton scatter of the
       tube's anode lines (or the monochromatic beam), Si escape peaks (in the detector response),
       pile-up (sum) peaks and the SNIP background. Candidates are removed one at a time, least
       significant first, until every remaining element is fitted at ``min_significance`` sigma or
       more, has its main line at a peak, explains at least half of what it predicts there, and has
       the second line of its family (Kb, Lb) where that line should be visible. A lone peak that
       another element's line explains therefore does not make an element.
    4. Confirmation against matrix effects: each element is refitted with the line ratios of all other
       families freed within physical bounds (Kb/Ka between the values thick paint matrices give,
       :func:`_kb_bounds`; L families per vacancy subshell), smooth triangular background terms that
       absorb broad humps (sum spectra of 5e5 counts or more), and a 2 % model error of the other
       families' peaks in the channel variances. An element whose fitted intensity is then below
       ``min_significance`` sigma -- e.g. Mn Ka (5.90 keV) that is really the self-absorption excess
       of Cr Kb (5.95 keV) in chrome yellow -- is removed (weakest first) and the rest re-judged.
    5. Argon (air between sample and detector) is reported with ``origin="setup"``.

    Parameters
    ----------
    spectrum : Spectrum
        The spectrum; its calibration is used.
    instrument : Instrument
        Excitation (which families are excited, scatter lines) and detector response (FWHM, escape).
    min_significance : float, optional
        Minimum fitted family intensity over its Poisson sigma.
    peak_threshold : float, optional
        Peak-search threshold in sigma.
    energy_range_keV : (float, float), optional
        Searched range (default as in :func:`fit_elements`).
    tolerance_keV : float, optional
        Largest distance of a main line from a peak (default half the FWHM plus 20 eV).
    candidates : "common", "all" or sequence of str, optional
        Elements considered: :data:`COMMON_ELEMENTS` (default; what paintings, their supports, metal
        leaf and standards contain), every element from Na to U, or your own list.
    matrix : str, optional
        Formula of a thick sample for the line ratios (see :func:`fit_elements`).

    Returns
    -------
    list of DetectedElement
        Sorted by decreasing score; each with the peaks that show it.
    """
    kind, data = _counts_and_kind(spectrum)
    if kind != "spectrum":
        data = data.sum_spectrum(max(1024, 2**25 // data.n_channels))  # bounded memory
    cal = data.calibration
    y = np.asarray(data.counts, dtype=float)
    n_ch = y.size
    energy = cal.energies_keV(n_ch)
    lo, hi, e_lo, e_hi = _fit_range(cal, n_ch, instrument, energy_range_keV)
    fwhm_mid = float(np.asarray(instrument.fwhm_keV(0.5 * (e_lo + e_hi))))
    smooth = max(1, round(0.5 * fwhm_mid / cal.gain_keV)) if y.sum() < 1e6 else 0
    bg = np.zeros_like(y)
    bg[lo:hi] = snip_background(
        y[lo:hi], width_keV=max(0.3, 3.0 * fwhm_mid), gain_keV=cal.gain_keV, smooth_channels=smooth
    )
    peaks = _find_peaks(y, energy, instrument, lo, hi, peak_threshold, bg)
    if not peaks:
        return []
    peak_e = np.array([p.energy_keV for p in peaks])

    def tol(e: float) -> float:
        if tolerance_keV is not None:
            return float(tolerance_keV)
        return 0.5 * float(np.asarray(instrument.fwhm_keV(e))) + 0.02

    def fwhm(e: float) -> float:
        return float(np.asarray(instrument.fwhm_keV(e)))

    anode = getattr(instrument, "anode", None)
    anode_z = atomic_number(anode) if anode and not getattr(instrument, "monochromatic_keV", None) else None
    e_max = _max_excitation_keV(instrument)
    if isinstance(candidates, str) and candidates in ("common", "all"):
        allowed = None if candidates == "all" else {atomic_number(s) for s in COMMON_ELEMENTS}
    else:
        names = [candidates] if isinstance(candidates, str) else list(candidates)
        allowed = {atomic_number(_parse_element(s)[0]) for s in names}
        if not allowed:
            raise FitError("candidates is empty: give element symbols, 'common' or 'all'")
    table = [
        (z, fam, e)
        for z, fam, e in _candidate_energy_table(e_lo, e_hi, e_max)
        if z != anode_z and (allowed is None or z in allowed)
    ]
    response = _response(instrument, energy)
    e_rng = energy[lo:hi]
    y_rng = y[lo:hi]

    models: dict[str, tuple[_FamilyModel, list[_FamilyModel]]] = {}
    fixed: dict[str, np.ndarray] = {}  # fixed-ratio template of each candidate family (unit total)

    def add_candidates(positions: np.ndarray, exclude: set[str]) -> None:
        cand: dict[int, set[str]] = {}
        for z, fam, e in table:
            if positions.size and np.min(np.abs(positions - e)) <= tol(e):
                cand.setdefault(z, set()).add(fam)
        for z, fams in cand.items():
            usable = {}
            for fam in FAMILIES:
                fm = _family_model(z, fam, instrument, matrix)
                if fm is not None and e_lo <= fm.main_energy_keV <= e_hi:
                    usable[fam] = fm
            matched = [
                usable[f]
                for f in fams
                if f in usable
                and np.min(np.abs(positions - usable[f].main_energy_keV)) <= tol(usable[f].main_energy_keV)
            ]
            if not matched or matched[0].element in exclude or matched[0].element in models:
                continue
            main = _choose_family(matched, e_max)
            eff = float(np.ravel(instrument.detector_efficiency(np.array([main.main_energy_keV])))[0])
            if eff < 1e-3:
                continue  # its line cannot reach the detector (air path, window): the peak is something else
            if _choose_family(list(usable.values()), e_max) is not main:
                # e.g. Zn L at 1.0 keV while Zn K (excited, in range) shows no peak: not Zn
                continue
            secondary = [
                f for f in usable.values() if f is not main and f.relative_yield > 1e-3 * main.relative_yield
            ]
            models[main.element] = (main, secondary)
            t_full = _family_template(main, response)
            fixed[main.element] = t_full[lo:hi] / max(t_full.sum(), 1e-300)

    def judge(active: dict[str, Any]) -> tuple[dict[str, float], list[str], np.ndarray, np.ndarray]:
        """Fit the active candidates; (verdict per element, elements fitted to zero, model, weights)."""
        resolved = [(m, s, "setup" if el == "Ar" else "sample") for el, (m, s) in active.items()]
        design = _make_design(
            resolved, instrument, cal, y, lo, hi, None, True, split_l=False, cache=cache
        )
        coef, model, w = _fit_one(design, y_rng)
        design = design.with_escape(coef)
        coef, model, w = _fit_one(design, y_rng)
        names = list(dict.fromkeys(c.element for c in design.columns if c.kind == "element"))
        Rm = np.array(
            [[float(c.kind == "element" and c.element == e) for c in design.columns] for e in names]
        )
        total_el = Rm @ np.maximum(coef, 0.0)
        var = _sum_variance(design.A, w, Rm)
        is_bg = np.array([c.kind == "background" for c in design.columns])
        lines_model = model - design.A[:, is_bg] @ coef[is_bg]  # peaks only: what competes for a line
        verdict: dict[str, float] = {}
        for j, name in enumerate(names):
            score = total_el[j] / np.sqrt(var[j]) if var[j] > 0 else 0.0
            fm = active[name][0]
            own = design.A @ (Rm[j] * coef)
            others = model - own
            t = fixed[name] * total_el[j]
            ok = score >= min_significance
            unique = False
            for group in dict.fromkeys(fm.groups):
                e_g, share = fm.group_energy(group)
                if share < 0.03 or not e_lo <= e_g <= e_hi:
                    continue
                half = 0.5 * fwhm(e_g)
                mine = float(_window_sum(own, e_rng, e_g, half))
                there = float(_window_sum(model, e_rng, e_g, half))
                peaks_there = float(_window_sum(lines_model, e_rng, e_g, half))
                # a line group this element explains mostly by itself (among the peaks there), clearly
                # above the noise and above the systematic error of the other peaks
                if mine >= 0.3 * peaks_there and mine >= min_significance * (
                    np.sqrt(max(there, 1.0)) + _SYSTEMATIC * max(peaks_there - mine, 0.0)
                ):
                    unique = True
                need = {_MAIN[fm.family]: 0.5, _SECOND[fm.family]: 0.3}.get(group)
                if not ok or need is None:
                    continue
                pred = float(_window_sum(t, e_rng, e_g, half))
                obs = float(_window_sum(y_rng - others, e_rng, e_g, half))
                # Poisson noise plus a 5 % systematic share of the other terms there (peak-shape errors
                # of a large neighbour must not veto a small line beneath it)
                noise = float(np.sqrt(max(there, 1.0))) + 0.05 * max(peaks_there - mine, 0.0)
                if group == _MAIN[fm.family]:
                    if np.min(np.abs(peak_e_all - e_g)) > tol(e_g):
                        ok = False  # no peak at the main line
                    elif obs < need * pred - 3 * noise:
                        ok = False
                elif pred > 5 * noise and obs < need * pred - 3 * noise:
                    ok = False  # second line should be visible but is not
            _log.debug("detect %s %s: %.1f sigma, checks %s, unique %s", name, fm.family, score, ok, unique)
            ok = ok and unique
            verdict[name] = score if ok else -1.0 + min(score, 0.99) * 1e-3
        zero = [e for j, e in enumerate(names) if total_el[j] <= 0]
        return verdict, zero, model, w

    def eliminate(active: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float], np.ndarray]:
        verdict: dict[str, float] = {}
        model = np.zeros_like(y_rng)
        while active:
            verdict, zero, model, _ = judge(active)
            worst = min(verdict, key=verdict.__getitem__)
            if verdict[worst] >= min_significance:
                break
            # elements the fit gave nothing go together, the others one at a time
            for el in (zero if 0 < len(zero) < len(verdict) else []):
                del active[el]
            active.pop(worst, None)
        return active, verdict, model

    def free_score(active: dict[str, Any], name: str) -> float:
        """Significance of ``name`` when every other element's line ratios are free (see Notes)."""
        resolved = [(m, s, "setup" if el == "Ar" else "sample") for el, (m, s) in active.items()]
        fine = frozenset(el for el in active if el != name)
        design = _make_design(
            resolved, instrument, cal, y, lo, hi, None, True, split_l=False, fine=fine,
            hats_fwhm=_HATS_FWHM if y_rng.sum() >= _HATS_MIN_COUNTS else None, cache=cache,
        )
        coef, _, _ = _fit_one(design, y_rng)
        design = design.with_escape(coef)
        coef, model, _ = _fit_one(design, y_rng)
        own = np.array([c.kind == "element" and c.element == name for c in design.columns])
        is_bg = np.array([c.kind == "background" for c in design.columns])
        others = model - design.A[:, is_bg | own] @ coef[is_bg | own]  # peaks of everything else
        var = np.maximum(model, 1.0) + (_MODEL_ERROR * np.maximum(others, 0.0)) ** 2
        act = (coef > 0) | own
        v = float(_sum_variance(design.A[:, act], 1.0 / var, own[act][None, :].astype(float))[0])
        total = float(coef[own].sum())
        return total / np.sqrt(v) if v > 0 else 0.0

    def confirm(
        active: dict[str, Any], verdict: dict[str, float], model: np.ndarray
    ) -> tuple[dict[str, Any], dict[str, float], np.ndarray]:
        """Drop, weakest first, elements that another family explains once its line ratios are free."""
        while active:
            scores = {el: free_score(active, el) for el in active if el != "Ar"}
            _log.debug("detect, free-ratio significance: %s", scores)
            bad = {el: sc for el, sc in scores.items() if sc < min_significance}
            if not bad:
                verdict = {el: min(verdict[el], scores.get(el, np.inf)) for el in active}
                break
            active = dict(active)
            del active[min(bad, key=bad.__getitem__)]
            active, verdict, model = eliminate(active)
        return active, verdict, model

    cache: dict = {}
    peak_e_all = peak_e
    add_candidates(peak_e, set())
    if not models:
        return []
    active, verdict, model = eliminate(dict(models))
    # second round: peaks left in the residual (shoulders of large peaks, e.g. Cu Ka beside Ni Kb)
    model_full = np.concatenate([np.zeros(lo), model, np.zeros(n_ch - hi)])
    resid_peaks = _find_peaks(
        y - model_full, energy, instrument, lo, hi, peak_threshold, np.zeros(n_ch),
        variance=y + (_SYSTEMATIC * model_full) ** 2,
    )
    resid_peaks = [p for p in resid_peaks if np.min(np.abs(peak_e - p.energy_keV)) > tol(p.energy_keV)]
    # residuals within 3 FWHM of a peak 50 times larger are taken as its shape (tail) error, not a line
    resid_peaks = [
        p
        for p in resid_peaks
        if not any(
            abs(q.energy_keV - p.energy_keV) < 3 * fwhm(q.energy_keV) and p.net_counts < 0.02 * q.net_counts
            for q in peaks
        )
    ]
    if resid_peaks:
        new_e = np.array([p.energy_keV for p in resid_peaks])
        before = set(models)
        add_candidates(new_e, exclude=set())
        added = set(models) - before
        if added:
            peaks = peaks + resid_peaks
            peak_e_all = np.concatenate([peak_e, new_e])
            peak_e = peak_e_all
            active, verdict, model = eliminate({**active, **{el: models[el] for el in added}})
    active, verdict, model = confirm(active, verdict, model)
    if not active:
        return []
    result = []
    for el in active:
        score = verdict[el]
        fm = active[el][0]
        evidence = []
        for group in dict.fromkeys(fm.groups):
            e_g, share = fm.group_energy(group)
            if share < 0.01:
                continue
            near = np.abs(peak_e - e_g) <= tol(e_g)
            for i in np.nonzero(near)[0]:
                p = peaks[i]
                evidence.append(DetectedPeak(p.energy_keV, group, e_g, p.significance, p.net_counts))
        evidence.sort(key=lambda p: (p.line != _MAIN[fm.family], -p.significance))
        origin = "setup" if el == "Ar" else "sample"
        note = "explained by setup: argon in the air path to the detector" if origin == "setup" else ""
        result.append(DetectedElement(el, fm.family, tuple(evidence), float(score), origin, note))
    result.sort(key=lambda d: -d.score)
    return result


# ------------------------------------------------------------------------------------------------
# ROI maps
# ------------------------------------------------------------------------------------------------
def roi_maps(
    scan_or_spectrum: Any,
    instrument: Any,
    elements: Any,
    *,
    width_fwhm: float = 2.0,
    background: str = "snip",
    side_fwhm: float = 0.5,
    snip_width_keV: float | None = None,
    max_pixels: int | None = None,
    progress: bool = True,
) -> ElementMaps:
    """Element maps by region-of-interest integration with background subtraction.

    Each element's ROI is centred on its main line group (Ka, La or Ma, xraylib energies) and is
    ``width_fwhm`` detector FWHMs wide (2 FWHM hold 98 % of a Gaussian peak).

    Parameters
    ----------
    scan_or_spectrum : Scan or Spectrum
        The data; its calibration is used.
    instrument : Instrument
        Gives the FWHM and which line family is excited.
    elements : sequence of str
        ``"Fe"`` or ``"Pb L"`` (family chosen as in :func:`fit_elements`).
    width_fwhm : float, optional
        Full ROI width in units of the FWHM at the line.
    background : {"snip", "linear", "none"}, optional
        ``"snip"``: the SNIP background of the sum spectrum inside the ROI, scaled to each pixel's
        counts in the fitted range (low noise, follows the continuum's shape). ``"linear"``: per
        pixel, the mean of two side windows of ``side_fwhm`` FWHM each, interpolated under the ROI
        (classic, but biased where a neighbouring peak falls into a side window). ``"none"``: gross
        counts.
    side_fwhm : float, optional
        Width of each side window for ``background="linear"``, in FWHM.
    snip_width_keV : float, optional
        SNIP window for ``background="snip"`` (default as in :func:`fit_elements`).
    max_pixels : int, optional
        Pixels read per block.
    progress : bool, optional
        Show a progress bar over the scan's blocks.

    Returns
    -------
    ElementMaps
        ``intensity``: net ROI counts (not the whole family); ``sigma`` from Poisson statistics of
        ROI and background estimate; ``detection_limit``: 3 sigma of the background alone; ``chi2``
        is NaN (no model); ``residual`` is zero. ``metadata["rois_keV"]`` gives each ROI.

    Notes
    -----
    Overlapping lines (Pb La / As Ka, Pb Ma / S Ka, Ti Ka / Ba La) are counted in every ROI they fall
    in; use :func:`fit_elements` where lines overlap.
    """
    if background not in ("snip", "linear", "none"):
        raise FitError(f"background must be 'snip', 'linear' or 'none', got {background!r}")
    if not width_fwhm > 0 or not side_fwhm > 0:
        raise FitError("width_fwhm and side_fwhm must be > 0")
    kind, data = _counts_and_kind(scan_or_spectrum)
    cal = data.calibration
    n_ch = data.n_channels
    energy = cal.energies_keV(n_ch)
    lo, hi, e_lo, e_hi = _fit_range(cal, n_ch, instrument, None)
    resolved = _resolve_elements(elements, instrument, e_lo, e_hi)
    n_el = len(resolved)
    # window matrix: for each element, columns ROI, left, right
    W = np.zeros((n_ch, 3 * n_el), np.float32)
    rois = {}
    for i, (fm, _, _) in enumerate(resolved):
        e0 = fm.main_energy_keV
        f = float(np.asarray(instrument.fwhm_keV(e0)))
        a, b = e0 - 0.5 * width_fwhm * f, e0 + 0.5 * width_fwhm * f
        roi = (energy >= a) & (energy <= b)
        if roi.sum() < 1:
            raise FitError(f"the ROI of {fm.element} {fm.family} ({a:.3f}-{b:.3f} keV) holds no channel")
        left = (energy >= a - side_fwhm * f) & (energy < a)
        right = (energy > b) & (energy <= b + side_fwhm * f)
        if background == "linear" and (left.sum() < 1 or right.sum() < 1):
            raise FitError(f"the side windows of {fm.element} {fm.family} fall outside the spectrum")
        W[:, 3 * i] = roi
        W[:, 3 * i + 1] = left
        W[:, 3 * i + 2] = right
        rois[f"{fm.element} {fm.family}"] = (float(energy[roi][0]), float(energy[roi][-1]))
    n_roi = W[:, 0::3].sum(axis=0).astype(float)
    n_left = np.maximum(W[:, 1::3].sum(axis=0), 1).astype(float)
    n_right = np.maximum(W[:, 2::3].sum(axis=0), 1).astype(float)
    if kind == "scan":
        rows, cols = data.shape[:2]
        total = np.asarray(data.sum_spectrum(max_pixels or max(1024, 2**25 // n_ch)).counts, dtype=float)
    else:
        rows = cols = 1
        total = np.asarray(data.counts, dtype=float)
    snip_frac = np.zeros(n_el)
    if background == "snip":
        fwhm_mid = float(np.asarray(instrument.fwhm_keV(0.5 * (e_lo + e_hi))))
        width = snip_width_keV if snip_width_keV is not None else max(0.3, 3.0 * fwhm_mid)
        bg = np.zeros(n_ch)
        bg[lo:hi] = snip_background(total[lo:hi], width_keV=width, gain_keV=cal.gain_keV)
        in_range = total[lo:hi].sum()
        snip_frac = (bg @ W[:, 0::3]) / max(in_range, 1e-300)  # ROI background per count in range
    rng_vec = np.zeros((n_ch, 1), np.float32)
    rng_vec[lo:hi] = 1.0
    Wall = np.concatenate([W, rng_vec], axis=1)
    n_pix = rows * cols
    out = np.zeros((n_pix, 3 * n_el + 1))

    def add(Y: np.ndarray, start: int) -> None:
        out[start : start + Y.shape[0]] = Y.astype(np.float32, copy=False) @ Wall

    if kind == "spectrum":
        add(total[None, :], 0)
    else:
        from tqdm.auto import tqdm

        per = max_pixels or max(1024, 2**25 // n_ch)
        with tqdm(total=rows, unit="row", desc="roi_maps", disable=not progress) as bar:
            for row_slice, block in data.iter_blocks(per):
                flat = block.reshape(-1, n_ch)
                for s in range(0, flat.shape[0], 4096):
                    add(flat[s : s + 4096], row_slice.start * cols + s)
                bar.update(row_slice.stop - row_slice.start)
    S = out[:, 0 : 3 * n_el : 3]
    L = out[:, 1 : 3 * n_el : 3]
    R = out[:, 2 : 3 * n_el : 3]
    if background == "linear":
        B = 0.5 * n_roi * (L / n_left + R / n_right)
        var_b = (0.5 * n_roi) ** 2 * (L / n_left**2 + R / n_right**2)
    elif background == "snip":
        B = out[:, -1:] * snip_frac[None, :]
        var_b = np.zeros_like(B)
    else:
        B = np.zeros_like(S)
        var_b = np.zeros_like(S)
    net = S - B
    sigma = np.sqrt(np.maximum(S, 0.0) + var_b)
    dl = 3.0 * np.sqrt(np.maximum(B, 0.0) + var_b)
    return ElementMaps(
        elements=tuple(fm.element for fm, _, _ in resolved),
        families=tuple(fm.family for fm, _, _ in resolved),
        intensity=net.reshape(rows, cols, n_el),
        sigma=sigma.reshape(rows, cols, n_el),
        detection_limit=dl.reshape(rows, cols, n_el),
        chi2=np.full((rows, cols), np.nan, np.float32),
        residual=np.zeros(n_ch),
        metadata={
            "method": f"ROI integration, background={background!r}",
            "quantity": "net counts in the ROI of the main line group",
            "instrument": getattr(instrument, "name", None),
            "rois_keV": rois,
            "width_fwhm": width_fwhm,
            "sum_spectrum": total,
        },
    )
