"""The detector's solid angle as a function of depth in a thick, weakly absorbing sample.

The FP model (:mod:`xrfnb.physics.fp`) sees the whole irradiated volume under one detector solid angle,
that of the spot on the surface. That is exact while the radiation comes from a depth much smaller than
the sample-to-detector distance: every metal, pigment layer or ground up to a few hundred um. It is not
for a thick low-Z scatterer in a close micro-XRF geometry: in PMMA (C5H8O2, 1.18 g/cm3) the scatter of
20-40 keV photons comes from 5-20 mm deep, while the Bruker M4's detector is 18.9 mm from the spot (its
header's ``SolidAngleDetection`` 0.0065 x 4 pi for the 30 mm2 XFlash 430). A point at path length ``s``
along the incident beam below the spot is at

    ``r(s)^2 = d^2 + s^2 - 2 s d cos(theta)``

from the detector's centre (``d`` the detector distance, ``theta`` the scattering angle between the
incident beam and the direction to the detector), and a detector of area ``A`` facing the spot subtends
``A cos(alpha) / r^2`` from it, ``cos(alpha) = (d - s cos(theta)) / r`` (inverse-square law). Relative to
the spot:

    ``w(s) = (d / r)^2 cos(alpha)``

For the M4's 132 deg, 50/50 deg geometry ``w`` is 0.64 at 5 mm depth and 0.42 at 10 mm, so the simulated
scatter of a thick PMMA blank is too strong by a factor that grows with energy (1 / 0.71 at 20 keV, 1 / 0.55
at 30 keV relative to 10 keV) and a lens transmission fitted to such blanks comes out too low above
~15 keV by the same factor: the cause of the too-weak Zr and Sn K lines (issue #17,
``benchmarks/bench_physics_real.py``).

:func:`simulate_depth_weighted` simulates a homogeneous thick sample slice by slice (the scatter and
fluorescence of a slice do not depend on what lies below it) and weights each slice by ``w`` at its
middle. It neglects the change of the exit angle with depth (the exit path is taken at the nominal
take-off angle) and secondary fluorescence between slices, both small for a low-Z scatterer.

:func:`depth_factor` is the same physics for one scattering (or fluorescence) process in a thick
homogeneous sample, in closed form up to a fine quadrature: the yield from depth ``z`` falls as
``exp(-k z)``, ``k = rho (mu(E0) / sin psi_in + mu(E) / sin psi_out)`` (incident energy ``E0``, detected
energy ``E``), so the yield seen by depth relative to the spot's solid angle at every depth is

    ``F(k) = k * integral_0^inf w(z) exp(-k z) dz``

(1 for ``w = 1``). It is what :func:`xrfnb.fit_instrument`'s thick scatterers use. For the bruker-m4's
Rayleigh scatter ``F`` is 0.999 for lead white and 0.98 for calcite at 20 keV (everything comes from
< 0.5 mm), but 0.65 at 20 keV and 0.51 at 30 keV for PMMA.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from .simulate import simulate
from .stack import Layer, Stack

#: depth edges of the slices, mm below the surface; the last slice is the substrate (to infinity)
DEPTH_EDGES_MM = (0.0, 0.01, 0.03, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0,
                  15.0, 20.0, 25.0, 30.0, 40.0, 60.0, 100.0)


def detector_distance_mm(instrument) -> float:
    """Distance from the spot to the detector, mm (``detector_distance_mm``, else ``detector_path_mm``)."""
    d = instrument.detector_distance_mm
    return float(instrument.detector_path_mm if d is None else d)


def _weight(distance_mm: float, incidence_deg: float, scattering_angle_deg: float,
            depth_mm: np.ndarray) -> np.ndarray:
    """``w(z)`` of the module docstring for a detector at ``distance_mm``."""
    d = float(distance_mm)
    s = depth_mm / math.sin(math.radians(incidence_deg))
    cos_t = math.cos(math.radians(scattering_angle_deg))
    r = np.sqrt(d * d + s * s - 2.0 * s * d * cos_t)
    return (d / r) ** 2 * (d - s * cos_t) / r


def depth_weight(instrument, depth_mm: np.ndarray | float) -> np.ndarray:
    """Detector solid angle seen from ``depth_mm`` below the spot on the incident beam, relative to the
    surface (see the module docstring).

    Parameters
    ----------
    instrument : xrfnb.Instrument
        Gives the detector distance, the incidence angle and the scattering angle.
    depth_mm : array_like
        Depths below the surface, mm (>= 0).

    Returns
    -------
    numpy.ndarray
        ``w`` in (0, 1], 1 at the surface, shape like ``depth_mm``.
    """
    z = np.asarray(depth_mm, dtype=float)
    if np.any(z < 0):
        raise ValueError("depth_mm must be >= 0")
    return _weight(detector_distance_mm(instrument), instrument.incidence_deg,
                   instrument.scattering_angle_deg, z)


#: depth nodes of :func:`depth_factor_at`'s quadrature, in detector distances: 21 geometric steps from
#: 0.001 d to 0.05 d (a metal's scatter comes from there), every 0.05 d to 4 d (``w`` changes on the scale
#: d), then 60 geometric steps of 9.6 % to 1000 d (``w ~ |cos theta| d^2 / s^2`` there). ``F`` is within
#: 6e-4 of an adaptive quadrature (``scipy.integrate.quad``) for ``k`` from 1e-4 to 1e4 per mm in the
#: presets' geometries (the error falls as the square of the steps)
_FACTOR_NODES = np.concatenate([[0.0], np.geomspace(1e-3, 0.05, 22), np.linspace(0.05, 4.0, 80)[1:],
                                np.geomspace(4.0, 1000.0, 61)[1:]])


def _depth_factor_exact(k: np.ndarray, d: float, incidence_deg: float,
                        scattering_angle_deg: float) -> np.ndarray:
    """:func:`depth_factor_at` by the quadrature itself, ``k`` of shape (n,), 1/mm."""
    z = _FACTOR_NODES * d
    w = _weight(d, incidence_deg, scattering_angle_deg, z)
    h = np.diff(z)
    kk = k.reshape(-1, 1)
    ea = np.exp(-kk * z[:-1])  # exp(-k a) at each piece's top
    kh = kk * h
    one_minus = -np.expm1(-kh)  # 1 - exp(-k h)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_exp = np.where(kh > 1e-8, one_minus / np.where(kh > 0, kh, 1.0), 1.0 - 0.5 * kh)
    # integral over [a, b] of (w_a + (w_b - w_a)(z - a)/h) k exp(-k z) dz
    pieces = ea * (w[:-1] * one_minus + (w[1:] - w[:-1]) * (mean_exp - (1.0 - one_minus)))
    return pieces.sum(axis=1) + w[-1] * np.exp(-k * z[-1])


#: ln(k d) of :func:`_depth_factor_table`: 1e-4 to 1e6 in steps of 0.05 (``F`` is smooth in ``ln k``; linear
#: interpolation errs by < 1e-4)
_LN_KD = np.arange(math.log(1e-4), math.log(1e6) + 0.05, 0.05)


@functools.lru_cache(maxsize=128)
def _depth_factor_table(d: float, incidence_deg: float, scattering_angle_deg: float) -> np.ndarray:
    """``F`` at ``k = exp(_LN_KD) / d`` for one geometry (cached: a fit asks for the same geometry for many
    materials and energies)."""
    return _depth_factor_exact(np.exp(_LN_KD) / d, d, incidence_deg, scattering_angle_deg)


def depth_factor_at(attenuation_per_mm: np.ndarray | float, *, distance_mm: float, incidence_deg: float,
                    scattering_angle_deg: float) -> np.ndarray:
    """Depth factor ``F(k) = k * integral_0^inf w(z) exp(-k z) dz`` of a thick homogeneous sample (see the
    module docstring) for explicit geometry.

    ``w`` is interpolated linearly between :data:`_FACTOR_NODES` (times the distance) and each piece is
    integrated against ``exp(-k z)`` exactly, so the result holds for any ``k``: 1 for a metal (``k``
    large), the mean of ``w`` weighted by the escape probability otherwise; beyond 1000 distances ``w`` is
    taken as constant (its value there is ~1e-6). Per geometry ``F`` is tabulated once on a grid in
    ``ln k`` (:data:`_LN_KD`) and interpolated; ``k d`` outside 1e-4 to 1e6 is computed directly.

    Parameters
    ----------
    attenuation_per_mm : array_like
        ``k = rho (mu(E0) / sin psi_in + mu(E) / sin psi_out)``, 1/mm (> 0), any shape.
    distance_mm : float
        Spot-to-detector distance, mm.
    incidence_deg : float
        Angle of the incident beam from the surface, degrees.
    scattering_angle_deg : float
        Angle between the incident beam and the direction to the detector, degrees.

    Returns
    -------
    numpy.ndarray
        ``F`` in (0, 1], shape like ``attenuation_per_mm``.
    """
    k = np.asarray(attenuation_per_mm, dtype=float)
    if np.any(~(k > 0)):
        raise ValueError("attenuation_per_mm must be > 0")
    d = float(distance_mm)
    geometry = (d, float(incidence_deg), float(scattering_angle_deg))
    ln_kd = np.log(k.ravel() * d)
    out = np.interp(ln_kd, _LN_KD, _depth_factor_table(*geometry))
    outside = (ln_kd < _LN_KD[0]) | (ln_kd > _LN_KD[-1])
    if np.any(outside):
        out[outside] = _depth_factor_exact(k.ravel()[outside], *geometry)
    return out.reshape(k.shape)


def depth_factor(instrument, mu_rho_cm2_g: np.ndarray | float, density_g_cm3: float) -> np.ndarray:
    """Depth factor of a thick homogeneous sample under ``instrument``'s geometry: the yield of a process
    attenuated by ``mu_rho_cm2_g = mu(E0) / sin psi_in + mu(E) / sin psi_out`` (cm2/g), each depth seen
    under its own detector solid angle (:func:`depth_weight`), relative to the spot's at every depth.

    Parameters
    ----------
    instrument : xrfnb.Instrument
        Gives the detector distance (:func:`detector_distance_mm`), incidence and scattering angles.
    mu_rho_cm2_g : array_like
        Mass attenuation along the depth, incident and exit paths together, cm2/g.
    density_g_cm3 : float
        The sample's density, g/cm3.

    Returns
    -------
    numpy.ndarray
        ``F`` in (0, 1] (:func:`depth_factor_at`), shape like ``mu_rho_cm2_g``.

    Examples
    --------
    >>> import xrfnb, xraylib
    >>> inst = xrfnb.Instrument.preset("bruker-m4")
    >>> th = inst.scattering_angle_deg
    >>> s1, s2 = (math.sin(math.radians(a)) for a in (inst.incidence_deg, inst.takeoff_deg))
    >>> mu = xraylib.CS_Total_CP("C5H8O2", 30.0) * (1 / s1 + 1 / s2)  # Rayleigh at 30 keV in PMMA
    >>> round(float(depth_factor(inst, mu, 1.18)), 2)
    0.51
    """
    k = np.asarray(mu_rho_cm2_g, dtype=float) * float(density_g_cm3) / 10.0  # 1/cm -> 1/mm
    return depth_factor_at(k, distance_mm=detector_distance_mm(instrument),
                           incidence_deg=instrument.incidence_deg,
                           scattering_angle_deg=instrument.scattering_angle_deg)


def simulate_depth_weighted(layer, instrument, *, live_time_s: float,
                            edges_mm: tuple[float, ...] = DEPTH_EDGES_MM, **options):
    """Expected spectrum of an infinitely thick sample of ``layer``'s material, each depth slice seen
    under its own detector solid angle (:func:`depth_weight`).

    Slices ``[edges_mm[k], edges_mm[k+1])`` (the last one down to infinity) are simulated as stacks of the
    slices above them plus themselves; the difference of consecutive stacks is the slice's own
    contribution, weighted by ``w`` at the slice's middle (the last, infinite slice at its top edge).
    Without noise and pile-up (negligible for the blanks' count rates).

    Parameters
    ----------
    layer : xrfnb.Layer
        The material (its own thickness is ignored).
    instrument : xrfnb.Instrument
    live_time_s : float
    edges_mm : tuple of float, optional
        Slice edges, mm, from 0 (default :data:`DEPTH_EDGES_MM`).
    **options
        Passed to :func:`xrfnb.simulate` (``secondary``, ``scatter``, ``argon``, ``chamber``); ``noise`` and
        ``pileup`` are off.

    Returns
    -------
    xrfnb.Spectrum
    """

    edges = np.asarray(edges_mm, dtype=float)
    slices = [Layer(dict(layer.composition), binder=None, thickness_um=(b - a) * 1e3,
                    density_g_cm3=layer.density_g_cm3, name=f"{layer.name} {a:g}-{b:g} mm")
              for a, b in itertools.pairwise(edges)]
    mids = np.append(0.5 * (edges[:-1] + edges[1:]), edges[-1])
    weights = depth_weight(instrument, mids)
    total = None
    previous = None
    for k in range(len(slices) + 1):
        stack = Stack(slices[: k + 1]) if k < len(slices) else Stack(slices, substrate=layer)
        spec = simulate(stack, instrument, live_time_s=live_time_s, noise=False, pileup=False, **options)
        counts = np.asarray(spec.counts, dtype=float)
        part = counts if previous is None else counts - previous
        total = weights[k] * part if total is None else total + weights[k] * part
        previous = counts
        last = spec
    meta = dict(last.metadata)
    meta["depth_weighted"] = True
    meta["count_rate_cps"] = float(total.sum() / live_time_s)
    return type(last)(total, last.calibration, live_time_s=live_time_s, metadata=meta)
