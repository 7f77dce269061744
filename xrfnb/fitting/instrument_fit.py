"""The instrument from the data alone: :func:`fit_instrument` and its :class:`InstrumentFit`.

A spectrum (or a scan's sum spectrum) carries the fingerprints of the instrument that measured it. This
module reads them back, each from its own evidence:

* **energy calibration** (offset, gain, quadratic term) from the centroids of the peaks it finds and
  identifies (element lines and the tube's Rayleigh lines), fitted by :func:`xrfnb.calibrate`;
* **detector resolution** (electronic noise and Fano factor) from the widths of those peaks against
  energy, ``FWHM^2 = noise^2 + 8 ln 2 * fano * w * E``, each peak fitted with its known fine structure
  (Ka1/Ka2, La1/La2 ...);
* **tube anode** from the scattered characteristic lines: the Rayleigh peaks sit at the anode's K or L
  line energies, each with a Doppler-broadened Compton partner below it; a **monochromatic beam** is one
  Rayleigh line with its Compton partner and no continuum above it;
* **scattering angle** and **tube voltage** by simulating the scattered tube spectrum
  (:func:`xrfnb.physics.simulate.simulation_setup`, :func:`xrfnb.physics.fp.scatter`) for trial
  instruments and minimising its Poisson deviance against the data: the Compton shift of the anode lines,
  ``E' = E / (1 + E / 511 keV (1 - cos theta))``, sets the angle; where the continuum ends, and the shape of
  its scattered end, the voltage;
* **atmosphere** and **air path** from the argon K lines the irradiated air adds (simulated by
  :func:`xrfnb.argon_lines` for trial paths against the scatter of the same fit);
* **pile-up** from the sum peaks: the self-convolution of the spectrum fitted above the highest line, which
  with the count rate gives the pulse-pair resolving time;
* the **hardness** of the beam and the detector -- primary filter (material and thickness), polycapillary
  optics or none, silicon thickness -- from the scattered continuum's shape above 4 keV: the tube's
  continuum through each candidate, scattered and detected, against the data (:func:`_fit_hardness`).

Each value comes with a one-sigma uncertainty and a line saying how it was determined. What the data cannot
settle (no continuum end below the spectrum's range, no argon line, filters that shape the beam alike) is
marked "not determined" and keeps the start instrument's value -- except the filter, optics and detector
thickness, where the instrument carries the best candidate (the ones that tie shape the spectrum alike).

Example
-------
>>> import xrfnb
>>> inst = xrfnb.Instrument.preset("lab-mo").with_(n_channels=1024, gain_keV=0.04)
>>> stack = xrfnb.Stack([xrfnb.Layer({"lead white": 0.7}, thickness_um=30)], substrate="chalk")
>>> spectrum = xrfnb.simulate(stack, inst, counts=2e6, rng=5)
>>> fit = xrfnb.fit_instrument(spectrum)                       # doctest: +SKIP
>>> fit.instrument.anode, fit["anode"].status                  # doctest: +SKIP
('Mo', 'fitted')
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
import scipy.optimize
import xraylib
import xraylib_np

from .._errors import CalibrationError, FitError, InstrumentError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..core.lines import LINE_GROUPS, atomic_number, line_energy_keV
from ..core.spectrum import Scan, Spectrum
from ..physics.depth import depth_factor_at, detector_distance_mm
from ..physics.detector import FWHM_PER_SIGMA, MN_KA_KEV, DetectorResponse, si_ka_keV
from ..physics.fp import compton_energy_keV
from ..physics.instrument import Instrument, resolve_instrument
from ..physics.materials import STANDARD_PRESSURE_MBAR, Absorber, composition
from ..physics.simulate import argon_lines
from ..physics.tube import anode_lines, ebel_continuum
from .calibration import calibrate
from .design import Column, Design
from .families import COMMON_ELEMENTS, FamilyModel, family_lines, family_model
from .solvers import fit_one

__all__ = [
    "ANODE_CANDIDATES",
    "DETECTOR_THICKNESSES_UM",
    "FILTER_CANDIDATES_UM",
    "FittedParameter",
    "InstrumentFit",
    "Peak",
    "find_peaks",
    "fit_instrument",
    "geometry_for_angle",
    "thick_scatter",
]

#: tube anodes considered (heritage scanners: Rh, Mo, W, Ag, Pd, Cu, Cr; Au and Ti for completeness)
ANODE_CANDIDATES = ("Cr", "Ti", "Cu", "Mo", "Rh", "Pd", "Ag", "W", "Au")

Status = Literal["fitted", "derived", "fixed", "start", "not determined"]

#: silicon pair-creation energy used where the start instrument gives none, eV
_PAIR_EV_DEFAULT = 3.64
#: systematic floor on a peak centroid, keV (line-energy tables, peak shape): keeps few-peak fits honest
_CENTROID_FLOOR_KEV = 0.003
#: relative systematic floor on a peak width (line shape beyond the Gaussian)
_WIDTH_FLOOR = 0.015
#: Compton profile of light matrices, 1 sigma, atomic units of momentum (as the simulator:
#: :data:`xrfnb.physics.simulate.COMPTON_PZ_SIGMA_AU`)
_PZ_SIGMA_AU = 1.0
_FINE_STRUCTURE_INV = 137.035999


class FittedParameter(NamedTuple):
    """One instrument setting as :func:`fit_instrument` determined it.

    Attributes
    ----------
    value : float, str or None
        The value, in the unit its name states (``"tube_voltage_kV"`` in kV ...).
    sigma : float or None
        One-sigma uncertainty in the same unit; None for categories (anode, atmosphere) and for values
        not determined.
    status : str
        ``"fitted"`` (from the data), ``"derived"`` (computed from fitted values), ``"fixed"`` (given in
        ``fixed=``), ``"start"`` (not looked for; the start instrument's value) or ``"not determined"``
        (looked for, but the data cannot settle it; the start instrument's value).
    evidence : str
        What it was determined from, or why not.
    """

    value: Any
    sigma: float | None
    status: Status
    evidence: str


# ------------------------------------------------------------------------------------------ small helpers
def _fwhm_keV(energy_keV: np.ndarray | float, noise_keV: float, fano: float, pair_eV: float) -> np.ndarray:
    """Detector FWHM, keV (the rule of :meth:`xrfnb.Instrument.fwhm_keV`) for trial noise and Fano."""
    e = np.maximum(np.asarray(energy_keV, dtype=float), 0.0)
    return np.sqrt(noise_keV**2 + FWHM_PER_SIGMA**2 * fano * pair_eV * 1e-3 * e)


@functools.cache
def _group_lines(element: str, group: str) -> tuple[tuple[float, float], ...]:
    """(energy keV, relative radiative rate) of the member lines of a line group, rates summing to 1."""
    z = atomic_number(element)
    out = []
    for iupac in LINE_GROUPS[group]:
        try:
            e = xraylib.LineEnergy(z, getattr(xraylib, f"{iupac}_LINE"))
            r = xraylib.RadRate(z, getattr(xraylib, f"{iupac}_LINE"))
        except (ValueError, AttributeError):
            continue
        if e > 0 and r > 0:
            out.append((float(e), float(r)))
    total = sum(r for _, r in out)
    return tuple((e, r / total) for e, r in out) if total > 0 else ()


class _RefLine(NamedTuple):
    name: str  # "Fe Ka"
    element: str
    group: str
    energy_keV: float
    anchor: bool  # a clean centroid: usable for the calibration
    partner_keV: float  # the line that must be found too (Kb1 for Ka, Lb1 for La, the main line for
    # the others); nan: none needed (Ka of light elements)


@functools.cache
def _reference_lines() -> tuple[_RefLine, ...]:
    """Lines that peaks are matched against, sorted by energy.

    Anchors (clean centroids, used for the calibration): Ka of Na to Ba, Kb of K to Zn, La of Mo and
    heavier elements. The others only explain peaks (so that a peak they explain is not taken for an
    anchor): Kb of heavier elements (their Kb2 line pulls the centroid), Lb1, Lb2, Lg1 and Ma. The elements
    are :data:`~xrfnb.fitting.families.COMMON_ELEMENTS` and the anode candidates.
    """
    elements = sorted({*COMMON_ELEMENTS, *ANODE_CANDIDATES}, key=atomic_number)
    out: list[_RefLine] = []
    for el in elements:
        z = atomic_number(el)
        rows = [("Ka", z >= 11), ("Kb", 19 <= z <= 30), ("La", z >= 42)]
        rows += [("Kb", False)] if z > 30 else []
        rows += [("Lb", False), ("Lb2", False), ("Lg", False)] if z >= 42 else []
        rows += [("Ma", False)] if z >= 72 else []
        for group, anchor in rows:
            try:
                e = line_energy_keV(el, group)
                if group == "Ka":
                    partner = line_energy_keV(el, "Kb1") if z >= 17 else float("nan")
                elif group == "La":
                    partner = line_energy_keV(el, "Lb1")
                else:
                    partner = line_energy_keV(el, {"K": "Ka", "L": "La", "M": "Ma"}[group[0]])
            except XRFNBError:
                continue
            if 1.0 <= e <= 45.0:
                out.append(_RefLine(f"{el} {group}", el, group, e, anchor, partner))
    return tuple(sorted(out, key=lambda t: t.energy_keV))


#: Ka lines of K-line anodes: their Rayleigh peak is strong in every tube spectrum
_TUBE_KA = ("Mo Ka", "Rh Ka", "Pd Ka", "Ag Ka")


# ------------------------------------------------------------------------------------------ peak search
class Peak(NamedTuple):
    """A peak found in the spectrum, fitted with a Gaussian on a straight background.

    Attributes
    ----------
    channel : float
        Centroid, fractional channel.
    channel_sigma : float
        Its statistical uncertainty, channels.
    width_ch : float
        Gaussian sigma, channels.
    width_sigma_ch : float
        Its uncertainty, channels.
    area : float
        Net counts of the Gaussian.
    significance : float
        Net counts over their Poisson sigma in the search window.
    """

    channel: float
    channel_sigma: float
    width_ch: float
    width_sigma_ch: float
    area: float
    significance: float


def _window_sums(values: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over channels ``[i - half[i], i + half[i]]`` for every channel i."""
    n = values.size
    c = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(n)
    lo = np.clip(i - half, 0, n)
    hi = np.clip(i + half + 1, 0, n)
    return c[hi] - c[lo]


def _gauss_fit(
    y: np.ndarray,
    centre: float,
    half_width: int,
    width_guess: float,
    shape: tuple[tuple[float, float], ...] = ((0.0, 1.0),),
) -> Peak | None:
    """Fit ``A sum_k w_k G(x; mu + d_k, s) + b0 + b1 (x - c)`` to ``y`` around channel ``centre``.

    ``shape`` holds ``(d_k, w_k)``: channel offsets of a multiplet's members from its weighted centroid, and
    their weights (summing to 1). Poisson weights; None when the fit fails or the peak leaves the window.
    """
    n = y.size
    c0 = round(centre)
    lo, hi = max(0, c0 - half_width), min(n, c0 + half_width + 1)
    if hi - lo < 7:
        return None
    x = np.arange(lo, hi, dtype=float)
    yy = y[lo:hi]
    sw = 1.0 / np.sqrt(np.maximum(yy, 1.0))
    d = np.array([s[0] for s in shape])
    w = np.array([s[1] for s in shape])
    edge = 0.5 * (yy[:2].mean() + yy[-2:].mean())
    a0 = max(float(yy.max() - edge), 1.0) * math.sqrt(2 * math.pi) * width_guess

    def model(p: np.ndarray) -> np.ndarray:
        a, mu, s, b0, b1 = p
        u = (x[:, None] - mu - d[None, :]) / s
        g = (np.exp(-0.5 * u * u) * w[None, :]).sum(axis=1) / (math.sqrt(2 * math.pi) * s)
        return a * g + b0 + b1 * (x - centre)

    p0 = np.array([a0, centre, width_guess, max(edge, 0.0), 0.0])
    lower = [0.0, lo + 1.0, 0.25 * width_guess, -np.inf, -np.inf]
    upper = [np.inf, hi - 2.0, 4.0 * width_guess, np.inf, np.inf]
    p0 = np.clip(p0, np.array(lower) + 1e-9, np.array(upper) - 1e-9)
    try:
        res = scipy.optimize.least_squares(
            lambda p: (model(p) - yy) * sw, p0, bounds=(lower, upper), x_scale="jac", max_nfev=200
        )
    except (ValueError, np.linalg.LinAlgError):
        return None
    a, mu, s = res.x[:3]
    if not res.success or a <= 0:
        return None
    dof = max(1, yy.size - 5)
    chi2 = float(np.sum(res.fun**2)) / dof
    try:
        cov = np.linalg.pinv(res.jac.T @ res.jac) * max(1.0, chi2)
    except np.linalg.LinAlgError:
        return None
    err = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    if not (lo + 1 < mu < hi - 2) or not np.all(np.isfinite(err)):
        return None
    z = a / math.sqrt(max(float(yy.sum()), 1.0))
    return Peak(float(mu), float(err[1]), float(s), float(err[2]), float(a), float(z))


def find_peaks(
    counts: np.ndarray, fwhm_channels: np.ndarray, *, threshold: float = 5.0, first_channel: int = 0
) -> list[Peak]:
    """Peaks of a spectrum: maxima of a top-hat filter matched to the detector FWHM, each fitted with a
    Gaussian on a straight background.

    The filter is the mean of a central window one FWHM wide minus the mean of two side windows half as
    wide each, so a straight background cancels; its significance is the filtered value over its Poisson
    sigma.

    Parameters
    ----------
    counts : numpy.ndarray
        Counts per channel, shape (channels,).
    fwhm_channels : numpy.ndarray
        Expected peak FWHM at each channel, channels, shape (channels,).
    threshold : float, optional
        Smallest significance of a peak.
    first_channel : int, optional
        Channels below it (the zero peak, the low-energy cut-off) are not searched.

    Returns
    -------
    list of Peak
        Sorted by channel; ``significance`` is the filter's.
    """
    y = np.asarray(counts, dtype=float)
    n = y.size
    fw = np.clip(np.asarray(fwhm_channels, dtype=float), 2.0, max(2.0, n / 8))
    h = np.maximum(1, np.rint(0.5 * fw)).astype(int)  # central window [i - h, i + h]
    side = np.maximum(1, np.rint(0.5 * (2 * h + 1) / 2)).astype(int)  # each side window's width
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(n)

    def wsum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b = np.clip(a, 0, n), np.clip(b, 0, n)
        return c[b] - c[a], (b - a).astype(float)

    s_c, n_c = wsum(i - h, i + h + 1)
    s_l, n_l = wsum(i - h - side, i - h)
    s_r, n_r = wsum(i + h + 1, i + h + 1 + side)
    ok = (n_l > 0) & (n_r > 0) & (n_c > 0)
    n_s = np.maximum(n_l + n_r, 1.0)
    f = np.where(ok, s_c / np.maximum(n_c, 1) - (s_l + s_r) / n_s, 0.0)
    var = s_c / np.maximum(n_c, 1) ** 2 + (s_l + s_r) / n_s**2 + 1.0 / np.maximum(n_c, 1) ** 2
    z = np.where(ok, f / np.sqrt(var), 0.0)
    z[:first_channel] = 0.0
    cand = np.nonzero((z[1:-1] > threshold) & (z[1:-1] >= z[:-2]) & (z[1:-1] > z[2:]))[0] + 1
    # strongest first; drop maxima within 0.8 FWHM of a stronger one
    taken: list[int] = []
    for k in cand[np.argsort(-z[cand])]:
        if all(abs(k - j) > 0.8 * fw[k] for j in taken):
            taken.append(int(k))
    peaks = []
    for k in sorted(taken):
        p = _gauss_fit(y, k, max(4, round(1.3 * fw[k])), fw[k] / FWHM_PER_SIGMA)
        if p is not None:
            peaks.append(p._replace(significance=float(z[k])))
    return peaks


# ------------------------------------------------------------------------------------------ calibration
class IdentifiedPeak(NamedTuple):
    """A peak assigned to an X-ray line.

    Attributes
    ----------
    line : str
        ``"Fe Ka"``, ``"Rh Ka"`` (a Rayleigh-scattered tube line reads as the anode's line) ...
    energy_keV : float
        The line's energy (xraylib, radiative-rate weighted over the group), keV.
    peak : Peak
        The fitted peak.
    """

    line: str
    energy_keV: float
    peak: Peak


def _artefact_energies(peaks: list[Peak], cal: EnergyCalibration) -> tuple[np.ndarray, np.ndarray]:
    """Energies where the strongest peaks put Si escape peaks and sum (pile-up) peaks, keV, and the
    area of the weaker parent of each (an artefact is far weaker than its parents)."""
    strong = sorted(peaks, key=lambda p: -p.area)[:6]
    e = np.array([float(cal.energy_keV(p.channel)) for p in strong])
    a = np.array([p.area for p in strong])
    i, j = np.triu_indices(e.size)
    return (
        np.concatenate([e[e > 2.0] - 1.740, e[i] + e[j]]),
        np.concatenate([a[e > 2.0], np.minimum(a[i], a[j])]),
    )


def _identify(
    peaks: list[Peak],
    cal: EnergyCalibration,
    tolerance_keV: np.ndarray | float,
    fwhm_keV: np.ndarray,
    confirm: bool = True,
) -> list[IdentifiedPeak]:
    """Assign peaks to anchor lines (:func:`_reference_lines`) within ``tolerance_keV`` under ``cal``.

    Skipped: peaks much wider or narrower than the detector (Compton peaks, humps, spikes), peaks where an
    escape or sum peak of a strong peak falls, peaks with two candidate anchors more than 15 eV apart (Ar
    Ka and Ag La) or with another line 10 eV closer than the anchor, and lines whose confirming line (Kb1
    for Ka, Lb1 for La, the element's main line for the others) is not found too: a lone peak that happens
    to sit on a line is no evidence (``confirm=False`` drops this test: for peak widths, where a line's
    energy matters less); the Ka of Na to S, whose Kb is not resolved, needs 30 sigma instead. A strong
    peak (10 sigma) on the Ka line of a K-line anode (Mo, Rh, Pd, Ag) needs
    no confirmation: nothing else sits there, Rayleigh-scattered or fluorescent. A line is used once, by its
    strongest peak.
    """
    ref = _reference_lines()
    ref_e = np.array([r.energy_keV for r in ref])
    tol = np.broadcast_to(np.asarray(tolerance_keV, dtype=float), (len(peaks),))
    energies = np.array([float(cal.energy_keV(p.channel)) for p in peaks])
    artefacts, parent_area = _artefact_energies(peaks, cal)

    def found(e_line: float, t: float) -> bool:
        return bool(np.isnan(e_line) or np.any(np.abs(energies - e_line) <= t))

    out: dict[str, IdentifiedPeak] = {}
    for p, e, t, fw in zip(peaks, energies, tol, fwhm_keV, strict=True):
        gain = float(cal.energy_keV(p.channel + 0.5) - cal.energy_keV(p.channel - 0.5))
        width_keV = p.width_ch * gain * FWHM_PER_SIGMA
        if not (0.6 * fw < width_keV < 1.6 * fw):
            continue
        if np.any((np.abs(artefacts - e) < 0.5 * fw) & (p.area < 0.2 * parent_area)):
            continue
        # candidate lines near the peak whose confirming line is found as well
        near = [
            ref[k]
            for k in np.nonzero(np.abs(ref_e - e) <= t)[0]
            if not confirm
            or (
                found(ref[k].partner_keV, max(t, 0.5 * fw))
                and (np.isfinite(ref[k].partner_keV) or p.significance >= 30)
            )
            or (ref[k].name in _TUBE_KA and p.significance >= 10)
        ]
        if not near:
            continue
        anchors = [r for r in near if r.anchor]
        if not anchors:
            continue
        e_anchor = np.array([r.energy_keV for r in anchors])
        if np.ptp(e_anchor) > 0.015:
            continue  # two anchors (Ar Ka and Ag La): which one is it?
        r = anchors[int(np.argmin(np.abs(e_anchor - e)))]
        others = [abs(o.energy_keV - e) for o in near if not o.anchor]
        if others and min(others) + 0.010 < abs(r.energy_keV - e):
            continue  # another line explains the peak better
        if r.name not in out or out[r.name].peak.significance < p.significance:
            out[r.name] = IdentifiedPeak(r.name, r.energy_keV, p)
    return sorted(out.values(), key=lambda ip: ip.energy_keV)


def _present_elements(
    energies_keV: np.ndarray,
    fwhm_keV: np.ndarray,
    exclude: tuple[str, ...] = (),
    max_excitation_keV: float = np.inf,
) -> tuple[str, ...]:
    """Elements whose main line (Ka, La) and confirming line (Kb1, Lb1) both sit on peaks (within 0.35
    FWHM plus 20 eV) at ``energies_keV``; by its L lines only where its K lines, if excited
    (``max_excitation_keV``) and inside the peaks' range, are found too (Ag La and Lb1 sit on Ar Ka and
    Kb: without Ag Ka they are argon)."""

    def found(e_line: float) -> bool:
        if not energies_keV.size:
            return False
        t = 0.35 * float(np.interp(e_line, energies_keV, fwhm_keV)) + 0.02
        return bool(np.any(np.abs(energies_keV - e_line) <= t))

    top = float(energies_keV.max()) if energies_keV.size else 0.0
    out = []
    for r in _reference_lines():
        if r.group not in ("Ka", "La") or np.isnan(r.partner_keV) or r.element in exclude:
            continue
        if not (found(r.energy_keV) and found(r.partner_keV)):
            continue
        if r.group == "La":
            z = atomic_number(r.element)
            try:
                ka, k_edge = line_energy_keV(r.element, "Ka"), float(xraylib.EdgeEnergy(z, xraylib.K_SHELL))
            except (XRFNBError, ValueError):
                ka, k_edge = np.inf, np.inf
            if k_edge < max_excitation_keV and ka < top and not found(ka):
                continue
        if r.element not in out:
            out.append(r.element)
    return tuple(out)


def _polyfit_robust(
    x: np.ndarray,
    y: np.ndarray,
    var: np.ndarray,
    order: int,
    prior: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted polynomial ``y(x)`` of ``order``, outliers (> 4 sigma and > 25 eV) removed one at a time.

    ``prior`` = (values, sigmas) of the coefficients (increasing powers; a sigma of inf leaves one free)
    enters as pseudo-observations that are never removed. Returns the coefficients, their covariance
    (scaled by the reduced chi-square of the data when it exceeds 1) and the mask of points kept.
    """
    p = order + 1
    if prior is None:
        prior = (np.zeros(p), np.full(p, np.inf))
    pv, ps = (np.asarray(a, dtype=float)[:p] for a in prior)
    pw = np.where(np.isfinite(ps), 1.0 / np.where(np.isfinite(ps), ps, 1.0) ** 2, 0.0)

    def solve(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = np.vander(x[keep], p, increasing=True)
        w = 1.0 / var[keep]
        N = (X * w[:, None]).T @ X + np.diag(pw)
        cov = np.linalg.pinv(N)
        return cov @ ((X * w[:, None]).T @ y[keep] + pw * pv), cov

    keep = np.ones(x.size, dtype=bool)
    sig = np.sqrt(var)
    coef, cov = solve(keep)
    for _ in range(x.size):
        res = y - np.vander(x, p, increasing=True) @ coef
        bad = keep & (np.abs(res) > np.maximum(4 * sig, 0.025))
        if not bad.any():
            break
        keep[int(np.argmax(np.where(keep, np.abs(res) / sig, -1.0)))] = False
        coef, cov = solve(keep)
    res = y[keep] - np.vander(x[keep], p, increasing=True) @ coef
    dof = int(keep.sum()) - int(np.sum(pw == 0))
    if dof > 0:
        cov = cov * max(1.0, float(np.sum(res**2 / var[keep])) / dof)
    return coef, cov, keep


class _BlindFamilies(NamedTuple):
    """Line families for :func:`_blind_calibration` (F families, L lines of all families)."""

    main_keV: np.ndarray  # (F,) the family's main line (Ka, La; 0 for the zero-energy peak)
    weight: np.ndarray  # (F,) 1, or 0.5 for a family that no second line can confirm (K of Z < 19)
    needs_confirm: np.ndarray  # (F,) bool: present only when a confirming line also sits on a peak
    line_keV: np.ndarray  # (L,) every line of every family
    line_family: np.ndarray  # (L,) int: its family
    line_confirms: np.ndarray  # (L,) bool: a peak here confirms the family (Kb1, Lb1; anode Compton)


@functools.cache
def _families_for_blind_search() -> _BlindFamilies:
    """Line families of the common elements and the tube anodes for :func:`_blind_calibration`.

    A family is its element's K or L lines (M lines joined to L from Z = 72), confirmed by Kb1 or Lb1; a
    tube anode's K family also holds its Ka and Kb Compton-scattered at 90-150 deg, and a Compton Ka peak
    confirms it (a scatter-dominated spectrum, as a blank or a thin paint, shows the anode's Rayleigh Ka
    and its Compton partner before its Kb). The zero-energy peak is a family of its own.
    """
    mains: list[float] = []
    weights: list[float] = []
    needs: list[bool] = []
    energies: list[float] = []
    family: list[int] = []
    confirms: list[bool] = []

    def add(e_keV: float, f: int, confirm: bool) -> None:
        energies.append(float(e_keV))
        family.append(f)
        confirms.append(confirm)

    for el in sorted({*COMMON_ELEMENTS, *ANODE_CANDIDATES}, key=atomic_number):
        z = atomic_number(el)
        l_groups = ("La", "Lb", "Lb2", "Lb3", "Lg", "Lg3", "Ll", "Ln", *(("Ma", "Mb") if z >= 72 else ()))
        for fam, groups in (("K", ("Ka", "Kb", "Kb2")), ("L", l_groups)):
            if fam == "L" and z < 42:
                continue
            try:
                main = line_energy_keV(el, groups[0])
                partner = line_energy_keV(el, "Kb1" if fam == "K" else "Lb1")
            except XRFNBError:
                continue
            if not 1.0 <= main <= 45.0:
                continue
            confirmable = not (fam == "K" and z < 19)
            f = len(mains)
            mains.append(main)
            weights.append(1.0 if confirmable else 0.5)
            needs.append(confirmable)
            for g in groups:
                try:
                    add(line_energy_keV(el, g), f, False)
                except XRFNBError:
                    continue
            if fam == "K" and main > 3.0:
                add(main - si_ka_keV(), f, False)  # its silicon escape peak
            if confirmable:
                add(partner, f, True)
            if fam == "K" and el in ANODE_CANDIDATES:
                for theta in _BLIND_COMPTON_ANGLES_DEG:
                    for g in ("Ka", "Kb"):
                        e_line = line_energy_keV(el, g)
                        add(float(compton_energy_keV(e_line, math.radians(theta))), f, g == "Ka")
    # the zero-energy peak (the pulse processor's strobe: Bruker Esprit spectra hold one at E = 0, by far
    # the strongest feature of their first 100 channels)
    mains.append(0.0)
    weights.append(1.0)
    needs.append(False)
    add(0.0, len(mains) - 1, False)
    return _BlindFamilies(
        np.array(mains),
        np.array(weights),
        np.array(needs),
        np.array(energies),
        np.array(family, dtype=int),
        np.array(confirms),
    )


def _blind_scores(
    e_keV: np.ndarray, fwhm_keV: np.ndarray, sig: np.ndarray, offset_keV: np.ndarray
) -> np.ndarray:
    """How well each calibration hypothesis explains the strong peaks.

    Parameters
    ----------
    e_keV, fwhm_keV : numpy.ndarray
        The peaks' energies and widths under each hypothesis, keV, shape (H, P).
    sig : numpy.ndarray
        The peaks' weights (log significance), shape (P,).
    offset_keV : numpy.ndarray
        Each hypothesis' energy of channel 0, keV, shape (H,).

    Returns
    -------
    numpy.ndarray
        Shape (H,): a family is present when its main line and (where it has one) a confirming line sit
        on peaks; each peak counts once, on the present family's line that explains it, times the
        family's weight and the peak's; less a prior on the offset: channel 0 lies near 0 keV
        (|offset| / 0.3 keV subtracted) unless a zero-energy peak pins E = 0 elsewhere (Bruker: -0.96 keV).
    """
    fam = _families_for_blind_search()
    n_fam = fam.main_keV.size
    onehot = np.zeros((fam.line_keV.size, n_fam))
    onehot[np.arange(fam.line_keV.size), fam.line_family] = 1.0
    tol = (0.35 * np.clip(fwhm_keV, 0.08, 0.5) + 0.01)[:, :, None]  # (H, P, 1)
    hit_line = np.abs(e_keV[:, :, None] - fam.line_keV[None, None, :]) < tol  # (H, P, L)
    any_line = hit_line.any(axis=1)  # (H, L)
    main_line = fam.line_keV == fam.main_keV[fam.line_family]
    hit_main = ((any_line & main_line[None, :]) @ onehot) > 0  # (H, F)
    hit_confirm = ((any_line & fam.line_confirms[None, :]) @ onehot) > 0
    present = hit_main & (hit_confirm | ~fam.needs_confirm[None, :])
    w_line = (present * fam.weight[None, :])[:, fam.line_family]  # (H, L)
    explained = (hit_line * w_line[:, None, :]).max(axis=2)  # (H, P): each peak once
    zero_peak = present[:, -1]  # the last family: the zero-energy peak
    prior = np.where(zero_peak, 0.0, np.abs(offset_keV) / _BLIND_OFFSET_SCALE_KEV)
    return (explained * sig[None, :]).sum(axis=1) - prior


def _strong_peaks(peaks: list[Peak]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (at most 20) most significant peaks for a blind calibration: channels, FWHM in channels and
    log significance, each shape (P,)."""
    strong = sorted([p for p in peaks if p.significance > 8], key=lambda p: -p.significance)[:20]
    return (
        np.array([p.channel for p in strong]),
        np.array([p.width_ch * FWHM_PER_SIGMA for p in strong]),
        np.log1p(np.array([p.significance for p in strong])),
    )


def _blind_calibration(
    peaks: list[Peak], n_channels: int, fano: float, pair_eV: float, keep: int = 8
) -> list[EnergyCalibration]:
    """A linear calibration for a spectrum without one.

    The peak widths bound the gain first: an SDD's squared FWHM grows linearly with energy,
    ``FWHM^2 = noise^2 + 8 ln 2 F w E``, so in channels ``width^2 = a + (8 ln 2 F w / gain) * channel``
    and the slope gives the gain to about 30 %. Every offset and gain within that bound that puts two
    strong peaks on two main lines (Ka, La) is a hypothesis. Under each, an element family is present when
    its main line and the line that confirms it (Kb1, Lb1; light elements: Ka alone, at half weight) both
    sit on peaks; the hypothesis scores the peaks that lines of present families explain, each peak once,
    weighted by its significance. Returns the ``keep`` best distinct hypotheses, best first (the caller
    refines each and keeps the one that identifies the most).
    """
    ch, wid, sig = _strong_peaks(peaks)
    if ch.size < 3:
        return []
    k = FWHM_PER_SIGMA**2 * fano * pair_eV * 1e-3
    g_lo, g_hi = 0.002, 0.2
    coef, cov, _ = _polyfit_robust(ch, wid**2, (0.1 * wid**2) ** 2, 1)
    if coef[1] > 3 * math.sqrt(cov[1, 1]):
        g0 = k / coef[1]
        g_lo, g_hi = max(g_lo, 0.6 * g0), min(g_hi, 1.6 * g0)
    # every pair of peaks on every pair of main lines, in the same order (a calibration is monotonic):
    # both sorted, the lower peak on the lower line
    main = np.sort(np.unique(_families_for_blind_search().main_keV))
    ch_sorted = np.sort(ch)
    i, j = np.triu_indices(ch_sorted.size, 1)
    a, b = np.triu_indices(main.size, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = (main[b] - main[a])[None, :] / (ch_sorted[j] - ch_sorted[i])[:, None]
    offset = main[a][None, :] - gain * ch_sorted[i][:, None]
    ok = (gain > g_lo) & (gain < g_hi) & (np.abs(offset) < 1.5)
    g, o = gain[ok], offset[ok]
    # a hypothesis must give its peaks widths a silicon detector can have: no narrower than the Fano limit
    # (FWHM^2 >= 8 ln 2 F w E with F >= 0.08; real SDDs and Si(Li)s measure 1.05-2.3 times the limit at
    # F = 0.115 on the shared real spectra). Checked on the median of the peaks above 1 keV (blends of
    # unresolved lines are wider, never narrower): a calibration squeezing the peaks into the dense L and M
    # lines at 1-4 keV makes them too narrow (Steel at 3.1 instead of 11.9 eV per channel: 45 eV at 3 keV).
    plausible = _widths_plausible(o, g, ch, wid, pair_eV)
    g, o = g[plausible], o[plausible]
    if g.size == 0:
        return []
    scores = np.zeros(g.size)
    for start in range(0, g.size, 256):
        gg, oo = g[start : start + 256, None], o[start : start + 256, None]
        scores[start : start + 256] = _blind_scores(oo + gg * ch[None, :], gg * wid[None, :], sig, oo[:, 0])
    out: list[EnergyCalibration] = []
    for k in np.argsort(-scores):
        cal = EnergyCalibration(float(o[k]), float(g[k]))
        e_mid = cal.energy_keV(0.5 * n_channels)
        if any(
            abs(c.gain_keV / cal.gain_keV - 1) < 0.01 and abs(c.energy_keV(0.5 * n_channels) - e_mid) < 0.1
            for c in out
        ):
            continue  # the same hypothesis, found through other peak pairs
        try:
            out.append(cal.check_monotonic(n_channels))
        except CalibrationError:
            continue
        if len(out) >= keep:
            break
    return out


#: scale of the blind calibration's prior on the offset (channel 0 near 0 keV), keV
_BLIND_OFFSET_SCALE_KEV = 0.3

#: scattering angles at which a blind calibration looks for the anode's Compton peaks, deg
_BLIND_COMPTON_ANGLES_DEG = (90.0, 100.0, 110.0, 120.0, 130.0, 140.0, 150.0)

#: lowest Fano factor a blind calibration may imply for its peaks (silicon: 0.11-0.12 measured)
_BLIND_MIN_FANO = 0.08


def _widths_plausible(
    offset_keV: np.ndarray, gain_keV: np.ndarray, ch: np.ndarray, wid_ch: np.ndarray, pair_eV: float
) -> np.ndarray:
    """Which calibration hypotheses (offset, gain: shape (H,)) give the peaks (channels, FWHM in channels:
    shape (P,)) widths no narrower than a silicon detector's Fano limit (median over the peaks above 1 keV;
    hypotheses placing fewer than two peaks there are kept). Returns a bool array, shape (H,)."""
    e = offset_keV[:, None] + gain_keV[:, None] * ch[None, :]  # (H, P) keV
    fwhm = gain_keV[:, None] * wid_ch[None, :]
    limit = FWHM_PER_SIGMA * np.sqrt(_BLIND_MIN_FANO * pair_eV * 1e-3 * np.clip(e, 1e-6, None))
    ratio = np.where(e > 1.0, fwhm / limit, np.nan)
    counted = np.isfinite(ratio).sum(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: too few peaks above 1 keV
        med = np.nanmedian(ratio, axis=1)
    return (counted < 2) | (med >= 1.0)


class _Calibration(NamedTuple):
    calibration: EnergyCalibration
    width_lines: tuple[IdentifiedPeak, ...]  # peaks on lines without the confirming line: for widths
    cov: np.ndarray  # (3, 3) covariance of offset, gain, quadratic (keV, keV/ch, keV/ch^2)
    lines: tuple[IdentifiedPeak, ...]
    quadratic: bool  # whether the quadratic term was fitted
    blind: bool  # whether the start came from a blind search
    peaks: tuple[Peak, ...]


def _fit_calibration(
    y: np.ndarray, start_cal: EnergyCalibration, start: Instrument, blind: bool, spectrum: Spectrum
) -> _Calibration:
    """Energy calibration from identified peaks (see :func:`fit_instrument`)."""
    n = y.size

    def fwhm_ch(cal: EnergyCalibration) -> np.ndarray:
        e = cal.energies_keV(n)
        gain = np.gradient(e)
        return np.asarray(start.fwhm_keV(np.clip(e, 0.5, None)), dtype=float) / gain

    if not blind:
        return _refine_calibration(y, start_cal, start_cal, start, False, spectrum, fwhm_ch)
    # widths in channels are unknown: search with a guess, then refine the best hypotheses and keep the
    # one that identifies the most lines (weighted by their significance)
    peaks = find_peaks(y, np.full(n, max(3.0, n / 400.0)), first_channel=8)
    ch, wid, sig = _strong_peaks(peaks)
    best, best_score = None, -1.0
    for cal0 in _blind_calibration(peaks, n, float(start.fano), float(start.pair_energy_eV)):
        try:
            c = _refine_calibration(y, cal0, start_cal, start, True, spectrum, fwhm_ch)
        except CalibrationError:
            continue
        # the strong peaks the refined calibration explains (zero peak and Compton peaks included), then
        # the lines it identified in the whole spectrum
        e = np.asarray(c.calibration.energy_keV(ch), dtype=float)[None, :]
        gain = np.gradient(np.asarray(c.calibration.energies_keV(n)))[np.clip(ch.astype(int), 0, n - 1)]
        off = np.array([c.calibration.offset_keV])
        score = float(_blind_scores(e, (gain * wid)[None, :], sig, off)[0]) + _blind_score(c)
        if score > best_score:
            best, best_score = c, score
    if best is None or not best.lines:
        raise CalibrationError(
            "the spectrum has no energy calibration and its peaks match no common lines: give one "
            "(load(..., calibration=...)) or fit_instrument(..., start=Instrument(calibration=...))"
        )
    return best


def _blind_score(c: _Calibration) -> float:
    """How well a calibration found blind explains its lines: each line's log significance, weighted down
    by its residual (a true calibration puts every line within a few eV; a wrong one needs the quadratic
    term to bend through them and still misses some)."""
    score = 0.0
    for ip in c.lines:
        res = abs(float(c.calibration.energy_keV(ip.peak.channel)) - ip.energy_keV)
        sd = max(3 * c.calibration.gain_keV * ip.peak.channel_sigma, 0.005)
        score += math.log1p(ip.peak.significance) * math.exp(-0.5 * (res / sd) ** 2)
    return score - (2.0 if c.quadratic else 0.0)


def _refine_calibration(
    y: np.ndarray,
    cal: EnergyCalibration,
    start_cal: EnergyCalibration,
    start: Instrument,
    blind: bool,
    spectrum: Spectrum,
    fwhm_ch: Any,
) -> _Calibration:
    """Identify peaks under ``cal`` and fit the calibration to them, three times (see
    :func:`_fit_calibration`)."""
    n = y.size
    first = int(np.searchsorted(cal.energies_keV(n), 0.7))
    peaks = find_peaks(y, fwhm_ch(cal), first_channel=max(first, 3))
    tol = 0.35 * np.asarray(start.fwhm_keV(np.clip([cal.energy_keV(p.channel) for p in peaks], 0.5, None)))
    tol = tol + (0.06 if blind else 0.03)
    # the start calibration as a prior: a file's calibration is good to about 1 % in gain and 50 eV in
    # offset; a blind one to a few %
    g0 = cal.gain_keV
    prior_sd = np.array([0.2, 0.03 * g0, np.inf]) if blind else np.array([0.05, 0.01 * g0, np.inf])
    prior = (np.array([cal.offset_keV, cal.gain_keV, 0.0]), prior_sd)
    q0 = 0.0 if blind else start_cal.quadratic_keV
    ids: list[IdentifiedPeak] = []
    coef = np.array([cal.offset_keV, cal.gain_keV, q0])
    cov = np.diag([prior_sd[0] ** 2, prior_sd[1] ** 2, 0.0])
    quad = False
    for _ in range(3):
        fw = np.array([float(start.fwhm_keV(max(cal.energy_keV(p.channel), 0.5))) for p in peaks])
        ids = _identify(peaks, cal, tol, fw)
        if not ids:
            break
        ch = np.array([ip.peak.channel for ip in ids])
        e = np.array([ip.energy_keV for ip in ids])
        var = (cal.gain_keV * np.array([ip.peak.channel_sigma for ip in ids])) ** 2 + _CENTROID_FLOOR_KEV**2
        c1, cov1, keep = _polyfit_robust(ch, e - q0 * ch**2, var, 1, prior)
        coef = np.array([c1[0], c1[1], q0])
        cov = np.zeros((3, 3))
        cov[:2, :2] = cov1
        quad = False
        if keep.sum() >= 4 and np.ptp(ch[keep]) > 0.4 * n:
            c2, cov2, keep2 = _polyfit_robust(ch, e, var, 2, prior)
            if abs(c2[2]) > 3 * math.sqrt(cov2[2, 2]) and keep2.sum() >= 4:
                coef, cov, keep, quad = c2, cov2, keep2, True
        ids = [ip for ip, k in zip(ids, keep, strict=True) if k]
        try:
            cal = EnergyCalibration(*coef).check_monotonic(n)
        except CalibrationError:
            break
        # tighter tolerance: the calibration's own uncertainty plus a margin
        X = np.stack([np.ones(len(peaks)), [p.channel for p in peaks], [p.channel**2 for p in peaks]], axis=1)
        pred = np.sqrt(np.einsum("ij,jk,ik->i", X, cov, X))
        tol = 3 * pred + 0.03
    if len(ids) >= 2 and (quad or coef[2] == 0.0):
        # the least-squares fit itself: xrfnb.calibrate, on the peaks identified here, where it agrees
        guess = {ip.line: ip.peak.channel for ip in ids}
        half = max(2, round(0.4 * float(np.median(fwhm_ch(cal)))))
        try:
            cf = calibrate(spectrum, guess, quadratic=quad, search_half_width=half)
        except CalibrationError:
            cf = None
        if cf is not None:
            X = np.stack([np.ones(n), np.arange(n), np.arange(n) ** 2], axis=1)[:: max(1, n // 64)]
            sd = np.sqrt(np.einsum("ij,jk,ik->i", X, cov, X))
            diff = np.abs(cf.calibration.energy_keV(X[:, 1]) - cal.energy_keV(X[:, 1]))
            if np.all(diff <= 2 * sd + 0.002):
                cal = cf.calibration
    fw = np.array([float(start.fwhm_keV(max(cal.energy_keV(p.channel), 0.5))) for p in peaks])
    loose = _identify(peaks, cal, 0.3 * fw + 0.02, fw, confirm=False)
    return _Calibration(cal, tuple(loose), cov, tuple(ids), quad, blind, tuple(peaks))


# ------------------------------------------------------------------------------------------ resolution
class _Resolution(NamedTuple):
    noise_keV: float
    fano: float
    cov: np.ndarray  # (2, 2) covariance of noise_keV and fano (fano's row zero where it was not fitted)
    fano_fitted: bool
    widths: tuple[tuple[str, float, float, float], ...]  # (line, energy keV, FWHM keV, sigma keV)


def _fit_resolution(
    y: np.ndarray,
    cal: EnergyCalibration,
    ids: tuple[IdentifiedPeak, ...],
    peaks: tuple[Peak, ...],
    start: Instrument,
    fano_fixed: float | None,
) -> _Resolution | None:
    """Noise and Fano factor from the widths of identified, isolated peaks (see :func:`fit_instrument`).

    Each peak is refitted as its line group (Ka1 + Ka2 ...: xraylib energies and rates) with one Gaussian
    width. With peaks over less than 4 keV, or a Fano factor the widths do not settle (below 3 sigma, or
    outside 0.06-0.2), the Fano factor stays at the start instrument's and only the noise is fitted. None
    (not determined) without a usable peak below 12 keV, or where the widths leave no significant room for
    the noise.
    """
    pair = float(start.pair_energy_eV)
    rows = []
    all_ch = np.array([p.channel for p in peaks])
    for ip in ids:
        el, group = ip.line.split()
        members = _group_lines(el, group)
        if not members:
            continue
        p = ip.peak
        gain = float(cal.energy_keV(p.channel + 0.5) - cal.energy_keV(p.channel - 0.5))
        fw_ch = float(start.fwhm_keV(ip.energy_keV)) / gain
        others = np.abs(all_ch - p.channel)
        if np.any((others > 0.3 * fw_ch) & (others < 1.6 * fw_ch)):
            continue  # a neighbour inside the window would widen the peak
        shape = tuple(((e - ip.energy_keV) / gain, w) for e, w in members)
        fit = _gauss_fit(y, p.channel, max(5, round(1.5 * fw_ch)), p.width_ch, shape)
        if fit is None or fit.significance < 10:
            continue
        fwhm = fit.width_ch * gain * FWHM_PER_SIGMA
        sd = math.hypot(fit.width_sigma_ch * gain * FWHM_PER_SIGMA, _WIDTH_FLOOR * fwhm)
        rows.append((ip.line, ip.energy_keV, fwhm, sd))
    if not rows:
        return None
    e = np.array([r[1] for r in rows])
    f2 = np.array([r[2] for r in rows]) ** 2
    var = (2 * np.array([r[2] * r[3] for r in rows])) ** 2
    k = FWHM_PER_SIGMA**2 * pair * 1e-3  # FWHM^2 = noise^2 + k * fano * E
    fano0 = float(start.fano if fano_fixed is None else fano_fixed)
    cov = np.zeros((2, 2))
    if not np.any(e < 12.0):
        return None  # the noise term shows at low energies only
    if fano_fixed is None and len(rows) >= 3 and np.ptp(e) >= 4.0:
        c, cv, keep = _polyfit_robust(e, f2, var, 1)
        a, b = c
        if b > 0 and b > 3 * math.sqrt(cv[1, 1]) and 0.06 <= b / k <= 0.2 and a > 0:
            noise = math.sqrt(a)
            # d noise = d a / (2 noise); d fano = d b / k
            J = np.array([[0.5 / noise, 0.0], [0.0, 1.0 / k]])
            cov = J @ cv @ J.T
            used = tuple(r for r, kk in zip(rows, keep, strict=True) if kk)
            return _Resolution(noise, b / k, cov, True, used)
    a_i = f2 - k * fano0 * e
    w = 1.0 / var
    keep = np.ones(e.size, dtype=bool)
    for _ in range(3):
        a = float(np.sum(a_i[keep] * w[keep]) / np.sum(w[keep]))
        res = (a_i - a) / np.sqrt(var)
        bad = keep & (np.abs(res) > 4)
        if not bad.any() or keep.sum() <= 2:
            break
        keep[np.argmax(np.where(keep, np.abs(res), -1))] = False
    a = float(np.sum(a_i[keep] * w[keep]) / np.sum(w[keep]))
    var_a = 1.0 / float(np.sum(w[keep]))
    if keep.sum() > 1:
        chi2 = float(np.sum((a_i[keep] - a) ** 2 * w[keep])) / (keep.sum() - 1)
        var_a *= max(1.0, chi2)
    if a <= 3 * math.sqrt(var_a):
        return None  # the widths leave no room for electronic noise: not determined
    noise = math.sqrt(a)
    cov[0, 0] = var_a / (4 * a)
    used = tuple(r for r, kk in zip(rows, keep, strict=True) if kk)
    return _Resolution(noise, fano0, cov, False, used)


# ------------------------------------------------------------------------------------------ scatter lines
def _compton_sigma_keV(energy_keV: np.ndarray, theta_rad: float) -> tuple[np.ndarray, np.ndarray]:
    """Compton energies of lines at ``energy_keV`` and their Doppler spread (1 sigma, keV), as the
    simulator models them (a Gaussian electron-momentum profile of 1 a.u.)."""
    e = np.asarray(energy_keV, dtype=float)
    ec = compton_energy_keV(e, theta_rad)
    q = np.sqrt(e**2 + ec**2 - 2 * e * ec * math.cos(theta_rad))
    return ec, q / _FINE_STRUCTURE_INV * _PZ_SIGMA_AU


def _gaussians(
    axis_keV: np.ndarray, centres_keV: np.ndarray, sigma_keV: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Sum of normalised Gaussians (counts per channel of unit total weight) on an energy axis."""
    width = np.gradient(axis_keV)
    u = (axis_keV[:, None] - centres_keV[None, :]) / sigma_keV[None, :]
    g = np.exp(-0.5 * u * u) / (math.sqrt(2 * math.pi) * sigma_keV[None, :])
    return (g * weights[None, :]).sum(axis=1) * width


def _flexible_peak(axis_keV: np.ndarray, centre_keV: float, sigma_keV: float) -> list[np.ndarray]:
    """A Gaussian and its derivatives by centre and by width: linear columns that let a fit move and
    widen a peak a little (a fluorescence peak of unknown fine structure, Ka1/Ka2 or Lb1/Lb2)."""
    u = (axis_keV - centre_keV) / sigma_keV
    g = np.exp(-0.5 * u * u) * np.gradient(axis_keV) / (math.sqrt(2 * math.pi) * sigma_keV)
    # both signs: the fits are non-negative
    return [g, g * u, -g * u, g * (u * u - 1.0), -g * (u * u - 1.0)]


def _pileup_column(y: np.ndarray, energy_keV: np.ndarray, share: float) -> np.ndarray:
    """What pile-up adds to a spectrum per unit share of sum events, shape (channels,).

    A share ``p`` of recorded events are sums of two photons: ``y = N [(1 - p) s + p/2 (s * s)]``
    (:meth:`xrfnb.physics.detector.DetectorResponse.pileup`), so ``y`` changes by ``p N (s * s / 2 - s)``.
    The single-photon spectrum ``s`` is the measured one above 1 keV with its own sum peaks taken out
    for the share ``share`` (two fixed-point steps), so that they do not make third-order sums.
    """
    keep = energy_keV >= 1.0
    total = float(y[keep].sum())
    if total <= 0:
        return np.zeros_like(y, dtype=float)
    s = np.where(keep, y, 0.0) / total
    p = float(np.clip(share, 0.0, 0.5))
    s_meas = s
    for _ in range(3 if p > 0 else 0):
        s = np.maximum((1.0 - 0.5 * p) * s_meas - 0.5 * p * _pileup_template(s, energy_keV, 1.0), 0.0) / (
            1.0 - p
        )
        s = s / s.sum()
    return total * (0.5 * _pileup_template(s, energy_keV, 1.0) - s)


class _Pileup(NamedTuple):
    share: float  # p, the share of recorded events that are sums of two photons
    sigma: float
    sums_keV: tuple[float, ...]  # the sum-peak energies that gave it


def _fit_pileup(
    y: np.ndarray, energy_keV: np.ndarray, fwhm_keV: np.ndarray, peaks: list[Peak], cal: EnergyCalibration
) -> _Pileup | None:
    """The share of sum events from the sum peaks of the strongest peaks (see :func:`fit_instrument`).

    Around each sum energy ``E_i + E_j`` of the four strongest peaks, the counts (+/- 2.5 FWHM) are fitted
    with a straight background, flexible Gaussians at other peaks in the window, and the pile-up column
    (:func:`_pileup_column`) whose coefficient is the share ``p``; twice, the second time with the column
    built for the first estimate. Windows that disagree with the others by more than 3 sigma (a
    fluorescence line under the sum peak) are dropped; the rest are averaged with their weights.
    """
    strong = sorted(peaks, key=lambda p: -p.area)[:4]
    if not strong:
        return None
    e = np.array([float(cal.energy_keV(p.channel)) for p in strong])
    all_e = np.array([float(cal.energy_keV(p.channel)) for p in peaks])
    i, j = np.triu_indices(e.size)
    sums = np.unique(np.round(e[i] + e[j], 3))
    sums = sums[sums < energy_keV[-1] - 0.5]
    if sums.size == 0:
        return None
    share = 0.0
    est: list[tuple[float, float, float]] = []
    for _ in range(2):
        col = _pileup_column(y, energy_keV, share)
        est = []
        for e_s in sums:
            fw = float(np.interp(e_s, energy_keV, fwhm_keV))
            sel = np.nonzero(np.abs(energy_keV - e_s) <= 2.5 * fw)[0]
            if sel.size < 8 or col[sel].max() <= 0:
                continue
            x = energy_keV[sel]
            t = (x - e_s) / fw
            cols = [np.ones_like(x), t, col[sel]]
            for e_p in all_e:
                if abs(e_p - e_s) > 0.7 * fw and abs(e_p - e_s) < 3.0 * fw:
                    cols.extend(
                        _flexible_peak(
                            x, float(e_p), float(np.interp(e_p, energy_keV, fwhm_keV)) / FWHM_PER_SIGMA
                        )[:2]
                    )
            A = np.stack(cols, axis=1)
            w = 1.0 / np.maximum(y[sel], 1.0)
            try:
                cov = np.linalg.pinv((A * w[:, None]).T @ A)
            except np.linalg.LinAlgError:
                continue
            coef = cov @ (A * w[:, None]).T @ y[sel]
            chi2 = float(np.sum((y[sel] - A @ coef) ** 2 * w)) / max(1, sel.size - A.shape[1])
            sd = math.sqrt(max(cov[2, 2], 1e-30) * max(1.0, chi2))
            if np.isfinite(coef[2]) and sd > 0:
                est.append((float(coef[2]), sd, float(e_s)))
        if not est:
            return None
        v = np.array([a for a, _, _ in est])
        sd = np.array([b for _, b, _ in est])
        keep = np.abs(v - np.median(v)) <= 3 * np.maximum(sd, 1e-6) + 0.1 * abs(float(np.median(v)))
        w = 1.0 / sd[keep] ** 2
        if not np.isfinite(w).all() or w.sum() <= 0:
            return None  # no consistent sum-peak estimate (e.g. a wrong calibration's energies)
        share = float(np.clip(np.sum(v[keep] * w) / np.sum(w), 0.0, 0.5))
    sigma = float(1.0 / math.sqrt(np.sum(w)))
    if keep.sum() > 1:
        chi2 = float(np.sum((v[keep] - share) ** 2 * w)) / (keep.sum() - 1)
        sigma *= math.sqrt(max(1.0, chi2))
    return _Pileup(share, sigma, tuple(e_s for (_, _, e_s), k in zip(est, keep, strict=True) if k))


class _TubeLines(NamedTuple):
    anode: str
    energy_keV: np.ndarray  # (m,) the anode's K or L lines
    weight: np.ndarray  # (m,) relative intensity within the line's subshell (radiative rates)
    subshell: np.ndarray  # (m,) int: initial vacancy subshell (0 K, 1 L1, 2 L2, 3 L3)
    family: str  # "K" or "L"


@functools.cache
def _tube_lines(anode: str, family: str) -> _TubeLines:
    """An anode's K or L lines above 1 keV (:func:`xrfnb.physics.tube.anode_lines` at 100 kV): energies,
    radiative-rate weights within each initial-vacancy subshell (the subshells' ratios depend on the tube
    voltage and on the sample's absorption, so they are left free in the fits), lines of less than 1 % of
    the strongest dropped."""
    names, e, i = anode_lines(anode, 100.0, min_energy_keV=1.0)
    sub = {"K": 0, "L1": 1, "L2": 2, "L3": 3}
    shells = np.array([sub.get(n.split()[1][:2] if n.split()[1][0] == "L" else "K", -1) for n in names])
    sel = np.array([n.split()[1].startswith(family) for n in names], dtype=bool)
    e, i, shells = e[sel], i[sel], shells[sel]
    keep = i >= 0.01 * i.max() if i.size else sel[:0]
    e, i, shells = e[keep], i[keep], shells[keep]
    w = i.copy()
    for sh in np.unique(shells):
        w[shells == sh] /= w[shells == sh].sum()
    return _TubeLines(anode, e, w, shells, family)


class _ScatterEvidence(NamedTuple):
    lines: _TubeLines
    theta_deg: float  # best scattering angle of the local fit
    z_rayleigh: float  # significance of the Rayleigh peaks (all subshells)
    z_compton: float  # significance of the Compton peaks
    rayleigh_counts: float
    compton_counts: float
    chi2_dof: float
    dof: int


def _pileup_template(y: np.ndarray, energy_keV: np.ndarray, min_energy_keV: float = 1.0) -> np.ndarray:
    """Shape of the sum (pile-up) spectrum: the self-convolution of the measured spectrum above
    ``min_energy_keV`` on the energy axis, shape (channels,), normalised so that all sums, the ones
    beyond the last channel included, add up to one."""
    n = y.size
    gain = float(energy_keV[-1] - energy_keV[0]) / (n - 1)
    # resample onto a uniform grid from 0 keV (so that energies add as indices), convolve, sample back
    m = math.ceil(energy_keV[-1] / gain) + 1
    grid = np.arange(m) * gain
    dens = np.interp(grid, energy_keV, np.where(energy_keV >= min_energy_keV, y, 0.0), left=0.0, right=0.0)
    nfft = int(2 ** math.ceil(math.log2(2 * m)))
    f = np.fft.rfft(dens, nfft)
    conv = np.maximum(np.fft.irfft(f * f, nfft)[: 2 * m], 0.0)
    out = np.interp(energy_keV, np.arange(2 * m) * gain, conv, left=0.0, right=0.0)
    # per channel of the spectrum, not of the grid; sums beyond the last channel are lost, as in a detector
    total = conv.sum() * float(np.mean(np.diff(energy_keV))) / gain
    return out / total if total > 0 else out


def _scatter_evidence(
    y: np.ndarray,
    energy_keV: np.ndarray,
    fwhm: np.ndarray,
    lines: _TubeLines,
    other_peaks_keV: np.ndarray,
    thetas_deg: np.ndarray,
    pileup: np.ndarray,
    families: Mapping[str, list[tuple[np.ndarray, np.ndarray]]] | None = None,
) -> _ScatterEvidence | None:
    """Local fit of one tube line family's Rayleigh peaks and their Compton partners.

    In a window from the Compton energy at 180 deg of the lowest line to above the highest line, the data
    are fitted (Poisson-weighted least squares) with a quadratic background, the Rayleigh template (the
    lines at their own energies, detector width), the Compton template (the lines at their Compton energy,
    Doppler and detector widths), the sum peaks (``pileup``, the spectrum's self-convolution), the line
    families of the sample's elements (``families``: element -> parts of (line energies, weights), the
    anode's own element left out) and a flexible Gaussian at every other peak in the window that is not at
    one of the main Rayleigh lines, for each angle of ``thetas_deg``; the angle with the lowest chi-square
    wins (a 10 degree scan, then the grid's points within 8 degrees of the best).
    """
    e_l, w_l, sh = lines.energy_keV, lines.weight, lines.subshell
    if e_l.size == 0:
        return None
    lo_e = float(compton_energy_keV(e_l.min(), math.pi)) - 3 * float(np.interp(e_l.min(), energy_keV, fwhm))
    hi_e = float(e_l.max()) + 3 * float(np.interp(e_l.max(), energy_keV, fwhm))
    sel = np.nonzero((energy_keV >= lo_e) & (energy_keV <= hi_e))[0]
    if sel.size < 12 or energy_keV[-1] < e_l.max():
        return None
    x = energy_keV[sel]
    yy = y[sel]
    if yy.sum() < 100:
        return None
    s_l = np.interp(e_l, energy_keV, fwhm) / FWHM_PER_SIGMA
    shells = [k for k in np.unique(sh) if w_l[sh == k].sum() > 0]
    rayleigh = [_gaussians(x, e_l[sh == k], s_l[sh == k], w_l[sh == k]) for k in shells]
    t = (x - x.mean()) / max(np.ptp(x), 1e-9)
    cols = [np.ones_like(x), t, t * t, *rayleigh]
    n_r = len(rayleigh)
    if pileup[sel].sum() > 0:
        cols.append(pileup[sel] / pileup[sel].sum())
    fw_line = np.interp(other_peaks_keV, energy_keV, fwhm)
    # the strongest line of each subshell sets that subshell's Rayleigh amplitude: no other peak there
    main_l = np.array([e_l[sh == k][np.argmax(w_l[sh == k])] for k in shells])
    fam_e: list[float] = []
    for el, pieces in (families or {}).items():
        if el == lines.anode:
            continue
        for e_f, w_f in pieces:
            inside = (e_f > lo_e) & (e_f < hi_e)
            if inside.any() and w_f[inside].sum() > 0.05 * w_f.sum():
                s_f = np.interp(e_f, energy_keV, fwhm) / FWHM_PER_SIGMA
                cols.append(_gaussians(x, e_f, s_f, w_f))
                fam_e.extend(e_f[w_f > 0.02 * w_f.max()].tolist())
    fam_arr = np.array(fam_e)
    for e_p, f_p in zip(other_peaks_keV, fw_line, strict=True):
        if (
            lo_e < e_p < hi_e
            and np.min(np.abs(main_l - e_p)) > 0.35 * f_p
            and not (fam_arr.size and np.min(np.abs(fam_arr - e_p)) < 0.5 * f_p)
        ):
            cols.extend(_flexible_peak(x, e_p, f_p / FWHM_PER_SIGMA))
    base = np.stack(cols, axis=1)
    w = 1.0 / np.maximum(yy, 1.0)
    bw = base * w[:, None]
    n_bb, b_b, yy_w = bw.T @ base, bw.T @ yy, float(np.sum(yy * yy * w))

    def solve(th: float) -> tuple[float, float, np.ndarray, np.ndarray] | None:
        ec, sd = _compton_sigma_keV(e_l, math.radians(th))
        s_c = np.sqrt(np.interp(ec, energy_keV, fwhm / FWHM_PER_SIGMA) ** 2 + sd**2)
        C = np.stack([_gaussians(x, ec[sh == k], s_c[sh == k], w_l[sh == k]) for k in shells], axis=1)
        cw = C * w[:, None]
        N = np.block([[n_bb, bw.T @ C], [C.T @ bw, cw.T @ C]])
        b = np.concatenate([b_b, cw.T @ yy])
        try:
            cov = np.linalg.pinv(N)
        except np.linalg.LinAlgError:
            return None
        coef = cov @ b
        return max(yy_w - float(coef @ b), 0.0), th, coef, cov

    # a coarse scan of the angles, then a finer one around the best
    thetas = np.asarray(thetas_deg, dtype=float)
    best = None
    for grid in (
        thetas[:: max(1, round(10.0 / max(float(np.median(np.diff(thetas))), 1e-9)))]
        if thetas.size > 3
        else thetas,
        None,
    ):
        if grid is None:
            if best is None or thetas.size <= 3:
                break
            grid = thetas[np.abs(thetas - best[1]) <= 8.0]
        for th in grid:
            r = solve(float(th))
            if r is not None and (best is None or r[0] < best[0]):
                best = r
    if best is None:
        return None
    chi2, th, coef, cov = best
    dof = max(1, sel.size - coef.size)
    scale = math.sqrt(max(1.0, chi2 / dof))
    r_idx = np.arange(3, 3 + n_r)  # the Rayleigh columns
    c_idx = np.arange(coef.size - n_r, coef.size)  # the Compton columns
    r_sum, c_sum = float(coef[r_idx].sum()), float(coef[c_idx].sum())
    sd_r = math.sqrt(max(float(cov[np.ix_(r_idx, r_idx)].sum()), 1e-300)) * scale
    sd_c = math.sqrt(max(float(cov[np.ix_(c_idx, c_idx)].sum()), 1e-300)) * scale
    return _ScatterEvidence(lines, float(th), r_sum / sd_r, c_sum / sd_c, r_sum, c_sum, chi2 / dof, dof)


# ------------------------------------------------------------------------------------------ geometry
#: the lowest take-off angle :func:`geometry_for_angle` moves a detector to before it changes the incidence
#: too, degrees (scanners' take-offs lie at 30-65 deg; the training's at 35-65)
_MIN_TAKEOFF_DEG = 20.0


def geometry_for_angle(instrument: Instrument, scattering_angle_deg: float) -> dict[str, float]:
    """Settings that give an instrument a scattering angle, changing as little as possible.

    The incidence and take-off angles are kept and the detector azimuth solved from
    ``cos theta = -sin psi1 sin psi2 - cos psi1 cos psi2 cos(azimuth)`` where the angle lies in their range
    ``[psi1 + psi2, 180 - |psi1 - psi2|]``; otherwise the take-off angle moves (azimuth 180 deg below the
    range, 0 deg above it); below the range, where the take-off would fall under 20 deg, both angles shrink
    in proportion instead; where nothing else reaches it both angles become half the scattering angle.

    Parameters
    ----------
    instrument : Instrument
        The instrument whose incidence and take-off angles are kept where possible.
    scattering_angle_deg : float
        The scattering angle wanted, degrees (0-180).

    Returns
    -------
    dict
        ``incidence_deg``, ``takeoff_deg`` and ``detector_azimuth_deg`` for :meth:`Instrument.with_`.

    Examples
    --------
    >>> import xrfnb
    >>> inst = xrfnb.Instrument.preset("bruker-m4")
    >>> settings = geometry_for_angle(inst, 140.0)
    >>> round(inst.with_(**settings).scattering_angle_deg, 6)
    140.0
    """
    theta = float(np.clip(scattering_angle_deg, 1.0, 180.0))
    p1, p2 = float(instrument.incidence_deg), float(instrument.takeoff_deg)
    s1, s2 = math.sin(math.radians(p1)), math.sin(math.radians(p2))
    c1, c2 = math.cos(math.radians(p1)), math.cos(math.radians(p2))
    lo, hi = p1 + p2, 180.0 - abs(p1 - p2)
    if lo <= theta <= hi and c1 * c2 > 1e-9:
        cos_az = -(math.cos(math.radians(theta)) + s1 * s2) / (c1 * c2)
        az = math.degrees(math.acos(float(np.clip(cos_az, -1.0, 1.0))))
        return {"incidence_deg": p1, "takeoff_deg": p2, "detector_azimuth_deg": az}
    if lo <= theta <= hi:  # a beam or detector normal to the surface: every azimuth gives this angle
        az0 = float(getattr(instrument, "detector_azimuth_deg", 180.0))
        return {"incidence_deg": p1, "takeoff_deg": p2, "detector_azimuth_deg": az0}
    if theta < lo and _MIN_TAKEOFF_DEG <= theta - p1 <= 90.0:
        return {"incidence_deg": p1, "takeoff_deg": theta - p1, "detector_azimuth_deg": 180.0}
    if theta < lo:
        # the take-off alone would go below any scanner's (101 deg from 90/60 made an 11 deg take-off,
        # its exit path 4.5 times longer): both angles shrink in proportion, in the plane of incidence
        k = theta / lo
        return {"incidence_deg": p1 * k, "takeoff_deg": p2 * k, "detector_azimuth_deg": 180.0}
    if theta > hi:
        for p2_new in (p1 - (180.0 - theta), p1 + (180.0 - theta)):
            if 0.0 < p2_new <= 90.0:
                return {"incidence_deg": p1, "takeoff_deg": p2_new, "detector_azimuth_deg": 0.0}
    half = min(90.0, max(0.5, 0.5 * theta))
    return {"incidence_deg": half, "takeoff_deg": half, "detector_azimuth_deg": 180.0}


# ------------------------------------------------------------------------------------------ scatter physics
#: thick scatterers whose Rayleigh-to-Compton ratios span a painting's: binder or wood (light), chalk and
#: lead white; non-negative mixtures of their scatter stand for the unknown sample
_SCATTER_MATRICES = ("C5H8O2", "CaCO3", "Pb3C2O8H2")
#: their densities, g/cm3, for the depth of their scatter (:func:`xrfnb.physics.depth.depth_factor_at`):
#: PMMA as NIST's acrylic blanks (tests/test_physics_real.py), calcite 2.71 and hydrocerussite 6.80
#: (Anthony et al., Handbook of Mineralogy, measured densities)
_SCATTERER_DENSITY = {"C5H8O2": 1.18, "CaCO3": 2.71, "Pb3C2O8H2": 6.80}


@functools.lru_cache(maxsize=256)
def _scatterer_density(material: str) -> float:
    """Density (g/cm3) of a thick scatterer: :data:`_SCATTERER_DENSITY`; a mixture by mass (``"a:w, b:w"``)
    with the volumes of its parts adding, ``1 / rho = sum w_i / rho_i``; an element at xraylib's density,
    except a gas, whose thick pure scatter only stands for its absorption edge in a sample: calcite's."""
    if material in _SCATTERER_DENSITY:
        return _SCATTERER_DENSITY[material]
    if ":" in material:
        parts = [p.split(":") for p in material.split(",")]
        w = np.array([float(f) for _, f in parts])
        rho = np.array([_scatterer_density(m.strip()) for m, _ in parts])
        return float(w.sum() / np.sum(w / rho))
    density = composition(material)[2]
    return float(density) if density is not None and density > 0.1 else _SCATTERER_DENSITY["CaCO3"]


def _thick_yields(
    dr: np.ndarray,
    dc: np.ndarray,
    mu: np.ndarray,
    mu_c: np.ndarray,
    incidence_deg: float,
    takeoff_deg: float,
    depth: tuple[float, float, float] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Thick-layer Rayleigh and Compton yields per incident photon and sr from cross-sections (cm2/g/sr)
    and attenuation at E and at the Compton energy (cm2/g); with ``depth = (detector distance mm, scattering
    angle deg, density g/cm3)`` each times its depth factor (:func:`xrfnb.physics.depth.depth_factor_at`,
    ``k = rho (mu(E) / sin psi1 + mu(E') / sin psi2)``)."""
    s1, s2 = math.sin(math.radians(incidence_deg)), math.sin(math.radians(takeoff_deg))
    att_r, att_c = mu / s1 + mu / s2, mu / s1 + mu_c / s2
    r, c = dr / att_r / s1, dc / att_c / s1
    if depth is not None:
        dist, theta, rho = depth
        f = depth_factor_at(
            np.concatenate([att_r, att_c]) * (rho / 10.0),  # 1/cm -> 1/mm
            distance_mm=dist,
            incidence_deg=incidence_deg,
            scattering_angle_deg=theta,
        )
        r, c = r * f[: r.size], c * f[r.size :]
    return r, c


#: energy grid (keV) and angle step (deg) on which the scatter cross-sections are tabulated
_XS_ENERGY_KEV = np.arange(0.5, 101.0, 0.25)
_XS_THETA_STEP_DEG = 2.0


@functools.lru_cache(maxsize=512)
def _scatter_table(material: str, theta_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rayleigh and Compton cross-sections (cm2/g/sr), attenuation at E and at the Compton energy (cm2/g)
    of a material on :data:`_XS_ENERGY_KEV`, at one scattering angle."""
    z, w, _, _ = composition(material)
    z = np.asarray(z, dtype=int)
    w = np.asarray(w, dtype=float)
    e = _XS_ENERGY_KEV
    th = np.array([math.radians(theta_deg)])
    ec = compton_energy_keV(e, th[0])
    return (
        w @ xraylib_np.DCS_Rayl(z, e, th)[:, :, 0],
        w @ xraylib_np.DCS_Compt(z, e, th)[:, :, 0],
        w @ xraylib_np.CS_Total(z, e),
        w @ xraylib_np.CS_Total(z, ec),
    )


def _theta_nodes(theta_deg: float) -> tuple[tuple[float, float], ...]:
    """The tabulated scattering angles around ``theta_deg`` (deg, clipped to 0-180) with their linear
    interpolation weights; nodes of zero weight are left out."""
    t = float(np.clip(theta_deg, 0.0, 180.0))
    t0 = math.floor(t / _XS_THETA_STEP_DEG) * _XS_THETA_STEP_DEG
    t1 = min(t0 + _XS_THETA_STEP_DEG, 180.0)
    f = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
    return tuple((tt, ww) for tt, ww in ((t0, 1.0 - f), (t1, f)) if ww != 0.0)


def thick_scatter(
    material: str,
    energy_keV: np.ndarray,
    theta_deg: float,
    incidence_deg: float,
    takeoff_deg: float,
    detector_distance_mm: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rayleigh and Compton scatter of an infinitely thick sample, per incident photon and steradian.

    ``dcs(E, theta) / (mu(E) / sin psi1 + mu(E') / sin psi2) / sin psi1`` with xraylib's differential
    cross-sections and attenuation of the material's elements (the thick-layer limit of
    :func:`xrfnb.physics.fp.scatter`), ``E'`` the Rayleigh (``E``) or Compton energy; tabulated every
    0.25 keV and 2 degrees and interpolated. With ``detector_distance_mm`` each depth is seen under its
    own detector solid angle: times the depth factor of :func:`xrfnb.physics.depth.depth_factor_at` (the
    scatter of PMMA at 20-40 keV comes from 5-20 mm deep), the material at :func:`_scatterer_density`.

    Parameters
    ----------
    material : str
        Formula or name (:func:`xrfnb.physics.materials.composition`).
    energy_keV : numpy.ndarray
        Incident energies, keV, shape (n,), 0.5-100 keV.
    theta_deg : float
        Scattering angle, degrees.
    incidence_deg, takeoff_deg : float
        Angles of the incident and detected beams from the surface, degrees.
    detector_distance_mm : float, optional
        Spot-to-detector distance, mm; None (default): the spot's solid angle at every depth.

    Returns
    -------
    rayleigh, compton : numpy.ndarray
        Shape (n,) each, photons per incident photon per sr.

    Examples
    --------
    >>> r, c = thick_scatter("CaCO3", np.array([20.0]), 130.0, 90.0, 40.0)
    >>> bool(c[0] > r[0] > 0)
    True
    """
    e = np.asarray(energy_keV, dtype=float)
    tabs = np.zeros((4, e.size))
    for tt, ww in _theta_nodes(theta_deg):
        tabs += ww * np.array([np.interp(e, _XS_ENERGY_KEV, a) for a in _scatter_table(material, tt)])
    depth = (
        None
        if detector_distance_mm is None
        else (float(detector_distance_mm), float(theta_deg), _scatterer_density(material))
    )
    return _thick_yields(*tabs, incidence_deg, takeoff_deg, depth)


def _thick_scatter_in_chalk(
    element: str,
    mass_fraction: float,
    energy_keV: np.ndarray,
    theta_deg: float,
    incidence_deg: float,
    takeoff_deg: float,
    detector_distance_mm: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`thick_scatter` of chalk holding ``mass_fraction`` of an element (cross-sections and attenuation
    mixed by mass; with ``detector_distance_mm`` seen by depth at the mixture's density)."""
    e = np.asarray(energy_keV, dtype=float)
    tabs = np.zeros((4, e.size))
    for tt, ww in _theta_nodes(theta_deg):
        for m, f in (("CaCO3", 1.0 - mass_fraction), (element, mass_fraction)):
            tabs += ww * f * np.array([np.interp(e, _XS_ENERGY_KEV, a) for a in _scatter_table(m, tt)])
    depth = None
    if detector_distance_mm is not None:
        mix = f"CaCO3:{1.0 - mass_fraction:.6g},{element}:{mass_fraction:.6g}"
        depth = (float(detector_distance_mm), float(theta_deg), _scatterer_density(mix))
    return _thick_yields(*tabs, incidence_deg, takeoff_deg, depth)


def _family_pieces(fm: FamilyModel) -> list[tuple[np.ndarray, np.ndarray]]:
    """A family cut into the parts whose ratios a thick, absorbing sample changes: Ka and Kb; per L
    subshell each line group (La, Lb2 and Ll of L3 apart: an absorption edge of the matrix between them,
    Hg L3 between Pb La and Pb Lb2, changes their ratio). Parts under 3 % of the family join the largest
    part of their subshell (or the largest part). Returns (line energies keV, weights) per part."""
    e, w = np.asarray(fm.energies_keV, dtype=float), np.asarray(fm.weights, dtype=float)
    sub = fm.subshells or tuple("K" for _ in fm.groups)
    key = np.array(
        [
            f"{s_} {'Ka' if g == 'Ka' else ('Kb' if s_ == 'K' else g)}"
            for s_, g in zip(sub, fm.groups, strict=True)
        ]
    )
    shares = {k: float(w[key == k].sum()) for k in dict.fromkeys(key)}
    for k in sorted(shares, key=shares.__getitem__):
        if shares[k] >= 0.03 or len(shares) == 1:
            continue
        rest = [o for o in shares if o != k]
        same = [o for o in rest if o.split()[0] == k.split()[0]] or rest
        into = max(same, key=shares.__getitem__)
        key[key == k] = into
        shares[into] += shares.pop(k)
    return [(e[key == k], w[key == k]) for k in shares if w[key == k].sum() > 0]


class _ScatterFit(NamedTuple):
    deviance: float
    model: np.ndarray  # expected counts in the window
    pileup_share: float  # p: the share of recorded events that are sums of two photons


#: powers of the incident energy that tilt the continuum's upper block (the start instrument's optics and
#: filters may not be the data's: a lens steepens the continuum by E^-5 above its cut-off)
_TILTS = (-8.0, -4.0, 0.0, 4.0, 8.0)
#: Gauss-Hermite nodes of the Compton (Doppler) profile: seven for lines, as in the simulator's scatter
#: rows, five for the smooth continuum
_HERMITE = {k: (x, w / w.sum()) for k in (5, 7) for x, w in [np.polynomial.hermite_e.hermegauss(k)]}


def _rows(response: DetectorResponse, energy_keV: np.ndarray) -> np.ndarray:
    """The detector's response to photons of ``energy_keV`` (float64, non-finite entries zeroed): lines
    far outside a window's channels over- or underflow in the far tail, harmlessly."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        rows = np.asarray(response.matrix(np.asarray(energy_keV, dtype=float), dtype=np.float32), dtype=float)
    rows[~np.isfinite(rows)] = 0.0
    return rows


def _deviance_terms(y: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Per-channel Poisson deviance ``2 (y ln(y / mu) - (y - mu))``."""
    mu = np.maximum(mu, 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 2.0 * (np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0) / mu), 0.0) - (y - mu))


def _adaptive_grid(start: float, stop: float, step: Any) -> np.ndarray:
    """Energies from ``start`` to ``stop`` (keV), ``step(E)`` apart."""
    out = [start]
    while out[-1] < stop:
        out.append(out[-1] + float(step(out[-1])))
    return np.array(out)


def _interpolation_matrix(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Linear interpolation weights from ``coarse`` onto ``fine`` points, shape (fine, coarse)."""
    j = np.clip(np.searchsorted(coarse, fine) - 1, 0, coarse.size - 2)
    f = np.clip((fine - coarse[j]) / (coarse[j + 1] - coarse[j]), 0.0, 1.0)
    P = np.zeros((fine.size, coarse.size))
    P[np.arange(fine.size), j] = 1.0 - f
    P[np.arange(fine.size), j + 1] += f
    return P


class _ScatterPhysics:
    """Poisson deviance of the measured spectrum's upper part against the scattered tube spectrum, for
    trial scattering angles and tube voltages (see :func:`fit_instrument`).

    The forward model is the simulator's, arranged for fitting: the incident spectrum is the start
    instrument's (:meth:`xrfnb.Instrument.tube_spectrum`, Ebel's model, times
    :meth:`~xrfnb.Instrument.incident_transmission`: window, filters, optics, gas) on a 0.2 keV grid plus
    the anode lines; each incident energy is scattered by three thick samples (:func:`thick_scatter`:
    PMMA, chalk, lead white; each depth under its own detector solid angle, :mod:`xrfnb.physics.depth`:
    19 mm from the detector PMMA's scatter is 0.65 of the spot's at 20 keV, 0.45 at 40 keV), Rayleigh at
    its own energy and Compton at its Compton energy with the
    simulator's Doppler profile (a 1 a.u. Gaussian in electron momentum), weighted by the detector
    efficiency and drawn through the detector response (:class:`xrfnb.physics.detector.DetectorResponse`:
    Gaussian, escape, tail, shelf). The rows that do not depend on the trial values are computed once.

    The fit's columns: each group of anode lines (Rayleigh and Compton free); the continuum tilted by
    five powers of the energy (``E^-8`` to ``E^8``: the start instrument's filters and optics need not be
    the data's), each per scatterer (so the Rayleigh-to-Compton ratio stays physical); the line families
    of the sample's elements found (per subshell and line group) and a flexible Gaussian at every other
    peak in the window; and pile-up, ``p N (s * s / 2 - s)`` for the share ``p`` of sums from the sum peaks
    (:func:`_fit_pileup`; :meth:`xrfnb.physics.detector.DetectorResponse.pileup`'s model), fixed.
    Non-negative, Poisson-weighted (:func:`xrfnb.fitting.solvers.fit_one`). The continuum's shape in
    incident energy is free where filters, optics and the sample's absorption shape it, while where it
    ends and how its scatter is shifted are physics: the tube voltage and the angle.
    """

    def __init__(
        self,
        y: np.ndarray,
        cal: EnergyCalibration,
        base: Instrument,
        window_keV: tuple[float, float],
        nuisance_keV: np.ndarray,
        fwhm_fn: Any,
        max_kv: float,
        elements: tuple[str, ...] = (),
    ) -> None:
        n = y.size
        b = max(1, n // 1024)
        m = n // b
        yb = np.asarray(y[: m * b], dtype=float).reshape(m, b).sum(axis=1)
        c = (b - 1) / 2.0
        q = cal.quadratic_keV
        calb = EnergyCalibration(
            cal.offset_keV + cal.gain_keV * c + q * c * c, cal.gain_keV * b + 2 * q * b * c, q * b * b
        )
        energy = calb.energies_keV(m)
        lo, hi = (int(np.searchsorted(energy, v)) for v in window_keV)
        lo, hi = max(lo, 1), max(min(hi, m), lo + 8)
        self.y = yb[lo:hi]
        self.energy = energy[lo:hi]
        self.base = base
        #: the detector's distance, for the depth of the thick scatterers' scatter
        self.distance_mm = detector_distance_mm(base)
        self.response = DetectorResponse(base, channel_energy_keV=self.energy)
        # the sample's heavy elements found in the spectrum whose absorption edges fall in the window
        # scatter as well: their edges shape the scattered continuum
        edges = {}
        for el in elements:
            z = atomic_number(el)
            for shell in (xraylib.K_SHELL, xraylib.L3_SHELL, xraylib.L2_SHELL, xraylib.L1_SHELL):
                try:
                    edge = xraylib.EdgeEnergy(z, shell)
                except ValueError:
                    continue
                if self.energy[0] < edge < self.energy[-1]:
                    edges[el] = edge
        self.matrices = _SCATTER_MATRICES + tuple(el for el in edges if el != "Pb")
        x = self.energy
        fw = np.asarray(fwhm_fn(np.clip(x, 0.5, None)), dtype=float)
        # the sample's fluorescence: the line families of the elements found (per subshell, Ka and Kb
        # apart), and a flexible Gaussian at every other peak
        cols = []
        family_e: list[float] = []
        for el in elements:
            for fam in ("K", "L"):
                fm = family_model(el, fam, base)
                if fm is None or not np.any((fm.energies_keV > x[0]) & (fm.energies_keV < x[-1])):
                    continue
                for e_l, w_l in _family_pieces(fm):
                    cols.append(w_l @ _rows(self.response, e_l))
                family_e.extend(fm.energies_keV[fm.weights > 0.01].tolist())
        fe = np.array(family_e)
        for e_p in nuisance_keV:
            if x[0] < e_p < x[-1]:
                s_p = float(np.interp(e_p, x, fw)) / FWHM_PER_SIGMA
                if fe.size and np.min(np.abs(fe - e_p)) < 0.5 * FWHM_PER_SIGMA * s_p:
                    continue
                cols.extend(_flexible_peak(x, float(e_p), s_p))
        self._full = (yb, energy, lo, hi)
        self.cache: dict[tuple[float, float], _ScatterFit] = {}
        self.weight = np.ones(self.y.size)
        self.set_pileup(None)
        self.nuisance = np.stack(cols, axis=1) if cols else np.zeros((x.size, 0))
        # incident energies: what can land in the window (its Compton energy at 180 deg at most its top), up
        # to the highest voltage tried; for the Rayleigh rows 1.2 detector sigma apart (a comb of Gaussians
        # that close is flat to 1e-4), for the Compton rows 1.2 widths of the Compton peak (detector and
        # Doppler at 60 deg) apart, linearly interpolated onto the fine grid
        e0 = max(0.6, float(x[0]) - 0.3)
        e_top = float(x[-1]) / max(1.0 - 2.0 * float(x[-1]) / 510.999, 0.2)
        top = min(100.0, max_kv, e_top) + 0.1

        def sig(e: float) -> float:
            return float(fwhm_fn(np.array([e]))[0]) / FWHM_PER_SIGMA

        self.grid = _adaptive_grid(e0, top, lambda e: max(0.02, 1.2 * sig(e)))
        self.coarse = _adaptive_grid(e0, top, lambda e: max(0.05, 1.2 * math.hypot(sig(e), e / 137.036)))
        self.interp = _interpolation_matrix(self.grid, self.coarse)
        self.width = np.gradient(self.grid)
        self.rayleigh_rows = _rows(self.response, self.grid)
        self.eff = np.asarray(base.detector_efficiency(self.grid), dtype=float)
        self.transmission = np.asarray(base.incident_transmission(self.grid), dtype=float)
        self.lines = self._lines()
        self.line_trans = np.asarray(base.incident_transmission(self.lines[0]), dtype=float)
        self.line_eff = np.asarray(base.detector_efficiency(self.lines[0]), dtype=float)
        self.compton_cache: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        self.tilts = _TILTS
        self.ebel_cache: dict[float, np.ndarray] = {}

    def _ebel(self, kv: float) -> np.ndarray:
        """Ebel's continuum (photons per keV) on the fine grid at a voltage, zero above it (cached)."""
        key = round(kv, 6)
        if key not in self.ebel_cache:
            if len(self.ebel_cache) > 24:
                self.ebel_cache.clear()
            below = self.grid < kv
            out = np.zeros(self.grid.size)
            out[below] = ebel_continuum(
                self.base.anode,
                kv,
                self.grid[below],
                electron_incidence_deg=self.base.electron_incidence_deg,
                takeoff_deg=self.base.anode_takeoff_deg,
            )
            self.ebel_cache[key] = out
        return self.ebel_cache[key]

    def set_pileup(self, share: float | None) -> None:
        """Pile-up: the share ``p`` of sum events (a fixed part of the model; see :func:`_pileup_column`),
        or None: a free column (its coefficient the share)."""
        yb, energy, lo, hi = self._full
        self.pileup_free = share is None
        self.pileup_column = _pileup_column(yb, energy, 0.0 if share is None else share)[lo:hi]
        self.pileup_offset = np.zeros(self.y.size) if share is None else share * self.pileup_column
        self.cache.clear()

    def _lines(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Anode lines in the window's reach: energies, line-group index, Rayleigh rows."""
        _, e, photons = anode_lines(self.base.anode, 100.0, min_energy_keV=1.0)
        keep = (e > self.grid[0]) & (photons > 1e-3 * photons.max(initial=0.0))
        e = e[keep]
        order = np.argsort(e)
        e = e[order]
        group = np.concatenate([[0], np.cumsum(np.diff(e) > 0.3)]) if e.size else np.zeros(0, dtype=int)
        return e, group, _rows(self.response, e) if e.size else np.zeros((0, self.y.size))

    def _compton_rows(self, theta_deg: float, energies: np.ndarray, nodes: int) -> np.ndarray:
        th = math.radians(theta_deg)
        ec, sd = _compton_sigma_keV(energies, th)
        hx, hw = _HERMITE[nodes]
        at = np.maximum(ec[:, None] + hx[None, :] * sd[:, None], 1e-3)  # (n, nodes)
        rows = _rows(self.response, at.ravel()).reshape(energies.size, nodes, -1)
        return np.einsum("j,njc->nc", hw, rows)

    def _compton(self, theta_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Compton rows of the coarse grid and of the anode lines at an angle, and the detector efficiency
        at the fine grid's Compton energies (cached per angle)."""
        key = round(float(theta_deg), 6)
        if key not in self.compton_cache:
            if len(self.compton_cache) > 24:
                self.compton_cache.clear()
            th = math.radians(theta_deg)
            grid_rows = self._compton_rows(theta_deg, self.coarse, 5)
            eff_c = np.asarray(self.base.detector_efficiency(compton_energy_keV(self.grid, th)), dtype=float)
            le = self.lines[0]
            line_rows = np.zeros((0, self.y.size))
            if le.size:
                eff_l = np.asarray(self.base.detector_efficiency(compton_energy_keV(le, th)))
                line_rows = self._compton_rows(theta_deg, le, 7) * eff_l[:, None]
            self.compton_cache[key] = (grid_rows, line_rows, eff_c)
        return self.compton_cache[key]

    def line_columns(self, theta_deg: float, kv: float) -> np.ndarray:
        """Rayleigh and Compton columns of the anode's line groups in the window, shape (k, window
        channels)."""
        _, l_e, l_photons = anode_lines(
            self.base.anode,
            float(kv),
            electron_incidence_deg=self.base.electron_incidence_deg,
            takeoff_deg=self.base.anode_takeoff_deg,
            min_energy_keV=1.0,
        )
        geo = geometry_for_angle(self.base, theta_deg)
        _, c_line, _ = self._compton(theta_deg)
        le, lg, l_rows = self.lines
        cols = []
        if le.size:
            l_ph = np.zeros(le.size)
            for i_l, e_i in enumerate(le):
                hit = np.abs(l_e - e_i) < 1e-6
                l_ph[i_l] = float(l_photons[hit].sum())
            l_ph *= self.line_trans
            r_l, c_l = thick_scatter(
                "CaCO3", le, theta_deg, geo["incidence_deg"], geo["takeoff_deg"], self.distance_mm
            )
            for g in np.unique(lg):
                sel = (lg == g) & (l_ph > 0)
                if sel.any():
                    cols.append((l_ph[sel] * r_l[sel] * self.line_eff[sel]) @ l_rows[sel])
                    cols.append((l_ph[sel] * c_l[sel]) @ c_line[sel])
        return np.array(cols).reshape(-1, self.y.size)

    def columns(self, theta_deg: float, kv: float) -> np.ndarray:
        """Physics columns in the window, shape (window channels, k)."""
        below = self.grid < kv
        cont = np.zeros(self.grid.size)
        cont[below] = self._ebel(float(kv))[below] * self.width[below] * self.transmission[below]
        geo = geometry_for_angle(self.base, theta_deg)
        inc, out = geo["incidence_deg"], geo["takeoff_deg"]
        c_grid, _, eff_c = self._compton(theta_deg)
        # the continuum's shape: the tube model's, tilted by powers of the energy, per scatterer
        S = np.stack([(self.grid / max(kv, 1.0)) ** tilt for tilt in self.tilts])  # (s, n)
        W_r, W_c = [], []
        for mat in self.matrices:
            r, c = thick_scatter(mat, self.grid, theta_deg, inc, out, self.distance_mm)
            W_r.append(S * (cont * r * self.eff)[None, :])
            W_c.append(S * (cont * c * eff_c)[None, :])
        cont_cols = np.concatenate(W_r) @ self.rayleigh_rows + (np.concatenate(W_c) @ self.interp) @ c_grid
        A = np.concatenate([self.line_columns(theta_deg, kv), cont_cols]).T
        return A[:, A.sum(axis=0) > 0]

    def fit(self, theta_deg: float, kv: float) -> _ScatterFit:
        key = (round(float(theta_deg), 6), round(float(kv), 6))
        if key not in self.cache:
            parts = [self.columns(theta_deg, kv), self.nuisance]
            if self.pileup_free:
                parts.append(self.pileup_column[:, None])
            A = np.concatenate(parts, axis=1)
            scale = np.abs(A).sum(axis=0)
            scale[scale <= 0] = 1.0
            coef, model = _nnls_poisson(A / scale, self.y, self.pileup_offset)
            share = (
                float(coef[-1] / scale[-1])
                if self.pileup_free
                else float(np.sum(self.pileup_offset) / max(np.sum(self.pileup_column), 1e-30))
            )
            dev = float(np.sum(self.weight * _deviance_terms(self.y, model)))
            self.cache[key] = _ScatterFit(dev, model, share)
        return self.cache[key]

    def deviance(self, theta_deg: float, kv: float, upto_keV: float | None = None) -> float:
        """The (weighted) Poisson deviance of the fit at an angle and a voltage; with ``upto_keV`` only of
        the channels up to that energy (the fit itself is always of the whole window)."""
        fit = self.fit(theta_deg, kv)
        if upto_keV is None:
            return fit.deviance
        m = self.energy <= upto_keV
        return float(np.sum((self.weight * _deviance_terms(self.y, fit.model))[m]))

    def reweight(self, theta_deg: float, kv: float) -> None:
        """Weigh each channel's deviance by one over the local dispersion of the fit at (theta, kV): the
        deviance per channel averaged over 1 keV, at least 1. Where the model misses the data by far more
        than Poisson noise (the fine structure of a heavy sample's L lines and edges), those channels
        would otherwise decide the angle and voltage; quasi-likelihood with a local dispersion."""
        self.weight = np.ones(self.y.size)
        self.cache.clear()
        d = _deviance_terms(self.y, self.fit(theta_deg, kv).model)
        k = max(3, round(1.0 / max(float(np.mean(np.diff(self.energy))), 1e-6)))
        local = np.convolve(np.pad(d, k // 2, mode="edge"), np.ones(k) / k, mode="valid")[: d.size]
        self.weight = 1.0 / np.maximum(local, 1.0)
        self.cache.clear()


def _nnls_poisson(
    A: np.ndarray, y: np.ndarray, offset: np.ndarray, passes: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative ``c`` for ``y ~ A c + offset`` by Poisson-weighted NNLS (weights from the smoothed data,
    then from the model), as :func:`xrfnb.fitting.solvers.fit_one` with a fixed part. Returns ``c`` and the
    model (floored at 1e-9)."""
    design = Design([Column(str(i), "scatter") for i in range(A.shape[1])], A, 0, y.size)
    if not np.any(offset):
        coef, model, _ = fit_one(design, y, passes)
        return coef, np.maximum(model, 1e-9)
    w = 1.0 / np.maximum(np.convolve(np.pad(y, 2, mode="edge"), np.ones(5) / 5, mode="valid"), 1.0)
    coef = np.zeros(A.shape[1])
    model = np.maximum(offset, 1e-9)
    for _ in range(passes):
        sw = np.sqrt(w)
        coef, _ = scipy.optimize.nnls(A * sw[:, None], (y - offset) * sw, maxiter=50 * A.shape[1])
        model = np.maximum(A @ coef + offset, 1e-9)
        w = 1.0 / np.maximum(model, max(1e-6 * float(model.max()), 1e-3))
    return coef, model


def _parabola_min(x: np.ndarray, d: np.ndarray) -> tuple[float, float] | None:
    """Vertex and curvature ``d2D/dx2`` of a parabola through points (x, D); None if it opens down."""
    if x.size < 3:
        return None
    c2, c1, _ = np.polyfit(x, d, 2)
    if c2 <= 0:
        return None
    return float(-c1 / (2 * c2)), float(2 * c2)


class _AngleVoltage(NamedTuple):
    theta_deg: float
    theta_sd: float | None  # None: not determined
    kv: float | None  # None: not determined (then kv_lower is a lower bound)
    kv_sd: float | None
    kv_lower: float
    deviance_per_dof: float
    evaluations: int


#: the scattering angles :func:`_fit_angle_voltage` searches, degrees
_ANGLE_RANGE_DEG = (30.0, 180.0)
#: a fitted angle with a larger one-sigma uncertainty (degrees) is reported as not determined
_MAX_ANGLE_SD_DEG = 30.0


def _fit_angle_voltage(
    sp: _ScatterPhysics,
    theta0: float,
    kv_lo: float,
    kv_hi: float,
    fixed_theta: float | None,
    fixed_kv: float | None,
    scan_theta: bool = True,
    angle_upto_keV: float | None = None,
) -> _AngleVoltage:
    """Minimise the scatter deviance over the scattering angle and the tube voltage (see
    :func:`fit_instrument`).

    A scan of the voltage in 5 kV steps; the channels then weighted by one over the fit's local
    dispersion there (:meth:`_ScatterPhysics.reweight`) and the voltage scanned again; a scan of the angle
    in 15 degree steps (``scan_theta``;
    otherwise ``theta0`` is trusted to about 10 degrees), then twice for each a parabola fitted by least
    squares to five points around the best (the deviance is not smooth on a scale below 1 kV: the
    continuum's discretisation and the reweighting of the fit). Each parameter's sigma comes from the last
    parabola's curvature (``sqrt(2 / D'')``), scaled by the deviance per degree of freedom where the model
    misses the data by more than Poisson noise; the two are treated as uncorrelated.

    ``angle_upto_keV``: the angle from the deviance of the channels up to that energy only (the tube lines
    and their Compton partners), the voltage from all. Where the tube's lines lie below 15 keV the scattered
    continuum's end would otherwise set the angle, and its Compton edge trades off against the voltage
    (``kV / (1 + kV (1 - cos theta) / m_e c^2)``) and against the sample's unknown scatter: on simulated
    W and Cu tubes the continuum alone put the angle 30-75 deg off where the lines put it within 15.
    """

    def dev_theta(t: float, k: float) -> float:
        return sp.deviance(t, k, angle_upto_keV)

    theta = float(fixed_theta if fixed_theta is not None else theta0)
    kv_hi = min(kv_hi, 100.0)
    kv_lo = min(max(kv_lo, 5.0), kv_hi - 1.0)
    if fixed_kv is None:
        grid = np.unique(np.clip(np.arange(kv_lo, kv_hi + 2.5, 5.0), kv_lo, kv_hi))
        d = np.array([sp.deviance(theta, k) for k in grid])
        kv = float(grid[int(np.argmin(d))])
        sp.reweight(theta, kv)
        d = np.array([sp.deviance(theta, k) for k in grid])
        kv = float(grid[int(np.argmin(d))])
    else:
        kv = float(fixed_kv)
        sp.reweight(theta, kv)
    if fixed_theta is None and scan_theta:
        ts = np.unique(np.concatenate([[theta], np.arange(60.0, 181.0, 15.0)]))
        d = np.array([dev_theta(t, kv) for t in ts])
        theta = float(ts[int(np.argmin(d))])

    def refine(x0: float, offsets: np.ndarray, lo: float, hi: float, dev: Any) -> tuple[float, float | None]:
        xs = np.unique(np.clip(x0 + offsets, lo, hi))
        d = np.array([dev(v) for v in xs])
        pm = _parabola_min(xs, d)
        if pm is None:
            return float(xs[int(np.argmin(d))]), None
        return float(np.clip(pm[0], xs[0], xs[-1])), pm[1]

    curv_kv = curv_th = None
    for k_off, t_off in ((3.0, 6.0), (1.5, 3.0)):
        if fixed_kv is None:
            th_now = theta
            kv, curv_kv = refine(
                kv, np.array([-2, -1, 0, 1, 2]) * k_off, kv_lo, kv_hi, lambda v, t=th_now: sp.deviance(t, v)
            )
        if fixed_theta is None:
            kv_now = kv
            theta, curv_th = refine(
                theta,
                np.array([-2, -1, 0, 1, 2]) * t_off,
                *_ANGLE_RANGE_DEG,
                lambda v, k=kv_now: dev_theta(v, k),
            )
    best = sp.fit(theta, kv)
    dof = max(1, sp.y.size - 40)
    over = max(1.0, best.deviance / dof)
    n_th = int(np.sum(sp.energy <= angle_upto_keV)) if angle_upto_keV is not None else sp.y.size
    over_th = max(1.0, dev_theta(theta, kv) / max(1, n_th - 20))
    theta_sd = math.sqrt(2.0 / curv_th * over_th) if curv_th else None
    if fixed_theta is None and not _ANGLE_RANGE_DEG[0] + 0.5 < theta < _ANGLE_RANGE_DEG[1] - 0.5:
        # the deviance falls to the search's edge: no minimum inside it (180 deg, tube and detector on one
        # axis, is no scanner's geometry), so the angle is not settled by the data
        theta_sd = None
    if theta_sd is not None and theta_sd > _MAX_ANGLE_SD_DEG:
        theta_sd = None  # the deviance hardly changes with the angle: not settled by the data
    kv_sd = math.sqrt(2.0 / curv_kv * over) if curv_kv else None
    return _AngleVoltage(theta, theta_sd, kv, kv_sd, kv_lo, best.deviance / dof, len(sp.cache))


# ------------------------------------------------------------------------------------------ hardness
#: primary-filter materials the hardness search tries (none is always a candidate), with the range of
#: thicknesses tried, um (log-spaced): the filters of heritage and micro-XRF scanners
FILTER_CANDIDATES_UM: dict[str, tuple[float, float]] = {
    "Al": (5.0, 3000.0),
    "Ti": (3.0, 500.0),
    "Ni": (2.0, 300.0),
    "Cu": (2.0, 300.0),
    "Mo": (2.0, 300.0),
    "Ag": (2.0, 300.0),
}
#: silicon detector thicknesses the hardness search tries, um
DETECTOR_THICKNESSES_UM = (300.0, 450.0, 700.0, 1000.0, 1500.0)
#: thicknesses tried per filter material before the refinement
_FILTER_STEPS = 7
#: lowest energy of the hardness fit's window, keV (below, the detector's window and the air path, which
#: the fit does not settle, shape the spectrum more than the beam's hardness)
_HARDNESS_LOW_KEV = 4.0
#: relative systematic uncertainty of the simulated scattered continuum in a 1 keV bin: the simulator
#: against the Bruker M4 blanks reads 0.96-1.10 of the measured counts in 8-35 keV windows (README, "Against
#: real Bruker spectra")
_SHAPE_SYSTEMATIC = 0.05
#: relative tilt of the simulated continuum across the hardness window that the tube's and the lens's models
#: may be off by (the blanks' scaled simulated/measured ratios span 0.96-1.10 over 8-35 keV): the systematic
#: floor of the filter's and the detector's thickness
_SHAPE_TILT = 0.10
#: deviance difference, in units of the fit's dispersion (deviance per degree of freedom, at least 1), by
#: which the best of a discrete choice (a filter material, optics or none) must beat every other to count as
#: determined: a likelihood ratio of e^-4.5, about three sigma
_CHOICE_DELTA = 9.0


class _HardnessModel:
    """The scatter fit of a :class:`_ScatterPhysics` with the continuum's shape set by physics alone: for a
    candidate incident transmission and detector efficiency, the Poisson deviance of the non-negative fit
    (anode line groups, one continuum column per thick scatterer, the sample's families and other peaks,
    the fixed pile-up).

    For speed the continuum is carried on the physics' coarse grid (its density interpolated linearly onto
    the fine grid: ``sum_j f(E_j) w_j R_j = f_coarse @ (P^T diag(w) R)``), so a candidate costs two small
    matrix products and one NNLS; the rows, the scatterers' cross-sections and the anode lines are computed
    once at the fitted angle and voltage."""

    def __init__(self, sp: _ScatterPhysics, theta_deg: float, kv: float) -> None:
        self.sp = sp
        th = math.radians(theta_deg)
        self.energy = sp.coarse
        self.compton_energy = np.asarray(compton_energy_keV(sp.coarse, th), dtype=float)
        P, w = sp.interp, sp.width
        c_grid, _, _ = sp._compton(theta_deg)
        self.rayleigh = P.T @ (w[:, None] * sp.rayleigh_rows)  # (coarse, channels)
        self.compton = (P.T @ (w[:, None] * P)) @ c_grid  # (coarse, channels)
        below = self.energy < kv
        self.ebel = np.zeros(self.energy.size)
        self.ebel[below] = ebel_continuum(
            sp.base.anode,
            float(kv),
            self.energy[below],
            electron_incidence_deg=sp.base.electron_incidence_deg,
            takeoff_deg=sp.base.anode_takeoff_deg,
        )
        geo = geometry_for_angle(sp.base, theta_deg)
        # binder, chalk and lead white, and for each other element whose edge lies in the window chalk with
        # 10 % of it (its edge, at a painting's concentration): a thick pure element's scatter rises so
        # steeply with energy between its edges that, free, it stands in for a hard beam
        self.matrices = _SCATTER_MATRICES + tuple(m for m in sp.matrices if m not in _SCATTER_MATRICES)
        inc, out = geo["incidence_deg"], geo["takeoff_deg"]
        rc = [
            thick_scatter(m, self.energy, theta_deg, inc, out, sp.distance_mm)
            if m in _SCATTER_MATRICES
            else _thick_scatter_in_chalk(m, 0.1, self.energy, theta_deg, inc, out, sp.distance_mm)
            for m in self.matrices
        ]
        self.r = np.array([a for a, _ in rc])  # (scatterers, coarse)
        self.c = np.array([b for _, b in rc])
        self.fixed = np.concatenate([sp.line_columns(theta_deg, kv), sp.nuisance.T]).T
        self.keep = (sp.weight > 0).astype(float)
        self.bins = np.floor(sp.energy - sp.energy[0]).astype(int)
        self.n_bins = int(self.bins.max()) + 1
        filled = np.bincount(self.bins, self.keep, self.n_bins) > 0
        #: degrees of freedom of the binned chi-square: bins less the continuum's scatterers (the line and
        #: peak columns mostly sit inside single bins)
        self.dof = max(1, int(filled.sum()) - len(self.matrices))

    def fit(self, transmission: np.ndarray, eff: np.ndarray, eff_compton: np.ndarray) -> _ScatterFit:
        """The fit for an incident transmission (at :attr:`energy`) and detector efficiencies (at
        :attr:`energy` and at :attr:`compton_energy`)."""
        base = self.ebel * transmission
        cont = (self.r * (base * eff)) @ self.rayleigh + (self.c * (base * eff_compton)) @ self.compton
        A = np.concatenate([self.fixed, cont.T], axis=1)
        A = A[:, A.sum(axis=0) > 0]
        scale = np.abs(A).sum(axis=0)
        _, model = _nnls_poisson(A / scale, self.sp.y, self.sp.pileup_offset)
        return _ScatterFit(float(np.sum(self.sp.weight * _deviance_terms(self.sp.y, model))), model, 0.0)

    def deviance(self, transmission: np.ndarray, eff: np.ndarray, eff_compton: np.ndarray) -> float:
        """The candidate's misfit: chi-square of the fitted counts in 1 keV bins (the channels the weights
        keep) with the simulator's systematic shape uncertainty, :data:`_SHAPE_SYSTEMATIC` of each bin, beside
        the counting noise. At the counts of a scan's sum spectrum the Poisson deviance per channel is set by
        the physics' few-percent shape errors (the Compton profile, the detector's tails, the lens), and the
        candidate that best hides them (a filter with an edge in the right place) would win by hundreds."""
        model = self.fit(transmission, eff, eff_compton).model
        ym = np.bincount(self.bins, self.sp.y * self.keep, self.n_bins)
        mm = np.bincount(self.bins, model * self.keep, self.n_bins)
        ok = ym > 0
        var = mm[ok] + (_SHAPE_SYSTEMATIC * mm[ok]) ** 2
        return float(np.sum((ym[ok] - mm[ok]) ** 2 / np.maximum(var, 1.0)))


class _Hardness(NamedTuple):
    material: str  # "none" or the filter's element
    thickness_um: float  # 0 for none
    thickness_sd_um: float | None  # None: not settled (at the range's edge, or a flat deviance)
    material_settled: bool
    optics: str
    optics_settled: bool
    detector_um: float
    detector_sd_um: float | None  # None: not settled
    ranking: tuple[tuple[str, str, float, float], ...]  # (optics, material, thickness um, delta), best first
    dispersion: float
    channels: int
    window_keV: tuple[float, float]
    evaluations: int
    lens: Instrument  # the instrument whose lens shape the polycapillary candidate used


def _filter_label(material: str, thickness_um: float) -> str:
    return "none" if material == "none" else f"{material} {thickness_um:.3g} um"


def _fit_hardness(
    y: np.ndarray,
    cal: EnergyCalibration,
    inst: Instrument,
    nuisance_keV: np.ndarray,
    fwhm_fn: Any,
    elements: tuple[str, ...],
    pileup_share: float,
    theta_deg: float,
    kv: float,
    fixed: Mapping[str, Any],
) -> _Hardness | None:
    """The primary filter, optics and detector thickness that make the scattered continuum's shape.

    The scatter fit of :func:`_fit_angle_voltage` lets the continuum's shape free (five powers of the
    energy). Here it is physics only: the tube's Ebel continuum times the candidate's incident transmission
    (the start's window and gas path; no filter or one filter of :data:`FILTER_CANDIDATES_UM`; no optics or
    the polycapillary lens of the start, else of ``bruker-m4``), scattered by the thick scatterers of the
    fit at the fitted angle, times the candidate detector's efficiency (:data:`DETECTOR_THICKNESSES_UM`),
    against the spectrum from :data:`_HARDNESS_LOW_KEV` up (the sample's line families, other peaks and
    the fixed pile-up alongside, as in :class:`_ScatterPhysics`). Each material's thickness is scanned on a
    log grid and refined by a parabola in ``ln t``; the detector's thickness likewise for the best filter.
    Returns None where the window holds too few channels or counts.
    """
    e_top = float(cal.energy_keV(y.size - 1))
    lo = max(_HARDNESS_LOW_KEV, float(cal.energy_keV(0)))
    filters_fixed = "tube_filters" in fixed
    bare = inst.with_(optics="none") if filters_fixed else inst.with_(tube_filters=(), optics="none")
    lines = _tube_lines(str(inst.anode), "K")
    if lines.energy_keV.size == 0 or lines.energy_keV.max() > min(e_top, kv):
        lines = _tube_lines(str(inst.anode), "L")
    main = (
        lines.energy_keV[lines.weight >= 0.2 * lines.weight.max()]
        if lines.energy_keV.size
        else lines.energy_keV
    )
    th = math.radians(theta_deg)
    if main.size:
        # above twice the tube lines' Compton energy the sums of two scattered tube photons (pile-up) make the
        # spectrum: left out
        e_sum = 2.0 * float(compton_energy_keV(main.min(), math.pi))
        e_top = min(e_top, e_sum - 3.0 * float(fwhm_fn(np.array([e_sum]))[0]))
    if e_top - lo < 4.0 or float(y.sum()) < 1e4:
        return None
    sp = _ScatterPhysics(y, cal, bare, (lo, e_top), nuisance_keV, fwhm_fn, kv, elements)
    if sp.y.sum() < 1e4:
        return None
    sp.set_pileup(pileup_share)
    # the tube lines' Rayleigh and Compton peaks are left out of the deviance: their shapes (the Compton
    # profile, the detector's line shape at 1e6 counts) decide it there, not the continuum's hardness
    # (every line of 5 % of the strongest, from 5 sigma below the Compton peak, whose measured profile has
    # longer tails than the model's Gaussian in momentum, to 3 sigma above the Rayleigh peak)
    weight = np.ones(sp.y.size)
    for e_l in lines.energy_keV[lines.weight >= 0.05 * lines.weight.max()] if main.size else main:
        ec, sd_c = _compton_sigma_keV(np.array([e_l]), th)
        s_r = float(fwhm_fn(np.array([e_l]))[0]) / FWHM_PER_SIGMA
        s_c = math.hypot(float(fwhm_fn(ec)[0]) / FWHM_PER_SIGMA, float(sd_c[0]))
        weight[(sp.energy > ec[0] - 5 * s_c) & (sp.energy < e_l + 3 * s_r)] = 0.0
    sp.weight = weight
    model = _HardnessModel(sp, theta_deg, kv)
    e_c, e_cc = model.energy, model.compton_energy
    t_bare = np.asarray(bare.incident_transmission(e_c), dtype=float)
    lens = inst if inst.optics == "polycapillary" else Instrument.preset("bruker-m4")
    optics_t = {"none": np.ones(e_c.size), "polycapillary": np.asarray(lens.optics_transmission(e_c), float)}
    mu = {m: -np.log(np.maximum(Absorber(m, 1.0).transmission(e_c), 1e-300)) for m in FILTER_CANDIDATES_UM}
    effs: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def eff(det_um: float) -> tuple[np.ndarray, np.ndarray]:
        key = round(det_um, 3)
        if key not in effs:
            d = bare.with_(detector_thickness_um=float(det_um))
            effs[key] = (
                np.asarray(d.detector_efficiency(e_c), dtype=float),
                np.asarray(d.detector_efficiency(e_cc), dtype=float),
            )
        return effs[key]

    memo: dict[tuple[str, str, float, float], float] = {}

    def dev(optics: str, material: str, t_um: float, det_um: float) -> float:
        key = (optics, material, round(t_um, 4), round(det_um, 3))
        if key not in memo:
            trans = t_bare * optics_t[optics]
            if material != "none" and t_um > 0:
                trans = trans * np.exp(-mu[material] * t_um)
            memo[key] = model.deviance(trans, *eff(det_um))
        return memo[key]

    def best_thickness(
        optics: str, material: str, det_um: float, around: float | None = None
    ) -> tuple[float, float, float | None]:
        """(thickness um, misfit, sd of ln t or None) of a material: a log grid (or three points around a
        thickness), a halved step around the best, then a parabola in ln t through the five nearest."""
        lo_t, hi_t = (math.log(v) for v in FILTER_CANDIDATES_UM[material])
        if around is None:
            lt = np.linspace(lo_t, hi_t, _FILTER_STEPS)
        else:
            lt = np.unique(np.clip(math.log(around) + np.array([-0.4, 0.0, 0.4]), lo_t, hi_t))
        d = np.array([dev(optics, material, math.exp(v), det_um) for v in lt])
        step = float(lt[1] - lt[0]) / 2.0 if lt.size > 1 else 0.2
        i = int(np.argmin(d))
        new = np.unique(np.clip(lt[i] + np.array([-step, step]), lo_t, hi_t))
        lt = np.concatenate([lt, new])
        d = np.concatenate([d, [dev(optics, material, math.exp(v), det_um) for v in new]])
        order = np.argsort(lt)
        lt, d = lt[order], d[order]
        i = int(np.argmin(d))
        near = np.sort(np.argsort(np.abs(lt - lt[i]))[:5])
        pm = _parabola_min(lt[near], d[near])
        x, curv = float(lt[i]), None
        if pm is not None and lt[near].min() <= pm[0] <= lt[near].max():
            curv = pm[1]  # the parabola's curvature measures the minimum's width even where its vertex
            if dev(optics, material, math.exp(pm[0]), det_um) <= d[i]:  # does not beat the best point
                x = pm[0]
        edge = x <= lo_t + 1e-6 or x >= hi_t - 1e-6
        sd = None if (curv is None or edge) else math.sqrt(2.0 / curv)
        return math.exp(x), dev(optics, material, math.exp(x), det_um), sd

    optics_list = [inst.optics] if "optics" in fixed else ["none", "polycapillary"]
    # fixed filters stay in the bare path and only "none" (no further filter) is tried
    materials = ["none"] if filters_fixed else ["none", *FILTER_CANDIDATES_UM]
    det0 = float(inst.detector_thickness_um)

    def scan(
        det_um: float, which: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[float, float, float | None]]:
        return {
            (o, m): (0.0, dev(o, m, 0.0, det_um), None) if m == "none" else best_thickness(o, m, det_um)
            for o, m in which
        }

    results = scan(det0, [(o, m) for o in optics_list for m in materials])
    (o_best, m_best), (t_best, d0, _) = min(results.items(), key=lambda kv_: kv_[1][1])
    # the detector's thickness for the best filter and optics: five thicknesses (the filter re-fitted near
    # its thickness), a parabola in ln t through the best and its neighbours
    det_um, det_sd_ln = det0, None
    if "detector_thickness_um" not in fixed:
        dets = np.array(DETECTOR_THICKNESSES_UM)
        d_det = np.array(
            [
                dev(o_best, m_best, 0.0, float(dt))
                if m_best == "none"
                else best_thickness(o_best, m_best, float(dt), around=t_best)[1]
                for dt in dets
            ]
        )
        i = int(np.argmin(d_det))
        det_um = float(dets[i])
        pm = (
            _parabola_min(np.log(dets[i - 1 : i + 2]), d_det[i - 1 : i + 2])
            if 0 < i < dets.size - 1
            else None
        )
        if pm is not None:
            det_um = float(np.clip(math.exp(pm[0]), dets[0], dets[-1]))
            det_sd_ln = math.sqrt(2.0 / pm[1])
        if abs(det_um - det0) > 1e-6:
            # the candidates that stood near the best re-fitted with that detector
            phi0 = max(1.0, d0 / model.dof)
            near = [k for k, v in results.items() if (v[1] - d0) / phi0 < 4 * _CHOICE_DELTA]
            results.update(scan(det_um, near))
    ranked = sorted(results.items(), key=lambda kv_: kv_[1][1])
    (o_best, m_best), (t_best, d_best, t_sd_ln) = ranked[0]
    phi = max(1.0, d_best / model.dof)
    if m_best != "none" and t_best <= FILTER_CANDIDATES_UM[m_best][0] * 1.001:
        # the thinnest filter tried fits best: as thin as can be told, so no filter where none fits as well
        bare_best = [r for r in ranked if r[0] == (o_best, "none")]
        if bare_best and (bare_best[0][1][1] - d_best) / phi < _CHOICE_DELTA:
            ranked.remove(bare_best[0])
            ranked.insert(0, bare_best[0])
            (o_best, m_best), (t_best, _, t_sd_ln) = ranked[0]
    ranking = tuple((o, m, t, (d - d_best) / phi) for (o, m), (t, d, _) in ranked)
    other_m = [r[3] for r in ranking[1:] if r[1] != m_best]
    other_o = [r[3] for r in ranking if r[0] != o_best]
    # systematic floors: a tilt of :data:`_SHAPE_TILT` across the window (the tube model and the lens) moves
    # the filter's thickness by _SHAPE_TILT / (its log transmission's range there, where it passes > 1 %),
    # the detector's by _SHAPE_TILT / (d ln(efficiency ratio of the window's ends) / d ln t)
    kept = model.energy[(model.energy >= sp.energy[sp.weight > 0].min()) & (model.energy <= sp.energy[-1])]
    t_sd = None
    if t_sd_ln is not None and m_best != "none":
        ln_t = -mu[m_best][np.searchsorted(model.energy, kept)] * t_best
        span = float(ln_t.max() - max(ln_t.min(), math.log(0.01)))
        sys_ln = _SHAPE_TILT / max(span, 1e-3)
        t_sd = t_best * math.hypot(t_sd_ln * math.sqrt(phi), sys_ln)
    d_sd = None
    if det_sd_ln is not None:
        ends = np.array([kept.min() if kept.size else lo, kept.max() if kept.size else e_top])
        ends[0] = max(ends[0], 10.0) if ends[1] > 15.0 else ends[0]
        r = [
            np.log(bare.with_(detector_thickness_um=det_um * f).detector_efficiency(ends)) for f in (0.9, 1.1)
        ]
        slope = abs(float((r[1][1] - r[1][0]) - (r[0][1] - r[0][0]))) / (2 * math.log(1.1))
        sys_ln = _SHAPE_TILT / max(slope, 1e-3)
        d_sd = det_um * math.hypot(det_sd_ln * math.sqrt(phi), sys_ln)
    return _Hardness(
        m_best,
        t_best,
        t_sd,
        all(v >= _CHOICE_DELTA for v in other_m),
        o_best,
        len(optics_list) > 1 and all(v >= _CHOICE_DELTA for v in other_o),
        det_um,
        d_sd,
        ranking,
        phi,
        int(sp.y.size),
        (float(sp.energy[0]), float(sp.energy[-1])),
        len(memo),
        lens,
    )


# ------------------------------------------------------------------------------------------ argon
class _Argon(NamedTuple):
    counts: float  # net Ar K counts
    sigma: float
    air_path_mm: float | None  # air at one atmosphere on the beam path that gives them (None: none seen)
    air_path_sd_mm: float | None
    note: str


def _argon_counts(
    y: np.ndarray,
    energy_keV: np.ndarray,
    fwhm_keV: np.ndarray,
    response: DetectorResponse,
    peaks_keV: np.ndarray,
    elements: tuple[str, ...],
    anode: str | None,
) -> tuple[float, float] | None:
    """Net counts of the Ar K lines (xraylib Ka, Kb energies and rates) in 2.4-3.8 keV, fitted with a
    quadratic background, the K and L families of the sample's elements and the anode's L lines there, and
    flexible Gaussians at other peaks. None where the spectrum does not reach the window."""
    sel = np.nonzero((energy_keV >= 2.4) & (energy_keV <= 3.8))[0]
    if sel.size < 10:
        return None
    x = energy_keV[sel]
    yy = y[sel]
    t = (x - x.mean()) / max(np.ptp(x), 1e-9)
    ar = np.array([line_energy_keV("Ar", "Ka"), line_energy_keV("Ar", "Kb")])
    ar_w = np.array([xraylib.RadRate(18, xraylib.KA_LINE), xraylib.RadRate(18, xraylib.KB_LINE)])
    cols = [(ar_w / ar_w.sum()) @ _rows(response, ar)[:, sel], np.ones_like(x), t, t * t]
    covered = list(ar)
    if anode:
        # the tube's own L lines, scattered: one part per subshell (their ratios are the tube's)
        tl = _tube_lines(anode, "L")
        for k in np.unique(tl.subshell):
            sel_l = (tl.subshell == k) & (tl.energy_keV > 2.2) & (tl.energy_keV < 4.0)
            if sel_l.any():
                cols.append(
                    (tl.weight[sel_l] / tl.weight[sel_l].sum())
                    @ _rows(response, tl.energy_keV[sel_l])[:, sel]
                )
                covered.extend(tl.energy_keV[sel_l].tolist())
    for el in elements:
        if el in ("Ar", anode):
            continue
        for fam in ("K", "L", "M"):
            lines = [
                (e, xraylib.RadRate(atomic_number(el), m))
                for _, m, e in family_lines(atomic_number(el), fam)
                if 2.2 < e < 4.0
            ]
            if not lines:
                continue
            e_l = np.array([a for a, _ in lines])
            w_l = np.array([b for _, b in lines])
            cols.append((w_l / w_l.sum()) @ _rows(response, e_l)[:, sel])
            covered.extend(e_l.tolist())
    cov_e = np.array(covered)
    for e_p in peaks_keV:
        if 2.45 < e_p < 3.75:
            fw = float(np.interp(e_p, energy_keV, fwhm_keV))
            if np.min(np.abs(cov_e - e_p)) > 0.5 * fw:
                cols.extend(_flexible_peak(x, float(e_p), fw / FWHM_PER_SIGMA)[:3])
    A = np.stack(cols, axis=1).astype(float)
    w = 1.0 / np.maximum(yy, 1.0)
    cov = np.linalg.pinv((A * w[:, None]).T @ A)
    coef = cov @ (A * w[:, None]).T @ yy
    chi2 = float(np.sum((yy - A @ coef) ** 2 * w)) / max(1, yy.size - A.shape[1])
    return float(coef[0]), math.sqrt(max(float(cov[0, 0]), 1e-30) * max(1.0, chi2))


def _thick_mixture(t: float) -> str:
    """A scatterer along PMMA (0) - chalk (1) - lead white (2), as a mixture by mass."""
    t = float(np.clip(t, 0.0, 2.0))
    if t <= 1.0:
        return f"C5H8O2:{1 - t:.4f},CaCO3:{t:.4f}" if 0 < t < 1 else ("C5H8O2" if t == 0 else "CaCO3")
    return f"CaCO3:{2 - t:.4f},Pb3C2O8H2:{t - 1:.4f}" if t < 2 else "Pb3C2O8H2"


def _air_path(
    inst: Instrument,
    line_energy_keV: np.ndarray,
    rayleigh: float,
    compton: float,
    ar_counts: float,
    ar_sd: float,
) -> tuple[float, float, str]:
    """Air path (mm at one atmosphere) on the beam path that makes the argon seen, from the simulator.

    The Rayleigh-to-Compton ratio of the tube lines picks a thick scatterer (PMMA - chalk - lead white) and
    with it the Compton yield per incident photon (:func:`thick_scatter`); the simulator's argon
    (:func:`xrfnb.argon_lines`) and the lines' Compton counts are both per incident photon, so their
    ratio, computed for trial air paths and interpolated in log-log, gives the path that matches
    ``ar_counts / compton``. Returns the path, its sigma (counting statistics and a 100 % allowance for the
    unknown sample and the start instrument's incident spectrum below 10 keV) and a note.
    """
    e, photons = inst.excitation()
    sel = np.zeros(e.size, dtype=bool)
    for e_l in line_energy_keV:
        sel |= np.abs(e - e_l) < 1e-3
    e_l, ph = e[sel], photons[sel]
    if e_l.size == 0 or compton <= 0:
        return float("nan"), float("nan"), "no Compton counts of the tube lines to compare with"
    th = inst.scattering_angle_deg
    ec = compton_energy_keV(e_l, math.radians(th))
    eff_r = np.asarray(inst.detector_efficiency(e_l))
    eff_c = np.asarray(inst.detector_efficiency(ec))
    ts = np.linspace(0.0, 2.0, 21)
    ratio, yield_c = [], []
    for t in ts:
        r, c = thick_scatter(
            _thick_mixture(t), e_l, th, inst.incidence_deg, inst.takeoff_deg, detector_distance_mm(inst)
        )
        ratio.append(float(np.sum(ph * r * eff_r)) / max(float(np.sum(ph * c * eff_c)), 1e-300))
        yield_c.append(float(np.sum(ph * c * eff_c)))
    ratio_arr = np.array(ratio)
    observed = rayleigh / compton
    t_best = float(ts[int(np.argmin(np.abs(np.log(ratio_arr) - math.log(max(observed, 1e-6)))))])
    rate_c = float(np.interp(t_best, ts, yield_c)) * inst.detector_solid_angle_sr
    paths = np.array([0.1, 1.0, 10.0, 50.0])
    rate_ar = []
    small = inst.with_(n_channels=64, calibration=EnergyCalibration(0.0, max(inst.max_energy_keV, 5.0) / 60))
    for path in paths:
        lines = argon_lines(
            small.with_(
                atmosphere="air", atmosphere_pressure_mbar=STANDARD_PRESSURE_MBAR, beam_path_mm=float(path)
            )
        )
        rate_ar.append(sum(lines.values()))
    pred = np.array(rate_ar) / rate_c  # argon counts per Compton count, per path
    target = ar_counts / compton
    if target <= 0 or not np.all(pred > 0):
        return 0.0, float("nan"), ""
    if target < pred[0]:
        return (
            float("nan"),
            float("nan"),
            (
                f"argon {ar_counts:.3g} counts against {compton:.3g} Compton counts of the tube lines: "
                f"less than the start instrument predicts for {paths[0]:g} mm of air (its optics and "
                "window below 10 keV, which excite the argon, are not the data's)"
            ),
        )
    path = float(np.exp(np.interp(math.log(target), np.log(pred), np.log(paths))))
    if target > pred[-1]:
        path = float(paths[-1] * target / pred[-1])
    rel = math.hypot(ar_sd / max(ar_counts, 1e-30), _AIR_SYSTEMATIC)
    note = (
        f"argon {ar_counts:.3g} +/- {ar_sd:.2g} counts against {compton:.3g} Compton counts of the tube "
        f"lines; scatterer {_thick_mixture(t_best)} (Rayleigh/Compton {observed:.2f})"
    )
    return path, path * rel, note


# ------------------------------------------------------------------------------------------ the result
#: order and labels of the parameters in :meth:`InstrumentFit.summary`
_LABELS = {
    "offset_keV": "calibration offset",
    "gain_keV": "calibration gain",
    "quadratic_keV": "calibration quadratic",
    "noise_keV": "electronic noise (FWHM)",
    "fano": "Fano factor",
    "fwhm_mnka_eV": "FWHM at Mn Ka",
    "anode": "tube anode",
    "monochromatic_keV": "monochromatic beam",
    "tube_voltage_kV": "tube voltage",
    "scattering_angle_deg": "scattering angle",
    "atmosphere": "atmosphere",
    "air_path_mm": "air on the beam path (1 atm)",
    "pileup_share": "pile-up (share of sums)",
    "count_rate_cps": "count rate",
    "pileup_time_s": "pulse-pair resolving time",
    "tube_filter": "tube filter",
    "tube_filter_um": "tube filter thickness",
    "optics": "optics",
    "detector_thickness_um": "detector thickness",
    "detector_window": "detector window",
}


@dataclasses.dataclass(frozen=True)
class InstrumentFit:
    """The instrument :func:`fit_instrument` read from a spectrum or scan.

    Attributes
    ----------
    instrument : Instrument
        The start instrument with every fitted and fixed value put in (geometry: the scattering angle set
        through :func:`geometry_for_angle`; atmosphere: the air path as the pressure of air on the start's
        paths).
    parameters : mapping of str to FittedParameter
        Per setting (units in the names: ``offset_keV``, ``gain_keV``, ``quadratic_keV``, ``noise_keV``,
        ``fano``, ``fwhm_mnka_eV``, ``anode``, ``monochromatic_keV``, ``tube_voltage_kV``,
        ``scattering_angle_deg``, ``atmosphere``, ``air_path_mm``, ``pileup_share``, ``count_rate_cps``,
        ``pileup_time_s``, ``tube_filter`` (element or ``"none"``), ``tube_filter_um``, ``optics``,
        ``detector_thickness_um``, ``detector_window``): value, one-sigma uncertainty, status and evidence.
        The filter, optics and detector thickness marked "not determined" are nevertheless the best
        candidate's, put in :attr:`instrument` (the ties shape the spectrum alike; the evidence names them).
    calibration_cov : numpy.ndarray
        Covariance of (offset keV, gain keV/channel, quadratic keV/channel^2), shape (3, 3).
    start : Instrument
        The instrument the fit started from (values not fitted come from it).
    source : str
        What was fitted (file name, "scan sum of N pixels" ...).
    total_counts : float
        Counts in the fitted spectrum.
    n_pixels : int
        Pixels summed (1 for a spectrum).
    lines : tuple of str
        The peaks identified for the calibration and the resolution.
    seconds : float
        Wall time of the fit, s.
    calibration_blind : bool
        Whether the energy calibration was found by a blind search (the data had none and none was given
        or fixed). A blind calibration is often wrong on real spectra (the README gives the measured
        share): check it against peaks you know before using it.
    """

    instrument: Instrument
    parameters: Mapping[str, FittedParameter]
    calibration_cov: np.ndarray
    start: Instrument
    source: str
    total_counts: float
    n_pixels: int
    lines: tuple[str, ...]
    seconds: float
    calibration_blind: bool = False

    def __getitem__(self, name: str) -> FittedParameter:
        """``fit["tube_voltage_kV"]``: one parameter."""
        try:
            return self.parameters[name]
        except KeyError:
            raise KeyError(f"no parameter {name!r}; parameters: {', '.join(self.parameters)}") from None

    @property
    def values(self) -> dict[str, Any]:
        """Parameter name -> value."""
        return {k: p.value for k, p in self.parameters.items()}

    @property
    def sigmas(self) -> dict[str, float | None]:
        """Parameter name -> one-sigma uncertainty (None where there is none)."""
        return {k: p.sigma for k, p in self.parameters.items()}

    def energy_sigma_keV(self, energy_keV: float) -> float:
        """One-sigma uncertainty of the fitted calibration at an energy, keV."""
        ch = float(self.instrument.calibration.channel(energy_keV))
        x = np.array([1.0, ch, ch * ch])
        return float(math.sqrt(max(float(x @ self.calibration_cov @ x), 0.0)))

    def summary(self) -> str:
        """What was fitted, from which evidence, what was fixed or not determined, as readable text."""
        head = (
            f"Instrument fitted to {self.source}: {self.instrument.n_channels} channels, "
            f"{self.total_counts:.3g} counts"
            + (f" ({self.n_pixels:,} pixels)" if self.n_pixels > 1 else "")
            + f", {self.seconds:.1f} s"
        )
        rows = [
            head,
            f"  calibration: {self.instrument.calibration}, "
            f"+/- {1000 * self.energy_sigma_keV(10.0):.1f} eV at 10 keV",
        ]
        groups: dict[str, list[str]] = {
            "fitted": [],
            "derived": [],
            "fixed": [],
            "not determined": [],
            "start": [],
        }
        for name, p in self.parameters.items():
            groups[p.status].append(name)
        for name, p in self.parameters.items():
            rows.append(
                f"  {_LABELS.get(name, name):30s} {_format_value(name, p):24s} {p.status}: {p.evidence}"
            )
        if groups["fixed"]:
            rows.append("Fixed by the user: " + ", ".join(groups["fixed"]))
        if groups["not determined"]:
            rows.append(
                "Not determined (start instrument's value kept): " + ", ".join(groups["not determined"])
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()


def _format_value(name: str, p: FittedParameter) -> str:
    v, s = p.value, p.sigma
    if v is None:
        return "none"
    if isinstance(v, str):
        return v
    unit = {
        "_keV": " keV",
        "_eV": " eV",
        "_kV": " kV",
        "_deg": " deg",
        "_mm": " mm",
        "_cps": " counts/s",
        "_s": " s",
        "_um": " um",
    }
    suffix = next((u for k, u in unit.items() if name.endswith(k)), "")
    if name in ("gain_keV", "quadratic_keV", "pileup_time_s"):
        text = f"{v:.5g}" + (f" +/- {s:.2g}" if s else "")
    else:
        text = f"{v:.4g}" + (f" +/- {s:.2g}" if s else "")
    return text + suffix


# ------------------------------------------------------------------------------------------ the fit
#: settings ``fixed=`` accepts besides the Instrument's fields
_EXTRA_FIXED = ("scattering_angle_deg", "fwhm_mnka_eV", "air_path_mm", "offset_keV", "gain_keV")
#: share of the counts at Ar Ka that argon may have at most (3 sigma) for a spectrum to read as helium or
#: vacuum; above, the atmosphere is not determined
_AR_LIMIT_SHARE = 0.02
#: relative systematic uncertainty of the air path: the argon is excited by the incident spectrum at 3-10
#: keV, the reference Compton peak by the tube lines, and their ratio is the start instrument's (its optics
#: and window), not measured; a polycapillary lens alone changes it several times
_AIR_SYSTEMATIC = 1.0
#: smallest significance of the Rayleigh and of the Compton peaks of a tube's lines to name the anode
_MIN_SCATTER_Z = 5.0


def _spectrum_of(data: Spectrum | Scan) -> tuple[Spectrum, int, float | None, str]:
    """The spectrum to fit (a scan's sum, read block by block), pixels, live time per pixel, source."""
    if isinstance(data, Spectrum):
        return data, 1, data.live_time_s, str(data.metadata.get("source", "spectrum"))
    if isinstance(data, Scan):
        rows, cols, n_ch = data.shape
        total = data.sum_spectrum(max(1024, 2**25 // n_ch))
        n = rows * cols
        live = None if total.live_time_s is None else total.live_time_s / n
        src = str(data.metadata.get("source", "scan"))
        return total, n, live, f"{src} (sum of {rows} x {cols} pixels)"
    raise FitError(
        f"fit_instrument needs a Spectrum or a Scan, got {type(data).__name__}: wrap arrays with "
        "xrfnb.Spectrum(counts, calibration) or xrfnb.Scan(counts, calibration)"
    )


def _start_instrument(
    spec: Spectrum, start: Instrument | None, fixed: Mapping[str, Any]
) -> tuple[Instrument, bool]:
    """The start instrument on the data's channels, with the fixed values put in; and whether the
    calibration must be found blind (no calibration in the data, none given)."""
    calibrated = bool(spec.metadata.get("calibrated", True))
    if start is not None:
        inst = start
    else:
        try:
            inst = resolve_instrument(None, spec.metadata)
        except InstrumentError:  # the metadata name an instrument that is not a preset (a simulation's)
            inst = resolve_instrument(None, None)
    if not isinstance(inst, Instrument):
        raise InstrumentError(f"start must be an xrfnb.Instrument, got {type(inst).__name__}")
    cal_fixed = "calibration" in fixed or "offset_keV" in fixed or "gain_keV" in fixed
    blind = not calibrated and start is None and not cal_fixed
    changes: dict[str, Any] = {"n_channels": spec.n_channels}
    if calibrated:
        changes["calibration"] = spec.calibration
    elif start is None:
        changes["calibration"] = EnergyCalibration(0.0, 0.01)  # replaced by the blind search
    try:
        inst = inst.with_(**changes)
    except InstrumentError as exc:
        raise InstrumentError(
            f"the start instrument does not fit the data's {spec.n_channels} channels: {exc}"
        ) from None
    fields = {f.name for f in dataclasses.fields(Instrument)}
    unknown = sorted(set(fixed) - fields - set(_EXTRA_FIXED))
    if unknown:
        raise InstrumentError(
            f"fit_instrument: unknown fixed setting(s) {', '.join(unknown)}; give Instrument fields "
            f"(anode, tube_voltage_kV, noise_keV, fano, calibration, atmosphere, ...) or "
            f"{', '.join(_EXTRA_FIXED)}"
        )
    plain = {k: v for k, v in fixed.items() if k in fields or k in ("fwhm_mnka_eV", "offset_keV", "gain_keV")}
    if "anode" in plain and plain["anode"] is not None and "monochromatic_keV" not in plain:
        plain["monochromatic_keV"] = None
    try:
        inst = inst.with_(**plain)
        if "scattering_angle_deg" in fixed:
            inst = inst.with_(**geometry_for_angle(inst, float(fixed["scattering_angle_deg"])))
    except InstrumentError as exc:
        raise InstrumentError(
            f"fit_instrument: the fixed settings give an invalid instrument: {exc}"
        ) from None
    return inst, blind


def _score(ev: _ScatterEvidence) -> float:
    """How strongly a scatter fit says "these are the tube's lines": the Compton partners' significance,
    capped at three times the Rayleigh peaks' (a sample's fluorescence line has a huge Rayleigh-like peak
    but no Compton partner; a heavy sample can leave a tube's Rayleigh peaks weak beside clear Compton
    peaks)."""
    return min(ev.z_compton, 3.0 * ev.z_rayleigh)


def _choose_source(
    y: np.ndarray,
    energy: np.ndarray,
    fwhm: np.ndarray,
    peaks_e: np.ndarray,
    peak_narrow: np.ndarray,
    peak_significance: np.ndarray,
    pileup: np.ndarray,
    families: Mapping[str, list[tuple[np.ndarray, np.ndarray]]],
) -> tuple[_ScatterEvidence | None, list[_ScatterEvidence], _ScatterEvidence | None]:
    """The tube anode (the best scatter evidence, see :func:`fit_instrument`) and the best single-line
    (monochromatic beam) evidence; also all anode candidates' evidence, best first."""
    thetas = np.arange(60.0, 181.0, 4.0)
    found = []
    for anode in ANODE_CANDIDATES:
        for fam in ("K", "L"):
            lines = _tube_lines(anode, fam)
            if lines.energy_keV.size == 0 or lines.energy_keV.max() > energy[-1]:
                continue
            # the family's strongest line must sit on a peak: no Rayleigh peak, no anode
            e_main = float(lines.energy_keV[int(np.argmax(lines.weight))])
            if not peaks_e.size or np.min(np.abs(peaks_e - e_main)) > 1.5 * float(
                np.interp(e_main, energy, fwhm)
            ):
                continue
            ev = _scatter_evidence(y, energy, fwhm, lines, peaks_e, thetas, pileup, families)
            if ev is not None:
                found.append(ev)
    found.sort(key=lambda ev: -_score(ev))
    best = found[0] if found and _score(found[0]) >= _MIN_SCATTER_Z else None
    # a monochromatic beam: one of the six most significant narrow peaks above 5 keV
    mono = None
    sel = np.nonzero(peak_narrow & (peaks_e > 5.0))[0]
    cand = peaks_e[sel[np.argsort(-peak_significance[sel])][:6]]
    for e0 in cand:
        lines = _TubeLines("beam", np.array([e0]), np.array([1.0]), np.array([0]), "beam")
        ev = _scatter_evidence(y, energy, fwhm, lines, peaks_e, thetas, pileup, families)
        if ev is not None and (mono is None or _score(ev) > _score(mono)):
            mono = ev
    return best, found, mono


#: anode materials that no pigment, ground or binder contains: their lines in a painting's spectrum come
#: from the tube (Mo, Ag, W, Cu and Cr do occur in pigments and drawings: molybdate orange, silverpoint,
#: tungstates, copper and chromium pigments)
_TUBE_ONLY_ANODES = ("Rh", "Pd")


def _tube_only_l_lines(peaks_keV: np.ndarray, fwhm_fn: Any) -> str | None:
    """The tube-only anode (:data:`_TUBE_ONLY_ANODES`, in that order) whose La line sits on a peak (within
    0.35 FWHM plus 20 eV) that no other element's Ka or La line explains, or None. Rh comes first: Rh Lb1
    sits 5 eV from Pd La, so a Rh tube shows a "Pd La" peak, while a Pd tube shows none at Rh La."""
    if not peaks_keV.size:
        return None
    for anode in _TUBE_ONLY_ANODES:
        e_la = line_energy_keV(anode, "La")
        tol = 0.35 * float(fwhm_fn(np.array([e_la]))[0]) + 0.02
        near = np.abs(peaks_keV - e_la) <= tol
        if not near.any():
            continue
        e_peak = float(peaks_keV[near][np.argmin(np.abs(peaks_keV[near] - e_la))])
        if any(
            r.element != anode and abs(r.energy_keV - e_peak) <= tol
            for r in _reference_lines()
            if r.group in ("Ka", "La")
        ):
            continue
        return anode
    return None


def _continuum_above(
    y: np.ndarray,
    energy: np.ndarray,
    fwhm: np.ndarray,
    e0: float,
    pileup_share: float,
    pileup_col: np.ndarray,
) -> float:
    """Counts per keV above a line, over counts per keV in the 2 keV below its Compton partner at 180 deg:
    about 0 for a monochromatic beam. Above the line (beyond 4 FWHM, six 0.5 keV bins) the second-lowest
    bin counts, net of pile-up: sum peaks sit in some bins, a tube's continuum fills all of them."""
    fw = float(np.interp(e0, energy, fwhm))
    e_c = float(compton_energy_keV(e0, math.pi))
    below = (energy > e_c - 2.0 - 3 * fw) & (energy < e_c - 3 * fw)
    if not below.any():
        return float("nan")
    dens = []
    for k in range(6):
        a = e0 + 4 * fw + 0.5 * k
        sel = (energy >= a) & (energy < a + 0.5)
        if sel.any():
            net = float(y[sel].sum() - pileup_share * pileup_col[sel].sum())
            dens.append(max(net, 0.0) / 0.5)
    if len(dens) < 2:
        return float("nan")
    ref = float(y[below].sum()) / max(float(np.ptp(energy[below])) + float(np.mean(np.diff(energy))), 1e-6)
    return sorted(dens)[1] / max(ref, 1.0)


def fit_instrument(
    spectrum_or_scan: Spectrum | Scan,
    *,
    fixed: Mapping[str, Any] | None = None,
    start: Instrument | None = None,
) -> InstrumentFit:
    """Fit the instrument that measured a spectrum or scan, from the data alone.

    For a scan the sum spectrum is fitted (read block by block, so lazy HDF5 and dask scans of any size
    work in bounded memory). What each setting is fitted from:

    * **energy calibration** (``offset_keV``, ``gain_keV``, ``quadratic_keV``): peaks found by a top-hat
      filter matched to the detector FWHM, each fitted with a Gaussian, are identified as lines (Ka of Na
      to Ba, Kb of K to Zn, La of Mo and heavier, the tube's Rayleigh lines among them) where the line
      that confirms them (Kb1, Lb1) is found too and no escape or sum peak of a strong peak falls there;
      :func:`xrfnb.calibrate` fits their centroids, with the file's calibration as a prior (1 % in gain,
      50 eV in offset) and outliers removed; the quadratic term only where four or more lines over 40 %
      of the channels settle it at 3 sigma. A spectrum without a calibration is calibrated blind first
      (the gain bounded by the peak widths; the offset and gain that put the most peaks on the two lines
      of one element).
    * **resolution** (``noise_keV``, ``fano``; ``fwhm_mnka_eV`` derived): the widths of the identified,
      isolated peaks, each refitted as its line group (Ka1 + Ka2 ...), against energy:
      ``FWHM^2 = noise^2 + 8 ln 2 fano w E``; with lines over less than 4 keV the Fano factor stays the
      start's.
    * **anode**: the Rayleigh peaks of the anode's K or L lines (:data:`ANODE_CANDIDATES`) with their
      Doppler-broadened Compton partners in a local fit (the sample's line families, sum peaks and the
      background fitted alongside); the candidate whose Compton partners are the most significant wins,
      at 5 sigma or more and with Rayleigh peaks of at least a third of that (a fluorescence line of the
      sample sits at the anode's energy but has no Compton partner). **Monochromatic beam**
      (``monochromatic_keV``): a single Rayleigh line with its Compton partner, no anode's line pattern,
      and no continuum above it.
    * **scattering angle** and **tube voltage**: the scattered tube spectrum is simulated for trial
      angles and voltages (the simulator's tube model, detector response and efficiency, Compton shift
      and Doppler profile, thick scatterers) and its Poisson deviance against the spectrum above the
      anode lines' Compton peaks minimised; the continuum's shape is free up to five powers of the
      energy, where it ends and how it is shifted are physics. The voltage is "not determined" (with a
      lower bound) unless the fitted voltage, plus two FWHM and two sigma, lies inside the spectrum: a
      continuum that runs past the last channel (a Bruker spectrum stops at 40 keV) shows where its
      scattered end is only through its shape, which the start instrument's optics also set.
    * **atmosphere**, ``air_path_mm``: the argon K lines (fitted in 2.4-3.8 keV beside the sample's and
      the anode's lines there); their counts against the tube lines' Compton counts, compared with the
      simulator's argon (:func:`xrfnb.argon_lines`) for trial air paths, give the air on the beam path at
      one atmosphere (set in the instrument as the pressure of air on the start's paths) -- to within a
      factor of about two: the argon is excited by the incident spectrum below 10 keV, which is the start
      instrument's (optics, window), not measured. Without argon (under 2 % of the counts at Ar Ka at
      3 sigma): helium or vacuum (the two cannot be told apart); argon hidden by the sample's or the tube's
      lines there: not determined.
    * **pile-up** (``pileup_share``; ``pileup_time_s`` from it and ``count_rate_cps`` where the live time
      is known): the sum peaks of the four strongest peaks, fitted with the spectrum's self-convolution.
    * **primary filter** (``tube_filter``, ``tube_filter_um``), **optics** and **detector thickness**: the
      continuum's shape as physics (no free powers of the energy): the tube's Ebel continuum through the
      start's window and gas and each candidate -- no filter or one of :data:`FILTER_CANDIDATES_UM` at a
      log grid of thicknesses refined by a parabola, no optics or a polycapillary lens (the start's shape,
      else ``bruker-m4``'s), a silicon detector of :data:`DETECTOR_THICKNESSES_UM` -- scattered at the
      fitted angle by thick binder, chalk and lead white (and chalk with 10 % of each element whose edge
      lies in the window) and fitted non-negatively beside the anode lines, the sample's lines and the
      fixed pile-up, against the spectrum above 4 keV (the tube lines' Rayleigh and Compton peaks and the
      tube lines' own sum peaks left out); candidates compared by the chi-square of 1 keV bins with a 5 %
      systematic shape uncertainty per bin. A material (or the optics) is "fitted" where it beats every
      other by 9 dispersions, else "not determined" with the ties named, and the instrument carries the
      best; thicknesses carry the parabola's sigma and a floor for a 10 % tilt of the model's continuum;
      a thickness at the edge of its range is not determined. The detector window is not determined.

    Uncertainties are one sigma: from the fits' covariances (scaled by the reduced chi-square or
    deviance where the model misses the data by more than counting noise), with floors for known
    systematics (3 eV per line centroid, 1.5 % per peak width, 100 % for the air path: the
    incident spectrum below 10 keV, which excites the argon, is the start instrument's).

    Parameters
    ----------
    spectrum_or_scan : Spectrum or Scan
        The data; a scan's sum spectrum is fitted.
    fixed : mapping, optional
        Settings the user knows, not fitted: Instrument fields (``{"anode": "Rh", "tube_voltage_kV": 50}``,
        ``calibration``, ``noise_keV``, ``fano``, ``atmosphere``, ``beam_path_mm``, ...) and
        ``scattering_angle_deg``, ``fwhm_mnka_eV``, ``air_path_mm``, ``offset_keV``, ``gain_keV``.
    start : Instrument, optional
        The starting point and the source of everything not fitted (e.g.
        ``xrfnb.Instrument.from_file(path)`` for a Bruker file); default: the preset the data's metadata
        names, else :data:`xrfnb.physics.instrument.DEFAULT_INSTRUMENT`.

    Returns
    -------
    InstrumentFit
        ``.instrument``, ``.parameters`` (name -> value, sigma, status, evidence), ``.summary()``.

    Raises
    ------
    FitError
        Not a Spectrum or Scan, or a spectrum with no peak at all (too few counts): nothing to fit.
    CalibrationError
        A spectrum without a calibration whose peaks match no common lines.
    InstrumentError
        Unknown ``fixed`` settings, or fixed values that make an invalid instrument.
    """
    t0 = time.perf_counter()
    fixed = dict(fixed or {})
    spec, n_pix, live_pix, source = _spectrum_of(spectrum_or_scan)
    y = np.asarray(spec.counts, dtype=float)
    n = y.size
    total = float(y.sum())
    inst0, blind = _start_instrument(spec, start, fixed)
    params: dict[str, FittedParameter] = {}

    def put(name: str, value: Any, sigma: float | None, status: Status, evidence: str) -> None:
        params[name] = FittedParameter(value, None if sigma is None else float(sigma), status, evidence)

    # 1. energy calibration ---------------------------------------------------------------------------
    cal_fixed = "calibration" in fixed or "offset_keV" in fixed or "gain_keV" in fixed
    c = _fit_calibration(y, inst0.calibration, inst0, blind, spec)
    if not c.peaks:
        raise FitError(
            f"{source}: no peak stands out of the {total:.0f} counts (5 sigma): too few counts to fit an "
            "instrument; sum more pixels or measure longer"
        )
    cal = inst0.calibration if cal_fixed else c.calibration
    cal_cov = np.zeros((3, 3)) if cal_fixed else c.cov
    names = ", ".join(ip.line for ip in c.lines)
    if cal_fixed:
        for k, v in (
            ("offset_keV", cal.offset_keV),
            ("gain_keV", cal.gain_keV),
            ("quadratic_keV", cal.quadratic_keV),
        ):
            put(k, v, None, "fixed", "given in fixed=")
    else:
        how = "blind search, then " if blind else ""
        status_lin: Status = "fitted" if c.lines else "not determined"
        ev = (
            f"{how}centroids of {len(c.lines)} lines ({names})"
            if c.lines
            else "no identified line: the data's (or start's) calibration kept"
        )
        put("offset_keV", cal.offset_keV, math.sqrt(cal_cov[0, 0]), status_lin, ev)
        gain_status: Status = status_lin if len(c.lines) >= 2 else "start"
        put(
            "gain_keV",
            cal.gain_keV,
            math.sqrt(cal_cov[1, 1]),
            gain_status,
            ev if len(c.lines) >= 2 else "one line or none: the gain is the data's, within a 1 % prior",
        )
        if c.quadratic:
            put("quadratic_keV", cal.quadratic_keV, math.sqrt(cal_cov[2, 2]), "fitted", ev)
        else:
            put(
                "quadratic_keV",
                cal.quadratic_keV,
                None,
                "not determined",
                "fewer than 4 lines over 40 % of the channels, or not significant at 3 sigma",
            )
    energy = cal.energies_keV(n)

    # 2. resolution -----------------------------------------------------------------------------------
    noise_fixed = "noise_keV" in fixed or "fwhm_mnka_eV" in fixed
    fano_fixed = "fano" in fixed
    width_lines = tuple({ip.line: ip for ip in (*c.width_lines, *c.lines)}.values())
    res = (
        None
        if noise_fixed
        else _fit_resolution(y, cal, width_lines, c.peaks, inst0, float(inst0.fano) if fano_fixed else None)
    )
    noise, fano = float(inst0.noise_keV), float(inst0.fano)
    pair = float(inst0.pair_energy_eV)
    k_f = FWHM_PER_SIGMA**2 * pair * 1e-3 * MN_KA_KEV
    if res is not None:
        noise, fano = res.noise_keV, res.fano
        widths = ", ".join(f"{w[0]} {1000 * w[2]:.0f}" for w in res.widths)
        put(
            "noise_keV",
            noise,
            math.sqrt(res.cov[0, 0]),
            "fitted",
            f"widths (eV) of {len(res.widths)} peaks: {widths}",
        )
        if fano_fixed:
            put("fano", fano, None, "fixed", "given in fixed=")
        elif res.fano_fitted:
            put("fano", fano, math.sqrt(res.cov[1, 1]), "fitted", "slope of FWHM^2 against energy")
        else:
            put(
                "fano",
                fano,
                None,
                "not determined",
                "peaks span less than 4 keV, or the slope is not significant: the start's Fano factor",
            )
        fw_mn = math.sqrt(noise**2 + k_f * fano)
        var = (noise * math.sqrt(res.cov[0, 0])) ** 2 + (0.5 * k_f) ** 2 * res.cov[1, 1]
        put(
            "fwhm_mnka_eV",
            1000 * fw_mn,
            1000 * math.sqrt(var) / fw_mn,
            "derived",
            "from noise and Fano factor",
        )
    else:
        st: Status = "fixed" if noise_fixed else "not determined"
        why = (
            "given in fixed="
            if noise_fixed
            else "no isolated, identified peak below 12 keV to measure the "
            "noise on, or widths that leave no room for it"
        )
        put("noise_keV", noise, None, st, why)
        put(
            "fano",
            fano,
            None,
            "fixed" if fano_fixed else ("start" if noise_fixed else "not determined"),
            "given in fixed=" if fano_fixed else why,
        )
        put(
            "fwhm_mnka_eV",
            1000 * math.sqrt(noise**2 + k_f * fano),
            None,
            "derived",
            "from noise and Fano factor",
        )

    def fwhm_fn(e: np.ndarray) -> np.ndarray:
        return _fwhm_keV(np.clip(e, 0.1, None), noise, fano, pair)

    fwhm = fwhm_fn(energy)
    inst = inst0.with_(calibration=cal, noise_keV=noise, fano=fano)
    peaks_e = np.array([float(cal.energy_keV(p.channel)) for p in c.peaks])
    gain_at = np.array(
        [float(cal.energy_keV(p.channel + 0.5) - cal.energy_keV(p.channel - 0.5)) for p in c.peaks]
    )
    peak_fwhm = np.array([p.width_ch for p in c.peaks]) * gain_at * FWHM_PER_SIGMA
    narrow = (peak_fwhm > 0.6 * fwhm_fn(peaks_e)) & (peak_fwhm < 1.4 * fwhm_fn(peaks_e))

    # 3. pile-up from the sum peaks --------------------------------------------------------------------
    pile = _fit_pileup(y, energy, fwhm, list(c.peaks), cal)
    share = pile.share if pile is not None else 0.0
    pile_col = _pileup_column(y, energy, share)

    # 4. anode or monochromatic beam -------------------------------------------------------------------
    anode_fixed = "anode" in fixed or "monochromatic_keV" in fixed
    # the sample's line families (an anode's own element is left out of its own test)
    families = {}
    for el in _present_elements(peaks_e, fwhm_fn(peaks_e), (), float(energy[-1])):
        pieces = []
        for fam in ("K", "L"):
            fm = family_model(
                el, fam, inst.with_(tube_voltage_kV=100.0, anode=inst.anode or "Rh", monochromatic_keV=None)
            )
            if fm is not None:
                pieces.extend(_family_pieces(fm))
        families[el] = pieces
    significance = np.array([p.significance for p in c.peaks])
    best, found, mono = _choose_source(
        y, energy, fwhm, peaks_e, narrow, significance, share * pile_col, families
    )
    source_ev: _ScatterEvidence | None = None
    is_mono = False
    l_tube = False  # the anode from the L lines of a tube-only element (no scatter evidence)
    l_anode: str | None = None
    if anode_fixed:
        is_mono = inst.monochromatic_keV is not None and inst.anode is None
        put("anode", inst.anode, None, "fixed", "given in fixed=")
        put(
            "monochromatic_keV",
            inst.monochromatic_keV,
            None,
            "fixed" if "monochromatic_keV" in fixed else "start",
            "given in fixed=" if "monochromatic_keV" in fixed else "start instrument",
        )
        if is_mono:
            source_ev = mono
        elif inst.anode is not None:
            for fam in ("K", "L"):
                lines = _tube_lines(inst.anode, fam)
                if lines.energy_keV.size and lines.energy_keV.max() < energy[-1]:
                    ev = _scatter_evidence(
                        y,
                        energy,
                        fwhm,
                        lines,
                        peaks_e,
                        np.arange(60.0, 181.0, 4.0),
                        share * pile_col,
                        families,
                    )
                    if ev is not None and (source_ev is None or ev.z_compton > source_ev.z_compton):
                        source_ev = ev
    else:
        mono_score = _score(mono) if mono is not None else 0.0
        above = (
            _continuum_above(y, energy, fwhm, float(mono.lines.energy_keV[0]), share, pile_col)
            if mono is not None
            else float("nan")
        )
        best_score = _score(best) if best is not None else 0.0
        e_mono = float(mono.lines.energy_keV[0]) if mono is not None else 0.0
        if (
            mono is not None
            and mono_score >= _MIN_SCATTER_Z
            and above < 0.05
            and (
                best is None
                or (
                    mono_score > 2 * best_score
                    and np.min(np.abs(best.lines.energy_keV - e_mono))
                    > 2 * float(np.interp(e_mono, energy, fwhm))
                )
            )
        ):
            is_mono = True
            source_ev = mono
            put(
                "anode",
                None,
                None,
                "fitted",
                f"one Rayleigh line at {mono.lines.energy_keV[0]:.3f} keV (z = {mono.z_rayleigh:.0f}) "
                "with its "
                f"Compton partner (z = {mono.z_compton:.0f}) and no continuum above it ({above:.3f} of the "
                "counts below): a monochromatic beam",
            )
        elif best is not None:
            source_ev = best
            runner = [ev for ev in found[1:] if ev.lines.anode != best.lines.anode][:1]
            other = (
                (
                    f"; next best {runner[0].lines.anode} {runner[0].lines.family} (z = "
                    f"{_score(runner[0]):.1f})"
                )
                if runner
                else ""
            )
            put(
                "anode",
                best.lines.anode,
                None,
                "fitted",
                f"Rayleigh peaks at the {best.lines.anode} {best.lines.family} lines "
                f"(z = {best.z_rayleigh:.0f}) "
                f"with Compton partners (z = {best.z_compton:.0f}){other}",
            )
        elif (l_anode := _tube_only_l_lines(peaks_e, fwhm_fn)) is not None:
            # no Compton partners (L lines at 2-3 keV are shifted by less than the detector's width), but
            # the L lines of an element that only a tube brings
            put(
                "anode",
                l_anode,
                None,
                "fitted",
                f"{l_anode} La ({line_energy_keV(l_anode, 'La'):.3f} keV) on a peak no other element's Ka or "
                f"La line explains, and no tube's K lines scattered: {l_anode} is an anode material no "
                "pigment or ground contains (at 2-3 keV Compton partners cannot be told apart from the "
                "Rayleigh peaks)",
            )
            l_tube = True
        else:
            put(
                "anode",
                inst.anode,
                None,
                "not determined",
                "no scattered tube lines: no candidate anode's Rayleigh peaks have Compton partners at "
                f"{_MIN_SCATTER_Z:g} sigma (too few counts, or lines beyond the spectrum's range)",
            )
        if is_mono:
            e0 = float(mono.lines.energy_keV[0])
            fw0 = float(np.interp(e0, energy, fwhm)) / FWHM_PER_SIGMA
            sd0 = math.hypot(fw0 / math.sqrt(max(mono.rayleigh_counts, 1.0)), float(math.sqrt(cal_cov[0, 0])))
            put("monochromatic_keV", e0, sd0, "fitted", "centroid of the Rayleigh line")
            inst = inst.with_(anode=None, monochromatic_keV=e0)
        else:
            put(
                "monochromatic_keV",
                None,
                None,
                "fitted" if best is not None or l_tube else "start",
                "a tube: the anode's line pattern" if best is not None or l_tube else "start instrument",
            )
            if l_tube:
                inst = inst.with_(anode=l_anode, monochromatic_keV=None)
            elif best is not None:
                inst = inst.with_(
                    anode=best.lines.anode,
                    monochromatic_keV=None,
                    tube_voltage_kV=max(inst.tube_voltage_kV, float(best.lines.energy_keV.max()) + 1.0),
                )

    # 5. scattering angle and tube voltage -------------------------------------------------------------
    hardness_context: tuple[np.ndarray, tuple[str, ...]] | None = None
    theta_fixed = "scattering_angle_deg" in fixed or any(
        k in fixed for k in ("incidence_deg", "takeoff_deg", "detector_azimuth_deg")
    )
    kv_fixed = "tube_voltage_kV" in fixed
    theta0 = source_ev.theta_deg if source_ev is not None else inst.scattering_angle_deg
    elements = _present_elements(
        peaks_e, fwhm_fn(peaks_e), (inst.anode,) if inst.anode else (), float(energy[-1])
    )
    if is_mono:
        put("tube_voltage_kV", None, None, "fitted", "a monochromatic beam has no tube voltage to fit")
        if theta_fixed:
            put("scattering_angle_deg", inst.scattering_angle_deg, None, "fixed", "given in fixed=")
        elif source_ev is not None:
            th, sd = _refine_angle(
                y, energy, fwhm, source_ev.lines, peaks_e, share * pile_col, source_ev.theta_deg
            )
            put(
                "scattering_angle_deg",
                th,
                sd,
                "fitted",
                f"Compton shift of the beam's line ({source_ev.theta_deg:.0f} "
                "deg on the 4 deg grid, refined)",
            )
            inst = inst.with_(**geometry_for_angle(inst, th))
    elif inst.anode is not None and (source_ev is not None or anode_fixed or l_tube):
        lines = source_ev.lines if source_ev is not None else _tube_lines(inst.anode, "L" if l_tube else "K")
        main = lines.energy_keV[lines.weight >= 0.2 * lines.weight.max()]
        lo = float(compton_energy_keV(main.min(), math.pi)) - 3 * float(np.interp(main.min(), energy, fwhm))
        e_c_hi = float(main.max())
        nuisance = np.array(
            [
                e
                for e, nw in zip(peaks_e, narrow, strict=True)
                if nw
                and np.min(np.abs(main - e)) > 0.35 * float(np.interp(e, energy, fwhm))
                and not (lo < e < e_c_hi and not _near_family(e, elements, inst))
            ]
        )
        kv_hi = 100.0 if kv_fixed is False else float(inst.tube_voltage_kV)
        sp = _ScatterPhysics(
            y,
            cal,
            inst,
            (lo, float(energy[-1])),
            nuisance,
            fwhm_fn,
            kv_hi if not kv_fixed else float(inst.tube_voltage_kV),
            elements,
        )
        sp.set_pileup(share)
        kv_lo = float(lines.energy_keV.max()) + 0.3
        # Compton partners of lines above 15 keV stand clear of their Rayleigh peaks: the local fit's
        # angle is good to a few degrees; below, they overlap and the angle is scanned
        av = _fit_angle_voltage(
            sp,
            theta0,
            kv_lo,
            kv_hi,
            inst.scattering_angle_deg if theta_fixed else None,
            float(inst.tube_voltage_kV) if kv_fixed else None,
            scan_theta=float(main.max()) < 15.0 or source_ev is None,
            angle_upto_keV=(
                float(main.max()) + 3 * float(np.interp(main.max(), energy, fwhm))
                if float(main.max()) < 15.0
                else None
            ),
        )
        hardness_context = (nuisance, elements)
        scat = (
            f"simulated scatter of the tube spectrum against {sp.y.size} channels above {lo:.1f} keV "
            f"(deviance/dof {av.deviance_per_dof:.1f}, {av.evaluations} trials)"
        )
        if theta_fixed:
            put("scattering_angle_deg", inst.scattering_angle_deg, None, "fixed", "given in fixed=")
        elif av.theta_sd is not None:
            put(
                "scattering_angle_deg",
                av.theta_deg,
                av.theta_sd,
                "fitted",
                f"Compton shift of the {inst.anode} lines and of the continuum's end: {scat}",
            )
            inst = inst.with_(**geometry_for_angle(inst, av.theta_deg))
        else:
            put(
                "scattering_angle_deg",
                inst.scattering_angle_deg,
                None,
                "not determined",
                "the deviance has no minimum in the angle inside "
                f"{_ANGLE_RANGE_DEG[0]:.0f}-{_ANGLE_RANGE_DEG[1]:.0f} deg: {scat}",
            )
        if kv_fixed:
            put("tube_voltage_kV", inst.tube_voltage_kV, None, "fixed", "given in fixed=")
        elif (
            av.kv is not None
            and av.kv_sd is not None
            and av.kv + 2 * float(np.interp(av.kv, energy, fwhm)) + 2 * av.kv_sd < energy[-1]
        ):
            # the continuum's end (the Rayleigh-scattered tube voltage) lies inside the spectrum: seen
            put("tube_voltage_kV", av.kv, av.kv_sd, "fitted", f"where the continuum ends: {scat}")
            inst = inst.with_(tube_voltage_kV=float(np.clip(av.kv, 5.0, 100.0)))
        else:
            bound = min(float(energy[-1]), float(av.kv or energy[-1]))
            keep = max(float(inst.tube_voltage_kV), bound)
            put(
                "tube_voltage_kV",
                keep,
                None,
                "not determined",
                f"the continuum runs to the spectrum's last channel ({energy[-1]:.1f} keV): the voltage "
                "is above "
                f"about {bound:.0f} kV; the start's ({inst0.tube_voltage_kV:g} kV) or that bound is kept",
            )
            inst = inst.with_(tube_voltage_kV=keep)
    else:
        put(
            "scattering_angle_deg",
            inst.scattering_angle_deg,
            None,
            "fixed" if theta_fixed else "not determined",
            "given in fixed=" if theta_fixed else "no scattered tube lines to measure a Compton shift on",
        )
        put(
            "tube_voltage_kV",
            inst.tube_voltage_kV,
            None,
            "fixed" if kv_fixed else "not determined",
            "given in fixed=" if kv_fixed else "no tube identified",
        )

    # 6. atmosphere ------------------------------------------------------------------------------------
    atm_fixed = any(
        k in fixed for k in ("atmosphere", "air_path_mm", "beam_path_mm", "atmosphere_pressure_mbar")
    )
    if atm_fixed:
        if "air_path_mm" in fixed:
            inst = _with_air_path(inst, float(fixed["air_path_mm"]))
        put("atmosphere", inst.atmosphere, None, "fixed", "given in fixed=")
        put("air_path_mm", _air_path_of(inst), None, "fixed", "given in fixed=")
    else:
        # an element seen by L lines alone whose La sits on Ar Ka (Ag, 27 eV away) is argon's double: left out
        ar_elements = tuple(
            el
            for el in _present_elements(
                peaks_e, fwhm_fn(peaks_e), (inst.anode,) if inst.anode else (), inst.max_energy_keV
            )
            if not (atomic_number(el) >= 42 and abs(line_energy_keV(el, "La") - 2.957) < 0.06)
        )
        ar = _argon_counts(y, energy, fwhm, DetectorResponse(inst, energy), peaks_e, ar_elements, inst.anode)
        if ar is None:
            put(
                "atmosphere",
                inst.atmosphere,
                None,
                "not determined",
                "the spectrum does not reach 2.4-3.8 keV",
            )
            put("air_path_mm", _air_path_of(inst), None, "not determined", "no argon window")
        elif ar[0] < 3 * ar[1]:
            # no argon: could some hide under 3 sigma of it? (against the counts under Ar Ka)
            near_ar = np.abs(energy - 2.957) <= float(np.interp(2.957, energy, fwhm))
            upper = max(ar[0], 0.0) + 3 * ar[1]
            limit = upper / max(float(y[near_ar].sum()), 1.0)
            if limit <= _AR_LIMIT_SHARE:
                atm = inst.atmosphere if inst.atmosphere in ("helium", "vacuum") else "vacuum"
                put(
                    "atmosphere",
                    "helium or vacuum",
                    None,
                    "fitted",
                    f"no argon K lines ({ar[0]:.0f} +/- {ar[1]:.0f} counts, under {100 * limit:.1g} % of the "
                    "counts at Ar Ka at 3 sigma): "
                    f"helium and vacuum look alike ({atm} kept in the instrument)",
                )
                put("air_path_mm", 0.0, None, "fitted", "no argon")
                inst = inst.with_(atmosphere=atm)
            else:
                why = (
                    f"no significant argon ({ar[0]:.0f} +/- {ar[1]:.0f} counts), but up to "
                    f"{100 * limit:.0f} % of the counts at Ar Ka could be argon (lines of the sample and "
                    "the tube there)"
                )
                put("atmosphere", inst.atmosphere, None, "not determined", why)
                put("air_path_mm", _air_path_of(inst), None, "not determined", why)
        elif source_ev is None:
            put("atmosphere", "air", None, "fitted", f"argon K lines ({ar[0]:.0f} +/- {ar[1]:.0f} counts)")
            put(
                "air_path_mm",
                _air_path_of(inst),
                None,
                "not determined",
                "no scattered tube lines to compare the argon with",
            )
        else:
            lines_e = source_ev.lines.energy_keV
            path, path_sd, note = _air_path(
                inst, lines_e, source_ev.rayleigh_counts, source_ev.compton_counts, ar[0], ar[1]
            )
            put("atmosphere", "air", None, "fitted", f"argon K lines ({ar[0]:.0f} +/- {ar[1]:.0f} counts)")
            if np.isfinite(path):
                put("air_path_mm", path, path_sd, "fitted", note)
                inst = _with_air_path(inst, path)
            else:
                put("air_path_mm", _air_path_of(inst), None, "not determined", note)

    # 7. pile-up ---------------------------------------------------------------------------------------
    rate = total / n_pix / live_pix if live_pix else None
    if pile is not None:
        put(
            "pileup_share",
            pile.share,
            pile.sigma,
            "fitted",
            f"sum peaks at {', '.join(f'{e:.2f}' for e in pile.sums_keV[:6])} keV",
        )
    else:
        put("pileup_share", None, None, "not determined", "no sum peak of a strong peak inside the spectrum")
    if rate is not None:
        put(
            "count_rate_cps", rate, None, "derived", f"counts per pixel over its live time ({live_pix:.3g} s)"
        )
    else:
        put("count_rate_cps", None, None, "not determined", "no live time in the data")
    if "pileup_time_s" in fixed:
        put("pileup_time_s", inst.pileup_time_s, None, "fixed", "given in fixed=")
    elif pile is not None and rate and pile.share > 2 * pile.sigma:
        tau = pile.share / (2 * rate)
        put(
            "pileup_time_s", tau, tau * pile.sigma / pile.share, "derived", "share of sums / (2 x count rate)"
        )
        inst = inst.with_(pileup_time_s=tau)
    else:
        put(
            "pileup_time_s",
            inst.pileup_time_s,
            None,
            "not determined",
            "no live time (count rate)" if not rate else "no significant sum peaks",
        )

    # 8. the beam's and the detector's hardness: filter, optics, detector thickness ---------------------
    inst = _put_hardness(y, cal, inst, fwhm_fn, share, fixed, hardness_context, put)
    if "detector_window" in fixed:
        put("detector_window", _window_text(inst), None, "fixed", "given in fixed=")
    else:
        put(
            "detector_window",
            _window_text(inst),
            None,
            "not determined",
            "the window shapes the spectrum below 4 keV, where the air path, the sample's light elements and "
            "the detector's tail do too: the start's value",
        )
    return InstrumentFit(
        inst.with_(name=f"fitted to {source}"[:200]),
        params,
        cal_cov,
        inst0,
        source,
        total,
        n_pix,
        tuple(ip.line for ip in c.lines),
        time.perf_counter() - t0,
        calibration_blind=c.blind,
    )


def _put_hardness(
    y: np.ndarray,
    cal: EnergyCalibration,
    inst: Instrument,
    fwhm_fn: Any,
    share: float,
    fixed: Mapping[str, Any],
    context: tuple[np.ndarray, tuple[str, ...]] | None,
    put: Any,
) -> Instrument:
    """Fit the beam's and the detector's hardness (:func:`_fit_hardness`), record ``tube_filter``,
    ``tube_filter_um``, ``optics`` and ``detector_thickness_um`` through ``put`` and return the instrument
    with them put in."""
    names = ("tube_filter", "tube_filter_um", "optics", "detector_thickness_um")
    # what the file's own header gave (Instrument.from_file lists it as "  field: header ...") counts as
    # fixed: a real M6 header's lens is not replaced by a guess from the continuum's shape
    description = inst.description or ""
    from_header = {f for f in ("tube_filters", "optics", "detector_thickness_um")
                   if f"\n  {f}: header" in description and f not in fixed}
    fixed = {**fixed, **{f: getattr(inst, f) for f in from_header}}
    fixed_why = {
        name: ("from the file's header" if field in from_header else "given in fixed=")
        for name, field in (("tube_filter", "tube_filters"), ("tube_filter_um", "tube_filters"),
                            ("optics", "optics"), ("detector_thickness_um", "detector_thickness_um"))
    }
    fixed_now = {
        "tube_filter": "tube_filters" in fixed,
        "tube_filter_um": "tube_filters" in fixed,
        "optics": "optics" in fixed,
        "detector_thickness_um": "detector_thickness_um" in fixed,
    }
    current = {
        "tube_filter": " + ".join(a.material for a in inst.tube_filters) or "none",
        "tube_filter_um": float(sum(a.thickness_um for a in inst.tube_filters)),
        "optics": inst.optics,
        "detector_thickness_um": float(inst.detector_thickness_um),
    }
    hard = None
    if context is not None and inst.anode is not None and not all(fixed_now.values()):
        hard = _fit_hardness(
            y,
            cal,
            inst,
            context[0],
            fwhm_fn,
            context[1],
            share,
            float(inst.scattering_angle_deg),
            float(inst.tube_voltage_kV),
            fixed,
        )
    if hard is None:
        why = (
            "no tube identified: no scattered tube continuum to read it from"
            if context is None or inst.anode is None
            else "too few counts or channels above 4 keV"
        )
        for name in names:
            if fixed_now[name]:
                put(name, current[name], None, "fixed", fixed_why[name])
            else:
                put(name, current[name], None, "not determined", f"{why}: the start's value")
        return inst
    rank = hard.ranking
    where = (
        f"Ebel continuum through each candidate, scattered at {inst.scattering_angle_deg:.0f} deg, against "
        f"{hard.channels} channels at {hard.window_keV[0]:.1f}-{hard.window_keV[1]:.1f} keV (deviance/dof "
        f"{hard.dispersion:.1f}, {hard.evaluations} trials)"
    )
    runner_m = next((r for r in rank[1:] if r[1] != hard.material), None)
    alike = [
        f"{_filter_label(m, t)}{' + lens' if o == 'polycapillary' else ''} (+{d:.1f})"
        for o, m, t, d in rank[1:]
        if d < _CHOICE_DELTA and m != hard.material
    ][:4]
    # filter: material and thickness
    if fixed_now["tube_filter"]:
        put("tube_filter", current["tube_filter"], None, "fixed", fixed_why["tube_filter"])
        put("tube_filter_um", current["tube_filter_um"], None, "fixed", fixed_why["tube_filter_um"])
    else:
        label = _filter_label(hard.material, hard.thickness_um)
        if hard.material_settled:
            ev = f"{label} fits best: {where}" + (
                f"; next best {_filter_label(runner_m[1], runner_m[2])} (deviance +{runner_m[3]:.0f} "
                "dispersions)"
                if runner_m
                else ""
            )
            put("tube_filter", hard.material, None, "fitted", ev)
        else:
            ev = (
                f"{label} fits best, but "
                + ", ".join(alike)
                + f" fit within {_CHOICE_DELTA:g} dispersions: the material is not settled; the instrument "
                f"carries {label}, which shapes the spectrum as they do ({where})"
            )
            put("tube_filter", hard.material, None, "not determined", ev)
        if hard.material == "none":
            put(
                "tube_filter_um",
                0.0,
                None,
                "fitted" if hard.material_settled else "not determined",
                "no filter"
                if hard.material_settled
                else "no filter fits best, but the choice is not settled",
            )
        elif hard.thickness_sd_um is not None:
            put(
                "tube_filter_um",
                hard.thickness_um,
                hard.thickness_sd_um,
                "fitted",
                f"thickness of {hard.material}: parabola of the deviance in ln(thickness)",
            )
        else:
            put(
                "tube_filter_um",
                hard.thickness_um,
                None,
                "not determined",
                f"the deviance of {hard.material} has no minimum inside "
                f"{FILTER_CANDIDATES_UM[hard.material][0]:g}-{FILTER_CANDIDATES_UM[hard.material][1]:g} um",
            )
        inst = inst.with_(
            tube_filters=() if hard.material == "none" else (Absorber(hard.material, hard.thickness_um),)
        )
    # optics
    if fixed_now["optics"]:
        put("optics", current["optics"], None, "fixed", fixed_why["optics"])
    else:
        other = next((r for r in rank if r[0] != hard.optics), None)
        ev = f"{hard.optics} fits best" + (
            f"; the best with{'out' if other[0] == 'none' else ''} a lens "
            f"({_filter_label(other[1], other[2])}) {other[3]:.1f} dispersions worse"
            if other
            else ""
        )
        lens_from = "" if hard.optics == "none" else f" (lens shape of {hard.lens.name})"
        put(
            "optics",
            hard.optics,
            None,
            "fitted" if hard.optics_settled else "not determined",
            ev
            + lens_from
            + ("" if hard.optics_settled else ": not settled; the instrument carries the best"),
        )
        if hard.optics == "polycapillary" and inst.optics != "polycapillary":
            lens = hard.lens
            inst = inst.with_(
                optics="polycapillary",
                polycapillary_cutoff_keV=lens.polycapillary_cutoff_keV,
                polycapillary_slope=lens.polycapillary_slope,
                polycapillary_floor=lens.polycapillary_floor,
                polycapillary_low_keV=lens.polycapillary_low_keV,
            )
        else:
            inst = inst.with_(optics=hard.optics)
    # detector thickness
    if fixed_now["detector_thickness_um"]:
        put("detector_thickness_um", current["detector_thickness_um"], None, "fixed",
            fixed_why["detector_thickness_um"])
    elif hard.detector_sd_um is not None:
        put(
            "detector_thickness_um",
            hard.detector_um,
            hard.detector_sd_um,
            "fitted",
            f"the efficiency above 15 keV, with the best filter and optics: deviance at "
            f"{', '.join(f'{t:g}' for t in DETECTOR_THICKNESSES_UM)} um, parabola in ln(thickness)",
        )
        inst = inst.with_(detector_thickness_um=hard.detector_um)
    else:
        put(
            "detector_thickness_um",
            current["detector_thickness_um"],
            None,
            "not determined",
            f"the misfit is lowest at {hard.detector_um:g} um, the edge of the "
            f"{DETECTOR_THICKNESSES_UM[0]:g}-{DETECTOR_THICKNESSES_UM[-1]:g} um tried (or flat): the start's "
            f"{current['detector_thickness_um']:g} um kept",
        )
    return inst


def _near_family(e: float, elements: tuple[str, ...], inst: Instrument) -> bool:
    """Whether a line of a family of ``elements`` lies within 0.5 FWHM of ``e`` (a fluorescence peak)."""
    fw = float(inst.fwhm_keV(e))
    for el in elements:
        for fam in ("K", "L"):
            for _, _, e_l in family_lines(atomic_number(el), fam):
                if abs(e_l - e) < 0.5 * fw:
                    return True
    return False


def _refine_angle(
    y: np.ndarray,
    energy: np.ndarray,
    fwhm: np.ndarray,
    lines: _TubeLines,
    peaks_e: np.ndarray,
    pileup: np.ndarray,
    theta0: float,
) -> tuple[float, float | None]:
    """The scattering angle of a monochromatic beam's Compton peak: the local scatter fit's chi-square on a
    1 degree grid around ``theta0``, a parabola through its minimum; sigma where the chi-square rises by
    one (times the reduced chi-square where that exceeds one)."""
    ts = np.arange(max(30.0, theta0 - 8.0), min(180.0, theta0 + 8.0) + 0.5, 1.0)
    chi = []
    for t in ts:
        ev = _scatter_evidence(y, energy, fwhm, lines, peaks_e, np.array([t]), pileup)
        chi.append(np.inf if ev is None else ev.chi2_dof * ev.dof)
    chi_arr = np.array(chi)
    i = int(np.argmin(chi_arr))
    sel = slice(max(0, i - 2), i + 3)
    pm = _parabola_min(ts[sel], chi_arr[sel])
    if pm is None:
        return float(ts[i]), None
    ev = _scatter_evidence(y, energy, fwhm, lines, peaks_e, np.array([pm[0]]), pileup)
    over = max(1.0, ev.chi2_dof) if ev is not None else 1.0
    return float(np.clip(pm[0], 30.0, 180.0)), float(math.sqrt(2.0 / pm[1] * over))


def _air_path_of(inst: Instrument) -> float:
    """Air at one atmosphere on the beam path, mm: the path times the air's pressure (0 without air)."""
    if inst.atmosphere != "air":
        return 0.0
    return float(inst.beam_path_mm) * float(inst.atmosphere_pressure_mbar) / STANDARD_PRESSURE_MBAR


def _with_air_path(inst: Instrument, path_mm: float) -> Instrument:
    """The instrument with air on its paths that amounts to ``path_mm`` at one atmosphere on the beam
    path: the start's paths at a lower pressure (a flushed or pumped chamber), or a longer beam path."""
    if path_mm <= 0:
        return inst.with_(atmosphere="vacuum")
    if inst.beam_path_mm > 0 and path_mm <= inst.beam_path_mm:
        return inst.with_(
            atmosphere="air", atmosphere_pressure_mbar=STANDARD_PRESSURE_MBAR * path_mm / inst.beam_path_mm
        )
    return inst.with_(atmosphere="air", atmosphere_pressure_mbar=STANDARD_PRESSURE_MBAR, beam_path_mm=path_mm)


def _window_text(inst: Instrument) -> str:
    w = inst.detector_window
    return "none" if w is None else f"{w.material} {w.thickness_um:g} um"
