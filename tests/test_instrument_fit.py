"""``xrfnb.fit_instrument``: the instrument read back from simulated and real spectra (issue #18 item 1).

Targets (the issue's): anode right, tube voltage within 5 kV, scattering angle within 15 deg, FWHM at Mn Ka
within 10 %, energy at 10 keV within 15 eV. Simulated instruments lie outside the presets (no optics, other
geometries, channels and paths); their seeds (18201-18299) are used nowhere else. The real Bruker spectra
come from ``../shared/data/real`` (skipped with the reason where absent). The full table is
``benchmarks/bench_instrument_fit.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import xrfnb
from xrfnb import EnergyCalibration, Instrument, Layer, Stack
from xrfnb.fitting.instrument_fit import geometry_for_angle, thick_scatter
from xrfnb.physics.fp import scatter
from xrfnb.physics.simulate import simulation_setup, stack_arrays, tables_for

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
M4 = REAL / "bruker_m4_rh50kv"
needs_real = pytest.mark.skipif(not M4.is_dir(), reason=f"real Bruker spectra not found in {M4}")

CHALK = Layer({"chalk": 0.9}, thickness_um=500)


def _instrument(
    anode: str,
    kv: float,
    n_ch: int,
    gain_keV: float,
    incidence: float,
    takeoff: float,
    atmosphere: str = "air",
    fwhm_eV: float = 145.0,
    azimuth: float = 180.0,
) -> Instrument:
    return Instrument(
        name="test",
        anode=anode,
        tube_voltage_kV=kv,
        incidence_deg=incidence,
        takeoff_deg=takeoff,
        detector_azimuth_deg=azimuth,
        atmosphere=atmosphere,
        beam_path_mm=10.0,
        detector_path_mm=10.0,
        optics="none",
        source_solid_angle_sr=1e-4,
        pileup_time_s=2e-7,
        calibration=EnergyCalibration(-0.05, gain_keV),
        n_channels=n_ch,
    ).with_(fwhm_mnka_eV=fwhm_eV)


@pytest.fixture(scope="module")
def mo_fit() -> tuple[Instrument, xrfnb.InstrumentFit, float]:
    """A Mo tube at 35 kV, 1,024 channels of 40 eV, 120 deg, ochre on chalk, 5e6 counts."""
    inst = _instrument("Mo", 35.0, 1024, 0.04, 60.0, 60.0, fwhm_eV=150.0)
    stack = Stack([Layer({"yellow ochre": 0.6}, thickness_um=30)], substrate=CHALK)
    spectrum = xrfnb.simulate(stack, inst, counts=5e6, live_time_s=100.0, rng=18201)
    return inst, xrfnb.fit_instrument(spectrum), spectrum.metadata["count_rate_cps"]


def _e10_error_eV(fit: xrfnb.InstrumentFit, truth: EnergyCalibration) -> float:
    return 1000 * (float(fit.instrument.calibration.energy_keV(truth.channel(10.0))) - 10.0)


def test_simulated_mo_tube_meets_the_targets(mo_fit):
    inst, fit, _ = mo_fit
    p = fit.parameters
    assert p["anode"].value == "Mo" and p["anode"].status == "fitted"
    assert p["tube_voltage_kV"].status == "fitted"
    assert abs(p["tube_voltage_kV"].value - 35.0) <= 5.0
    assert abs(p["scattering_angle_deg"].value - inst.scattering_angle_deg) <= 15.0
    assert p["fwhm_mnka_eV"].value == pytest.approx(150.0, rel=0.10)
    assert abs(_e10_error_eV(fit, inst.calibration)) <= 15.0
    # the instrument carries the fitted values
    assert fit.instrument.anode == "Mo"
    assert fit.instrument.tube_voltage_kV == pytest.approx(p["tube_voltage_kV"].value)
    assert fit.instrument.scattering_angle_deg == pytest.approx(p["scattering_angle_deg"].value, abs=1e-6)
    assert float(fit.instrument.fwhm_keV(5.8988)) * 1000 == pytest.approx(p["fwhm_mnka_eV"].value, rel=1e-6)


def test_every_value_has_a_status_an_evidence_and_units_in_its_name(mo_fit):
    _, fit, _ = mo_fit
    for name, p in fit.parameters.items():
        assert p.status in ("fitted", "derived", "fixed", "start", "not determined"), name
        assert p.evidence, name
        if p.status == "fitted" and isinstance(p.value, float):
            assert p.sigma is not None and p.sigma >= 0, name
    assert {
        "offset_keV",
        "gain_keV",
        "noise_keV",
        "fano",
        "fwhm_mnka_eV",
        "anode",
        "tube_voltage_kV",
        "scattering_angle_deg",
        "atmosphere",
        "air_path_mm",
        "pileup_share",
        "detector_thickness_um",
        "detector_window",
    } <= set(fit.parameters)
    assert {"tube_filter", "tube_filter_um", "optics"} <= set(fit.parameters)
    assert fit["detector_thickness_um"].status in ("fitted", "not determined")
    assert fit["detector_window"].status == "not determined"
    assert fit.energy_sigma_keV(10.0) > 0


def test_summary_names_what_was_fitted_fixed_and_not_determined(mo_fit):
    _, fit, _ = mo_fit
    text = fit.summary()
    assert "tube anode" in text and "Mo" in text and "Compton" in text
    assert "Not determined" in text and "detector_window" in text
    assert str(fit) == text


def test_the_pile_up_share_comes_from_the_sum_peaks(mo_fit):
    inst, fit, rate_sim = mo_fit
    assert fit["count_rate_cps"].value == pytest.approx(5e6 / 100.0, rel=0.01)
    # the simulator's share of sums: 2 R tau at its own count rate (the spectrum is then scaled to 5e6)
    assert fit["pileup_share"].status == "fitted"
    expected = 2 * rate_sim * inst.pileup_time_s
    assert fit["pileup_share"].value == pytest.approx(expected, rel=0.2, abs=3 * fit["pileup_share"].sigma)


def test_fixed_values_are_kept_and_marked(mo_fit):
    inst, _, _ = mo_fit
    stack = Stack([Layer({"yellow ochre": 0.6}, thickness_um=30)], substrate=CHALK)
    spectrum = xrfnb.simulate(stack, inst, counts=2e6, live_time_s=100.0, rng=18202)
    fit = xrfnb.fit_instrument(
        spectrum, fixed={"anode": "Mo", "tube_voltage_kV": 35.0, "scattering_angle_deg": 120.0}
    )
    assert (
        fit["anode"].status == fit["tube_voltage_kV"].status == fit["scattering_angle_deg"].status == "fixed"
    )
    assert fit.instrument.tube_voltage_kV == 35.0
    assert fit.instrument.scattering_angle_deg == pytest.approx(120.0)
    assert "Fixed by the user" in fit.summary()


def test_the_start_instrument_supplies_what_is_not_fitted():
    inst = _instrument("Rh", 40.0, 1024, 0.04, 90.0, 45.0)
    stack = Stack([Layer({"lead white": 0.7}, thickness_um=30)], substrate=CHALK)
    spectrum = xrfnb.simulate(stack, inst, counts=2e6, live_time_s=50.0, rng=18203)
    start = Instrument.preset("lab-mo").with_(detector_thickness_um=1000.0, name="my scanner")
    fit = xrfnb.fit_instrument(spectrum, start=start)
    assert fit.start.detector_thickness_um == 1000.0
    assert fit.instrument.detector_thickness_um == 1000.0
    assert fit["anode"].value == "Rh"  # fitted over the start's Mo


def test_a_scan_is_fitted_through_its_sum_read_block_by_block():
    inst = _instrument("Ag", 40.0, 1024, 0.04, 80.0, 45.0)
    stack = Stack([Layer({"vermilion": 0.4}, thickness_um=20)], substrate=CHALK)
    pixels = xrfnb.simulate_batch([stack] * 48, inst, counts=2e5, rng=18204, secondary=False)
    counts = np.asarray(pixels, dtype=np.float64).reshape(6, 8, -1)
    scan = xrfnb.Scan(counts, inst.calibration, live_time_s=1.0, metadata={"source": "test scan"})
    fit = xrfnb.fit_instrument(scan)
    assert fit.n_pixels == 48
    assert fit.total_counts == pytest.approx(counts.sum())
    assert fit["count_rate_cps"].value == pytest.approx(counts.sum() / 48)
    assert fit["anode"].value == "Ag"
    assert "6 x 8 pixels" in fit.source
    dask = pytest.importorskip("dask.array")
    lazy = xrfnb.Scan(dask.from_array(counts, chunks=(2, 8, 1024)), inst.calibration, live_time_s=1.0)
    fit_lazy = xrfnb.fit_instrument(lazy)
    assert fit_lazy["anode"].value == "Ag"
    assert fit_lazy["offset_keV"].value == pytest.approx(fit["offset_keV"].value)


def test_a_monochromatic_beam_is_one_scattered_line_without_continuum():
    inst = Instrument.preset("synchrotron").with_(
        n_channels=1024, calibration=EnergyCalibration(0.0, 0.02), flux_photons_s=1e8, pileup_time_s=1e-7
    )
    stack = Stack([Layer({"lead white": 0.5, "vermilion": 0.2}, thickness_um=20)], substrate=CHALK)
    spectrum = xrfnb.simulate(stack, inst, counts=3e6, live_time_s=30.0, rng=18205)
    fit = xrfnb.fit_instrument(spectrum)
    assert fit["anode"].value is None and fit["anode"].status == "fitted"
    assert fit["monochromatic_keV"].value == pytest.approx(18.0, abs=0.05)
    assert abs(fit["scattering_angle_deg"].value - inst.scattering_angle_deg) <= 15.0
    assert fit.instrument.monochromatic_keV == pytest.approx(fit["monochromatic_keV"].value)


def test_a_spectrum_without_calibration_is_calibrated_blind():
    inst = _instrument("Rh", 45.0, 2048, 0.02, 45.0, 45.0)
    stack = Stack([Layer({"yellow ochre": 0.5, "lead white": 0.2}, thickness_um=30)], substrate=CHALK)
    sim = xrfnb.simulate(stack, inst, counts=5e6, live_time_s=100.0, rng=18206)
    raw = xrfnb.Spectrum(
        sim.counts,
        EnergyCalibration(0.0, 1.0),
        live_time_s=100.0,
        metadata={"calibrated": False, "source": "uncalibrated"},
    )
    fit = xrfnb.fit_instrument(raw)
    assert "blind search" in fit["offset_keV"].evidence
    assert abs(_e10_error_eV(fit, inst.calibration)) <= 15.0


@pytest.mark.parametrize(
    "name",
    ["bruker_m6_jetstream_p059.spx", "bruker_m4_rh50kv/pure_elements/Fe_50kv_50_ma_Rh_vac_D1.msa"],
)
def test_real_bruker_spectra_stripped_of_their_calibration_are_calibrated_blind(name):
    """Bruker spectra start at -0.96 keV and hold a zero-energy peak at channel 96; the blind search pins
    E = 0 on it (and keeps only peak widths a silicon detector can have). The reference is the file's own
    Esprit calibration. Before these, the M6 file came out 1.6 keV off and the Fe file 6.4 keV off."""
    path = REAL / name
    if not path.exists():
        pytest.skip(f"real spectra not found in {REAL} (../shared/data/real beside the checkout)")
    real = xrfnb.load(path)
    raw = xrfnb.Spectrum(
        np.asarray(real.counts), EnergyCalibration(0.0, 1.0), metadata={"calibrated": False}
    )
    fit = xrfnb.fit_instrument(raw)
    assert fit.calibration_blind
    assert abs(_e10_error_eV(fit, real.calibration)) <= 15.0
    assert xrfnb.fit_instrument(real).calibration_blind is False


def test_geometry_for_angle_reaches_every_angle():
    for inst in (Instrument.preset("bruker-m4"), Instrument.preset("bruker-m6"), Instrument.preset("lab-mo")):
        for theta in (60.0, 90.0, 120.0, 132.0, 150.0, 170.0, 180.0):
            got = inst.with_(**geometry_for_angle(inst, theta)).scattering_angle_deg
            assert got == pytest.approx(theta, abs=1e-6), (inst.name, theta)


def test_thick_scatter_agrees_with_the_simulator():
    """The fit's thick-scatterer weights against the simulator's scatter of a thick chalk layer: the ratio
    of Compton to Rayleigh per incident energy (their absolute scale is free in the fit)."""
    inst = Instrument.preset("lab-mo")
    e = np.array([12.0, 17.5, 25.0])
    r, c = thick_scatter("CaCO3", e, inst.scattering_angle_deg, inst.incidence_deg, inst.takeoff_deg)
    setup = simulation_setup(inst)
    arr = stack_arrays([Stack([], substrate=Layer({"CaCO3": 1.0}, binder=None, density_g_cm3=2.7))])
    ray, comp = scatter(arr.weight_fraction, arr.mass_thickness_g_cm2, tables_for(arr.elements, setup))
    w = setup.exc.weight
    for k, energy in enumerate(e):
        j = int(np.argmin(np.abs(setup.exc.energy_keV - energy)))
        ratio_sim = comp[0, j] / ray[0, j]
        assert c[k] / r[k] == pytest.approx(ratio_sim, rel=0.15), energy
        assert w[j] > 0


def test_errors_say_what_is_missing():
    cal = EnergyCalibration(0.0, 0.02)
    with pytest.raises(xrfnb.FitError, match="too few counts"):
        xrfnb.fit_instrument(xrfnb.Spectrum(np.zeros(1024), cal))
    with pytest.raises(xrfnb.FitError, match="Spectrum or a Scan"):
        xrfnb.fit_instrument(np.ones(1024))  # type: ignore[arg-type]
    spectrum = xrfnb.Spectrum(np.random.default_rng(18207).poisson(50.0, 1024).astype(float), cal)
    with pytest.raises(xrfnb.InstrumentError, match="unknown fixed setting"):
        xrfnb.fit_instrument(spectrum, fixed={"anodes": "Rh"})


def test_too_few_counts_leave_values_not_determined_rather_than_wrong():
    inst = _instrument("Rh", 40.0, 1024, 0.04, 90.0, 45.0)
    stack = Stack([Layer({"yellow ochre": 0.6}, thickness_um=30)], substrate=CHALK)
    spectrum = xrfnb.simulate(stack, inst, counts=3e3, live_time_s=1.0, rng=18208)
    try:
        fit = xrfnb.fit_instrument(spectrum)
    except xrfnb.FitError as exc:
        assert "too few counts" in str(exc)
        return
    p = fit.parameters
    assert p["anode"].status == "not determined" or p["anode"].value == "Rh"
    if p["tube_voltage_kV"].status == "fitted":
        assert abs(p["tube_voltage_kV"].value - 40.0) <= 3 * max(p["tube_voltage_kV"].sigma or 0, 2.0)


@pytest.mark.parametrize(
    ("anode", "kv", "atmosphere", "sample", "seed"),
    [("Rh", 20.0, "air", "yellow ochre", 18230), ("Pd", 22.0, "helium", "lead white", 18231)],
)
def test_a_tube_below_its_k_edge_is_named_by_its_l_lines(anode, kv, atmosphere, sample, seed):
    """Rh at 20 kV (K edge 23.2 keV) and Pd at 22 kV (24.35 keV) emit no K lines; at 2.7-2.8 keV their
    scattered L lines' Compton partners lie within the detector's width, so only the lines themselves
    name the tube: neither element is in any pigment or ground. The voltage then comes from the
    continuum's end; the angle is fitted within 15 deg or left not determined, never wrong."""
    inst = _instrument(anode, kv, 2048, 0.015, 60.0, 50.0, atmosphere=atmosphere, fwhm_eV=140.0)
    stack = Stack([Layer({sample: 0.6}, thickness_um=30)], substrate=CHALK)
    fit = xrfnb.fit_instrument(xrfnb.simulate(stack, inst, counts=1e7, live_time_s=100.0, rng=seed))
    p = fit.parameters
    assert (p["anode"].value, p["anode"].status) == (anode, "fitted")
    assert "La" in p["anode"].evidence
    assert p["tube_voltage_kV"].status == "fitted"
    assert abs(p["tube_voltage_kV"].value - kv) <= 5.0
    th = p["scattering_angle_deg"]
    assert th.status == "not determined" or abs(th.value - inst.scattering_angle_deg) <= 15.0


def test_a_w_tube_over_vermilion_takes_its_angle_from_its_l_lines_not_the_continuum():
    """A W tube at 40 kV emits L lines only (8-12 keV), under Hg and Pb L lines. The scattered continuum's
    Compton edge trades off against the voltage and put the angle at 81 +- 4 deg (truth 135) when it
    decided the angle; the lines' Compton shift (0.2-0.3 keV, about 2 detector sigma) gives it to 8-14 deg
    (one sigma): the truth must lie within two of its sigmas (this seed: 152 +- 14; the benchmark's:
    142 +- 8)."""
    inst = _instrument("W", 40.0, 2048, 0.02, 70.0, 65.0, fwhm_eV=160.0)
    stack = Stack(
        [Layer({"vermilion": 0.5}, thickness_um=15), Layer({"lead white": 0.6}, thickness_um=40)],
        substrate=CHALK,
    )
    fit = xrfnb.fit_instrument(xrfnb.simulate(stack, inst, counts=1e7, live_time_s=100.0, rng=18233))
    p = fit.parameters
    assert p["anode"].value == "W"
    th = p["scattering_angle_deg"]
    assert th.status == "fitted" and th.sigma is not None and th.sigma <= 15.0
    assert abs(th.value - inst.scattering_angle_deg) <= 2 * th.sigma
    assert abs(p["tube_voltage_kV"].value - 40.0) <= 5.0


def test_a_molybdenum_tube_below_its_k_edge_is_not_named_from_its_l_lines():
    """Mo is in pigments (molybdate orange): Mo L lines alone do not say the tube is Mo, and no other
    anode is named in its place."""
    inst = _instrument("Mo", 15.0, 2048, 0.015, 60.0, 50.0, fwhm_eV=140.0)
    stack = Stack([Layer({"yellow ochre": 0.6}, thickness_um=30)], substrate=CHALK)
    fit = xrfnb.fit_instrument(xrfnb.simulate(stack, inst, counts=1e7, live_time_s=100.0, rng=18232))
    assert fit.parameters["anode"].status == "not determined"


# ---------------------------------------------------------------------------------------------- real
@needs_real
def test_real_m4_rh_blank_against_its_header():
    path = M4 / "acrylic_blanks" / "20170510_D1_Rh_50kv_100mA_acryl_f1_0.spx"
    truth = Instrument.from_file(path, preset="bruker-m4")
    fit = xrfnb.fit_instrument(xrfnb.load(path))
    p = fit.parameters
    assert p["anode"].value == "Rh" and p["anode"].status == "fitted"
    assert abs(p["scattering_angle_deg"].value - truth.scattering_angle_deg) <= 15.0
    assert abs(_e10_error_eV(fit, truth.calibration)) <= 15.0
    # the spectrum stops at 40 keV, the tube runs at 50 kV: the voltage cannot be read off it
    assert p["tube_voltage_kV"].status == "not determined" or abs(p["tube_voltage_kV"].value - 50) <= 5


@needs_real
def test_real_m4_mo_blank_names_the_mo_tube():
    path = M4 / "acrylic_blanks" / "20170510_D1_Mo_50kv_100mA_acryl_0.spx"
    fit = xrfnb.fit_instrument(xrfnb.load(path))
    assert fit["anode"].value == "Mo"
    assert abs(fit["scattering_angle_deg"].value - 131.7) <= 15.0


@needs_real
def test_real_pure_iron_resolution_and_calibration():
    spectrum = xrfnb.load(M4 / "pure_elements" / "Fe_50kv_50_ma_Rh_vac_D1.msa")
    fit = xrfnb.fit_instrument(spectrum)
    header_fwhm = spectrum.metadata["emsa_detector"]["fwhm_mnka_eV"]
    assert fit["noise_keV"].status == "fitted"
    assert fit["fwhm_mnka_eV"].value == pytest.approx(header_fwhm, rel=0.10)
    assert abs(_e10_error_eV(fit, spectrum.calibration)) <= 15.0
    assert fit["anode"].value == "Rh"
    assert fit["atmosphere"].value in ("helium or vacuum", "air")


@needs_real
@pytest.mark.slow
@pytest.mark.parametrize(
    "name", sorted(p.name for p in (M4 / "acrylic_blanks").glob("*.spx")) if M4.is_dir() else ["(none)"]
)
def test_real_blanks_anode_angle_and_energy(name):
    path = M4 / "acrylic_blanks" / name
    truth = Instrument.from_file(path, preset="bruker-m4")
    fit = xrfnb.fit_instrument(xrfnb.load(path))
    assert fit["anode"].value == truth.anode
    assert abs(fit["scattering_angle_deg"].value - truth.scattering_angle_deg) <= 15.0
    assert abs(_e10_error_eV(fit, truth.calibration)) <= 15.0


@needs_real
@pytest.mark.slow
def test_real_m6_file():
    path = REAL / "bruker_m6_jetstream_p059.spx"
    fit = xrfnb.fit_instrument(xrfnb.load(path))
    assert fit["anode"].value == "Rh"
    assert abs(fit["scattering_angle_deg"].value - 150.0) <= 15.0
    assert fit["fwhm_mnka_eV"].value == pytest.approx(141.8, rel=0.10)


# ---------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize(
    ("anode", "kv", "n_ch", "gain", "inc", "out", "sample"),
    [
        ("Rh", 45.0, 2048, 0.025, 45.0, 45.0, "lead white"),
        ("W", 30.0, 1024, 0.035, 60.0, 60.0, "yellow ochre"),
        ("Ag", 35.0, 2048, 0.02, 80.0, 40.0, "chalk"),
        ("Pd", 40.0, 4096, 0.0125, 50.0, 60.0, "yellow ochre"),
        ("Cu", 25.0, 1024, 0.03, 90.0, 60.0, "lead white"),
    ],
)
def test_simulated_instruments_meet_the_targets(anode, kv, n_ch, gain, inc, out, sample):
    inst = _instrument(anode, kv, n_ch, gain, inc, out)
    stack = Stack([Layer({sample: 0.6}, thickness_um=30)], substrate=CHALK)
    seed = 18210 + ["Rh", "W", "Ag", "Pd", "Cu"].index(anode)
    fit = xrfnb.fit_instrument(xrfnb.simulate(stack, inst, counts=1e7, live_time_s=100.0, rng=seed))
    p = fit.parameters
    assert p["anode"].value == anode
    # every spectrum reaches past the tube voltage, so the continuum's end is seen
    assert p["tube_voltage_kV"].status == "fitted"
    assert abs(p["tube_voltage_kV"].value - kv) <= 5.0
    assert abs(p["scattering_angle_deg"].value - inst.scattering_angle_deg) <= 15.0
    assert p["fwhm_mnka_eV"].value == pytest.approx(145.0, rel=0.10)
    assert abs(_e10_error_eV(fit, inst.calibration)) <= 15.0
    assert math.isfinite(fit.seconds)


def test_cli_info_prints_the_fitted_instrument(tmp_path, capsys, mo_fit):
    from xrfnb.ui import cli

    inst, _, _ = mo_fit
    stack = Stack([Layer({"yellow ochre": 0.6}, thickness_um=30)], substrate=CHALK)
    spectrum = xrfnb.simulate(stack, inst, counts=2e6, live_time_s=100.0, rng=18209)
    path = tmp_path / "spectrum.h5"
    xrfnb.save(xrfnb.Spectrum(spectrum.counts, spectrum.calibration, live_time_s=100.0), path)
    assert cli.main(["info", str(path), "--fit-instrument", "--no-elements"]) == 0
    out = capsys.readouterr().out
    assert "fitted instrument (xrfnb.fit_instrument):" in out
    assert "tube anode" in out and "Mo" in out and "not determined" in out
