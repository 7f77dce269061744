"""Fundamental-parameter (FP) physics core: line intensities and scatter of layered samples.

Everything here works on plain arrays so that many stacks can be computed at once; the user-facing
API (:func:`xrfnb.line_intensities`, :func:`xrfnb.simulate`, :func:`xrfnb.simulate_batch`) lives in
``xrfnb.physics.simulate``. All atomic data come from xraylib [1]_ (``xraylib_np`` for vectorised calls).

Physics
-------
Stacks are layers ``j = 0 .. N-1`` from the surface down, each homogeneous with weight fractions
``w_jz`` and mass thickness ``m_j = rho_j t_j`` (g/cm^2; ``inf`` for an infinitely thick substrate).
Incidence angle ``psi1`` and take-off angle ``psi2`` are measured from the sample surface.

*Primary fluorescence* (Sherman's equation [2]_, [3]_) of line ``l`` of element ``z`` in layer ``j``,
per incident photon and per steradian of detector solid angle::

    P = 1/(4 pi) * 1/sin(psi1) * sum_k n_k * w_jz * tau_l(E_k) * A_in_j(E_k) * A_out_j(E_l)
        * (1 - exp(-chi_jkl m_j)) / chi_jkl,
    chi_jkl = mu_j(E_k)/sin(psi1) + mu_j(E_l)/sin(psi2),
    A_in_j(E) = exp(-sum_{i<j} mu_i(E) m_i / sin(psi1)),
    A_out_j(E) = exp(-sum_{i<j} mu_i(E) m_i / sin(psi2)),

where ``n_k`` is the fraction of incident photons in excitation bin ``k``, ``mu`` the total mass
attenuation coefficient (``CS_Total``) and ``tau_l(E)`` the line production cross-section
``CS_FluorLine_Kissel_Cascade`` (photo-ionisation of every subshell, fluorescence yield, radiative rate,
Coster-Kronig transitions and radiative/non-radiative cascades from deeper shells [4]_).

*Secondary fluorescence*: line ``m`` photons produced by the primary beam excite line ``l`` of another
element (or a shallower shell of the same element). Within one layer, with ``a = mu(E_k)/sin(psi1)``,
``b = mu(E_l)/sin(psi2)``, ``c = mu(E_m)``::

    S = 1/(4 pi) * 1/sin(psi1) * sum_k n_k A_in A_out w_z tau_l(E_m) w_z' tau_m(E_k) * 1/2 * D(a, b, c, m_j)
    D = int_0^T int_0^T exp(-a z) E1(c |z - z'|) exp(-b z') dz dz'

``D`` is evaluated exactly for finite ``T`` by writing ``E1(x) = int_0^1 exp(-x/u) du/u``, integrating
the depth double integral in closed form and the angular variable by Gauss-Legendre quadrature; for
``T -> inf`` it reduces to the closed form of Shiraiwa and Fujino [5]_ (checked in the tests).
Between layers (line ``m`` made in layer ``j``, absorbed in layer ``i``, through the layers in
between) the same angular representation makes both depth integrals elementary
(:func:`secondary_between_layers`). Tertiary fluorescence is not included (about +3 % on Cr K in
stainless steel, less in paint). Against fisx [6]_ (which computes the same two secondary terms) the
enhancement factors (P+S)/P agree to about 1-2 % (see ``tests/test_fisx.py``).

*Scatter*: Rayleigh and Compton scattering of every excitation bin with the xraylib differential
cross-sections ``DCS_Rayl`` and ``DCS_Compt`` (unpolarised beam, form factors and incoherent
scattering functions) at the scattering angle ``theta`` (``psi1 + psi2`` in the plane of incidence;
see :func:`scattering_angle_rad` for a detector at another azimuth), using the same
attenuation/self-absorption factor with the outgoing energy ``E`` (Rayleigh) or the Compton energy
``E' = E / (1 + E/(m_e c^2) (1 - cos theta))``. Scattering of the tube continuum is the continuum
background of the spectrum.

References
----------
.. [1] T. Schoonjans et al., "The xraylib library for X-ray-matter interactions. Recent developments",
   Spectrochim. Acta B 66 (2011) 776-784.
.. [2] J. Sherman, "The theoretical derivation of fluorescent X-ray intensities from mixtures",
   Spectrochim. Acta 7 (1955) 283-306.
.. [3] D. K. G. de Boer, "Calculation of X-ray fluorescence intensities from bulk and multilayer
   samples", X-Ray Spectrom. 19 (1990) 145-154.
.. [4] T. Schoonjans et al., "A general Monte Carlo simulation of energy dispersive X-ray fluorescence
   spectrometers - Part 5", Spectrochim. Acta B 70 (2012) 10-23 (cascade effects).
.. [5] T. Shiraiwa and N. Fujino, "Theoretical calculation of fluorescent X-ray intensities in
   fluorescent X-ray spectrochemical analysis", Jpn. J. Appl. Phys. 5 (1966) 886-899.
.. [6] V. A. Sole et al., fisx, https://github.com/vasole/fisx (ESRF).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
import xraylib
import xraylib_np

from .._errors import SimulationError
from .perturb import current_perturbation

__all__ = [
    "ElementLines",
    "Excitation",
    "Tables",
    "build_tables",
    "element_lines",
    "primary",
    "rebin_excitation",
    "scatter",
    "secondary_depth_integral",
    "secondary_within_layers",
]

#: Electron rest energy in keV (CODATA 2018, 510.99895 keV).
ELECTRON_REST_KEV = 510.99895
FOUR_PI = 4.0 * np.pi

_LINE_RE = re.compile(r"(K|L[1-3]|M[1-5])([K-Q]\d*)_LINE")
_ALL_LINES: tuple[tuple[str, int, str], ...] = tuple(
    (name[:-5], getattr(xraylib, name), m.group(1))
    for name in dir(xraylib)
    if (m := _LINE_RE.fullmatch(name))
)

@dataclasses.dataclass(frozen=True, eq=False)
class Excitation:
    """Discretised incident photon spectrum used by the FP computation.

    Parameters
    ----------
    energy_keV : numpy.ndarray
        Photon-weighted mean energy of each physics bin, shape (n,).
    weight : numpy.ndarray
        Fraction of incident photons in each bin, shape (n,), sums to 1.
    render_energy_keV, render_weight : numpy.ndarray
        A finer discretisation (shape (m,), ``m >= n``) used to draw scattered radiation and to average
        cross-sections inside each physics bin; ``render_weight`` sums to 1.
    render_bin : numpy.ndarray
        Physics bin of each render bin, shape (m,), int.
    total_photons : float
        Sum of the photon numbers handed in (the absolute scale of ``weight``).
    """

    energy_keV: np.ndarray
    weight: np.ndarray
    render_energy_keV: np.ndarray
    render_weight: np.ndarray
    render_bin: np.ndarray
    total_photons: float

    @property
    def key(self) -> tuple:
        """Hashable identity (for caches)."""
        return (self.energy_keV.tobytes(), self.weight.tobytes(), self.render_energy_keV.tobytes(),
                self.render_weight.tobytes())


def _merge_bins(energy: np.ndarray, photons: np.ndarray, n_max: int) -> tuple[np.ndarray, ...]:
    """Merge adjacent bins into at most ``n_max`` bins of equal energy width; photon-weighted means."""
    if energy.size <= n_max:
        return energy, photons, np.arange(energy.size)
    edges = np.linspace(energy.min(), energy.max(), n_max + 1)
    idx = np.clip(np.searchsorted(edges, energy, side="right") - 1, 0, n_max - 1)
    w = np.bincount(idx, weights=photons, minlength=n_max)
    ew = np.bincount(idx, weights=photons * energy, minlength=n_max)
    keep = w > 0
    new_index = np.cumsum(keep) - 1
    return ew[keep] / w[keep], w[keep], new_index[idx]


def rebin_excitation(
    energy_keV: np.ndarray, photons: np.ndarray, *, max_bins: int = 64, max_render_bins: int = 2048,
    tube_voltage_kV: float | None = None,
) -> Excitation:
    """Discretise an incident photon spectrum for the FP computation.

    Parameters
    ----------
    energy_keV : numpy.ndarray
        Photon energies, shape (n,), keV, > 0.
    photons : numpy.ndarray
        Photons per bin (any unit), shape (n,), >= 0, not all zero.
    max_bins : int
        Most physics bins; finer spectra are merged into bins of equal width. Cross-sections inside
        a merged bin are averaged over the original bins (weighted by photons), so absorption edges
        inside a bin are treated correctly in the thin-sample limit.
    max_render_bins : int
        Most bins kept to draw the scattered spectrum.
    tube_voltage_kV : float, optional
        When given, energies above it are rejected (a tube cannot emit them).

    Returns
    -------
    Excitation

    Raises
    ------
    SimulationError
        Non-finite, non-positive energies, negative photon numbers, an all-zero spectrum, or energies
        above the tube voltage.
    """
    e = np.asarray(energy_keV, dtype=float).ravel()
    p = np.asarray(photons, dtype=float).ravel()
    if e.shape != p.shape or e.size == 0:
        raise SimulationError(
            f"excitation energies and photon numbers must be two 1-D arrays of one length, got {e.shape} "
            f"and {p.shape}")
    if not (np.all(np.isfinite(e)) and np.all(e > 0)):
        raise SimulationError("excitation energies must be finite and > 0 keV")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise SimulationError("excitation photon numbers must be finite, >= 0 and not all zero")
    if tube_voltage_kV is not None and e.max() > tube_voltage_kV * (1 + 1e-9):
        raise SimulationError(
            f"excitation contains photons of {e.max():.3f} keV, above the tube voltage of "
            f"{tube_voltage_kV:g} kV: a tube cannot emit them; lower the energies or raise the voltage")
    order = np.argsort(e, kind="stable")
    e, p = e[order], p[order]
    keep = p > 0
    e, p = e[keep], p[keep]
    total = float(p.sum())
    re_, rw, _ = _merge_bins(e, p, max_render_bins)
    pe, pw, rbin = _merge_bins(re_, rw, max_bins)
    return Excitation(pe, pw / total, re_, rw / total, rbin.astype(np.intp), total)


def _bin_average(values: np.ndarray, exc: Excitation) -> np.ndarray:
    """Photon-weighted average over render bins of each physics bin; values shape (..., m) -> (..., n)."""
    n = exc.energy_keV.size
    if exc.render_energy_keV.size == n:
        return values
    out = np.zeros((*values.shape[:-1], n))
    np.add.at(out.T, exc.render_bin, (values * exc.render_weight).T)
    return out / exc.weight


@dataclasses.dataclass(frozen=True, eq=False)
class ElementLines:
    """Emission lines of one element kept for a given excitation (see :func:`element_lines`).

    Attributes
    ----------
    z : int
    names : tuple of str
        IUPAC names; lines of one initial shell closer than 5 eV are merged ("M5N7+M5N6").
    energy_keV : numpy.ndarray
        Shape (L,), keV (production-weighted mean of merged lines).
    tau_cm2_g : numpy.ndarray
        Shape (L, n_render): line production cross-section ``CS_FluorLine_Kissel_Cascade`` at each render
        energy, cm^2/g.
    """

    z: int
    names: tuple[str, ...]
    energy_keV: np.ndarray
    tau_cm2_g: np.ndarray


@functools.lru_cache(maxsize=4096)
def _line_catalogue(z: int, min_energy_keV: float) -> tuple[tuple[str, int, str, float], ...]:
    """All xraylib lines of element ``z`` above ``min_energy_keV``: (name, macro, shell, energy)."""
    out = []
    for name, macro, shell in _ALL_LINES:
        try:
            e = xraylib.LineEnergy(z, macro)
            rate = xraylib.RadRate(z, macro)
        except ValueError:
            continue
        if e >= min_energy_keV and rate > 0:
            out.append((name, macro, shell, e))
    return tuple(out)


_ELEMENT_LINES_CACHE: dict[tuple, ElementLines] = {}


def element_lines(z: int, exc: Excitation, *, min_energy_keV: float = 0.9,
                  rel_threshold: float = 2e-4) -> ElementLines:
    """Lines of element ``z`` worth computing for the excitation ``exc``.

    A line is kept when its excitation-weighted production cross-section is at least
    ``rel_threshold`` times that of the element's strongest line and its energy is at least
    ``min_energy_keV`` (lower lines do not pass an SDD's Be window and air path). The threshold is low
    because L lines are produced far more than the K lines of the same element where the optics pass
    little above the K edge: under the Bruker M4's polycapillary lens Sn Kb is produced at 1.3e-3 of
    Sn La, yet it is a clear peak of the measured tin spectrum.
    """
    key = (z, exc.key, min_energy_keV, rel_threshold)
    hit = _ELEMENT_LINES_CACHE.get(key)
    if hit is not None:
        return hit
    cat = _line_catalogue(z, min_energy_keV)
    if not cat:
        res = ElementLines(z, (), np.zeros(0), np.zeros((0, exc.render_energy_keV.size)))
    else:
        macros = np.array([c[1] for c in cat], dtype=int)
        tau = xraylib_np.CS_FluorLine_Kissel_Cascade(np.array([z]), macros, exc.render_energy_keV)[0]
        strength = tau @ exc.render_weight
        keep = strength >= rel_threshold * max(strength.max(), 1e-300)
        keep &= strength > 0
        names = [c[0] for c, k in zip(cat, keep, strict=True) if k]
        shells = [c[2] for c, k in zip(cat, keep, strict=True) if k]
        energy = np.array([c[3] for c, k in zip(cat, keep, strict=True) if k])
        tau = tau[keep]
        strength = strength[keep]
        # merge lines of one shell closer than 5 eV (unresolvable, same attenuation)
        order = np.lexsort((energy, np.array(shells)))
        groups: list[list[int]] = []
        for i in order:
            same_shell = bool(groups) and shells[groups[-1][0]] == shells[i]
            if same_shell and abs(energy[i] - energy[groups[-1][-1]]) < 5e-3:
                groups[-1].append(i)
            else:
                groups.append([i])
        m_names, m_e, m_tau = [], [], []
        for g in groups:
            g = sorted(g, key=lambda i: -strength[i])
            s = strength[g]
            m_names.append("+".join(names[i] for i in g))
            m_e.append(float(np.sum(energy[g] * s) / s.sum()))
            m_tau.append(tau[g].sum(axis=0))
        order2 = np.argsort(m_e)
        res = ElementLines(z, tuple(m_names[i] for i in order2), np.array(m_e)[order2],
                           np.array(m_tau)[order2].reshape(len(m_e), -1))
    _ELEMENT_LINES_CACHE[key] = res
    return res


@dataclasses.dataclass(frozen=True, eq=False)
class Tables:
    """Atomic data of a set of elements on an excitation grid, precomputed once and reused.

    Shapes: ``Z`` elements, ``n`` excitation bins, ``L`` lines (all lines of all elements, concatenated).

    Attributes
    ----------
    elements : tuple of int
        Atomic numbers, shape (Z,).
    exc : Excitation
    sin_in, sin_out : float
        Sines of the incidence and take-off angles (from the surface).
    mu_exc : numpy.ndarray
        (Z, n) total mass attenuation ``CS_Total`` at the excitation bins, cm^2/g (bin averages).
    line_element : numpy.ndarray
        (L,) index into ``elements`` of each line's element.
    line_name : tuple of str
        (L,) IUPAC names.
    line_energy_keV : numpy.ndarray
        (L,).
    tau : numpy.ndarray
        (L, n) bin-averaged line production cross-section, cm^2/g.
    mu_line : numpy.ndarray
        (Z, L) attenuation of each element at each line energy, cm^2/g.
    tau_at_line : numpy.ndarray
        (L, L) production cross-section of line ``l`` (rows) by photons of line ``m`` (columns), cm^2/g,
        zero unless ``E_m`` is above the absorption edge of ``l``'s shell (for secondary fluorescence;
        an element's high-energy L lines can excite its own L3 shell).
    element_line_slices : tuple of slice
        Lines of each element.
    compton_energy_keV : numpy.ndarray
        (n,) Compton-scattered energy of each bin at the scattering angle.
    dcs_rayleigh, dcs_compton : numpy.ndarray
        (Z, n) differential scattering cross-sections at the scattering angle, cm^2/g/sr.
    mu_compton : numpy.ndarray
        (Z, n) attenuation at the Compton energies, cm^2/g.
    """

    elements: tuple[int, ...]
    exc: Excitation
    sin_in: float
    sin_out: float
    mu_exc: np.ndarray
    line_element: np.ndarray
    line_name: tuple[str, ...]
    line_energy_keV: np.ndarray
    tau: np.ndarray
    mu_line: np.ndarray
    tau_at_line: np.ndarray
    element_line_slices: tuple[slice, ...]
    scatter_angle_rad: float
    compton_energy_keV: np.ndarray
    dcs_rayleigh: np.ndarray
    dcs_compton: np.ndarray
    mu_compton: np.ndarray

    @property
    def n_lines(self) -> int:
        return int(self.line_energy_keV.size)


def scattering_angle_rad(incidence_deg: float, takeoff_deg: float, azimuth_deg: float = 180.0) -> float:
    """Scattering angle of the detected scatter, rad.

    The beam arrives at ``psi1`` above the surface, the detector looks at the spot from ``psi2`` above it,
    and ``azimuth_deg`` is the angle around the surface normal between the tube's and the detector's
    directions. The photon turns by ``theta`` with
    ``cos theta = -sin psi1 sin psi2 - cos psi1 cos psi2 cos(azimuth)``.
    At the default 180 deg (detector opposite the tube, in the plane of incidence) ``theta = psi1 + psi2``
    (90 deg for 45/45, 130 deg for a beam normal to the surface and a detector at 40 deg), the
    convention of PyMca and fisx (``setGeometry(alphaIn, alphaOut)``); at 0 deg (detector beside the tube)
    ``theta = 180 - |psi1 - psi2|``. With the beam normal to the surface the azimuth does not matter.

    Examples
    --------
    >>> round(float(np.degrees(scattering_angle_rad(45.0, 45.0))), 6)
    90.0
    >>> round(float(np.degrees(scattering_angle_rad(50.0, 50.0, 0.0))), 6)
    180.0
    """
    s1, s2 = np.sin(np.radians(incidence_deg)), np.sin(np.radians(takeoff_deg))
    c1, c2 = np.cos(np.radians(incidence_deg)), np.cos(np.radians(takeoff_deg))
    cos_theta = -s1 * s2 - c1 * c2 * np.cos(np.radians(azimuth_deg))
    return float(np.arccos(np.clip(cos_theta, -1.0, 1.0)))


def compton_energy_keV(energy_keV: np.ndarray, theta_rad: float) -> np.ndarray:
    """Compton-scattered photon energy, ``E / (1 + E/(m_e c^2) (1 - cos theta))``."""
    e = np.asarray(energy_keV, dtype=float)
    return e / (1.0 + e / ELECTRON_REST_KEV * (1.0 - np.cos(theta_rad)))


_TABLES_CACHE: dict[tuple, Tables] = {}


def build_tables(elements: tuple[int, ...], exc: Excitation, incidence_deg: float, takeoff_deg: float,
                 *, azimuth_deg: float = 180.0, min_energy_keV: float = 0.9) -> Tables:
    """Precompute (and cache) every atomic quantity the FP computation needs (see :class:`Tables`).

    ``azimuth_deg``: angle around the sample normal between tube and detector (see
    :func:`scattering_angle_rad`); it sets the scattering angle only. Inside a
    :func:`xrfnb.physics.perturb.atomic_perturbation` block every line's production cross-sections
    (``tau`` and ``tau_at_line``) carry that perturbation's factor, cached under its key.
    """
    perturbation = current_perturbation()
    key = (tuple(elements), exc.key, float(incidence_deg), float(takeoff_deg), float(azimuth_deg),
           min_energy_keV, perturbation.key if perturbation is not None else None)
    hit = _TABLES_CACHE.get(key)
    if hit is not None:
        return hit
    if not (0 < incidence_deg <= 90 and 0 < takeoff_deg <= 90):
        raise SimulationError(
            f"incidence and take-off angles must be in (0, 90] degrees from the surface, got "
            f"{incidence_deg} and {takeoff_deg}")
    zs = np.array(elements, dtype=int)
    e_r = exc.render_energy_keV
    mu_exc = _bin_average(xraylib_np.CS_Total(zs, e_r), exc)
    lines = [element_lines(int(z), exc, min_energy_keV=min_energy_keV) for z in zs]
    slices, start = [], 0
    for el in lines:
        slices.append(slice(start, start + len(el.names)))
        start += len(el.names)
    line_energy = np.concatenate([el.energy_keV for el in lines]) if start else np.zeros(0)
    line_el = np.concatenate([np.full(len(el.names), i) for i, el in enumerate(lines)]).astype(np.intp) \
        if start else np.zeros(0, np.intp)
    names = tuple(n for el in lines for n in el.names)
    tau = _bin_average(np.concatenate([el.tau_cm2_g for el in lines]), exc) if start \
        else np.zeros((0, exc.energy_keV.size))
    if perturbation is not None and start:  # atomic parameters within their uncertainty (perturb.py)
        scale = np.concatenate([perturbation.factors(el.z, el.names) for el in lines])
        tau = tau * scale[:, None]
    mu_line = xraylib_np.CS_Total(zs, line_energy) if start else np.zeros((zs.size, 0))
    # production of line l (element z) by photons of every line energy (secondary fluorescence)
    tau_at_line = np.zeros((start, start))
    for i, el in enumerate(lines):
        if not el.names:
            continue
        macros = []
        for nm in el.names:
            macros.append([getattr(xraylib, f"{part}_LINE") for part in nm.split("+")])
        for r, ms in enumerate(macros):
            vals = xraylib_np.CS_FluorLine_Kissel_Cascade(
                np.array([el.z]), np.array(ms, dtype=int), line_energy)[0].sum(axis=0)
            tau_at_line[slices[i].start + r] = vals
    if perturbation is not None and start:
        tau_at_line *= scale[:, None]
    # Secondary fluorescence is computed for the major lines only (>= 1 % of their element's strongest
    # line for this excitation), as exciting and as excited lines: the rest changes totals by < 0.3 %.
    strength = tau @ exc.weight if start else np.zeros(0)
    major = np.zeros(start, dtype=bool)
    for sl in slices:
        if sl.stop > sl.start:
            major[sl] = strength[sl] >= 0.01 * strength[sl].max()
    tau_at_line[~major, :] = 0.0
    tau_at_line[:, ~major] = 0.0
    theta = scattering_angle_rad(incidence_deg, takeoff_deg, azimuth_deg)
    e_c_r = compton_energy_keV(e_r, theta)
    e_c = compton_energy_keV(exc.energy_keV, theta)
    th = np.array([theta])
    dcs_r = _bin_average(xraylib_np.DCS_Rayl(zs, e_r, th)[:, :, 0], exc)
    dcs_c = _bin_average(xraylib_np.DCS_Compt(zs, e_r, th)[:, :, 0], exc)
    mu_c = _bin_average(xraylib_np.CS_Total(zs, e_c_r), exc)
    tables = Tables(
        elements=tuple(int(z) for z in zs), exc=exc,
        sin_in=float(np.sin(np.radians(incidence_deg))), sin_out=float(np.sin(np.radians(takeoff_deg))),
        mu_exc=mu_exc, line_element=line_el, line_name=names, line_energy_keV=line_energy, tau=tau,
        mu_line=mu_line, tau_at_line=tau_at_line, element_line_slices=tuple(slices),
        scatter_angle_rad=float(theta), compton_energy_keV=e_c, dcs_rayleigh=dcs_r, dcs_compton=dcs_c,
        mu_compton=mu_c,
    )
    if len(_TABLES_CACHE) > 64:
        _TABLES_CACHE.clear()
    _TABLES_CACHE[key] = tables
    return tables


def _self_absorption(chi: np.ndarray, mt: np.ndarray) -> np.ndarray:
    """``(1 - exp(-chi m)) / chi``; the limit ``1/chi`` for ``m = inf`` comes out of ``exp(-inf) = 0``.

    ``chi`` is clipped at 1e-30 so that empty padding layers (``chi = 0``, ``m = 0``) give 0. Uses ``exp``
    (vectorised, several times faster than ``expm1``) with the series ``m (1 - x/2 + x^2/6)`` for
    ``x = chi m < 0.01``, where ``1 - exp(-x)`` would lose precision.
    """
    c = np.maximum(chi, 1e-30)
    x = c * mt
    f = np.exp(-x)
    np.subtract(1.0, f, out=f)
    f /= c
    small = x < 1e-2
    if small.any():
        series = mt * (1.0 - x * (0.5 - x / 6.0))
        f = np.where(small, series, f)
    return f


def _overlayer(mu: np.ndarray, mt: np.ndarray, sin_angle: float) -> np.ndarray:
    """Transmission through all layers above each layer: mu (B, N, X), mt (B, N) -> (B, N, X)."""
    mt_f = (np.where(np.isinf(mt), 0.0, mt) / sin_angle).astype(mu.dtype)
    out = np.empty(mu.shape, dtype=mu.dtype)
    out[:, 0] = 0.0
    for j in range(1, mu.shape[1]):
        np.multiply(mu[:, j - 1], mt_f[:, j - 1, None], out=out[:, j])
        out[:, j] += out[:, j - 1]
    return np.exp(-out, out=out)


def layer_attenuation(W: np.ndarray, T: Tables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mass attenuation of every layer: W (B, N, Z) -> mu at excitation (B,N,n), lines (B,N,L), Compton."""
    return W @ T.mu_exc, W @ T.mu_line, W @ T.mu_compton


def primary(W: np.ndarray, mt: np.ndarray, T: Tables, *, chunk: int = 512) -> np.ndarray:
    """Primary fluorescence of every line from every layer of a batch of stacks.

    Parameters
    ----------
    W : numpy.ndarray
        Weight fractions, shape (B, N, Z) over ``T.elements``; layers from the surface down.
    mt : numpy.ndarray
        Mass thickness of each layer, shape (B, N), g/cm^2 (``inf`` for an infinitely thick bottom
        layer; ``0`` for padding layers).
    T : Tables

    Returns
    -------
    numpy.ndarray
        Shape (B, N, L): photons per incident photon per steradian leaving the sample towards the
        detector (before air path, window and detector efficiency).
    """
    W = np.asarray(W, dtype=float)
    mt = np.asarray(mt, dtype=float)
    B, N, _ = W.shape
    out = np.zeros((B, N, T.n_lines))
    if T.n_lines == 0:
        return out
    for b0 in range(0, B, chunk):
        sl = slice(b0, min(B, b0 + chunk))
        _primary_chunk(W[sl], mt[sl], T, out[sl])
    return out


def _primary_chunk(W: np.ndarray, mt: np.ndarray, T: Tables, out: np.ndarray) -> None:
    # float32 is ample here: every result is a sum of positive terms of relative precision 1e-7
    W32 = W.astype(np.float32)
    mu_e = W32 @ T.mu_exc.astype(np.float32)
    mu_l = W32 @ T.mu_line.astype(np.float32)
    a_in = _overlayer(mu_e, mt, T.sin_in)
    a_in *= T.exc.weight.astype(np.float32)  # (B, N, n): includes the bin weight
    a_out = _overlayer(mu_l, mt, T.sin_out)  # (B, N, L)
    a = mu_e / np.float32(T.sin_in)
    tau32 = T.tau.astype(np.float32)
    mt32 = mt.astype(np.float32)
    pref = 1.0 / (FOUR_PI * T.sin_in)
    for zi, sl in enumerate(T.element_line_slices):
        if sl.stop == sl.start:
            continue
        bb, jj = np.nonzero(W[:, :, zi] > 0)
        if bb.size == 0:
            continue
        chi = a[bb, jj, None, :] + (mu_l[bb, jj, sl] / np.float32(T.sin_out))[:, :, None]  # (P, Lz, n)
        f = _self_absorption(chi, mt32[bb, jj, None, None])
        f *= a_in[bb, jj][:, None, :]
        s = np.einsum("pln,ln->pl", f, tau32[sl])
        out[bb, jj, sl] = s * (W[bb, jj, zi] * pref)[:, None] * a_out[bb, jj, sl]


# --- secondary fluorescence ----------------------------------------------------------------------------

_GL_T, _GL_W = np.polynomial.legendre.leggauss(12)
_GL_T = 0.5 * (_GL_T + 1.0)
_GL_W = 0.5 * _GL_W


def _diff_exp_scalar(x: np.ndarray, y: np.ndarray, e_x: np.ndarray, e_y: np.ndarray, t: float) -> np.ndarray:
    """``(exp(-x t) - exp(-y t)) / (y - x)`` for finite scalar ``t``, given both exponentials."""
    d = y - x
    small = np.abs(d) * t < 1e-7
    val = (e_x - e_y) / np.where(small, 1.0, d)
    if small.any():
        val = np.where(small, t * e_x, val)
    return val


def secondary_depth_integral(a: np.ndarray, b: np.ndarray, c: np.ndarray, mt: np.ndarray) -> np.ndarray:
    """``D = int_0^T int_0^T exp(-a z) E1(c |z - z'|) exp(-b z') dz dz'`` for a homogeneous layer.

    Parameters
    ----------
    a, b, c : numpy.ndarray
        Linear-in-mass-depth attenuation of the incident beam along its path (``mu(E)/sin psi1``), of
        the emitted line towards the detector (``mu(E_i)/sin psi2``) and of the exciting line
        (``mu(E_j)``), cm^2/g; broadcastable.
    mt : numpy.ndarray
        Mass thickness ``T`` in g/cm^2 (``inf`` allowed); broadcastable.

    Returns
    -------
    numpy.ndarray
        ``D`` in (g/cm^2)^2 * (cm^2/g)^0 units of mass depth squared times E1 (dimensionless).

    Notes
    -----
    ``E1(x) = int_0^1 exp(-x/u) du/u``; for each direction cosine ``u`` the depth double integral of
    exponentials is elementary. The ``u`` integral uses 12-point Gauss-Legendre in ``t`` with
    ``u = t^2`` (relative error < 2e-4 against the closed form). For ``T = inf`` the result equals the
    closed form ``[ln(1 + a/c)/a + ln(1 + b/c)/b] / (a + b)`` of Shiraiwa and Fujino.
    """
    a, b, c = (np.asarray(x, dtype=float)[..., None] for x in (a, b, c))
    mt_arr = np.asarray(mt, dtype=float)
    if mt_arr.ndim == 0:  # one layer: no broadcasting of the thickness, fast path
        t = float(mt_arr)
        kappa = c / (_GL_T**2)
        if np.isinf(t):
            k1 = 1.0 / ((a + b) * (b + kappa))
            k2 = 1.0 / ((a + b) * (a + kappa))
        else:
            e_a, e_b, e_k = np.exp(-a * t), np.exp(-b * t), np.exp(-kappa * t)
            first = -np.expm1(-(a + b) * t) / (a + b)
            k1 = (first - e_b * _diff_exp_scalar(a, kappa, e_a, e_k, t)) / (b + kappa)
            k2 = (first - e_a * _diff_exp_scalar(b, kappa, e_b, e_k, t)) / (a + kappa)
        integrand = (k1 + k2) * (2.0 / _GL_T)  # du/u = 2 dt / t
        return np.sum(integrand * _GL_W, axis=-1)
    mt_b = mt_arr[..., None]
    u = _GL_T**2
    kappa = c / u
    inf = np.isinf(mt_b)
    tf = np.where(inf, 0.0, mt_b)
    e_ab = np.where(inf, 0.0, np.exp(-(a + b) * tf))
    first = np.where(inf, 1.0 / (a + b), -np.expm1(-(a + b) * tf) / (a + b))

    def cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # (exp(-(x+y) T) - exp(-(y+kappa) T)) / (kappa - x) with its limits
        d = kappa - x
        small = np.abs(d) * tf < 1e-7
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            val = (e_ab - np.exp(-(y + kappa) * tf)) / np.where(small, 1.0, d)
        val = np.where(small, tf * e_ab, val)
        return np.where(inf, 0.0, val)

    k1 = (first - cross(a, b)) / (b + kappa)
    k2 = (first - cross(b, a)) / (a + kappa)
    integrand = (k1 + k2) / u * (2.0 * _GL_T)  # du = 2 t dt
    return np.sum(integrand * _GL_W, axis=-1)


def _secondary_inputs(W: np.ndarray, mt: np.ndarray, T: Tables) -> tuple[np.ndarray, ...]:
    """What both secondary-fluorescence sums start from.

    Layer attenuation at the excitation and line energies, the overlayer transmissions of the incident
    beam (weighted by the excitation spectrum) and of the lines, the geometric prefactor, and the
    (excited line ``l``, exciting line ``m``) pairs with ``E_m`` above ``l``'s absorption edge.
    """
    mu_e, mu_l, _ = layer_attenuation(W, T)
    a_in = _overlayer(mu_e, mt, T.sin_in) * T.exc.weight
    a_out = _overlayer(mu_l, mt, T.sin_out)
    pref = 1.0 / (FOUR_PI * T.sin_in) * 0.5
    pairs_l, pairs_m = np.nonzero(T.tau_at_line > 0)
    return mu_e, mu_l, a_in, a_out, pref, pairs_l, pairs_m


def secondary_within_layers(W: np.ndarray, mt: np.ndarray, T: Tables) -> np.ndarray:
    """Secondary fluorescence excited inside the same layer, shape (B, N, L) like :func:`primary`.

    For every layer, every pair (exciting line ``m``, excited line ``l``) of two elements present in
    the layer with ``E_m`` above the absorption edge of ``l``'s shell contributes (see module notes).
    Meant for single stacks or small batches (it loops over layers and line pairs).
    """
    W = np.asarray(W, dtype=float)
    mt = np.asarray(mt, dtype=float)
    B, N, _ = W.shape
    out = np.zeros((B, N, T.n_lines))
    if T.n_lines == 0:
        return out
    mu_e, mu_l, a_in, a_out, pref, pairs_l, pairs_m = _secondary_inputs(W, mt, T)
    if pairs_l.size == 0:
        return out
    for b in range(B):
        for j in range(N):
            if mt[b, j] <= 0:
                continue
            present = W[b, j, T.line_element] > 0
            ok = present[pairs_l] & present[pairs_m]
            if not ok.any():
                continue
            pl, pm = pairs_l[ok], pairs_m[ok]
            a = mu_e[b, j] / T.sin_in  # (n,)
            bl = mu_l[b, j, pl] / T.sin_out  # (P,)
            cm = mu_l[b, j, pm]  # (P,)
            D = secondary_depth_integral(a[None, :], bl[:, None], cm[:, None], mt[b, j])  # (P, n)
            prod_m = T.tau[pm] * W[b, j, T.line_element[pm], None]  # (P, n) line m production
            s = np.sum(D * prod_m * a_in[b, j], axis=1) * T.tau_at_line[pl, pm] \
                * W[b, j, T.line_element[pl]] * pref
            np.add.at(out[b, j], pl, s * a_out[b, j, pl])
    return out


def _one_minus_exp_over(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``(1 - exp(-x t)) / x`` for x > 0 (``1/x`` for ``t = inf``)."""
    x, t = np.broadcast_arrays(x, t)
    inf = np.isinf(t)
    val = -np.expm1(-x * np.where(inf, 0.0, t)) / x
    return np.where(inf, 1.0 / x, val)


def secondary_between_layers(W: np.ndarray, mt: np.ndarray, T: Tables) -> np.ndarray:
    """Secondary fluorescence excited in one layer by lines emitted in another, (B, N, L).

    Line ``m`` photons made at depth ``z`` of layer ``j`` by the primary beam travel, in direction
    cosine ``u``, through the rest of ``j``, the layers in between and into layer ``i`` where they are
    absorbed by the shell of line ``l``. For each ``u`` the depth integrals over ``j`` and ``i`` are
    exponentials in closed form; the ``u`` integral (``E1`` kernel, see
    :func:`secondary_depth_integral`) uses the same Gauss-Legendre rule. Exact for homogeneous layers
    (de Boer 1990 treats the same geometry).
    """
    W = np.asarray(W, dtype=float)
    mt = np.asarray(mt, dtype=float)
    B, N, _ = W.shape
    out = np.zeros((B, N, T.n_lines))
    if T.n_lines == 0 or N < 2:
        return out
    mu_e, mu_l, a_in, a_out, pref, pairs_l, pairs_m = _secondary_inputs(W, mt, T)
    if pairs_l.size == 0:
        return out
    u = _GL_T**2  # (G,)
    gw = _GL_W * 2.0 * _GL_T / u  # weights of du/u with u = t^2
    for b in range(B):
        for j in range(N):  # emitting layer (line m)
            if mt[b, j] <= 0:
                continue
            present_j = W[b, j, T.line_element] > 0
            for i in range(N):  # absorbing layer (line l)
                if i == j or mt[b, i] <= 0:
                    continue
                present_i = W[b, i, T.line_element] > 0
                ok = present_i[pairs_l] & present_j[pairs_m]
                if not ok.any():
                    continue
                pl, pm = pairs_l[ok], pairs_m[ok]
                a = (mu_e[b, j] / T.sin_in)[None, :, None]  # (1, n, 1)
                kj = (mu_l[b, j, pm][:, None, None]) / u  # (P, 1, G): line m in layer j per path
                ki = (mu_l[b, i, pm][:, None, None]) / u
                bl = (mu_l[b, i, pl] / T.sin_out)[:, None, None]
                lo, hi = (j, i) if j < i else (i, j)
                between = sum(mt[b, k] * mu_l[b, k, pm] for k in range(lo + 1, hi)) \
                    if hi - lo > 1 else np.zeros(pm.size)
                mid = np.exp(-between[:, None, None] / u)
                tj, ti = float(mt[b, j]), float(mt[b, i])
                if i > j:  # downwards: leave j (finite) through its bottom, enter i at its top
                    j1 = _diff_exp_scalar(a, kj, np.exp(-a * tj), np.exp(-kj * tj), tj)
                    j2 = _one_minus_exp_over(bl + ki, ti)
                else:  # upwards: leave j through its top, enter i (finite) at its bottom
                    if np.isinf(tj):
                        j1 = 1.0 / (a + kj)
                    else:  # exp(-(a + kj) t) as a product of two small arrays
                        j1 = (1.0 - np.exp(-a * tj) * np.exp(-kj * tj)) / (a + kj)
                    j2 = _diff_exp_scalar(bl, ki, np.exp(-bl * ti), np.exp(-ki * ti), ti)
                D = np.sum(j1 * j2 * mid * gw, axis=-1)  # (P, n)
                prod_m = T.tau[pm] * W[b, j, T.line_element[pm], None]
                val = np.sum(D * prod_m * a_in[b, j], axis=1) * T.tau_at_line[pl, pm] \
                    * W[b, i, T.line_element[pl]] * pref
                np.add.at(out[b, i], pl, val * a_out[b, i, pl])
    return out


def scatter(W: np.ndarray, mt: np.ndarray, T: Tables) -> tuple[np.ndarray, np.ndarray]:
    """Rayleigh and Compton scatter of every excitation bin, summed over layers.

    Returns
    -------
    rayleigh, compton : numpy.ndarray
        Each shape (B, n): photons per incident photon per steradian leaving the sample towards the
        detector at the bin energy (Rayleigh) or its Compton energy ``T.compton_energy_keV``.
    """
    W = np.asarray(W, dtype=np.float32)
    mt = np.asarray(mt, dtype=float)
    mu_e = W @ T.mu_exc.astype(np.float32)
    mu_c = W @ T.mu_compton.astype(np.float32)
    # incident path and exit path combined: exp(-m (mu(E)/sin1 + mu(E')/sin2)) per overlying layer
    chi_r = mu_e * np.float32(1.0 / T.sin_in + 1.0 / T.sin_out)
    chi_c = mu_e / np.float32(T.sin_in) + mu_c / np.float32(T.sin_out)
    mt3 = mt.astype(np.float32)[..., None]
    weight = T.exc.weight.astype(np.float32) / np.float32(T.sin_in)
    ray = np.sum((W @ T.dcs_rayleigh.astype(np.float32)) * _overlayer(chi_r, mt, 1.0)
                 * _self_absorption(chi_r, mt3), axis=1) * weight
    comp = np.sum((W @ T.dcs_compton.astype(np.float32)) * _overlayer(chi_c, mt, 1.0)
                  * _self_absorption(chi_c, mt3), axis=1) * weight
    return ray, comp
