"""Argon fluorescence of the air the beam crosses (xrfnb.argon_lines, simulate, simulate_batch).

References are independent of the code under test: xraylib's cross-sections and the NIST composition of dry
air (1.28 wt % Ar), the thin-target formula ``I = w rho L sigma_F / (4 pi)`` per incident photon and sr, a
quadrature (scipy) of the point-by-point integral over the beam path, and the published Ar K line energies
(Ka1 2.9577 keV, Kb 3.1905 keV; Bearden, Rev. Mod. Phys. 39 (1967) 78).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import xraylib

import xrfnb
from xrfnb import Layer, Stack
from xrfnb.physics.simulate import stack_arrays

AIR = "Air, Dry (near sea level)"
RHO_AIR = 0.001205  # g/cm3, 20 degC, 1 atm


def _w_argon() -> float:
    nist = xraylib.GetCompoundDataNISTByName(AIR)
    return float(nist["massFractions"][list(nist["Elements"]).index(18)])


def _mono(**changes) -> xrfnb.Instrument:
    base = dict(name="mono-10", anode=None, monochromatic_keV=10.0, flux_photons_s=1e10, incidence_deg=45.0,
                takeoff_deg=45.0, atmosphere="air", beam_path_mm=0.5, detector_path_mm=20.0)
    base.update(changes)
    return xrfnb.Instrument(**base)


def _eff(inst: xrfnb.Instrument, energy_keV: float) -> float:
    return float(np.asarray(inst.detector_efficiency(np.array([energy_keV])))[0])


def _scale(inst: xrfnb.Instrument, energy_keV: float) -> float:
    """Photons/s per (photon reaching the spot, sr): flux x air transmission of the beam path x detector
    solid angle x detector efficiency."""
    at_spot = math.exp(-xraylib.CS_Total_CP(AIR, inst.monochromatic_keV) * RHO_AIR * inst.beam_path_mm / 10)
    return inst.flux_photons_s * at_spot * inst.detector_solid_angle_sr * _eff(inst, energy_keV)


def test_air_is_one_percent_argon() -> None:
    assert 0.0125 < _w_argon() < 0.0131  # 0.93 vol % of dry air


def test_short_beam_path_gives_the_thin_target_intensity() -> None:
    """0.5 mm of air 20 mm from the detector: no attenuation, no geometry, the thin-target formula."""
    inst = _mono()
    lines = xrfnb.argon_lines(inst)
    length_cm = 0.05
    for name, macro in (("Ka", xraylib.KA_LINE), ("Kb", xraylib.KB_LINE)):
        sigma = xraylib.CS_FluorLine_Kissel_Cascade(18, macro, 10.0)
        e_line = xraylib.LineEnergy(18, macro)
        expected = _w_argon() * RHO_AIR * length_cm * sigma / (4 * math.pi) * _scale(inst, e_line)
        assert lines[name] == pytest.approx(expected, rel=5e-3)
    # Ka / Kb is argon's own ratio, times the detector's efficiencies
    ka, kb = xraylib.LineEnergy(18, xraylib.KA_LINE), xraylib.LineEnergy(18, xraylib.KB_LINE)
    assert lines["Ka"] / lines["Kb"] == pytest.approx(
        xraylib.CS_FluorLine_Kissel_Cascade(18, xraylib.KA_LINE, 10.0)
        / xraylib.CS_FluorLine_Kissel_Cascade(18, xraylib.KB_LINE, 10.0) * _eff(inst, ka) / _eff(inst, kb),
        rel=1e-3)


@pytest.mark.parametrize(("incidence", "takeoff"), [(45.0, 45.0), (90.0, 40.0)])
def test_long_beam_path_follows_the_point_by_point_integral(incidence: float, takeoff: float) -> None:
    """20 mm of beam path, detector 15 mm away: each point of the path weighted by the beam's attenuation up
    to the spot, the detector's solid angle from there (detector facing the spot) and the extra air to it."""
    d, length = 1.5, 2.0  # cm
    inst = _mono(beam_path_mm=10 * length, detector_path_mm=10 * d, incidence_deg=incidence,
                 takeoff_deg=takeoff)
    # angle at the spot between the source and the detector: the beam turns by psi1 + psi2
    phi = math.pi - math.radians(incidence + takeoff)
    mu_in = xraylib.CS_Total_CP(AIR, 10.0) * RHO_AIR
    e_ka = xraylib.LineEnergy(18, xraylib.KA_LINE)
    mu_out = xraylib.CS_Total_CP(AIR, e_ka) * RHO_AIR

    def integrand(s: float) -> float:
        r = math.sqrt(d * d + s * s - 2 * d * s * math.cos(phi))
        omega = d * d * (d - s * math.cos(phi)) / r**3
        return math.exp(mu_in * s) * omega * math.exp(-mu_out * (r - d))

    path, _ = scipy.integrate.quad(integrand, 0.0, length)
    sigma = xraylib.CS_FluorLine_Kissel_Cascade(18, xraylib.KA_LINE, 10.0)
    expected = _w_argon() * RHO_AIR * sigma / (4 * math.pi) * path * _scale(inst, e_ka)
    assert xrfnb.argon_lines(inst)["Ka"] == pytest.approx(expected, rel=2e-3)
    if (incidence, takeoff) == (45.0, 45.0):
        # a beam at right angles to the detector's line of sight: geometry alone gives L d / sqrt(L^2 + d^2)
        no_air = length * d / math.hypot(length, d)
        assert 0.9 * no_air < path < 1.1 * no_air


@pytest.mark.parametrize("pressure_mbar", [20.0, 300.0])
def test_argon_of_a_chamber_at_low_pressure_follows_the_ideal_gas(pressure_mbar: float) -> None:
    """Bruker M4 chambers pump air to ~20 mbar: the thin-target intensity scales with the gas density
    (rho = rho_1atm p / 1013.25 mbar), and the beam's and detector's air transmission with it."""
    inst = _mono(atmosphere_pressure_mbar=pressure_mbar)
    rho = RHO_AIR * pressure_mbar / 1013.25
    length_cm = 0.05
    sigma = xraylib.CS_FluorLine_Kissel_Cascade(18, xraylib.KA_LINE, 10.0)
    e_ka = xraylib.LineEnergy(18, xraylib.KA_LINE)
    at_spot = math.exp(-xraylib.CS_Total_CP(AIR, 10.0) * rho * length_cm)
    scale = inst.flux_photons_s * at_spot * inst.detector_solid_angle_sr * _eff(inst, e_ka)
    expected = _w_argon() * rho * length_cm * sigma / (4 * math.pi) * scale
    assert xrfnb.argon_lines(inst)["Ka"] == pytest.approx(expected, rel=5e-3)
    at_1_atm = xrfnb.argon_lines(_mono())["Ka"]
    assert xrfnb.argon_lines(inst)["Ka"] < at_1_atm * pressure_mbar / 1013.25 * 1.5


def test_no_argon_without_air() -> None:
    assert xrfnb.argon_lines(_mono(atmosphere="helium")) == {}
    assert xrfnb.argon_lines(_mono(atmosphere="vacuum")) == {}
    assert xrfnb.argon_lines(_mono(beam_path_mm=0.0)) == {}
    # below the Ar K edge (3.206 keV) a beam cannot excite it
    assert xrfnb.argon_lines(_mono(monochromatic_keV=3.0)) == {}


def test_argon_peak_in_single_and_batch_spectra() -> None:
    m6 = xrfnb.Instrument.preset("bruker-m6")
    stack = Stack([Layer({"ultramarine": 0.5}, thickness_um=40)], ground="chalk")
    with_ar = xrfnb.simulate(stack, m6, noise=False, pileup=False).counts
    without = xrfnb.simulate(stack, m6, noise=False, pileup=False, argon=False).counts
    diff = with_ar - without
    e = m6.channel_energy_keV
    # the peak sits at the published Ar Ka energy, the second one at Kb
    assert e[np.argmax(diff)] == pytest.approx(2.9577, abs=0.011)
    kb = np.abs(e - 3.1905) < 0.05
    assert diff[kb].max() > 0.03 * diff.max()
    # all of it is argon_lines' rate (a little of the response falls outside the channels)
    lines = xrfnb.argon_lines(m6)
    assert diff.sum() == pytest.approx(lines["Ka"] + lines["Kb"], rel=0.02)
    # the batch path draws the same lines
    arr = stack_arrays([stack])
    batch_ar = xrfnb.simulate_batch(arr, m6, noise=False, dtype=np.float64)[0]
    batch_no = xrfnb.simulate_batch(arr, m6, noise=False, dtype=np.float64, argon=False)[0]
    np.testing.assert_allclose(batch_ar - batch_no, diff, rtol=1e-4, atol=1e-6 * diff.max())
    # and the noisy event path too: on average, argon's share of the counts
    noisy = xrfnb.simulate_batch([stack] * 400, m6, counts=2000.0, rng=3, method="events")
    share = diff.sum() / with_ar.sum()
    win = (e > 2.85) & (e < 3.3)
    excess = noisy[:, win].sum() / 400 - 2000.0 * without[win].sum() / with_ar.sum()
    assert excess == pytest.approx(2000.0 * share, rel=0.1)


def test_argon_is_a_setup_line_for_the_element_fit() -> None:
    """The simulated Ar peak is found and reported as a line of the set-up, not of the sample."""
    m6 = xrfnb.Instrument.preset("bruker-m6")
    stack = Stack([Layer({"ultramarine": 0.5}, thickness_um=40)], ground="chalk")
    found = xrfnb.detect_elements(xrfnb.simulate(stack, m6, counts=2e5, rng=1), m6)
    assert {d.element: d.origin for d in found}.get("Ar") == "setup"
