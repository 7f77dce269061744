"""``xrfnb.fit_instrument``'s hardness: the primary filter, optics and detector thickness from the scattered
continuum's shape (issue #18; the fresco's spectra rise towards 30 keV while every twin built with the start
preset's lens and no filter fell).

Simulated instruments with known filters, optics and detectors (seeds 18251-18259, used nowhere else) and a
real Bruker M4 blank whose header names its filter; the fit starts from a preset that knows neither. A
material the data cannot single out must be reported "not determined"; the instrument must then still carry
a filter that shapes the beam as the true one does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import xrfnb
from xrfnb import EnergyCalibration, Instrument, Layer, Stack

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
M4 = REAL / "bruker_m4_rh50kv" / "acrylic_blanks"
CHALK = Layer({"chalk": 0.9}, thickness_um=500)
OCHRE = Stack([Layer({"yellow ochre": 0.6}, thickness_um=30)], substrate=CHALK)


def _instrument(anode, kv, filters, optics, det_um, n_ch=2048, gain=0.025):
    inst = Instrument(
        name="hardness test",
        anode=anode,
        tube_voltage_kV=kv,
        incidence_deg=60.0,
        takeoff_deg=60.0,
        beam_path_mm=10.0,
        detector_path_mm=10.0,
        optics=optics,
        source_solid_angle_sr=1e-4,
        pileup_time_s=2e-7,
        calibration=EnergyCalibration(-0.05, gain),
        n_channels=n_ch,
        tube_filters=filters,
        detector_thickness_um=det_um,
    )
    if optics == "polycapillary":
        # the lens of the fit's default start (bruker-m6): the fit tries that lens or none and does not fit
        # the lens's shape (cut-off, slope, floor), so a truth with another lens shape would be explained by
        # a filter in front of the start's lens
        m6 = Instrument.preset("bruker-m6")
        inst = inst.with_(
            **{
                k: getattr(m6, k)
                for k in (
                    "polycapillary_cutoff_keV",
                    "polycapillary_slope",
                    "polycapillary_floor",
                    "polycapillary_low_keV",
                )
            }
        )
    return inst.with_(fwhm_mnka_eV=145.0)


def _filter_transmission(inst: Instrument, energy_keV: float) -> float:
    out = 1.0
    for a in inst.tube_filters:
        out *= float(a.transmission(np.array([energy_keV]))[0])
    return out


def _fit(inst: Instrument, seed: int) -> xrfnb.InstrumentFit:
    return xrfnb.fit_instrument(xrfnb.simulate(OCHRE, inst, counts=1e7, live_time_s=100.0, rng=seed))


def test_a_copper_filtered_silver_tube_gets_a_filter_that_hardens_the_beam_as_copper_does():
    """Ag tube at 50 kV behind 50 um Cu, no optics, 1,024 channels; the start (bruker-m6) has a lens and no
    filter. Cu fits best on this seed; Ni, whose K edge lies 0.7 keV below Cu's, shapes the beam alike, so
    the material may be left not determined, but the instrument's filter must pass what 50 um Cu passes at
    17 and 28 keV within a factor 1.4 (17 keV: 9 % through 50 um; the fit's 56.5 um passes 7 %)."""
    truth = _instrument("Ag", 50.0, ({"material": "Cu", "thickness_um": 50.0},), "none", 450.0, 1024, 0.04)
    fit = _fit(truth, 18251)
    p = fit.parameters
    assert p["tube_filter"].status in ("fitted", "not determined")
    assert p["tube_filter"].value == "Cu"
    for e in (17.0, 28.0):
        ratio = _filter_transmission(fit.instrument, e) / _filter_transmission(truth, e)
        assert abs(np.log(ratio)) <= np.log(1.4), (e, ratio)
    assert (p["optics"].value, p["optics"].status) == ("none", "fitted")
    assert fit.instrument.optics == "none"
    assert fit.start.optics == "polycapillary"  # the start's lens was not kept
    assert "tube filter" in fit.summary()


def test_a_lens_is_found_and_no_filter_is_put_in_front_of_it():
    """Mo tube at 40 kV with a polycapillary lens, no filter: the start (bruker-m6) has a lens too; the fit
    must tell the lens from a filter: keep the lens ("fitted") and put no filter (or one that passes > 90 %
    at 10 keV).

    The truth's lens has the start's shape. The fit tries only the start's lens (else bruker-m4's) or none:
    it does not fit a lens's shape (cut-off, slope, floor), a real limitation. A lens of another shape
    (bruker-m4's since its refit to the blanks by depth, 1fe3909: cut-off 14.3 against 13.6 keV, floor
    0.0089 against 0.0005) is explained by the start's lens behind a filter (0.59 at 10 keV on this seed)."""
    truth = _instrument("Mo", 40.0, (), "polycapillary", 450.0)
    fit = _fit(truth, 18253)
    p = fit.parameters
    assert (p["optics"].value, p["optics"].status) == ("polycapillary", "fitted")
    assert _filter_transmission(fit.instrument, 10.0) > 0.9
    det = p["detector_thickness_um"]
    if det.status == "fitted":
        assert abs(det.value - 450.0) <= 2.5 * det.sigma


def test_no_filter_no_lens_and_the_detector_thickness_within_its_sigma():
    """Rh at 50 kV, no filter, no optics, 450 um: no lens (fitted), no filter claimed as fitted, the detector
    within two of its sigmas where fitted."""
    truth = _instrument("Rh", 50.0, (), "none", 450.0)
    fit = _fit(truth, 18255)
    p = fit.parameters
    # no filter, or none claimed: on this seed a 2 um Ni filter (its K edge near the ochre layer's Fe edge,
    # which the fit's thick scatterers model only as chalk with 10 % Fe) ties with Cu and is not determined
    assert p["tube_filter"].value == "none" or p["tube_filter"].status == "not determined"
    assert (p["optics"].value, p["optics"].status) == ("none", "fitted")
    det = p["detector_thickness_um"]
    assert det.status in ("fitted", "not determined")
    if det.status == "fitted":
        assert det.sigma is not None and abs(det.value - 450.0) <= 2.0 * det.sigma
    assert fit.instrument.detector_thickness_um == pytest.approx(det.value)


def test_fixed_filter_optics_and_detector_are_kept():
    truth = _instrument("Rh", 50.0, (), "none", 450.0)
    spectrum = xrfnb.simulate(OCHRE, truth, counts=3e6, live_time_s=100.0, rng=18256)
    fit = xrfnb.fit_instrument(
        spectrum, fixed={"tube_filters": (), "optics": "none", "detector_thickness_um": 500.0}
    )
    p = fit.parameters
    assert all(
        p[k].status == "fixed" for k in ("tube_filter", "tube_filter_um", "optics", "detector_thickness_um")
    )
    assert fit.instrument.tube_filters == () and fit.instrument.optics == "none"
    assert fit.instrument.detector_thickness_um == 500.0


@pytest.mark.skipif(not M4.is_dir(), reason=f"real Bruker M4 blanks not found in {M4} (../shared/data/real)")
def test_real_m4_blank_behind_630_um_aluminium():
    """NIST's acrylic blank f3 (Rh, polycapillary, 630 um Al in the header), fitted from bruker-m4, which
    has the lens and no filter: Al (Ti, whose K edge lies below the spectrum's useful range, shapes the beam
    alike and may tie), its transmission at 15 and 25 keV within 25 % of the header filter's, and the lens
    kept. The fit finds 606 um (15 keV: 1.05 of the header's): its thick PMMA scatters 20-40 keV photons
    from 5-20 mm deep, 19 mm from the detector, and is seen by depth as bruker-m4's lens was fitted
    (1fe3909); seen under the spot's solid angle at every depth it overweighs the hard scatter and finds
    439 um (1.51, the material not settled)."""
    path = M4 / "20170510_D1_Rh_50kv_100mA_acryl_f3_0.spx"
    truth = Instrument.from_file(path, preset="bruker-m4")
    fit = xrfnb.fit_instrument(xrfnb.load(path), start=Instrument.preset("bruker-m4"))
    p = fit.parameters
    alike = p["tube_filter"].value == "Al" or "Al " in p["tube_filter"].evidence
    assert alike, p["tube_filter"].evidence
    for e in (15.0, 25.0):
        assert _filter_transmission(fit.instrument, e) == pytest.approx(
            _filter_transmission(truth, e), rel=0.25
        )
    assert p["optics"].value == "polycapillary"
