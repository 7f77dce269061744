"""Element detection: which elements a spectrum shows, and the peaks that show them (:func:`detect_elements`).

The search runs as the numbered steps of :func:`detect_elements`'s docstring, each a function here:
:func:`_search_peaks` (1), :func:`_candidate_table` and :func:`_candidates_at` (2), :func:`_judge` and
:func:`_eliminate` (3, with :func:`_residual_peaks` for a second round), :func:`_free_score` and
:func:`_confirm` (4) and :func:`_report` (5). They share one :class:`_Search`: the spectrum, the
instrument and the settings.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import xraylib

from .._errors import FitError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..core.lines import atomic_number, element_symbol
from ..core.spectrum import Scan, Spectrum
from ..physics.detector import DetectorResponse
from ..physics.instrument import Instrument
from .background import snip_background
from .design import counts_and_kind, family_template, fit_range, make_design
from .families import (
    COMMON_ELEMENTS,
    FAMILIES,
    MAIN_GROUP,
    FamilyModel,
    choose_family,
    edge_keV,
    family_model,
    max_excitation_keV,
)
from .solvers import fit_one, sum_variance

__all__ = ["DetectedElement", "DetectedPeak", "detect_elements", "parse_element"]

_log = logging.getLogger("xrfnb.fit")

#: second line group checked for consistency where it should be visible
_SECOND = {"K": "Kb", "L": "Lb", "M": ""}
#: elements never reported from a sample: noble gases other than argon, short-lived radioactive elements
_NEVER = frozenset({2, 10, 36, 54, 86, 43, 61, 84, 85, 87, 88, 89, 91})
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


def parse_element(entry: str | DetectedElement) -> tuple[str, str | None]:
    """Chemical symbol and family (or None) of an element request.

    Parameters
    ----------
    entry : str or DetectedElement
        ``"Fe"``, ``"Pb L"``, ``"Pb-L"``, ``"Ba_K"`` or a detected element (its family).

    Returns
    -------
    (str, str or None)
        ``("Pb", "L")``, ``("Fe", None)``.

    Raises
    ------
    FitError
        A name that is not an element (with an optional K, L or M family).
    """
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


@dataclasses.dataclass(frozen=True)
class _Peak:
    """A peak of the filtered spectrum: channel (fractional), energy keV, significance (sigma), net counts."""

    channel: float
    energy_keV: float
    significance: float
    net_counts: float


def _find_peaks(
    y: np.ndarray,
    energy: np.ndarray,
    instrument: Instrument,
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
            if edge_keV(z, fam) >= e_max:
                continue
            try:
                e = xraylib.LineEnergy(z, main_line[fam])
            except ValueError:
                continue
            if e_lo <= e <= e_hi:
                out.append((z, fam, float(e)))
    return out


def _window_sum(t: np.ndarray, energy: np.ndarray, center: float, half: float) -> np.ndarray:
    """Sum of ``t`` (shape (n, ...)) over the channels within ``half`` keV of ``center`` keV."""
    sel = np.abs(energy - center) <= half
    return t[sel].sum(axis=0)


# ------------------------------------------------------------------------------------------------
# The steps of detect_elements
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class _Search:
    """What every step of :func:`detect_elements` works on: one spectrum under one instrument.

    Attributes
    ----------
    instrument : Instrument
        Excitation, detector response and FWHM.
    calibration : EnergyCalibration
        The spectrum's calibration.
    y : numpy.ndarray
        Counts, shape (channels,), float64.
    energy_keV : numpy.ndarray
        Channel energies, shape (channels,), keV.
    lo, hi : int
        Searched channel range ``[lo, hi)``.
    e_lo, e_hi : float
        Energies of channels ``lo`` and ``hi - 1``, keV.
    e_max : float
        Excitation maximum, keV.
    min_significance : float
        Smallest significance (sigma) an element is reported at.
    tolerance_keV : float or None
        Largest distance of a main line from a peak (None: half the FWHM plus 20 eV).
    matrix : str or None
        Thick-sample formula for the line ratios.
    response : DetectorResponse
        Detector response on the spectrum's channels (the candidates' fixed-ratio templates).
    cache : dict
        Design templates kept between the many fits of one search (:func:`make_design`).
    """

    instrument: Instrument
    calibration: EnergyCalibration
    y: np.ndarray
    energy_keV: np.ndarray
    lo: int
    hi: int
    e_lo: float
    e_hi: float
    e_max: float
    min_significance: float
    tolerance_keV: float | None
    matrix: str | None
    response: DetectorResponse
    cache: dict

    @property
    def y_rng(self) -> np.ndarray:
        """Counts in the searched range, shape (hi - lo,)."""
        return self.y[self.lo : self.hi]

    @property
    def e_rng(self) -> np.ndarray:
        """Channel energies in the searched range, shape (hi - lo,), keV."""
        return self.energy_keV[self.lo : self.hi]

    def fwhm(self, e: float) -> float:
        """Detector FWHM at ``e`` keV, keV."""
        return float(np.asarray(self.instrument.fwhm_keV(e)))

    def tol(self, e: float) -> float:
        """Largest distance of a line at ``e`` keV from the peak that shows it, keV."""
        if self.tolerance_keV is not None:
            return float(self.tolerance_keV)
        return 0.5 * self.fwhm(e) + 0.02


@dataclasses.dataclass(frozen=True, eq=False)
class _Candidate:
    """A candidate element: its main and secondary families and the main family's fixed-ratio template.

    ``fixed`` is the main family's counts per channel in the searched range for unit total counts,
    shape (hi - lo,).
    """

    main: FamilyModel
    secondary: list[FamilyModel]
    fixed: np.ndarray

    @property
    def origin(self) -> str:
        """``"setup"`` for argon (the air path), else ``"sample"``."""
        return "setup" if self.main.element == "Ar" else "sample"


def _resolved(active: Mapping[str, _Candidate]) -> list[tuple[FamilyModel, list[FamilyModel], str]]:
    """The active candidates as :func:`make_design` takes them."""
    return [(c.main, c.secondary, c.origin) for c in active.values()]


def _search_peaks(search: _Search, peak_threshold: float) -> list[_Peak]:
    """Step 1: peaks more than ``peak_threshold`` sigma above the SNIP background of the searched range."""
    y, lo, hi, cal = search.y, search.lo, search.hi, search.calibration
    fwhm_mid = search.fwhm(0.5 * (search.e_lo + search.e_hi))
    smooth = max(1, round(0.5 * fwhm_mid / cal.gain_keV)) if y.sum() < 1e6 else 0
    bg = np.zeros_like(y)
    bg[lo:hi] = snip_background(
        y[lo:hi], width_keV=max(0.3, 3.0 * fwhm_mid), gain_keV=cal.gain_keV, smooth_channels=smooth
    )
    return _find_peaks(y, search.energy_keV, search.instrument, lo, hi, peak_threshold, bg)


def _candidate_table(
    e_lo: float, e_hi: float, e_max: float, instrument: Instrument, candidates: str | Sequence[str]
) -> list[tuple[int, str, float]]:
    """Step 2's list of element families a peak may belong to: (z, family, main-line energy keV).

    The anode element of a tube is left out (its lines are scatter); ``candidates`` is ``"common"``
    (:data:`COMMON_ELEMENTS`), ``"all"`` or a list of element names. FitError for an empty list.
    """
    anode = getattr(instrument, "anode", None)
    anode_z = atomic_number(anode) if anode and not getattr(instrument, "monochromatic_keV", None) else None
    if isinstance(candidates, str) and candidates in ("common", "all"):
        allowed = None if candidates == "all" else {atomic_number(s) for s in COMMON_ELEMENTS}
    else:
        names = [candidates] if isinstance(candidates, str) else list(candidates)
        allowed = {atomic_number(parse_element(s)[0]) for s in names}
        if not allowed:
            raise FitError("candidates is empty: give element symbols, 'common' or 'all'")
    return [
        (z, fam, e)
        for z, fam, e in _candidate_energy_table(e_lo, e_hi, e_max)
        if z != anode_z and (allowed is None or z in allowed)
    ]


def _candidates_at(
    search: _Search, table: list[tuple[int, str, float]], positions: np.ndarray,
    known: Mapping[str, _Candidate],
) -> dict[str, _Candidate]:
    """Step 2: new candidates of ``table`` whose main line lies at one of the peaks ``positions`` (keV).

    An element is a candidate through the family an expert would map among those at a peak
    (:func:`choose_family`), and only if that is also its preferred family overall (Zn L at 1.0 keV
    while Zn K, excited and in range, shows no peak is not zinc) and its line reaches the detector.
    Elements in ``known`` are skipped.
    """
    instrument, tol = search.instrument, search.tol
    cand: dict[int, set[str]] = {}
    for z, fam, e in table:
        if positions.size and np.min(np.abs(positions - e)) <= tol(e):
            cand.setdefault(z, set()).add(fam)
    new: dict[str, _Candidate] = {}
    for z, fams in cand.items():
        usable = {}
        for fam in FAMILIES:
            fm = family_model(z, fam, instrument, search.matrix)
            if fm is not None and search.e_lo <= fm.main_energy_keV <= search.e_hi:
                usable[fam] = fm
        matched = [
            usable[f]
            for f in fams
            if f in usable
            and np.min(np.abs(positions - usable[f].main_energy_keV)) <= tol(usable[f].main_energy_keV)
        ]
        if not matched or matched[0].element in known or matched[0].element in new:
            continue
        main = choose_family(matched, search.e_max)
        eff = float(np.ravel(instrument.detector_efficiency(np.array([main.main_energy_keV])))[0])
        if eff < 1e-3:
            continue  # its line cannot reach the detector (air path, window): the peak is something else
        if choose_family(list(usable.values()), search.e_max) is not main:
            # e.g. Zn L at 1.0 keV while Zn K (excited, in range) shows no peak: not Zn
            continue
        secondary = [
            f for f in usable.values() if f is not main and f.relative_yield > 1e-3 * main.relative_yield
        ]
        t_full = family_template(main, search.response)
        fixed = t_full[search.lo : search.hi] / max(t_full.sum(), 1e-300)
        new[main.element] = _Candidate(main, secondary, fixed)
    return new


def _judge(
    search: _Search, active: Mapping[str, _Candidate], peak_e: np.ndarray
) -> tuple[dict[str, float], list[str], np.ndarray]:
    """Step 3: fit the active candidates together and judge each one.

    An element passes when it is fitted at ``min_significance`` sigma or more, its main line sits at one
    of the peaks ``peak_e`` (keV) and it explains at least half of what it predicts there, its second
    line (Kb, Lb) is seen where it should be visible, and one of its line groups is mostly its own.

    Returns
    -------
    verdict : dict of str to float
        Per element its significance if it passes, else a negative number (ordered by significance).
    zero : list of str
        Elements the fit gave no counts.
    model : numpy.ndarray
        The fitted model of the searched range, shape (hi - lo,), counts.
    """
    min_sig = search.min_significance
    e_lo, e_hi, e_rng, y_rng = search.e_lo, search.e_hi, search.e_rng, search.y_rng
    design = make_design(
        _resolved(active), search.instrument, search.calibration, search.y, search.lo, search.hi, None, True,
        split_l=False, cache=search.cache,
    )
    coef, model, w = fit_one(design, y_rng)
    design = design.with_escape(coef)
    coef, model, w = fit_one(design, y_rng)
    names = list(dict.fromkeys(c.element for c in design.columns if c.kind == "element"))
    Rm = np.array([[float(c.kind == "element" and c.element == e) for c in design.columns] for e in names])
    total_el = Rm @ np.maximum(coef, 0.0)
    var = sum_variance(design.A, w, Rm)
    is_bg = np.array([c.kind == "background" for c in design.columns])
    lines_model = model - design.A[:, is_bg] @ coef[is_bg]  # peaks only: what competes for a line
    verdict: dict[str, float] = {}
    for j, name in enumerate(names):
        score = total_el[j] / np.sqrt(var[j]) if var[j] > 0 else 0.0
        fm = active[name].main
        own = design.A @ (Rm[j] * coef)
        others = model - own
        t = active[name].fixed * total_el[j]
        ok = score >= min_sig
        unique = False
        for group in dict.fromkeys(fm.groups):
            e_g, share = fm.group_energy(group)
            if share < 0.03 or not e_lo <= e_g <= e_hi:
                continue
            half = 0.5 * search.fwhm(e_g)
            mine = float(_window_sum(own, e_rng, e_g, half))
            there = float(_window_sum(model, e_rng, e_g, half))
            peaks_there = float(_window_sum(lines_model, e_rng, e_g, half))
            # a line group this element explains mostly by itself (among the peaks there), clearly
            # above the noise and above the systematic error of the other peaks
            if mine >= 0.3 * peaks_there and mine >= min_sig * (
                np.sqrt(max(there, 1.0)) + _SYSTEMATIC * max(peaks_there - mine, 0.0)
            ):
                unique = True
            need = {MAIN_GROUP[fm.family]: 0.5, _SECOND[fm.family]: 0.3}.get(group)
            if not ok or need is None:
                continue
            pred = float(_window_sum(t, e_rng, e_g, half))
            obs = float(_window_sum(y_rng - others, e_rng, e_g, half))
            # Poisson noise plus a 5 % systematic share of the other terms there (peak-shape errors
            # of a large neighbour must not veto a small line beneath it)
            noise = float(np.sqrt(max(there, 1.0))) + 0.05 * max(peaks_there - mine, 0.0)
            if group == MAIN_GROUP[fm.family]:
                if np.min(np.abs(peak_e - e_g)) > search.tol(e_g):
                    ok = False  # no peak at the main line
                elif obs < need * pred - 3 * noise:
                    ok = False
            elif pred > 5 * noise and obs < need * pred - 3 * noise:
                ok = False  # second line should be visible but is not
        _log.debug("detect %s %s: %.1f sigma, checks %s, unique %s", name, fm.family, score, ok, unique)
        ok = ok and unique
        verdict[name] = score if ok else -1.0 + min(score, 0.99) * 1e-3
    zero = [e for j, e in enumerate(names) if total_el[j] <= 0]
    return verdict, zero, model


def _eliminate(
    search: _Search, active: Mapping[str, _Candidate], peak_e: np.ndarray
) -> tuple[dict[str, _Candidate], dict[str, float], np.ndarray]:
    """Step 3: remove candidates, weakest first, until every remaining one passes :func:`_judge`.

    Elements the fit gave nothing go together, the others one at a time. Returns the remaining
    candidates, the last verdict and the last model (shape (hi - lo,)).
    """
    active = dict(active)
    verdict: dict[str, float] = {}
    model = np.zeros_like(search.y_rng)
    while active:
        verdict, zero, model = _judge(search, active, peak_e)
        worst = min(verdict, key=verdict.__getitem__)
        if verdict[worst] >= search.min_significance:
            break
        for el in (zero if 0 < len(zero) < len(verdict) else []):
            del active[el]
        active.pop(worst, None)
    return active, verdict, model


def _residual_peaks(
    search: _Search, model: np.ndarray, peaks: list[_Peak], peak_threshold: float
) -> list[_Peak]:
    """Step 3, second round: peaks left in the residual of ``model`` (shape (hi - lo,)) away from ``peaks``.

    The residual's variance includes a systematic share of the model; residuals within 3 FWHM of a peak
    50 times larger are taken as its shape (tail) error, not a line.
    """
    lo, hi, n_ch = search.lo, search.hi, search.y.size
    model_full = np.concatenate([np.zeros(lo), model, np.zeros(n_ch - hi)])
    resid_peaks = _find_peaks(
        search.y - model_full, search.energy_keV, search.instrument, lo, hi, peak_threshold, np.zeros(n_ch),
        variance=search.y + (_SYSTEMATIC * model_full) ** 2,
    )
    peak_e = np.array([p.energy_keV for p in peaks])
    resid_peaks = [p for p in resid_peaks if np.min(np.abs(peak_e - p.energy_keV)) > search.tol(p.energy_keV)]
    return [
        p
        for p in resid_peaks
        if not any(
            abs(q.energy_keV - p.energy_keV) < 3 * search.fwhm(q.energy_keV)
            and p.net_counts < 0.02 * q.net_counts
            for q in peaks
        )
    ]


def _free_score(search: _Search, active: Mapping[str, _Candidate], name: str) -> float:
    """Step 4: significance of ``name`` when every other element's line ratios are free.

    The other families' line ratios are freed within physical bounds (:func:`family_parts` with
    ``fine``), triangular background terms join for spectra of :data:`_HATS_MIN_COUNTS` counts or more,
    and the channel variances include :data:`_MODEL_ERROR` of the other elements' peaks.
    """
    y_rng = search.y_rng
    fine = frozenset(el for el in active if el != name)
    design = make_design(
        _resolved(active), search.instrument, search.calibration, search.y, search.lo, search.hi, None, True,
        split_l=False, fine=fine, hats_fwhm=_HATS_FWHM if y_rng.sum() >= _HATS_MIN_COUNTS else None,
        cache=search.cache,
    )
    coef, _, _ = fit_one(design, y_rng)
    design = design.with_escape(coef)
    coef, model, _ = fit_one(design, y_rng)
    own = np.array([c.kind == "element" and c.element == name for c in design.columns])
    is_bg = np.array([c.kind == "background" for c in design.columns])
    others = model - design.A[:, is_bg | own] @ coef[is_bg | own]  # peaks of everything else
    var = np.maximum(model, 1.0) + (_MODEL_ERROR * np.maximum(others, 0.0)) ** 2
    act = (coef > 0) | own
    v = float(sum_variance(design.A[:, act], 1.0 / var, own[act][None, :].astype(float))[0])
    total = float(coef[own].sum())
    return total / np.sqrt(v) if v > 0 else 0.0


def _confirm(
    search: _Search, active: dict[str, _Candidate], verdict: dict[str, float], model: np.ndarray,
    peak_e: np.ndarray,
) -> tuple[dict[str, _Candidate], dict[str, float], np.ndarray]:
    """Step 4: drop, weakest first, elements that another family explains once its line ratios are free.

    After each drop the rest are judged again (:func:`_eliminate`). The final verdict of an element is
    the smaller of its two significances. Argon is not tested.
    """
    while active:
        scores = {el: _free_score(search, active, el) for el in active if el != "Ar"}
        _log.debug("detect, free-ratio significance: %s", scores)
        bad = {el: sc for el, sc in scores.items() if sc < search.min_significance}
        if not bad:
            verdict = {el: min(verdict[el], scores.get(el, np.inf)) for el in active}
            break
        active = dict(active)
        del active[min(bad, key=bad.__getitem__)]
        active, verdict, model = _eliminate(search, active, peak_e)
    return active, verdict, model


def _report(
    search: _Search, active: Mapping[str, _Candidate], verdict: Mapping[str, float], peaks: list[_Peak],
) -> list[DetectedElement]:
    """Step 5: the detected elements with their evidence (peaks at their line groups), strongest first.

    Argon is reported with ``origin="setup"``.
    """
    peak_e = np.array([p.energy_keV for p in peaks])
    result = []
    for el, cand in active.items():
        fm = cand.main
        evidence = []
        for group in dict.fromkeys(fm.groups):
            e_g, share = fm.group_energy(group)
            if share < 0.01:
                continue
            near = np.abs(peak_e - e_g) <= search.tol(e_g)
            for i in np.nonzero(near)[0]:
                p = peaks[i]
                evidence.append(DetectedPeak(p.energy_keV, group, e_g, p.significance, p.net_counts))
        main_group = MAIN_GROUP[fm.family]
        evidence.sort(key=lambda p: (p.line != main_group, -p.significance))
        origin = cand.origin
        note = "explained by setup: argon in the air path to the detector" if origin == "setup" else ""
        result.append(DetectedElement(el, fm.family, tuple(evidence), float(verdict[el]), origin, note))
    result.sort(key=lambda d: -d.score)
    return result


def detect_elements(
    spectrum: Spectrum | Scan,
    instrument: Instrument,
    *,
    min_significance: float = 5.0,
    peak_threshold: float = 3.0,
    energy_range_keV: tuple[float, float] | None = None,
    tolerance_keV: float | None = None,
    candidates: str | Sequence[str] = "common",
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
       another element's line explains therefore does not make an element. Peaks then left in the
       residual (shoulders of large peaks, e.g. Cu Ka beside Ni Kb) bring their candidates in for a
       second round.
    4. Confirmation against matrix effects: each element is refitted with the line ratios of all other
       families freed within physical bounds (Kb/Ka between the values thick paint matrices give,
       :func:`~xrfnb.fitting.families.family_parts`; L families per vacancy subshell), smooth
       triangular background terms that absorb broad humps (sum spectra of 5e5 counts or more), and a
       2 % model error of the other families' peaks in the channel variances. An element whose fitted
       intensity is then below ``min_significance`` sigma -- e.g. Mn Ka (5.90 keV) that is really the
       self-absorption excess of Cr Kb (5.95 keV) in chrome yellow -- is removed (weakest first) and the
       rest re-judged.
    5. Argon (air between sample and detector) is reported with ``origin="setup"``.

    Parameters
    ----------
    spectrum : Spectrum or Scan
        The spectrum (of a scan: its sum spectrum); its calibration is used.
    instrument : Instrument
        Excitation (which families are excited, scatter lines) and detector response (FWHM, escape).
    min_significance : float, optional
        Minimum fitted family intensity over its Poisson sigma.
    peak_threshold : float, optional
        Peak-search threshold in sigma.
    energy_range_keV : (float, float), optional
        Searched range (default as in :func:`~xrfnb.fitting.elements.fit_elements`).
    tolerance_keV : float, optional
        Largest distance of a main line from a peak (default half the FWHM plus 20 eV).
    candidates : "common", "all" or sequence of str, optional
        Elements considered: :data:`COMMON_ELEMENTS` (default; what paintings, their supports, metal
        leaf and standards contain), every element from Na to U, or your own list.
    matrix : str, optional
        Formula of a thick sample for the line ratios (see :func:`~xrfnb.fitting.elements.fit_elements`).

    Returns
    -------
    list of DetectedElement
        Sorted by decreasing score; each with the peaks that show it.

    Raises
    ------
    FitError
        Not a Spectrum or Scan, a calibration that puts too few channels in the range, or an empty
        ``candidates`` list.
    """
    kind, data = counts_and_kind(spectrum)
    if kind != "spectrum":
        data = data.sum_spectrum(max(1024, 2**25 // data.n_channels))  # bounded memory
    cal = data.calibration
    y = np.asarray(data.counts, dtype=float)
    energy = cal.energies_keV(y.size)
    lo, hi, e_lo, e_hi = fit_range(cal, y.size, instrument, energy_range_keV)
    e_max = max_excitation_keV(instrument)
    search = _Search(
        instrument, cal, y, energy, lo, hi, e_lo, e_hi, e_max, min_significance, tolerance_keV, matrix,
        response=DetectorResponse(instrument, channel_energy_keV=energy), cache={},
    )
    # 1. peaks
    peaks = _search_peaks(search, peak_threshold)
    if not peaks:
        return []
    peak_e = np.array([p.energy_keV for p in peaks])
    # 2. candidates at the peaks
    table = _candidate_table(e_lo, e_hi, e_max, instrument, candidates)
    models = _candidates_at(search, table, peak_e, {})
    if not models:
        return []
    # 3. explanation, then a second round with the peaks left in the residual
    active, verdict, model = _eliminate(search, models, peak_e)
    resid_peaks = _residual_peaks(search, model, peaks, peak_threshold)
    if resid_peaks:
        new_e = np.array([p.energy_keV for p in resid_peaks])
        added = _candidates_at(search, table, new_e, models)
        if added:
            models.update(added)
            peaks = peaks + resid_peaks
            peak_e = np.concatenate([peak_e, new_e])
            active, verdict, model = _eliminate(search, {**active, **added}, peak_e)
    # 4. confirmation against matrix effects
    active, verdict, model = _confirm(search, active, verdict, model, peak_e)
    if not active:
        return []
    # 5. the report
    return _report(search, active, verdict, peaks)
