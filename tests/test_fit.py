"""Element maps by the fast linear fit, ROI maps and the SNIP background.

References are independent of the fitting code: the simulator's line table (xrfnb.line_intensities,
fundamental parameters with xraylib), analytic backgrounds, and Poisson statistics.
"""

from __future__ import annotations

import numpy as np
import pytest

import xrfnb
from xrfnb import EnergyCalibration, FitError, Scan, Spectrum, XRFNBError
from xrfnb.fitting.background import snip_background
from xrfnb.fitting.elements import ElementMaps, fit_elements
from xrfnb.fitting.roi import roi_maps

M6 = "bruker-m6"
#: the simulator renders the scattered tube continuum on coarse energy bins above ~16 keV (a comb of
#: peaks no real spectrum has), so validation fits stop below it
RANGE_KEV = (1.0, 15.5)


@pytest.fixture(scope="module")
def m6() -> xrfnb.Instrument:
    return xrfnb.Instrument.preset(M6)


def _one_layer() -> xrfnb.Stack:
    return xrfnb.Stack(
        [xrfnb.Layer({"lead white": 0.4, "red ochre": 0.1, "azurite": 0.2, "zinc white": 0.1, "chalk": 0.2},
                     thickness_um=30)]
    )


def _truth_counts(stack: xrfnb.Stack, inst: xrfnb.Instrument, spectrum: Spectrum, element: str,
                  family: str) -> float:
    """Detected counts of one line family in a spectrum simulated without pile-up (simulator's truth)."""
    table = xrfnb.line_intensities(stack, inst)
    scale = spectrum.total_counts / spectrum.metadata["count_rate_cps"]  # noise-free scale is counts/rate
    return table.total(element, family) * scale


# ------------------------------------------------------------------------------------------------
# SNIP
# ------------------------------------------------------------------------------------------------
def test_snip_recovers_analytic_background_under_peaks() -> None:
    x = np.arange(2048, dtype=float)
    background = 400.0 * np.exp(-x / 700.0) + 30.0 + 0.01 * x
    lines = ((5e4, 300), (800, 330), (2e4, 900), (300, 1500))
    peaks = sum(a * np.exp(-0.5 * ((x - c) / 5.0) ** 2) for a, c in lines)
    est = snip_background(background + peaks, iterations=25)
    inner = slice(100, 1950)
    assert np.max(np.abs(est[inner] - background[inner]) / background[inner]) < 0.05
    assert np.all(est <= background + peaks + 1e-9)


def test_snip_batch_equals_single_and_width_in_keV() -> None:
    rng = np.random.default_rng(0)
    x = np.arange(1024)
    y = rng.poisson(50 + 2000 * np.exp(-0.5 * ((x[None, :] - rng.integers(200, 800, (5, 1))) / 4) ** 2))
    batch = snip_background(y, width_keV=0.3, gain_keV=0.01, smooth_channels=3)
    single = np.stack([snip_background(row, iterations=30, smooth_channels=3) for row in y])
    np.testing.assert_allclose(batch, single)
    assert batch.shape == y.shape
    spec = Spectrum(y[0], EnergyCalibration(0.0, 0.02))
    np.testing.assert_allclose(snip_background(spec, width_keV=0.3), snip_background(y[0], iterations=15))


def test_snip_without_lls_and_bad_arguments() -> None:
    y = np.full(500, 10.0)
    np.testing.assert_allclose(snip_background(y, iterations=10, lls=False), 10.0)
    with pytest.raises(FitError):
        snip_background(np.array([1.0, 2.0]))
    with pytest.raises(FitError):
        snip_background(y, width_keV=-1.0, gain_keV=0.01)
    with pytest.raises(FitError):
        snip_background(np.array([1.0, np.nan, 3.0, 4.0]))


# ------------------------------------------------------------------------------------------------
# ElementMaps contract
# ------------------------------------------------------------------------------------------------
def test_element_maps_contract() -> None:
    inten = np.arange(12, dtype=float).reshape(2, 3, 2)
    maps = ElementMaps(("Fe", "Pb"), ("K", "L"), inten, np.ones_like(inten), np.full_like(inten, 4.5),
                       np.zeros((2, 3)), np.zeros(100), {"x": 1})
    assert maps.shape == (2, 3) and len(maps) == 2 and maps.labels == ("Fe K", "Pb L")
    assert maps.intensity.dtype == np.float32
    np.testing.assert_array_equal(maps["Pb"], inten[:, :, 1])
    np.testing.assert_array_equal(maps["Pb L"], inten[:, :, 1])
    np.testing.assert_array_equal(maps.present(), inten > 4.5)
    assert "Fe" in maps and "Cu" not in maps
    with pytest.raises(FitError, match="Fe K, Pb L"):
        maps["Cu"]
    with pytest.raises(FitError):
        ElementMaps(("Fe",), ("X",), inten[:, :, :1], inten[:, :, :1], inten[:, :, :1], np.zeros((2, 3)),
                    np.zeros(3))
    with pytest.raises(FitError):
        ElementMaps(("Fe", "Pb"), ("K", "L"), inten, inten, inten, np.zeros((3, 3)), np.zeros(3))


# ------------------------------------------------------------------------------------------------
# Validation against the simulator
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_layer_spectrum(m6: xrfnb.Instrument) -> tuple[xrfnb.Stack, Spectrum]:
    stack = _one_layer()
    return stack, xrfnb.simulate(stack, m6, counts=2e7, rng=3, pileup=False)


def test_fitted_family_intensities_match_simulator_truth(m6, one_layer_spectrum) -> None:
    """High counts: every family's fitted counts within 5 % of the simulator's line table."""
    stack, spectrum = one_layer_spectrum
    elements = ["Pb", "Fe", "Cu", "Zn", "Ca"]
    maps = fit_elements(spectrum, m6, elements, energy_range_keV=RANGE_KEV, progress=False)
    assert maps.shape == (1, 1) and maps.families == ("L", "K", "K", "K", "K")
    for el, fam in zip(maps.elements, maps.families, strict=True):
        truth = _truth_counts(stack, m6, spectrum, el, fam)
        assert maps[el][0, 0] == pytest.approx(truth, rel=0.05), el
        assert maps.present()[0, 0, maps.index(el)]
    # relative intensities (what an element map shows) hold too
    ratio = maps["Fe"][0, 0] / maps["Pb"][0, 0]
    truth_ratio = _truth_counts(stack, m6, spectrum, "Fe", "K") / _truth_counts(
        stack, m6, spectrum, "Pb", "L"
    )
    assert ratio == pytest.approx(truth_ratio, rel=0.05)
    assert maps.residual.shape == (spectrum.n_channels,)


def test_buried_layer_needs_free_kb(m6) -> None:
    """Cu under a lead/mercury layer: its Kb/Ka ratio grows; free_kb keeps the family total right."""
    stack = xrfnb.Stack([
        xrfnb.Layer({"vermilion": 0.3, "lead white": 0.5, "red ochre": 0.2}, thickness_um=15),
        xrfnb.Layer({"chalk": 0.6, "azurite": 0.4}, thickness_um=30),
    ])
    spectrum = xrfnb.simulate(stack, m6, counts=2e7, rng=4, pileup=False)
    maps = fit_elements(spectrum, m6, ["Pb", "Hg", "Fe", "Cu"], energy_range_keV=RANGE_KEV, free_kb=True,
                        progress=False)
    for el, fam in zip(maps.elements, maps.families, strict=True):
        assert maps[el][0, 0] == pytest.approx(_truth_counts(stack, m6, spectrum, el, fam), rel=0.05), el


@pytest.fixture(scope="module")
def blank_scan(m6: xrfnb.Instrument) -> tuple[Scan, np.ndarray]:
    """3000 single-pixel spectra (~3000 counts each) of chalk + lead white, Poisson noise."""
    stack = xrfnb.Stack([xrfnb.Layer({"chalk": 0.5, "lead white": 0.5}, thickness_um=40)])
    expected = np.asarray(xrfnb.simulate(stack, m6, noise=False, pileup=False).counts)
    expected = expected * (3000.0 / expected.sum())
    rng = np.random.default_rng(11)
    counts = rng.poisson(expected, size=(50, 60, expected.size)).astype(np.uint16)
    return Scan(counts, m6.calibration), expected


def test_detection_limits_are_three_sigma_on_blanks(m6, blank_scan) -> None:
    """Elements absent from the paint: at most a few % of pixels above their detection limit."""
    scan, _ = blank_scan
    absent = ["Cu", "Zn", "Cr", "Fe", "Hg", "Ti"]
    maps = fit_elements(scan, m6, ["Pb", "Ca", *absent], energy_range_keV=RANGE_KEV, progress=False)
    present = maps.present()
    for el in absent:
        rate = present[:, :, maps.index(el)].mean()
        assert rate <= 0.03, (el, rate)
    assert present[:, :, maps.index("Pb")].mean() > 0.99
    assert np.all(maps.detection_limit > 0)
    # chi-square of Poisson data against its own model: about 1 per degree of freedom
    assert 0.8 < float(np.median(maps.chi2)) < 1.3


def test_sigma_matches_pixel_scatter(m6, blank_scan) -> None:
    """The Poisson uncertainty equals the spread of the fitted intensity over identical pixels."""
    scan, _ = blank_scan
    maps = fit_elements(scan, m6, ["Pb", "Ca", "Fe"], energy_range_keV=RANGE_KEV, progress=False)
    for el in ("Pb", "Ca"):
        values = maps[el].ravel()
        assert values.std() == pytest.approx(float(np.mean(maps.sigma[:, :, maps.index(el)])), rel=0.12)


def test_scan_from_hdf5_in_blocks_equals_in_memory(m6, blank_scan, tmp_path) -> None:
    h5py = pytest.importorskip("h5py")
    scan, _ = blank_scan
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("counts", data=np.asarray(scan.counts), chunks=(5, 60, scan.n_channels))
    mem = fit_elements(scan, m6, ["Pb", "Ca", "Cu"], energy_range_keV=RANGE_KEV, progress=False)
    with h5py.File(path, "r") as f:
        lazy = Scan(f["counts"], m6.calibration)
        assert lazy.is_lazy
        out = fit_elements(lazy, m6, ["Pb", "Ca", "Cu"], energy_range_keV=RANGE_KEV, max_pixels=600,
                           progress=False)
    np.testing.assert_allclose(out.intensity, mem.intensity, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(out.chi2, mem.chi2, rtol=1e-4)
    # the residual is the data minus the model, summed over pixels
    assert np.abs(out.residual).sum() < 0.05 * float(np.asarray(scan.counts, dtype=float).sum())


def test_roi_maps_match_simulated_net_counts(m6) -> None:
    """ROI net counts equal the noise-free counts the element adds inside the ROI."""
    with_fe = xrfnb.Stack([xrfnb.Layer({"chalk": 0.8, "red ochre": 0.2}, thickness_um=30)])
    without = xrfnb.Stack([xrfnb.Layer({"chalk": 1.0}, thickness_um=30)])
    e_with = np.asarray(xrfnb.simulate(with_fe, m6, noise=False, pileup=False, live_time_s=10.0).counts)
    e_without = np.asarray(xrfnb.simulate(without, m6, noise=False, pileup=False, live_time_s=10.0).counts)
    scale = 1e7 / e_with.sum()
    spectrum = Spectrum(np.random.default_rng(5).poisson(e_with * scale).astype(float), m6.calibration)
    maps = roi_maps(spectrum, m6, ["Fe"], background="linear", progress=False)
    lo_keV, hi_keV = maps.metadata["rois_keV"]["Fe K"]
    e = m6.channel_energy_keV
    sel = (e >= lo_keV - 1e-9) & (e <= hi_keV + 1e-9)
    truth = float((e_with - e_without)[sel].sum() * scale)
    assert maps["Fe"][0, 0] == pytest.approx(truth, rel=0.05)
    assert np.isnan(maps.chi2).all()


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input_gives_clear_fit_errors(m6, one_layer_spectrum) -> None:
    _, spectrum = one_layer_spectrum
    with pytest.raises(FitError, match="empty"):
        fit_elements(spectrum, m6, [], progress=False)
    with pytest.raises(FitError, match="not excited"):
        fit_elements(spectrum, m6, ["Pb K"], progress=False)  # Pb K edge 88 keV > 50 kV
    mono = m6.with_(anode=None, monochromatic_keV=8.0)
    with pytest.raises(FitError, match="cannot be measured"):
        fit_elements(spectrum, mono, ["Ni"], progress=False)  # Ni K edge 8.33 keV; Ni L (0.85 keV) too low
    with pytest.raises(FitError, match="listed twice"):
        fit_elements(spectrum, m6, ["Fe", "Fe K"], progress=False)
    with pytest.raises(XRFNBError):
        fit_elements(spectrum, m6, ["Xx"], progress=False)
    far = spectrum.with_calibration(EnergyCalibration(100.0, 0.01))
    with pytest.raises(FitError, match="calibration"):
        fit_elements(far, m6, ["Fe"], progress=False)
    with pytest.raises(FitError, match="Spectrum or a Scan"):
        fit_elements(np.zeros(4096), m6, ["Fe"], progress=False)
    with pytest.raises(FitError):
        roi_maps(spectrum, m6, ["Fe"], background="quadratic", progress=False)
    with pytest.raises(FitError, match="matrix"):
        fit_elements(spectrum, m6, ["Fe"], matrix="Qq3", progress=False)
