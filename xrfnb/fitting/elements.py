"""Element maps by a fast linear fit: :class:`ElementMaps` and :func:`fit_elements`.

This is the "expert" route from spectra to elements, the one conservators use today (PyMca's fast
linear fit, Bruker's element maps): non-negative linear least squares over line-family templates built
from the detector response, plus scatter and background terms, solved for every pixel of a scan with one
design matrix (block by block, bounded memory). The rest of the route lives beside it:
:func:`~xrfnb.fitting.background.snip_background`, :func:`~xrfnb.fitting.detect.detect_elements` and
:func:`~xrfnb.fitting.roi.roi_maps`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import FitError
from ..core.lines import atomic_number
from ..core.spectrum import Scan, Spectrum
from ..physics.instrument import Instrument
from .design import counts_and_kind, fit_range, make_design, scan_blocks
from .detect import DetectedElement, detect_elements, parse_element
from .families import (
    FAMILIES,
    FamilyModel,
    choose_family,
    describe_families,
    edge_keV,
    family_model,
    max_excitation_keV,
)
from .solvers import Projector, fit_one, nnls_batch

__all__ = ["ElementMaps", "fit_elements", "resolve_elements"]

#: smallest model value (counts) a channel's chi-square divides by
_CHI2_FLOOR = 0.01


@dataclasses.dataclass(frozen=True, eq=False)
class ElementMaps:
    """Per-pixel element intensities from :func:`fit_elements` or :func:`~xrfnb.fitting.roi.roi_maps`.

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


def resolve_elements(
    elements: str | Sequence[str | DetectedElement], instrument: Instrument, e_lo: float, e_hi: float,
    matrix: str | None = None,
) -> list[tuple[FamilyModel, list[FamilyModel], str]]:
    """The line families to fit for requested elements.

    Parameters
    ----------
    elements : str or sequence of str or DetectedElement
        ``"Fe"`` (family chosen by :func:`~xrfnb.fitting.families.choose_family`), ``"Pb L"`` or
        elements found by :func:`~xrfnb.fitting.detect.detect_elements`.
    instrument : Instrument
        Decides which families are excited.
    e_lo, e_hi : float
        Fitted range, keV: a family counts when its main line lies inside.
    matrix : str, optional
        Thick-sample formula for the line ratios (:func:`~xrfnb.fitting.families.family_model`).

    Returns
    -------
    list of (FamilyModel, list of FamilyModel, str)
        Per element: main family, the other usable families with at least 1e-3 of its yield, and the
        origin (``"setup"`` for argon or a detected setup element, else ``"sample"``).

    Raises
    ------
    FitError
        An empty list, an element listed twice, an unreadable name, or an element (family) that is not
        excited or lies outside the fitted range.
    """
    if isinstance(elements, str):
        elements = [elements]
    entries = list(elements)
    if not entries:
        raise FitError("the element list is empty: name at least one element (e.g. ['Fe', 'Pb']) or pass "
                       "elements=None to detect them")
    e_max = max_excitation_keV(instrument)
    out: list[tuple[FamilyModel, list[FamilyModel], str]] = []
    seen: set[str] = set()
    for entry in entries:
        symbol, family = parse_element(entry)
        if symbol in seen:
            raise FitError(f"element {symbol} is listed twice: give each element once (one family each)")
        seen.add(symbol)
        z = atomic_number(symbol)
        usable = {}
        for fam in FAMILIES:
            fm = family_model(z, fam, instrument, matrix)
            if fm is not None and e_lo <= fm.main_energy_keV <= e_hi:
                usable[fam] = fm
        name = getattr(instrument, "name", "the instrument")
        if family is not None:
            if family not in usable:
                fm = family_model(z, family, instrument, matrix)
                if fm is None:
                    raise FitError(
                        f"{symbol} {family} lines are not excited by {name!r}: the {symbol} {family} edge "
                        f"({edge_keV(z, family):.2f} keV) is above the excitation energy ({e_max:g} keV)"
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
                    f"({describe_families(z)})"
                )
            main = choose_family(list(usable.values()), e_max)
        secondary = [
            f for f in usable.values() if f is not main and f.relative_yield > 1e-3 * main.relative_yield
        ]
        origin = "setup" if symbol == "Ar" else "sample"
        if isinstance(entry, DetectedElement):
            origin = entry.origin
        out.append((main, secondary, origin))
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class _PixelSolver:
    """The per-pixel part of :func:`fit_elements`: one shared projector for every block of pixels.

    Attributes
    ----------
    proj : Projector
        Weighted least-squares projector of the sum fit's design and weights.
    GR, GR_own : numpy.ndarray
        Variance matrices of the reported element sums, shape (k, n_el) (:meth:`Projector.report`).
    Rm : numpy.ndarray
        Membership of the terms in each reported element, shape (n_el, k), 0/1.
    A32 : numpy.ndarray
        The design matrix, shape (n_range, k), float32.
    dof : int
        Degrees of freedom of the chi-square.
    """

    proj: Projector
    GR: np.ndarray
    GR_own: np.ndarray
    Rm: np.ndarray
    A32: np.ndarray
    dof: int

    def solve(
        self, Y: np.ndarray, exact: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Fit a block of spectra ``Y`` (n, n_range), counts; ``exact`` (k,) gives a single spectrum's NNLS.

        Returns
        -------
        intensity, sigma, detection_limit : numpy.ndarray
            Shape (n, n_el), counts.
        chi2 : numpy.ndarray
            Reduced chi-square, shape (n,).
        residual : numpy.ndarray
            Data minus model summed over the block, shape (n_range,), float64.
        """
        proj = self.proj
        Yf = Y.astype(np.float32, copy=False)
        b = (Yf @ proj.Aw).astype(np.float64)
        if exact is None:
            C = nnls_batch(b @ proj.Ninv, b, proj.N)
        else:
            C = exact[None, :].copy()
        Cp = np.maximum(C, 0.0)
        var = Cp @ self.GR
        var_blank = np.maximum(var - Cp @ self.GR_own, 0.0)
        M = C.astype(np.float32) @ self.A32.T
        R = Yf - M
        chi2 = (R * R / np.maximum(M, _CHI2_FLOOR)).sum(axis=1) / self.dof
        return (Cp @ self.Rm.T, np.sqrt(np.maximum(var, 0.0)), 3.0 * np.sqrt(var_blank), chi2,
                R.sum(axis=0, dtype=np.float64))


def fit_elements(
    spectrum_or_scan: Spectrum | Scan,
    instrument: Instrument,
    elements: str | Sequence[str | DetectedElement] | None = None,
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
    kind, data = counts_and_kind(spectrum_or_scan)
    cal = data.calibration
    n_ch = data.n_channels
    lo, hi, e_lo, e_hi = fit_range(cal, n_ch, instrument, energy_range_keV)
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
    resolved = resolve_elements(elements, instrument, e_lo, e_hi, matrix)
    design = make_design(resolved, instrument, cal, total, lo, hi, snip_width_keV, pileup, free_kb)
    coef_sum, model_sum, w = fit_one(design, total[lo:hi])
    if escape:
        design = design.with_escape(coef_sum)
        coef_sum, model_sum, w = fit_one(design, total[lo:hi])
    keep = np.array([c.kind == "element" or coef_sum[i] > 0 for i, c in enumerate(design.columns)])
    design = design.subset(keep)
    coef_sum = coef_sum[keep]
    proj = Projector.build(design.A, w)
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
    solver = _PixelSolver(proj, GR, GR_own, Rm, design.A.astype(np.float32), dof)
    if kind == "spectrum":
        pixel_blocks = iter([(0, total[None, lo:hi], coef_sum)])
    else:
        blocks = scan_blocks(data, max_pixels, progress, "fit_elements")
        pixel_blocks = ((start, Y[:, lo:hi], None) for start, Y in blocks)
    for start, Y, exact in pixel_blocks:
        sl = slice(start, start + Y.shape[0])
        intensity[sl], sigma[sl], dl[sl], chi2[sl], block_resid = solver.solve(Y, exact)
        resid += block_resid
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
