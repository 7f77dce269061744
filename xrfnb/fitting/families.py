"""Element line families as one instrument sees them: the lines of K, L and M families of an element,
their weights (fluorescence cross sections over the excitation spectrum times detector efficiency), how
a family is cut into freely fitted parts, and which family of an element an expert maps.

A *family* is all lines with an initial vacancy in one shell (``"K"``, ``"L"``, ``"M"``); a *group*
(``"Ka"``, ``"Lb"`` ...) is what a spectroscopist names a peak (:func:`xrfnb.core.lines.line_group`).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
import xraylib
import xraylib_np

from .._errors import FitError
from ..core.lines import atomic_number, element_symbol, line_group
from ..physics.instrument import Instrument

__all__ = [
    "COMMON_ELEMENTS",
    "FAMILIES",
    "MAIN_GROUP",
    "FamilyModel",
    "choose_family",
    "describe_families",
    "edge_keV",
    "family_lines",
    "family_model",
    "family_parts",
    "max_excitation_keV",
]

#: line families: lines with an initial vacancy in the K, L or M shell
FAMILIES = ("K", "L", "M")


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
MAIN_GROUP = {"K": "Ka", "L": "La", "M": "Ma"}

#: xraylib line macros of single radiative lines (``KL3_LINE``, ``L2M4_LINE`` ...)
_IUPAC_RE = re.compile(r"^(K|L[1-3]|M[1-5])([K-P][1-7]?)_LINE$")
#: absorption edge that decides whether a family is excited (the shallowest subshell of its shell)
_EDGE = {"K": "K_SHELL", "L": "L3_SHELL", "M": "M5_SHELL"}
#: thick paint matrices whose absorption sets the range of Kb/Ka ratios (see _kb_bounds): binder, chalk,
#: gypsum, lead white, chrome yellow, vermilion, cadmium yellow, iron oxide, zinc white, smalt-like glass
_RATIO_MATRICES = (
    "C18H32O2", "CaCO3", "CaSO4H4O2", "Pb3C2O8H2", "PbCrO4", "HgS", "CdS", "Fe2O3", "ZnO", "SiO2",
)
#: margin on the Kb/Ka range for fundamental-parameter and detector-efficiency uncertainty
_KB_MARGIN = 0.1
#: free the L families by (subshell, line group) rather than by subshell in the free-ratio test; off:
#: group-level freedom let the L lines of one element absorb a neighbour's K line (I Lg1 and V Ka)
_FINE_L_GROUPS = False


@functools.lru_cache(maxsize=1)
def _iupac_macros() -> tuple[tuple[str, int], ...]:
    """(IUPAC name, xraylib macro) of every single radiative line xraylib knows."""
    out = []
    for name in dir(xraylib):
        m = _IUPAC_RE.match(name)
        if m:
            out.append((name[: -len("_LINE")], int(getattr(xraylib, name))))
    return tuple(out)


@functools.lru_cache(maxsize=2048)
def family_lines(z: int, family: str) -> tuple[tuple[str, int, float], ...]:
    """Every radiative line of one family of an element that an SDD can see.

    Parameters
    ----------
    z : int
        Atomic number.
    family : str
        ``"K"``, ``"L"`` or ``"M"``.

    Returns
    -------
    tuple of (str, int, float)
        (IUPAC name, xraylib line macro, energy in keV) of each line above 0.25 keV with a non-zero
        radiative rate, in xraylib's macro order.
    """
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


def edge_keV(z: int, family: str) -> float:
    """Absorption edge that excites a family (K, L3 or M5 edge) of element ``z``, keV; inf if none."""
    try:
        return float(xraylib.EdgeEnergy(z, getattr(xraylib, _EDGE[family])))
    except ValueError:
        return np.inf


@dataclasses.dataclass(frozen=True, eq=False)
class FamilyModel:
    """Lines of one element family as seen by one instrument (see :func:`family_model`).

    Attributes
    ----------
    element : str
        Chemical symbol.
    z : int
        Atomic number.
    family : str
        ``"K"``, ``"L"`` or ``"M"``.
    energies_keV : numpy.ndarray
        Line energies, shape (lines,), keV.
    weights : numpy.ndarray
        Share of the family's detected photons in each line, shape (lines,), sums to 1.
    groups : tuple of str
        Line group of each line (:func:`xrfnb.core.lines.line_group`: ``"Ka"``, ``"Lb"`` ...).
    relative_yield : float
        Detected photons of the family per unit concentration, arbitrary but common units: compares
        families of one instrument.
    subshells : tuple of str
        Initial vacancy subshell of each line (``"K"``, ``"L1"``, ``"L2"``, ``"L3"``, ``"M5"`` ...).
    """

    element: str
    z: int
    family: str
    energies_keV: np.ndarray
    weights: np.ndarray
    groups: tuple[str, ...]
    relative_yield: float
    subshells: tuple[str, ...] = ()

    def group_energy(self, group: str) -> tuple[float, float]:
        """(weighted mean energy keV, share of the family) of one line group; (nan, 0) if absent."""
        sel = np.array([g == group for g in self.groups])
        share = float(self.weights[sel].sum()) if sel.any() else 0.0
        if share <= 0:
            return float("nan"), 0.0
        return float(np.average(self.energies_keV[sel], weights=self.weights[sel])), share

    @property
    def main_energy_keV(self) -> float:
        """Weighted mean energy of the main line group (Ka, La or Ma), keV."""
        return self.group_energy(MAIN_GROUP[self.family])[0]


def max_excitation_keV(instrument: Instrument) -> float:
    """Highest incident photon energy, keV: the monochromatic beam's, else the tube voltage."""
    mono = getattr(instrument, "monochromatic_keV", None)
    if mono:
        return float(mono)
    return float(instrument.tube_voltage_kV)


def _excitation_grid(instrument: Instrument, max_points: int = 160) -> tuple[np.ndarray, np.ndarray]:
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


def _instrument_key(instrument: Instrument) -> tuple:
    """Cache key of an instrument: its hash, or its identity when it is not hashable."""
    try:
        return ("h", hash(instrument))
    except TypeError:
        return ("id", id(instrument))


#: family_model results by (z, family, instrument key, matrix)
_FAMILY_CACHE: dict[tuple, FamilyModel | None] = {}
#: _kb_bounds results by (z, instrument key)
_KB_BOUNDS_CACHE: dict[tuple, tuple[float, float]] = {}


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


def family_model(
    element: str | int, family: str, instrument: Instrument, matrix: str | None = None
) -> FamilyModel | None:
    """Template lines of one element family under ``instrument``; None when the family is not excited.

    Line weights are the fluorescence cross sections (xraylib ``CS_FluorLine_Kissel_Cascade``:
    photo-ionisation, Coster-Kronig and cascade effects, fluorescence yield, radiative rate) averaged
    over the incident spectrum, times the detector efficiency at the line energy. Without ``matrix``
    absorption in the sample is ignored (thin-sample approximation; the fit's free intensity per family
    absorbs its overall effect). With a ``matrix`` formula each incident energy ``E`` and line ``l`` are
    weighted by the thick-sample factor ``1 / (mu(E) / sin(incidence) + mu(E_l) / sin(takeoff))``, which
    sets the line ratios of a bulk sample (Kb/Ka of Cr in steel rises by ~20 %).

    Parameters
    ----------
    element : str or int
        Chemical symbol or atomic number.
    family : str
        ``"K"``, ``"L"`` or ``"M"``.
    instrument : Instrument
        Excitation spectrum, detector efficiency and geometry.
    matrix : str, optional
        Formula of a thick, homogeneous sample (xraylib syntax).

    Returns
    -------
    FamilyModel or None
        Lines holding at least 1e-4 of the strongest line's weight; None when the family's edge is at or
        above the excitation maximum or nothing of it reaches the detector. Cached per instrument.

    Raises
    ------
    FitError
        A matrix formula xraylib cannot read, or an instrument with an empty excitation spectrum.
    """
    z = atomic_number(element)
    key = (z, family, _instrument_key(instrument), matrix)
    if key in _FAMILY_CACHE:
        return _FAMILY_CACHE[key]
    result = None
    e_max = max_excitation_keV(instrument)
    if edge_keV(z, family) < e_max:
        lines = family_lines(z, family)
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
                groups = tuple(line_group(name) for name in kept)
                subshells = tuple(name[0] if name[0] == "K" else name[:2] for name in kept)
                result = FamilyModel(
                    element_symbol(z), z, family, energies, w / w.sum(), groups, float(w.sum()), subshells
                )
    _FAMILY_CACHE[key] = result
    return result


def _kb_ratio(fm: FamilyModel | None) -> float:
    """Kb/Ka weight ratio of a K family (NaN for None)."""
    if fm is None:
        return np.nan
    ka = np.array([g == "Ka" for g in fm.groups])
    return float(fm.weights[~ka].sum() / max(fm.weights[ka].sum(), 1e-300))


def _kb_bounds(fm: FamilyModel, instrument: Instrument) -> tuple[float, float]:
    """Range of a K family's Kb/Ka ratio relative to its thin-sample value, over paint matrices.

    Self-absorption in a thick paint changes Kb/Ka: a heavy matrix absorbs Ka more than Kb (ratio up,
    Cr in chrome yellow ~ +20 %), an absorption edge between Ka and Kb absorbs Kb more (ratio down, Fe
    beside Mn). The range is the min/max over :data:`_RATIO_MATRICES` and the element's own thick
    oxide-free form, from xraylib cross sections as :func:`family_model` computes them, widened by
    :data:`_KB_MARGIN`.
    """
    key = (fm.z, _instrument_key(instrument))
    if key in _KB_BOUNDS_CACHE:
        return _KB_BOUNDS_CACHE[key]
    thin = _kb_ratio(fm)
    values = [1.0]
    for matrix in (*_RATIO_MATRICES, fm.element):
        r = _kb_ratio(family_model(fm.z, "K", instrument, matrix)) / thin
        if np.isfinite(r):
            values.append(r)
    bounds = (min(values) * (1 - _KB_MARGIN), max(values) * (1 + _KB_MARGIN))
    _KB_BOUNDS_CACHE[key] = bounds
    return bounds


def family_parts(
    fm: FamilyModel, free_kb: bool = False, split_l: bool = True, fine: bool = False,
    instrument: Instrument | None = None,
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Parts of a family fitted with free intensities: (part name, line energies keV, line weights).

    K and M families are one template with fixed line ratios. L families get one template per
    initial vacancy subshell (L3: La, Ll, Lb2,15; L2: Lb1, Lg1, Ln; L1: Lb3,4, Lg2,3), as PyMca's
    "L1, L2, L3" option: the subshell vacancy shares depend on the incident spectrum inside the paint
    (Coster-Kronig transitions, edges of Pb and Hg between the lines), so fixed L-line ratios bias the
    family total by 5-10 %. Subshells holding less than 3 % of the family join the nearest one.
    With ``free_kb`` K families get separate Ka and Kb templates (for buried layers, whose Kb/Ka ratio
    grows with the absorption above them).

    ``fine`` frees the line ratios that matrix effects change (used by
    :func:`~xrfnb.fitting.detect.detect_elements` to test
    whether another element is needed): K families get two templates, Kb/Ka at the low and at the high
    end of the range paint matrices produce (:func:`_kb_bounds`; non-negative sums of the two span
    exactly that range), L families one part per
    (vacancy subshell, line group) -- La, Lb2,15 and Ll of L3 apart, since an absorption edge of the
    matrix between them (Hg L3 at 12.28 keV between Pb La and Pb Lb2) changes their ratio -- with
    parts below 3 % of the family joined to the largest part of their subshell. The K templates need
    ``instrument``.

    Returns
    -------
    list of (str, numpy.ndarray, numpy.ndarray)
        (part name, line energies keV shape (n,), line weights shape (n,)) per part.
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


def describe_families(z: int) -> str:
    """``"K edge 7.11 keV, L edge 0.71 keV"``: the edges of element ``z``'s families, for error messages."""
    parts = []
    for fam in FAMILIES:
        edge = edge_keV(z, fam)
        if np.isfinite(edge):
            parts.append(f"{fam} edge {edge:.2f} keV")
    return ", ".join(parts) or "no K/L/M lines in xraylib"


def choose_family(options: list[FamilyModel], e_max: float) -> FamilyModel:
    """The family an expert maps: the highest-energy family that is well excited (overvoltage >= 1.25).

    High-energy lines come from the whole paint depth and are not absorbed away by the matrix, which
    the thin-sample yields of :func:`family_model` ignore (they favour Pb M over Pb L). Families
    excited only near their edge fall back to the largest yield. ``e_max`` is the excitation maximum
    in keV (:func:`max_excitation_keV`).
    """
    order = {"K": 0, "L": 1, "M": 2}
    well = [f for f in options if edge_keV(f.z, f.family) * 1.25 <= e_max]
    if well:
        return min(well, key=lambda f: order[f.family])
    return max(options, key=lambda f: f.relative_yield)
