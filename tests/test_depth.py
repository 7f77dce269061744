"""``xrfnb.physics.depth.depth_factor``: the yield of a thick homogeneous scatterer with each depth under its
own detector solid angle, against an adaptive quadrature of the same integral, against the slice-by-slice
simulation (``simulate_depth_weighted``), and as the instrument fit's thick scatterers use it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import xraylib

import xrfnb
from xrfnb import Instrument
from xrfnb.fitting.instrument_fit import _scatterer_density, thick_scatter
from xrfnb.physics.depth import (
    DEPTH_EDGES_MM,
    depth_factor,
    depth_factor_at,
    depth_weight,
    detector_distance_mm,
    simulate_depth_weighted,
)
from xrfnb.physics.fp import compton_energy_keV

#: an infinitely thick PMMA blank (C5H8O2, 1.18 g/cm3), as tests/test_physics_real.py
PMMA = xrfnb.Layer({"C5H8O2": 1.0}, binder=None, thickness_um=10_000.0, density_g_cm3=1.18)


def _mu_path(inst: Instrument, material: str, e_in: float, e_out: float) -> float:
    """``mu(E0) / sin psi_in + mu(E) / sin psi_out``, cm2/g (xraylib)."""
    s1, s2 = (math.sin(math.radians(a)) for a in (inst.incidence_deg, inst.takeoff_deg))
    return xraylib.CS_Total_CP(material, e_in) / s1 + xraylib.CS_Total_CP(material, e_out) / s2


@pytest.mark.parametrize("preset", ["bruker-m4", "bruker-m6", "lab-mo"])
def test_depth_factor_is_the_laplace_integral_of_the_depth_weight(preset):
    """``k * integral w(z) exp(-k z) dz`` by scipy's adaptive quadrature of ``depth_weight`` itself, within
    1e-3, for attenuation lengths from 0.1 um to 10 m; 1 at the surface's limit."""
    inst = Instrument.preset(preset)
    for k in (1e-4, 1e-2, 0.05, 0.3, 3.0, 100.0, 1e4):
        expected, _ = scipy.integrate.quad(
            lambda z, k=k: k * float(depth_weight(inst, z)) * math.exp(-k * z),
            0.0,
            np.inf,
            limit=500,
            epsabs=1e-12,
        )
        assert float(depth_factor(inst, k * 10.0, 1.0)) == pytest.approx(expected, abs=1e-3), k
    big = depth_factor_at(np.array([1e9]), distance_mm=detector_distance_mm(inst),
                          incidence_deg=inst.incidence_deg, scattering_angle_deg=inst.scattering_angle_deg)
    assert float(big[0]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="> 0"):
        depth_factor(inst, 0.0, 1.0)


@pytest.mark.parametrize("energy_keV", [15.0, 25.0, 40.0])
def test_depth_factor_agrees_with_the_sliced_simulation(energy_keV):
    """A monochromatic beam on thick PMMA (bruker-m4, vacuum): the Rayleigh and Compton peaks of
    ``simulate_depth_weighted`` over the plain simulation are the slices' sum ``sum w(mid) (exp(-k a) -
    exp(-k b))`` (the same physics; to 2e-3: each window holds a little of the other peak, whose factor
    differs by < 3 %), and ``depth_factor`` differs from the simulation by the slicing error (w at each
    slice's middle, < 1 % here) and that 2e-3 at most."""
    inst = Instrument.preset("bruker-m4").with_(
        atmosphere="vacuum", monochromatic_keV=energy_keV, detector_compton=False
    )
    options = {"chamber": False}
    plain = xrfnb.simulate(xrfnb.Stack([], substrate=PMMA), inst, live_time_s=1.0, noise=False, pileup=False,
                           **options)
    weighted = simulate_depth_weighted(PMMA, inst, live_time_s=1.0, **options)
    e = plain.energy_keV
    e_c = float(compton_energy_keV(energy_keV, math.radians(inst.scattering_angle_deg)))
    f_r = float(inst.fwhm_keV(energy_keV))
    edges = np.asarray(DEPTH_EDGES_MM)
    w_mid = depth_weight(inst, 0.5 * (edges[:-1] + edges[1:]))
    for e_out, lo, hi in ((energy_keV, energy_keV - f_r, energy_keV + f_r), (e_c, e_c - 1.0, e_c + 0.5)):
        m = (e >= lo) & (e < hi)
        simulated = float(weighted.counts[m].sum() / plain.counts[m].sum())
        mu = _mu_path(inst, "C5H8O2", energy_keV, e_out)
        k = mu * PMMA.density_g_cm3 / 10.0  # 1/mm
        sliced = float(np.sum(w_mid * (np.exp(-k * edges[:-1]) - np.exp(-k * edges[1:])))
                       + depth_weight(inst, edges[-1]) * math.exp(-k * edges[-1]))
        factor = float(depth_factor(inst, mu, PMMA.density_g_cm3))
        assert simulated == pytest.approx(sliced, rel=2e-3), e_out
        slicing = abs(sliced - factor)
        assert slicing < 0.01 * factor
        assert abs(simulated - factor) <= slicing + 2e-3 * factor
        assert factor < 0.9  # PMMA at 15-40 keV: the depth matters


def test_depth_matters_for_pmma_and_wood_not_for_metals_or_paint():
    """Rayleigh scatter under bruker-m4's geometry (18.9 mm): lead white (6.8 g/cm3) within 1e-3 and copper
    within 2e-3 of 1 at 10-20 keV (``1 - F ~ -w'(0) / k``), calcite within 3 % at 20 keV and 1 % at 10 keV
    (its scatter comes from < 0.3 mm); PMMA 0.92 at 10 keV, 0.65 at 20 keV; wood (cellulose, 0.6 g/cm3)
    below PMMA."""
    inst = Instrument.preset("bruker-m4")

    def f(material: str, density: float, e: float) -> float:
        return float(depth_factor(inst, _mu_path(inst, material, e, e), density))

    for e in (10.0, 15.0, 20.0):
        assert f("Pb3C2O8H2", 6.8, e) > 0.999
        assert f("Cu", 8.96, e) > 0.998
    assert f("CaCO3", 2.71, 10.0) > 0.99
    assert f("CaCO3", 2.71, 20.0) > 0.97
    assert f("C5H8O2", 1.18, 10.0) == pytest.approx(0.92, abs=0.01)
    assert f("C5H8O2", 1.18, 20.0) == pytest.approx(0.65, abs=0.01)
    for e in (10.0, 20.0, 30.0):
        assert f("C6H10O5", 0.6, e) < f("C5H8O2", 1.18, e)


def test_fit_thick_scatterers_carry_the_depth_factor():
    """``thick_scatter`` with the detector's distance is the spot's thick-layer yield times ``depth_factor``
    at the scatterer's density, Rayleigh at ``mu(E) + mu(E)`` and Compton at ``mu(E) + mu(E')``; the
    densities: PMMA 1.18, a PMMA-chalk mixture by volume."""
    inst = Instrument.preset("bruker-m4")
    th, inc, out = inst.scattering_angle_deg, inst.incidence_deg, inst.takeoff_deg
    e = np.array([8.0, 20.0, 35.0])
    ec = compton_energy_keV(e, math.radians(th))
    for material in ("C5H8O2", "CaCO3", "Pb3C2O8H2"):
        r0, c0 = thick_scatter(material, e, th, inc, out)
        r, c = thick_scatter(material, e, th, inc, out, detector_distance_mm(inst))
        rho = _scatterer_density(material)
        for i in range(e.size):
            # the fit tabulates the attenuation every 0.25 keV: 1e-3 against xraylib at the exact energies
            f_r = float(depth_factor(inst, _mu_path(inst, material, e[i], e[i]), rho))
            f_c = float(depth_factor(inst, _mu_path(inst, material, e[i], ec[i]), rho))
            assert r[i] / r0[i] == pytest.approx(f_r, rel=1e-3)
            assert c[i] / c0[i] == pytest.approx(f_c, rel=1e-3)
    assert _scatterer_density("C5H8O2") == 1.18
    assert _scatterer_density("C5H8O2:0.5,CaCO3:0.5") == pytest.approx(1.0 / (0.5 / 1.18 + 0.5 / 2.71))
