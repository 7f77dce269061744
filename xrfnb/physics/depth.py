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
"""

from __future__ import annotations

import itertools
import math

import numpy as np

#: depth edges of the slices, mm below the surface; the last slice is the substrate (to infinity)
DEPTH_EDGES_MM = (0.0, 0.01, 0.03, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0,
                  15.0, 20.0, 25.0, 30.0, 40.0, 60.0, 100.0)


def detector_distance_mm(instrument) -> float:
    """Distance from the spot to the detector, mm (``detector_distance_mm``, else ``detector_path_mm``)."""
    d = instrument.detector_distance_mm
    return float(instrument.detector_path_mm if d is None else d)


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
    d = detector_distance_mm(instrument)
    s = z / math.sin(math.radians(instrument.incidence_deg))
    cos_t = math.cos(math.radians(instrument.scattering_angle_deg))
    r = np.sqrt(d * d + s * s - 2.0 * s * d * cos_t)
    return (d / r) ** 2 * (d - s * cos_t) / r


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
    from xrfnb.physics.simulate import simulate
    from xrfnb.physics.stack import Layer, Stack

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
