"""Figure builders and small analysis helpers for the notebooks (HoloViews with the Bokeh backend).

Figures
-------
:func:`spectrum_plot` (a spectrum on a keV axis with K/L/M line markers), :func:`probability_plot` (a model's
class probabilities as bars with the decision thresholds), :func:`map_image` and :func:`rgb_image` (maps with
a colour bar, axes in mm when the pixel size is known), :func:`confusion_plot` (a confusion matrix as a heat
map), :func:`score_bars` (grouped bars, e.g. per-class F1 of two methods), :func:`curves_plot` (several
labelled curves) and :func:`resolution_plot` (detector FWHM against energy). Every figure has a title, axis
labels with units and, where it shows more than one thing, a legend. The builders return HoloViews objects;
display them in a notebook (after ``hv.extension("bokeh", inline=True)``) or wrap them in a Panel pane.

Analysis helpers
----------------
:func:`line_markers` (line energies to draw, from xraylib), :func:`presence_scores` and
:func:`confusion_matrix` (scores of multi-label presence maps against ground truth), :func:`fit_peak` and
:func:`fit_resolution` (detector resolution ``FWHM(E)`` from fitted peaks: electronic noise + Fano
statistics), and :func:`demo_model` (the shipped model, or a clearly labelled tiny stand-in trained on the
spot when no model has been shipped yet).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import holoviews as hv
import numpy as np
from numpy.typing import ArrayLike

from .._errors import DataError, FitError, ModelError
from ..core.lines import DEFAULT_LINES, LineMarker, atomic_number, element_lines, parse_line
from ..core.spectrum import Spectrum
from ..model.model import PigmentModel, load_model
from ..model.train import train_model
from ..physics.detector import FWHM_PER_SIGMA

__all__ = [
    "LineMarker",
    "PeakFit",
    "ResolutionFit",
    "confusion_matrix",
    "confusion_plot",
    "curves_plot",
    "demo_model",
    "fit_peak",
    "fit_resolution",
    "line_markers",
    "map_image",
    "pixel_at",
    "presence_scores",
    "probability_plot",
    "resolution_plot",
    "rgb_image",
    "score_bars",
    "spectrum_plot",
]

#: colour of each line family's markers
FAMILY_COLORS = {"K": "#d62728", "L": "#1f77b4", "M": "#2ca02c"}


# ---------------------------------------------------------------------------------------------------------
# line markers
# ---------------------------------------------------------------------------------------------------------
def line_markers(
    elements: Sequence[str],
    e_min_keV: float = 0.0,
    e_max_keV: float = math.inf,
    lines: Sequence[str] = DEFAULT_LINES,
) -> list[LineMarker]:
    """The emission lines of some elements that fall inside an energy range, sorted by energy.

    Parameters
    ----------
    elements : sequence of str
        Chemical symbols.
    e_min_keV, e_max_keV : float
        Energy range, keV.
    lines : sequence of str
        Line groups to consider (``"Ka"``, ``"Kb"``, ``"La"``, ``"Lb"``, ``"Lg"``, ``"Ma"`` ...).
        M lines below 1.5 keV (light elements, not fluorescent in practice) are left out.

    Returns
    -------
    list of LineMarker
        Element, line group, family (``"K"``, ``"L"``, ``"M"``) and energy in keV (xraylib).

    Raises
    ------
    XRFNBError
        Unknown element symbol or line group.
    """
    return sorted(
        (m for el in elements for m in element_lines(el, e_min_keV, e_max_keV, lines)),
        key=lambda m: m.energy_keV,
    )


# ---------------------------------------------------------------------------------------------------------
# scores of presence maps
# ---------------------------------------------------------------------------------------------------------
def _flat_pair(pred: ArrayLike, truth: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape or p.ndim < 1:
        raise DataError(f"predictions {p.shape} and truth {t.shape} must have the same shape (..., K)")
    k = p.shape[-1]
    return p.reshape(-1, k), t.reshape(-1, k)


def presence_scores(
    pred: ArrayLike, truth: ArrayLike, valid: ArrayLike | None = None
) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support of presence decisions against ground truth.

    Parameters
    ----------
    pred, truth : array-like of bool
        Decisions and truth, same shape (..., K) (e.g. (rows, cols, K) maps or (n, K) spectra).
    valid : array-like of bool, optional
        Pixels/spectra to score, shape ``pred.shape[:-1]`` (e.g. the unmasked pixels of a map).

    Returns
    -------
    dict
        ``"precision"``, ``"recall"``, ``"f1"`` (float arrays (K,), NaN where undefined: recall and F1 of a
        class absent from both truth and decisions, precision of a class never called and never present),
        ``"support"`` (int (K,): positives in the truth), ``"tp"``, ``"fp"``, ``"fn"`` (int (K,)).
    """
    p, t = _flat_pair(pred, truth)
    if valid is not None:
        v = np.asarray(valid, dtype=bool).reshape(-1)
        if v.size != p.shape[0]:
            raise DataError(f"valid has {v.size} entries, expected {p.shape[0]}")
        p, t = p[v], t[v]
    tp = (p & t).sum(0)
    fp = (p & ~t).sum(0)
    fn = (~p & t).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.where(fn > 0, 0.0, np.nan))
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    return {
        "precision": precision.astype(float),
        "recall": recall.astype(float),
        "f1": f1.astype(float),
        "support": (tp + fn).astype(int),
        "tp": tp.astype(int),
        "fp": fp.astype(int),
        "fn": fn.astype(int),
    }


def confusion_matrix(
    pred: ArrayLike, truth: ArrayLike, valid: ArrayLike | None = None, *, normalize: bool = True
) -> np.ndarray:
    """Confusion matrix of multi-label presence decisions, one row per true class.

    A pixel can hold several classes, so the classical one-label confusion matrix does not apply. Here
    ``M[i, j]`` counts the pixels where class ``i`` is truly present and class ``j`` is called present;
    the last column counts the pixels where class ``i`` is present and *no* class is called at all.
    The diagonal is the true-positive count; an off-diagonal entry ``(i, j)`` with ``j`` truly absent at
    those pixels is a confusion of ``i`` with ``j``.

    Parameters
    ----------
    pred, truth : array-like of bool
        Same shape (..., K).
    valid : array-like of bool, optional
        Pixels to use, shape ``pred.shape[:-1]``.
    normalize : bool
        Divide each row by the number of pixels where its class is present (rows become fractions; the
        diagonal is the recall). Rows of classes never present are NaN.

    Returns
    -------
    numpy.ndarray
        Shape (K, K + 1), float.
    """
    p, t = _flat_pair(pred, truth)
    if valid is not None:
        v = np.asarray(valid, dtype=bool).reshape(-1)
        p, t = p[v], t[v]
    tf = t.astype(np.float64)
    m = np.empty((t.shape[1], t.shape[1] + 1))
    m[:, :-1] = tf.T @ p.astype(np.float64)
    m[:, -1] = tf.T @ (~p.any(axis=1)).astype(np.float64)
    # only count a called class j != i as a confusion where j is truly absent (else it is a correct call)
    wrong = tf.T @ (p & ~t).astype(np.float64)
    off = ~np.eye(t.shape[1], dtype=bool)
    m[:, :-1][off] = wrong[off]
    if normalize:
        support = tf.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            m = np.where(support[:, None] > 0, m / np.maximum(support[:, None], 1), np.nan)
    return m


# ---------------------------------------------------------------------------------------------------------
# detector resolution
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PeakFit:
    """A line group fitted in a spectrum by :func:`fit_peak`.

    Attributes
    ----------
    line : str
        The line group (``"Fe Ka"``).
    energy_keV : float
        Reference energy of the group (radiative-rate weighted mean, xraylib), keV.
    shift_keV : float
        Fitted position minus reference position, keV (a calibration error shows here).
    fwhm_keV : float
        Fitted detector FWHM at this energy, keV.
    fwhm_sigma_keV : float
        1-sigma uncertainty of ``fwhm_keV``, keV.
    area_counts : float
        Net peak area, counts.
    reduced_chi2 : float
        Chi-square per degree of freedom of the fit (Poisson weights).
    """

    line: str
    energy_keV: float
    shift_keV: float
    fwhm_keV: float
    fwhm_sigma_keV: float
    area_counts: float
    reduced_chi2: float


def _members(line: str) -> tuple[np.ndarray, np.ndarray]:
    """Energies (keV) and relative radiative rates of the member lines of a group."""
    import xraylib

    element, members = parse_line(line)
    z = atomic_number(element)
    energies, rates = [], []
    for iupac in members:
        macro = getattr(xraylib, f"{iupac}_LINE")
        try:
            e = xraylib.LineEnergy(z, macro)
            r = xraylib.RadRate(z, macro)
        except ValueError:
            continue
        if e > 0 and r > 0:
            energies.append(e)
            rates.append(r)
    if not energies:
        raise FitError(f"{line}: xraylib has no member lines for this group")
    r = np.asarray(rates)
    return np.asarray(energies), r / r.sum()


def fit_peak(
    spectrum: Spectrum,
    line: str,
    *,
    fwhm_guess_keV: float = 0.15,
    window_fwhm: float = 1.5,
    min_counts: float = 50.0,
) -> PeakFit:
    """Fit one line group of a calibrated spectrum: Gaussians of one common width on a linear background.

    The group's member lines (e.g. Ka1 and Ka2) keep their xraylib energy differences and radiative-rate
    ratios, so the fitted width is the detector's, not the line splitting's. Free parameters: area, a
    common shift, the FWHM and a linear background over ``+/- window_fwhm x fwhm_guess_keV`` around the
    members. Weights are Poisson (``1 / max(counts, 1)``).

    Parameters
    ----------
    spectrum : Spectrum
        A calibrated spectrum (``counts`` (channels,), ``energy_keV`` (channels,)).
    line : str
        Line group, ``"Fe Ka"``, ``"Pb La"``.
    fwhm_guess_keV : float
        Starting FWHM, keV; also sets the fit window.
    window_fwhm : float
        Half width of the fit window beyond the outermost members, in units of ``fwhm_guess_keV``.
    min_counts : float
        Smallest net area accepted.

    Returns
    -------
    PeakFit

    Raises
    ------
    FitError
        Window outside the spectrum, too few counts, or a fit that does not converge.
    """
    from scipy.optimize import curve_fit

    counts = np.asarray(spectrum.counts, dtype=float)
    energy = np.asarray(spectrum.energy_keV, dtype=float)
    e_mem, w_mem = _members(line)
    ref = float(np.sum(e_mem * w_mem))
    half = window_fwhm * fwhm_guess_keV
    sel = (energy >= e_mem.min() - half) & (energy <= e_mem.max() + half)
    if sel.sum() < 8:
        raise FitError(f"{line} at {ref:.3f} keV: fewer than 8 channels of the spectrum in the fit window")
    x, y = energy[sel], counts[sel]
    de = float(np.median(np.diff(energy)))

    def model(xx: np.ndarray, area: float, shift: float, fwhm: float, b0: float, b1: float) -> np.ndarray:
        s = abs(fwhm) / FWHM_PER_SIGMA
        g = np.exp(-0.5 * ((xx[:, None] - (e_mem[None, :] + shift)) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        return area * de * (g @ w_mem) + b0 + b1 * (xx - ref)

    edge = np.concatenate([y[:3], y[-3:]])
    b0 = max(float(np.median(edge)), 0.0)
    area0 = max(float((y - b0).sum()), 1.0)
    p0 = [area0, 0.0, fwhm_guess_keV, b0, 0.0]
    sigma = np.sqrt(np.maximum(y, 1.0))
    try:
        popt, pcov = curve_fit(
            model, x, y, p0=p0, sigma=sigma, absolute_sigma=True, max_nfev=2000,
            bounds=([0.0, -half, 0.02, -np.inf, -np.inf], [np.inf, half, 1.0, np.inf, np.inf]),
        )
    except (RuntimeError, ValueError) as exc:
        raise FitError(f"{line}: the peak fit did not converge ({exc})") from None
    area, shift, fwhm = float(popt[0]), float(popt[1]), abs(float(popt[2]))
    err = np.sqrt(np.abs(np.diag(pcov))) if np.all(np.isfinite(pcov)) else np.full(len(popt), np.inf)
    at_bound = fwhm <= 0.0201 or fwhm >= 0.999 or abs(shift) >= 0.999 * half
    # a real peak: significant area, a width known to 20 %, and where the calibration puts it
    weak = area < min_counts or area < 5.0 * err[0] or err[2] > 0.2 * fwhm
    misplaced = abs(shift) > 0.5 * fwhm_guess_keV
    if at_bound or weak or misplaced:
        raise FitError(
            f"{line}: no usable peak near {ref:.3f} keV (area {area:.0f} counts, FWHM {1000 * fwhm:.0f} eV, "
            f"shift {1000 * shift:.0f} eV): check the calibration, or choose a stronger, isolated line"
        )
    resid = (y - model(x, *popt)) / sigma
    dof = max(1, x.size - len(popt))
    return PeakFit(line, ref, shift, fwhm, float(err[2]), area, float(np.sum(resid**2) / dof))


@dataclasses.dataclass(frozen=True)
class ResolutionFit:
    """Detector resolution ``FWHM(E) = sqrt(noise^2 + 8 ln2 * fano * w * E)`` fitted to peak widths.

    Attributes
    ----------
    noise_keV : float
        Electronic-noise FWHM, keV.
    fano : float
        Fano factor.
    pair_energy_eV : float
        Energy per electron-hole pair used in the fit, eV.
    energies_keV, fwhm_keV, fwhm_sigma_keV : numpy.ndarray
        The fitted peaks: energies, FWHM and their uncertainties, shape (n,), keV.
    lines : tuple of str
        Names of the peaks.
    """

    noise_keV: float
    fano: float
    pair_energy_eV: float
    energies_keV: np.ndarray
    fwhm_keV: np.ndarray
    fwhm_sigma_keV: np.ndarray
    lines: tuple[str, ...] = ()

    def fwhm_at(self, energy_keV: ArrayLike) -> np.ndarray:
        """Fitted FWHM in keV at ``energy_keV`` (any shape)."""
        e = np.maximum(np.asarray(energy_keV, dtype=float), 0.0)
        return np.sqrt(self.noise_keV**2 + FWHM_PER_SIGMA**2 * self.fano * self.pair_energy_eV * 1e-3 * e)

    @property
    def residuals_keV(self) -> np.ndarray:
        """Measured minus fitted FWHM per peak, keV, shape (n,)."""
        return self.fwhm_keV - self.fwhm_at(self.energies_keV)


def fit_resolution(
    peaks: Sequence[PeakFit] | None = None,
    *,
    energies_keV: ArrayLike | None = None,
    fwhm_keV: ArrayLike | None = None,
    fwhm_sigma_keV: ArrayLike | None = None,
    pair_energy_eV: float = 3.64,
    fano: float | None = None,
) -> ResolutionFit:
    """Fit electronic noise and Fano factor to peak widths measured at several energies.

    ``FWHM^2 = noise^2 + (8 ln 2) * fano * w * E`` is linear in ``(noise^2, fano)``, so this is a weighted
    linear least-squares fit (weights from the FWHM uncertainties), constrained to ``noise^2 >= 0`` and
    ``fano > 0``. Over a narrow energy range (highest / lowest energy below ~2) the two parameters are
    strongly correlated; then fix the Fano factor (silicon: 0.11-0.12) and fit only the noise.

    Parameters
    ----------
    peaks : sequence of PeakFit, optional
        Peaks from :func:`fit_peak` (or give the arrays below).
    energies_keV, fwhm_keV : array-like, optional
        Energies and FWHM, keV, shape (n,), n >= 2.
    fwhm_sigma_keV : array-like, optional
        Uncertainties of ``fwhm_keV``; default equal weights.
    pair_energy_eV : float
        Mean energy per electron-hole pair in Si, eV (3.64 at room temperature; PyMca uses 3.85).
    fano : float, optional
        Keep the Fano factor at this value and fit only the noise (one peak is then enough).

    Returns
    -------
    ResolutionFit

    Raises
    ------
    FitError
        Fewer than two peaks at distinct energies, or widths no silicon detector can have.
    """
    from scipy.optimize import lsq_linear

    if peaks is not None:
        lines = tuple(p.line for p in peaks)
        e = np.array([p.energy_keV + p.shift_keV for p in peaks], dtype=float)
        f = np.array([p.fwhm_keV for p in peaks], dtype=float)
        s = np.array([p.fwhm_sigma_keV for p in peaks], dtype=float)
    else:
        if energies_keV is None or fwhm_keV is None:
            raise FitError("fit_resolution needs peaks, or energies_keV and fwhm_keV")
        e = np.asarray(energies_keV, dtype=float).reshape(-1)
        f = np.asarray(fwhm_keV, dtype=float).reshape(-1)
        s = np.ones_like(f) if fwhm_sigma_keV is None else np.asarray(fwhm_sigma_keV, dtype=float).reshape(-1)
        lines = ()
    if e.size != f.size or e.size != s.size:
        raise FitError(
            f"energies ({e.size}), widths ({f.size}) and uncertainties ({s.size}) differ in length"
        )
    if np.unique(np.round(e, 3)).size < (1 if fano is not None else 2):
        raise FitError("fit_resolution needs peaks at two or more distinct energies (or a fixed fano)")
    if not (np.all(np.isfinite(f)) and np.all(f > 0) and np.all(np.isfinite(e))):
        raise FitError("peak widths and energies must be finite and positive")
    ok = np.isfinite(s) & (s > 0)
    s = np.where(ok, s, float(np.median(s[ok])) if ok.any() else 1.0)
    # FWHM^2 = a + b E with a = noise^2, b = 8 ln2 fano w; sigma(FWHM^2) = 2 FWHM sigma(FWHM)
    w = 1.0 / (2.0 * f * s)
    per_fano = FWHM_PER_SIGMA**2 * pair_energy_eV * 1e-3
    if fano is not None:
        fano = float(fano)
        if not 0.01 <= fano <= 1.0:
            raise FitError(f"fixed Fano factor must be 0.01-1 (silicon: ~0.114), got {fano}")
        y = f**2 - per_fano * fano * e  # = noise^2
        a = max(float(np.sum(w**2 * y) / np.sum(w**2)), 0.0)
        return ResolutionFit(math.sqrt(a), fano, float(pair_energy_eV), e, f, s, lines)
    design = np.stack([np.ones_like(e), e], axis=1) * w[:, None]
    res = lsq_linear(design, f**2 * w, bounds=([0.0, 1e-12], [np.inf, np.inf]))
    a, b = (float(v) for v in res.x)
    fano = b / per_fano
    if not 0.01 <= fano <= 1.0:
        raise FitError(
            f"the peak widths give a Fano factor of {fano:.3g}, outside 0.01-1 (silicon: ~0.114): "
            "check the peaks (overlapping lines widen a peak) and the calibration"
        )
    return ResolutionFit(math.sqrt(a), fano, float(pair_energy_eV), e, f, s, lines)


# ---------------------------------------------------------------------------------------------------------
# the model for the notebooks
# ---------------------------------------------------------------------------------------------------------
#: training settings of the tiny stand-in model (seconds on a 2-core CPU; for demonstrations only)
TINY_TRAINING: dict[str, Any] = {
    "model": {"n_bins": 256, "conv_channels": 4, "hidden": [64], "dropout": 0.0},
    "data": {"instruments": ["bruker-m6"], "instrument_weights": [1.0], "n_instrument_variants": 2},
    "optim": {"batch_size": 64, "max_steps": 80, "time_budget_min": 0.3, "n_val": 256, "workers": 0,
              "threads": 1, "checkpoint_every": 100000, "lr": 3e-3},
}


def demo_model(
    cache_dir: str | os.PathLike, *, name: str = "default", progress: bool = False
) -> tuple[PigmentModel, str]:
    """The model for a demonstration: the shipped one when it exists, else a tiny stand-in trained here.

    Parameters
    ----------
    cache_dir : path
        Folder for the stand-in (``cache_dir/xrfnb-tiny-demo``); an earlier one found there is reused.
    name : str
        Model to try first (:func:`xrfnb.load_model`).
    progress : bool
        Show the training progress bar.

    Returns
    -------
    model : PigmentModel
    note : str
        One sentence saying which model this is; for the stand-in, that its results are not representative.
    """
    try:
        model = load_model(name)
    except ModelError:
        pass
    else:
        return model, f"using the model {model.name!r} ({len(model.classes)} pigment classes)"
    folder = Path(cache_dir) / "xrfnb-tiny-demo"
    note = (
        f"no trained model {name!r} is installed, so this notebook uses a TINY stand-in model trained in "
        "seconds on simulated spectra ({folder}); its maps are rough and NOT representative of xrfnb"
    )
    if (folder / "model.json").is_file() and (folder / "model.safetensors").is_file():
        return load_model(folder), note.format(folder=folder)
    cfg = {"name": "xrfnb-tiny-demo", **TINY_TRAINING}
    model = train_model(cfg, folder, progress=progress)
    return model, note.format(folder=folder)


# ---------------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------------
def spectrum_plot(
    spectrum: Spectrum,
    *,
    elements: Sequence[str] = (),
    lines: Sequence[str] = DEFAULT_LINES,
    energy_range_keV: tuple[float, float] | None = None,
    log_y: bool = True,
    title: str | None = None,
    label: str = "spectrum",
    model_counts: ArrayLike | None = None,
    model_label: str = "fit",
    width: int = 700,
    height: int = 320,
) -> hv.Overlay:
    """A spectrum on a keV axis with markers at the K, L and M lines of some elements.

    Parameters
    ----------
    spectrum : Spectrum
        Counts (channels,) and calibration.
    elements : sequence of str
        Elements whose lines to mark (one marker colour per family K, L, M; hover shows the line).
    lines : sequence of str
        Line groups to mark.
    energy_range_keV : (float, float), optional
        Energy range shown; default 1 keV (air absorbs lower energies) to the end of the spectrum (at most
        40 keV).
    log_y : bool
        Logarithmic counts axis (counts + 1 are plotted so empty channels show).
    title : str, optional
        Plot title (default from the spectrum's metadata).
    label : str
        Legend entry of the spectrum.
    model_counts : array-like, optional
        A second curve (e.g. a fit or a simulated spectrum), shape (channels,).
    model_label : str
        Its legend entry.
    width, height : int
        Size in screen pixels.

    Returns
    -------
    holoviews.Overlay
    """
    counts = np.asarray(spectrum.counts, dtype=float)
    energy = np.asarray(spectrum.energy_keV, dtype=float)
    lo, hi = energy_range_keV or (max(1.0, float(energy[0])), min(40.0, float(energy[-1])))
    sel = (energy >= lo) & (energy <= hi)
    shift = 1.0 if log_y else 0.0
    kdim = hv.Dimension("energy", label="Energy", unit="keV")
    vdim = hv.Dimension("counts", label="Counts + 1" if log_y else "Counts", unit="counts/channel")
    if title is None:
        meta = getattr(spectrum, "metadata", {}) or {}
        where = meta.get("pixel")
        src = str(meta.get("source", "spectrum"))
        title = f"{src}" + (f", pixel {tuple(where)}" if where is not None else "")
    curve = hv.Curve((energy[sel], counts[sel] + shift), kdim, vdim, label=label).opts(
        color="black", line_width=1
    )
    layers = [curve]
    if model_counts is not None:
        mc = np.asarray(model_counts, dtype=float)
        if mc.shape != counts.shape:
            raise DataError(f"model_counts has shape {mc.shape}, expected {counts.shape}")
        layers.append(
            hv.Curve((energy[sel], mc[sel] + shift), kdim, vdim, label=model_label).opts(
                color="#ff7f0e", line_width=1.5
            )
        )
    top = float(counts[sel].max() + shift) if sel.any() else 1.0
    bottom = 0.8 if log_y else 0.0
    markers = line_markers(elements, lo, hi, lines) if elements else []
    # marker lines from the axis floor to above the highest peak; labels above them, one height per family
    height_of = {"K": 2.2, "L": 1.6, "M": 1.25} if log_y else {"K": 1.12, "L": 1.07, "M": 1.02}
    for family in ("K", "L", "M"):
        fam = [m for m in markers if m.family == family]
        if not fam:
            continue
        y_top = top * height_of[family]
        seg = hv.Segments(
            {"energy": [m.energy_keV for m in fam], "counts": [bottom] * len(fam),
             "energy_end": [m.energy_keV for m in fam], "counts_end": [y_top] * len(fam),
             "line": [m.label for m in fam]},
            [kdim, vdim, "energy_end", "counts_end"], ["line"], label=f"{family} lines",
        ).opts(color=FAMILY_COLORS[family], line_width=1.2, line_dash="dashed", alpha=0.7, tools=["hover"])
        text = hv.Labels(
            {"energy": [m.energy_keV for m in fam], "counts": [y_top] * len(fam),
             "line": [m.label for m in fam]},
            [kdim, vdim], "line",
        ).opts(text_font_size="8pt", text_color=FAMILY_COLORS[family], angle=90, text_align="left",
               text_baseline="middle")
        layers += [seg, text]
    overlay = hv.Overlay(layers).opts(
        title=title, width=width, height=height, logy=log_y, legend_position="top_right", show_legend=True,
        ylim=(bottom, top * (12.0 if log_y else 1.35)), xlim=(lo, hi),
    )
    return overlay


def probability_plot(
    classes: Sequence[str],
    probability: ArrayLike,
    thresholds: ArrayLike,
    *,
    colors: Sequence[str] | None = None,
    top: int | None = 12,
    title: str = "Pigment class probabilities",
    width: int = 640,
    height: int = 380,
) -> hv.Overlay:
    """Horizontal bars of class probabilities with each class's decision threshold marked.

    Parameters
    ----------
    classes : sequence of str
        Class names (K).
    probability, thresholds : array-like
        Shape (K,), in [0, 1].
    colors : sequence of str, optional
        Bar colour per class (``"#rrggbb"``).
    top : int, optional
        Show only the ``top`` most probable classes (None: all).
    title : str
        Plot title.

    Returns
    -------
    holoviews.Overlay
        Bars (legend "probability") and threshold markers (legend "threshold").
    """
    p = np.asarray(probability, dtype=float).reshape(-1)
    t = np.broadcast_to(np.asarray(thresholds, dtype=float), p.shape)
    k = len(classes)
    if p.size != k:
        raise DataError(f"{p.size} probabilities for {k} classes")
    order = np.argsort(-np.nan_to_num(p, nan=-1.0), kind="stable")
    if top is not None:
        order = order[: int(top)]
    order = order[::-1]  # most probable on top of a horizontal bar chart
    cols = list(colors) if colors is not None else ["#4c72b0"] * k
    names = [classes[i] for i in order]
    cdim = hv.Dimension("pigment class")
    pdim = hv.Dimension("probability", label="Probability", unit="0-1", range=(0, 1))
    bars = hv.Bars(
        {"pigment class": names, "probability": p[order], "color": [cols[i] for i in order],
         "called": ["present" if p[i] >= t[i] else "absent" for i in order]},
        cdim, [pdim, "color", "called"], label="probability",
    ).opts(color="color", line_color="black", tools=["hover"], invert_axes=True)
    thr = hv.Scatter(
        {"pigment class": names, "probability": t[order]}, cdim, pdim, label="threshold"
    ).opts(marker="dash", size=18, color="black", angle=90, line_width=2)
    return hv.Overlay([bars, thr]).opts(
        title=title, width=width, height=height, legend_position="bottom_right", show_legend=True
    )


def _bounds(shape: tuple[int, int], pixel_size_um: float | None) -> tuple[tuple[float, ...], str]:
    rows, cols = shape
    if pixel_size_um:
        mm = pixel_size_um / 1000.0
        return (0.0, 0.0, cols * mm, rows * mm), "mm"
    return (0.0, 0.0, float(cols), float(rows)), "pixel"


def pixel_at(
    x: float, y: float, shape: tuple[int, int], pixel_size_um: float | None = None
) -> tuple[int, int]:
    """The (row, col) of the pixel under plot coordinates ``(x, y)`` of :func:`map_image` (e.g. a tap).

    Parameters
    ----------
    x, y : float
        Plot coordinates, mm when ``pixel_size_um`` is given, else pixels; y grows upwards and row 0 is
        at the top of the image.
    shape : (int, int)
        (rows, cols) of the map.
    pixel_size_um : float, optional
        Pixel pitch, um.

    Returns
    -------
    (int, int)
        Row and column, clipped to the map.
    """
    rows, cols = (int(v) for v in shape)
    step = pixel_size_um / 1000.0 if pixel_size_um else 1.0
    col = int(np.clip(math.floor(float(x) / step), 0, cols - 1))
    row = int(np.clip(math.floor(rows - float(y) / step), 0, rows - 1))
    return row, col


def map_image(
    values: ArrayLike,
    *,
    title: str,
    clabel: str,
    cmap: str = "viridis",
    pixel_size_um: float | None = None,
    clim: tuple[float, float] | None = None,
    width: int = 360,
    height: int = 320,
) -> hv.Image:
    """A map (rows, cols) as an image with a colour bar; row 0 at the top, as the scan was taken.

    Parameters
    ----------
    values : array-like
        Shape (rows, cols); NaN (masked pixels) shows transparent.
    title : str
        Plot title.
    clabel : str
        Colour-bar label with its unit, e.g. ``"probability (0-1)"`` or ``"Pb L net counts"``.
    cmap : str
        Colour map name.
    pixel_size_um : float, optional
        Pixel pitch; the axes are then in mm, else in pixels.
    clim : (float, float), optional
        Colour range.

    Returns
    -------
    holoviews.Image
        Key dimensions ``x`` and ``y`` (mm or pixel), value dimension ``value``.
    """
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 2:
        raise DataError(f"a map must have shape (rows, cols), got {arr.shape}")
    bounds, unit = _bounds(arr.shape, pixel_size_um)
    img = hv.Image(
        arr,
        kdims=[hv.Dimension("x", label="x", unit=unit), hv.Dimension("y", label="y", unit=unit)],
        vdims=[hv.Dimension("value", label=clabel)],
        bounds=bounds,
    )
    opts: dict[str, Any] = {
        "title": title, "cmap": cmap, "colorbar": True, "clabel": clabel, "tools": ["hover"],
        "frame_width": int(0.7 * width), "aspect": arr.shape[1] / arr.shape[0],
    }
    if clim is not None:
        opts["clim"] = clim
    return img.opts(**{k: v for k, v in opts.items() if v is not None})


def rgb_image(
    rgb: ArrayLike,
    *,
    title: str,
    pixel_size_um: float | None = None,
    legend: Mapping[str, str] | None = None,
    width: int = 420,
    height: int = 320,
) -> hv.RGB:
    """An RGB composite (rows, cols, 3) uint8 (e.g. :meth:`PigmentMaps.composite_rgb`), with a colour key.

    Parameters
    ----------
    rgb : array-like
        Shape (rows, cols, 3), uint8.
    title : str
        Plot title.
    pixel_size_um : float, optional
        Pixel pitch (axes in mm), else pixels.
    legend : mapping of str to str, optional
        Name -> ``"#rrggbb"`` shown as the legend (the colours of the composite).

    Returns
    -------
    holoviews.RGB or holoviews.Overlay
    """
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"an RGB composite must have shape (rows, cols, 3), got {arr.shape}")
    bounds, unit = _bounds(arr.shape[:2], pixel_size_um)
    kd = [hv.Dimension("x", label="x", unit=unit), hv.Dimension("y", label="y", unit=unit)]
    frame = {"frame_width": int(0.75 * width), "aspect": arr.shape[1] / arr.shape[0]}
    img = hv.RGB(arr, kdims=kd, bounds=bounds).opts(title=title, **frame)
    if not legend:
        return img
    # points at NaN (not drawn) carry the legend entries, one per colour
    keys = [
        hv.Points([(np.nan, np.nan)], kd, label=name).opts(color=color, size=10, line_color="black")
        for name, color in legend.items()
    ]
    return hv.Overlay([img, *keys]).opts(title=title, legend_position="right", show_legend=True, **frame)


def confusion_plot(
    matrix: ArrayLike,
    true_classes: Sequence[str],
    called_classes: Sequence[str],
    *,
    title: str,
    clabel: str = "fraction of the pixels where the true class is present",
    width: int | None = None,
    height: int | None = None,
) -> hv.HeatMap:
    """A confusion matrix (e.g. from :func:`confusion_matrix`) as a heat map with a colour bar.

    Parameters
    ----------
    matrix : array-like
        Shape (len(true_classes), len(called_classes)).
    true_classes, called_classes : sequence of str
        Row and column names.
    title, clabel : str
        Title and colour-bar label.

    Returns
    -------
    holoviews.HeatMap
    """
    m = np.asarray(matrix, dtype=float)
    if m.shape != (len(true_classes), len(called_classes)):
        raise DataError(f"matrix {m.shape} does not match {len(true_classes)} x {len(called_classes)} names")
    # room for the long class names: about 26 screen pixels per row and column
    width = width or 420 + 26 * len(called_classes)
    height = height or 260 + 26 * len(true_classes)
    rows = [
        (str(c), str(t), float(m[i, j]))
        for i, t in enumerate(true_classes)
        for j, c in enumerate(called_classes)
    ]
    return hv.HeatMap(
        rows,
        [hv.Dimension("called", label="Called class"), hv.Dimension("true", label="True class")],
        [hv.Dimension("fraction", label=clabel)],
    ).opts(
        title=title, cmap="Blues", colorbar=True, clabel=clabel, xrotation=60, width=width, height=height,
        tools=["hover"], invert_yaxis=True, clim=(0.0, max(1.0, float(np.nanmax(m, initial=0.0)))),
    )


def score_bars(
    classes: Sequence[str],
    scores: Mapping[str, ArrayLike],
    *,
    title: str,
    ylabel: str = "F1 score",
    unit: str = "0-1",
    width: int = 760,
    height: int = 360,
) -> hv.Bars:
    """Grouped bars: one group per class, one bar per method (legend: the methods).

    Parameters
    ----------
    classes : sequence of str
        Class names (K).
    scores : mapping of str to array-like
        Method -> scores (K,); NaN entries (undefined) are left out.
    title, ylabel, unit : str
        Title, value axis label and its unit.

    Returns
    -------
    holoviews.Bars
    """
    rows = []
    for method, vals in scores.items():
        v = np.asarray(vals, dtype=float).reshape(-1)
        if v.size != len(classes):
            raise DataError(f"{method}: {v.size} scores for {len(classes)} classes")
        rows += [(str(c), str(method), float(x)) for c, x in zip(classes, v, strict=True) if np.isfinite(x)]
    return hv.Bars(
        rows,
        [hv.Dimension("class", label="Pigment class"), hv.Dimension("method", label="Method")],
        hv.Dimension("score", label=ylabel, unit=unit, range=(0, 1)),
    ).opts(
        title=title, width=width, height=height, xrotation=60, multi_level=False, show_legend=True,
        color="method", cmap="Category10", legend_position="top_right", tools=["hover"],
    )


def curves_plot(
    x: ArrayLike,
    curves: Mapping[str, ArrayLike],
    *,
    title: str,
    xlabel: str,
    xunit: str,
    ylabel: str,
    yunit: str,
    logx: bool = False,
    logy: bool = False,
    markers: bool = True,
    width: int = 600,
    height: int = 340,
) -> hv.Overlay:
    """Several labelled curves (lines, with points unless ``markers=False``) over one x axis, with a legend.

    Parameters
    ----------
    x : array-like
        Shape (n,).
    curves : mapping of str to array-like
        Legend label -> y values, shape (n,).
    title, xlabel, xunit, ylabel, yunit : str
        Title, axis labels and their units.
    logx, logy : bool
        Logarithmic axes.

    Returns
    -------
    holoviews.Overlay
    """
    xv = np.asarray(x, dtype=float).reshape(-1)
    xd = hv.Dimension("x", label=xlabel, unit=xunit)
    yd = hv.Dimension("y", label=ylabel, unit=yunit)
    layers = []
    palette = hv.Cycle.default_cycles.get("default_colors", None) or [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    ]
    for i, (name, yv) in enumerate(curves.items()):
        y = np.asarray(yv, dtype=float).reshape(-1)
        if y.size != xv.size:
            raise DataError(f"curve {name!r} has {y.size} values for {xv.size} x values")
        color = palette[i % len(palette)]
        layers.append(hv.Curve((xv, y), xd, yd, label=str(name)).opts(color=color, line_width=2))
        if markers:
            layers.append(hv.Scatter((xv, y), xd, yd, label=str(name)).opts(color=color, size=6))
    return hv.Overlay(layers).opts(
        title=title, width=width, height=height, logx=logx, logy=logy, legend_position="right",
        show_legend=True,
    )


def resolution_plot(
    fit: ResolutionFit,
    *,
    title: str = "Detector resolution",
    reference: Mapping[str, tuple[float, float, float]] | None = None,
    e_max_keV: float | None = None,
) -> hv.Overlay:
    """Measured peak FWHM against energy with the fitted noise + Fano curve (and optional reference curves).

    Parameters
    ----------
    fit : ResolutionFit
        From :func:`fit_resolution`.
    title : str
        Plot title.
    reference : mapping of str to (noise_keV, fano, pair_energy_eV), optional
        Further curves to compare with, e.g. a PyMca configuration or an instrument preset.
    e_max_keV : float, optional
        Right end of the curves (default: 1.2 x the highest peak energy).

    Returns
    -------
    holoviews.Overlay
    """
    e_hi = e_max_keV or 1.2 * float(np.max(fit.energies_keV))
    grid = np.linspace(0.5, e_hi, 200)
    ed = hv.Dimension("energy", label="Energy", unit="keV")
    fd = hv.Dimension("fwhm", label="FWHM", unit="eV")
    layers = [
        hv.Curve(
            (grid, 1000 * fit.fwhm_at(grid)), ed, fd,
            label=f"fit: noise {1000 * fit.noise_keV:.0f} eV, Fano {fit.fano:.3f}",
        ).opts(color="#d62728", line_width=2)
    ]
    for name, (noise, fano, w) in (reference or {}).items():
        ref = np.sqrt(noise**2 + FWHM_PER_SIGMA**2 * fano * w * 1e-3 * grid)
        layers.append(hv.Curve((grid, 1000 * ref), ed, fd, label=name).opts(line_dash="dashed", line_width=2))
    pts = hv.ErrorBars(
        (fit.energies_keV, 1000 * fit.fwhm_keV, 1000 * np.nan_to_num(fit.fwhm_sigma_keV)), ed, [fd, "err"]
    ).opts(color="black")
    scat = hv.Scatter((fit.energies_keV, 1000 * fit.fwhm_keV), ed, fd, label="fitted peaks").opts(
        color="black", size=7
    )
    labels = hv.Labels(
        {"energy": fit.energies_keV, "fwhm": 1000 * fit.fwhm_keV,
         "line": list(fit.lines or [""] * fit.energies_keV.size)},
        [ed, fd], "line",
    ).opts(text_font_size="8pt", yoffset=4, text_align="left")
    return hv.Overlay([*layers, pts, scat, labels]).opts(
        title=title, width=620, height=360, legend_position="top_left", show_legend=True
    )
