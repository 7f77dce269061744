"""The element fit's design matrix: line-family templates drawn through the detector response, Si escape,
Rayleigh and Compton scatter, pile-up and background columns over the fitted channel range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import xraylib
from tqdm.auto import tqdm

from .._errors import FitError
from ..core.calibration import EnergyCalibration
from ..core.lines import atomic_number, element_symbol, line_group
from ..core.spectrum import Scan, Spectrum
from ..physics.detector import FWHM_PER_SIGMA, DetectorResponse, escape_fraction, si_ka_keV
from ..physics.fp import compton_energy_keV, scattering_angle_rad
from ..physics.instrument import Instrument
from .background import snip_background
from .families import FamilyModel, edge_keV, family_lines, family_parts, max_excitation_keV

__all__ = [
    "Column",
    "Design",
    "counts_and_kind",
    "family_template",
    "fit_range",
    "make_design",
    "scan_blocks",
]


#: 2 * Compton profile FWHM of light matrices in atomic units of momentum (C, O: ~1.3-1.6 a.u.)
_COMPTON_PROFILE_FWHM_AU = 1.5
#: parent-line energy separating the two free escape terms (the escape excess varies with energy)
_ESCAPE_SPLIT_KEV = 5.0


@dataclasses.dataclass(frozen=True)
class Column:
    """One term of the element fit.

    Attributes
    ----------
    name : str
        ``"Fe K"``, ``"Pb L (L3)"``, ``"Rh Ka Rayleigh"``, ``"background low"`` ...
    kind : str
        ``"element"`` (a main family or a part of it), ``"secondary"`` (another family of a fitted
        element), ``"scatter"``, ``"pileup"``, ``"background"`` or ``"escape"``.
    element, family : str or None
        Element and family of ``"element"`` and ``"secondary"`` terms.
    """

    name: str
    kind: str
    element: str | None = None
    family: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Design:
    """Design matrix of the element fit over the channel range ``[lo, hi)``.

    Attributes
    ----------
    columns : list of Column
        The terms, one per column of ``A``.
    A : numpy.ndarray
        Shape (hi - lo, k): each term's counts per channel in the range, normalised to unit sum over the
        whole spectrum (a coefficient is the term's total counts).
    lo, hi : int
        Channel range fitted.
    E : numpy.ndarray or None
        Shape (hi - lo, k, 2): the Si escape part of each column, for parent lines below and at or above
        5 keV (used by :meth:`with_escape`).
    """

    columns: list[Column]
    A: np.ndarray
    lo: int
    hi: int
    E: np.ndarray | None = None

    @property
    def k(self) -> int:
        """Number of terms."""
        return len(self.columns)

    def subset(self, keep: np.ndarray) -> Design:
        """The design with only the columns where ``keep`` (bool, shape (k,)) is True."""
        idx = np.nonzero(keep)[0]
        E = None if self.E is None else self.E[:, idx, :]
        return Design([self.columns[i] for i in idx], self.A[:, idx], self.lo, self.hi, E)

    def with_escape(self, coef: np.ndarray) -> Design:
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
                cols.append(Column(name, "escape"))
                A = np.concatenate([A, (t / t.sum())[:, None]], axis=1)
        if len(cols) == len(self.columns):
            return self
        E = np.concatenate([self.E, np.zeros((self.E.shape[0], len(cols) - len(self.columns), 2))], axis=1)
        return Design(cols, A, self.lo, self.hi, E)


def family_template(fm: FamilyModel, response: DetectorResponse) -> np.ndarray:
    """Counts per channel of one family with unit total line weight, shape (channels,), by ``response``."""
    return np.asarray(fm.weights, dtype=float) @ np.asarray(response.matrix(fm.energies_keV), dtype=float)


def _scatter_angle_deg(instrument: Instrument) -> float:
    """Scattering angle (incidence, take-off and azimuth geometry) of an instrument, degrees."""
    inc = float(getattr(instrument, "incidence_deg", 45.0))
    out = float(getattr(instrument, "takeoff_deg", 45.0))
    azimuth = float(getattr(instrument, "detector_azimuth_deg", 180.0))
    return float(np.degrees(scattering_angle_rad(inc, out, azimuth)))


def _escape_template(
    energies_keV: np.ndarray, weights: np.ndarray, instrument: Instrument, energy_axis_keV: np.ndarray
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
        s = max(float(np.asarray(instrument.fwhm_keV(e_esc))) / FWHM_PER_SIGMA, 1e-3)
        u = (energy_axis_keV - e_esc) / s
        near = np.abs(u) < 6
        out[near] += w_l * f_l * np.exp(-0.5 * u[near] ** 2) / (np.sqrt(2 * np.pi) * s) * width[near]
    return out


def _doppler_template(
    response: DetectorResponse, energies_keV: np.ndarray, weights: np.ndarray, angle_deg: float,
    profile_fwhm_au: float,
) -> np.ndarray:
    """Compton-scattered lines: each line shifted to its Compton energy and Doppler-broadened."""
    shifted = compton_energy_keV(energies_keV, np.radians(angle_deg))
    theta = np.radians(angle_deg)
    q_keV = np.sqrt(energies_keV**2 + shifted**2 - 2 * energies_keV * shifted * np.cos(theta))
    sigma_keV = profile_fwhm_au * q_keV / 137.036 / FWHM_PER_SIGMA
    offsets = np.linspace(-3.0, 3.0, 13)
    g = np.exp(-0.5 * offsets**2)
    g /= g.sum()
    e_all = (shifted[:, None] + offsets[None, :] * sigma_keV[:, None]).ravel()
    w_all = (weights[:, None] * g[None, :]).ravel()
    keep = e_all > 0.1
    return w_all[keep] @ np.asarray(response.matrix(e_all[keep]), dtype=float)


def _scatter_columns(instrument: Instrument, response: DetectorResponse) -> list[tuple[Column, np.ndarray]]:
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
                if edge_keV(z, family) >= kv:
                    continue
                lines = family_lines(z, family)
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
                    ka = np.array([line_group(ln[0]) == "Ka" for ln in lines])
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
        out.append((Column(f"{name} Rayleigh", "scatter"), rayleigh))
        if e.max() > 5.0:  # Compton shift of low-energy lines is below the resolution: Rayleigh covers it
            # three widths: at back-scatter angles (a beam normal to the painting, 130 deg) the Doppler
            # width exceeds the detector's, and two fixed shapes leave a residual at 1e6 counts where Rh
            # Kb Compton sits on Pd Ka (21.1 keV)
            for label, fwhm_au in (("Compton", _COMPTON_PROFILE_FWHM_AU),
                                   ("Compton mid", 5 / 3 * _COMPTON_PROFILE_FWHM_AU),
                                   ("Compton broad", 3 * _COMPTON_PROFILE_FWHM_AU)):
                template = _doppler_template(response, e, w, angle, fwhm_au)
                out.append((Column(f"{name} {label}", "scatter"), template))
    return out


def _pileup_column(sum_counts: np.ndarray, calibration: EnergyCalibration, lo: int) -> np.ndarray:
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
) -> list[tuple[Column, np.ndarray]]:
    """SNIP background of the sum spectrum as two ramps (low and high end) a pixel can scale and tilt."""
    # SNIP inside the fitted range only: empty channels below the detector threshold would drag it down
    bg = np.zeros_like(sum_counts, dtype=float)
    bg[lo:hi] = snip_background(
        sum_counts[lo:hi], width_keV=width_keV, gain_keV=gain_keV, smooth_channels=smooth_channels
    )
    x = np.zeros_like(bg)
    x[lo:hi] = np.linspace(0.0, 1.0, hi - lo)
    return [
        (Column("background low", "background"), bg * (1.0 - x)),
        (Column("background high", "background"), bg * x),
    ]


def _hat_columns(
    energy_keV: np.ndarray, lo: int, hi: int, instrument: Instrument, spacing_fwhm: float
) -> list[tuple[Column, np.ndarray]]:
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
            out.append((Column(f"background hat {k}", "background"), t))
    return out


def _build_design(
    columns: list[tuple[Column, np.ndarray, np.ndarray | None]], lo: int, hi: int
) -> Design:
    """Design of the columns (term, counts per channel, escape part or None) that put counts in range."""
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
        return Design(cols, np.zeros((hi - lo, 0)), lo, hi, np.zeros((hi - lo, 0, 2)))
    return Design(cols, np.stack(mats, axis=1), lo, hi, np.stack(escs, axis=1))


def _line_templates(
    cache: dict, response: DetectorResponse, instrument: Instrument, energy_keV: np.ndarray, e: np.ndarray,
    w: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Counts per channel of lines ``e`` (keV) with weights ``w``, and their Si escape part (channels, 2).

    The escape part is split by parent energy (below / at or above 5 keV); results are cached in ``cache``.
    """
    key = (e.tobytes(), w.tobytes())
    if key not in cache:
        t = w @ np.asarray(response.matrix(e), dtype=float)
        low = e < _ESCAPE_SPLIT_KEV  # escape of low- and high-energy parents apart: (channels, 2)
        esc = np.stack([_escape_template(e, w * sel, instrument, energy_keV) for sel in (low, ~low)], axis=1)
        cache[key] = (t, esc)
    return cache[key]


def make_design(
    resolved: list[tuple[FamilyModel, list[FamilyModel], str]],
    instrument: Instrument,
    calibration: EnergyCalibration,
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
) -> Design:
    """Design matrix of the element fit for the fitted range ``[lo, hi)``.

    Parameters
    ----------
    resolved : list of (FamilyModel, list of FamilyModel, str)
        Per element: main family, secondary families, origin (see
        :func:`~xrfnb.fitting.elements.resolve_elements`).
    instrument : Instrument
        Detector response, scatter lines, FWHM.
    calibration : EnergyCalibration
        The data's energy calibration.
    total : numpy.ndarray
        Sum spectrum, counts, shape (channels,): pile-up and background terms are built from it.
    lo, hi : int
        Fitted channel range.
    snip_width_keV : float or None
        SNIP window (default 3 FWHM at mid-range, at least 0.3 keV).
    pileup : bool
        Include the pile-up term.
    free_kb, split_l, fine
        How main families are cut into parts (:func:`~xrfnb.fitting.families.family_parts`; ``fine``
        names the elements whose line ratios are freed).
    hats_fwhm : float, optional
        Add triangular background terms this many FWHMs apart.
    cache : dict, optional
        Templates kept between calls on the same data and instrument (detect_elements refits often).

    Returns
    -------
    Design

    Raises
    ------
    FitError
        When an element's templates put no counts inside the fitted range.
    """
    n_ch = total.size
    energy = calibration.energies_keV(n_ch)
    cache = {} if cache is None else cache
    if "response" not in cache:
        cache["response"] = DetectorResponse(instrument, channel_energy_keV=energy)
    response = cache["response"]
    cols: list[tuple[Column, np.ndarray, np.ndarray | None]] = []
    for main, _, _ in resolved:
        for part, e, w in family_parts(main, free_kb, split_l, main.element in fine, instrument):
            name = f"{main.element} {main.family}" + ("" if part == main.family else f" ({part})")
            templates = _line_templates(cache, response, instrument, energy, e, w)
            cols.append((Column(name, "element", main.element, main.family), *templates))
    for _, secondary, _ in resolved:
        for fm in secondary:
            col = Column(f"{fm.element} {fm.family}", "secondary", fm.element, fm.family)
            templates = _line_templates(cache, response, instrument, energy, fm.energies_keV, fm.weights)
            cols.append((col, *templates))
    if "scatter" not in cache:
        cache["scatter"] = _scatter_columns(instrument, response)
    cols.extend((c, t, None) for c, t in cache["scatter"])
    if pileup:
        if "pileup" not in cache:
            cache["pileup"] = _pileup_column(total, calibration, lo)
        cols.append((Column("pile-up", "pileup"), cache["pileup"], None))
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


def fit_range(
    calibration: EnergyCalibration, n_channels: int, instrument: Instrument,
    energy_range_keV: tuple[float, float] | None,
) -> tuple[int, int, float, float]:
    """Channel slice and energies of the fitted range.

    Parameters
    ----------
    calibration : EnergyCalibration
        The data's calibration.
    n_channels : int
        Channels of the spectra.
    instrument : Instrument
        Gives the default upper end (1 keV above the excitation maximum).
    energy_range_keV : (float, float) or None
        Requested range in keV; default 0.9 keV to the excitation maximum plus 1 keV.

    Returns
    -------
    (int, int, float, float)
        ``lo``, ``hi`` (channels ``[lo, hi)``) and the energies of channels ``lo`` and ``hi - 1``, keV.

    Raises
    ------
    FitError
        A reversed range, or fewer than 20 channels inside it.
    """
    energy = calibration.energies_keV(n_channels)
    if energy_range_keV is None:
        e_lo = 0.9
        e_hi = max_excitation_keV(instrument) + 1.0
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


def scan_blocks(
    scan: Scan, max_pixels: int | None, progress: bool, desc: str, sub: int = 4096
) -> Iterator[tuple[int, np.ndarray]]:
    """The spectra of a scan in blocks of at most ``sub`` pixels, read ``max_pixels`` pixels at a time.

    Parameters
    ----------
    scan : Scan
        The scan (lazy HDF5/dask scans are read block by block).
    max_pixels : int or None
        Pixels read at a time (default ~32 M counts).
    progress : bool
        Show a progress bar (tqdm) over the rows, labelled ``desc``.
    desc : str
        Label of the progress bar.
    sub : int
        Largest block handed out.

    Yields
    ------
    (int, numpy.ndarray)
        Index of the block's first pixel (row-major) and its spectra, shape (n, channels).
    """
    n_ch = scan.n_channels
    cols = scan.shape[1]
    per = max_pixels or max(1024, 2**25 // n_ch)
    with tqdm(total=scan.shape[0], unit="row", desc=desc, disable=not progress) as bar:
        for row_slice, block in scan.iter_blocks(per):
            flat = block.reshape(-1, n_ch)
            base = row_slice.start * cols
            for s in range(0, flat.shape[0], sub):
                yield base + s, flat[s : s + sub]
            bar.update(row_slice.stop - row_slice.start)


def counts_and_kind(data: Spectrum | Scan) -> tuple[str, Spectrum | Scan]:
    """``("spectrum", data)`` or ``("scan", data)``; FitError for anything else (e.g. a bare array)."""
    if isinstance(data, Spectrum):
        return "spectrum", data
    if isinstance(data, Scan):
        return "scan", data
    raise FitError(
        f"expected a Spectrum or a Scan, got {type(data).__name__}: wrap arrays with "
        "xrfnb.Spectrum(counts, calibration) or xrfnb.Scan(counts, calibration)"
    )
