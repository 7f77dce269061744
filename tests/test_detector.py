"""Detector response: peak shape, resolution, escape peaks, tailing, pile-up and counting noise."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import xraylib
from scipy.optimize import curve_fit

from xrfnb import DataError, EnergyCalibration, InstrumentError
from xrfnb.physics.detector import (
    DetectorResponse,
    back_icc_fraction,
    compton_escape_ratio,
    escape_fraction,
    icc_fraction,
    poisson_counts,
    si_ka_keV,
)
from xrfnb.physics.instrument import Instrument

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
# Si Ka1,2 (keV), X-ray Data Booklet (LBNL 2009), table 1-2
SI_KA_KEV = 1.740


@pytest.fixture(scope="module")
def m6() -> Instrument:
    return Instrument.preset("bruker-m6")


@pytest.fixture(scope="module")
def response(m6: Instrument) -> DetectorResponse:
    return DetectorResponse(m6)


def _fit_gaussian(x: np.ndarray, y: np.ndarray, centre: float, half_width: float) -> tuple[float, float]:
    sel = np.abs(x - centre) < half_width
    popt, _ = curve_fit(
        lambda t, a, mu, s: a * np.exp(-0.5 * ((t - mu) / s) ** 2),
        x[sel],
        y[sel],
        p0=(y[sel].max(), centre, half_width / 2),
    )
    return float(popt[1]), abs(float(popt[2])) * 2.0 * math.sqrt(2.0 * math.log(2.0))


def test_matrix_shape_dtype_and_normalisation(response: DetectorResponse) -> None:
    e = np.linspace(1.0, 30.0, 300)
    m = response.matrix(e)
    assert m.shape == (300, 4096) and m.dtype == np.float32
    assert m.min() >= 0.0
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=2e-5)
    # a line above the channel range only leaves its shelf and tail inside: the flat partial-collection
    # shelf spreads its share p evenly over 0-60 keV, so the channels (up to ~40 keV) hold about 2/3 of p
    p = response.instrument.partial_collection
    top = float(response.channel_energy_keV[-1])
    assert response.matrix([60.0]).sum() == pytest.approx(p * top / 60.0, rel=0.02, abs=1e-4)
    with pytest.raises(InstrumentError):
        response.matrix([-1.0])


def test_batched_rows_equal_single_line_rows(response: DetectorResponse) -> None:
    rng = np.random.default_rng(0)
    e = np.concatenate([rng.uniform(0.5, 45.0, 97), [2.0, 2.0, 5.9]])  # repeated energies too
    m = response.matrix(e)
    for k in (0, 13, 50, 96, 97, 98, 99):
        np.testing.assert_allclose(m[k], response.matrix(e[k : k + 1])[0], atol=1e-7)


@pytest.mark.parametrize(
    ("element", "line"), [("Mn", "Ka"), ("Fe", "Ka"), ("Cu", "Ka"), ("Pb", "La"), ("Sn", "Ka")]
)
def test_peak_centroid_at_line_energy(
    response: DetectorResponse, m6: Instrument, element: str, line: str
) -> None:
    from xrfnb import line_energy_keV

    energy = line_energy_keV(element, line)
    row = response.matrix([energy])[0].astype(float)
    ch = np.arange(m6.n_channels)
    mu, _ = _fit_gaussian(ch.astype(float), row, m6.calibration.channel(energy), 8.0)
    assert abs(mu - m6.calibration.channel(energy)) < 0.5


def test_fwhm_at_mn_ka_from_fitted_gaussian(response: DetectorResponse, m6: Instrument) -> None:
    row = response.matrix([5.8988])[0].astype(float)
    _, fwhm = _fit_gaussian(m6.channel_energy_keV, row, 5.8988, 0.1)
    assert fwhm == pytest.approx(0.142, abs=0.003)  # the preset's (the M6 header's): ~142 eV at Mn Ka


def test_fwhm_squared_grows_linearly_with_fano_slope(response: DetectorResponse, m6: Instrument) -> None:
    energies = np.array([3.0, 6.0, 10.0, 15.0, 20.0])
    rows = response.matrix(energies).astype(float)
    fwhm = np.array(
        [
            _fit_gaussian(m6.channel_energy_keV, r, e, 0.8 * m6.fwhm_keV(e))[1]
            for r, e in zip(rows, energies, strict=True)
        ]
    )
    slope, intercept = np.polyfit(energies, fwhm**2, 1)
    # Fano statistics: d(FWHM^2)/dE = 8 ln2 * F * w with the preset's F (0.1227, the M6 header's
    # SigmaLin / w) and w = 3.64 eV for Si
    assert slope == pytest.approx(8 * math.log(2) * m6.fano * 3.64e-3, rel=0.05)
    assert math.sqrt(intercept) == pytest.approx(m6.noise_keV, rel=0.1)


def test_escape_peak_position_and_fraction(response: DetectorResponse, m6: Instrument) -> None:
    energy = 8.0
    row = response.matrix([energy])[0].astype(float)
    x = m6.channel_energy_keV
    esc_energy = energy - SI_KA_KEV
    near = np.abs(x - esc_energy) < 0.3
    mu, _ = _fit_gaussian(x, row, esc_energy, 0.15)
    assert abs(mu - esc_energy) < 0.5 * m6.calibration.gain_keV + 0.001
    area = row[near].sum() - row[(x > esc_energy + 0.4) & (x < esc_energy + 1.0)].mean() * near.sum()
    # the window holds the Ka escape peak and the Kb one 0.1 keV below it
    assert area == pytest.approx(escape_fraction(energy), rel=0.05)
    assert si_ka_keV() == pytest.approx(SI_KA_KEV, abs=0.002)


def test_escape_fraction_published_values() -> None:
    """Reed & Ware (1972) escape probabilities for Si: ~1.6 % just above the edge at 2 keV, falling to
    ~0.4 % at Mn Ka and ~0.1 % at 10 keV (cf. Johansson & Campbell, *PIXE*, 1988, fig. 3.9)."""
    e = np.array([2.0, 5.8988, 10.0])
    f = escape_fraction(e)
    assert 0.012 < f[0] < 0.02
    assert 0.003 < f[1] < 0.006
    assert 0.0007 < f[2] < 0.0015
    assert np.all(np.diff(escape_fraction(np.linspace(1.85, 40, 50))) < 0)


def test_escape_fraction_agrees_with_pymca() -> None:
    """PyMca computes Si escape independently (its own attenuation data, Ka and Kb escape lines)."""
    elements = pytest.importorskip("PyMca5.PyMcaPhysics.xrf.Elements")
    for energy in (2.5, 4.0, 5.8988, 8.0, 12.0):
        theirs = elements.getEscape(["Si1", 2.33, 0.045], energy, ethreshold=0.001, ithreshold=1e-9)
        ka = sum(i for _, i, label in theirs if label.startswith("Si KL"))
        kb = sum(i for _, i, label in theirs if label.startswith("Si KM"))
        assert escape_fraction(energy, "Ka") == pytest.approx(ka, rel=0.05)
        assert escape_fraction(energy, "Kb") == pytest.approx(kb, rel=0.1)
        assert escape_fraction(energy) == pytest.approx(ka + kb, rel=0.05)


def test_no_escape_below_si_k_edge(response: DetectorResponse, m6: Instrument) -> None:
    edge = xraylib.EdgeEnergy(14, xraylib.K_SHELL)
    assert escape_fraction(edge - 0.01) == 0.0
    assert escape_fraction(edge + 0.01) > 0.01
    parts = response.components(np.array([1.7, 1.9]))
    assert parts["escape"][0] == 0.0 and parts["escape"][1] > 0.0


def test_low_energy_tailing_physics(response: DetectorResponse, m6: Instrument) -> None:
    # incomplete charge collection rises towards low energy and jumps at the Si K edge (Campbell 1997)
    icc = icc_fraction(np.array([1.8, 1.9, 3.0, 6.0, 12.0]), m6.icc_layer_um, m6.detector_thickness_um)
    assert icc[1] > 3 * icc[0]
    assert np.all(np.diff(icc[1:]) < 0)
    # shelf extends flat below the peak down to 0 keV; the peak-to-background ratio of an SDD at Mn Ka
    # is 10^3-10^5 (measured at ~1 keV)
    row = response.matrix([5.8988])[0].astype(float)
    x = m6.channel_energy_keV
    shelf = row[(x > 0.8) & (x < 1.2)]
    assert shelf.std() < 0.05 * shelf.mean()
    assert 1e3 < row.max() / shelf.mean() < 1e5
    assert row[x < 0].sum() == 0.0
    # the tail makes the low side of the peak heavier than the high side
    c = np.argmax(row)
    assert row[c - 35] > 10 * row[c + 35]


def test_custom_channel_grid_and_curved_calibration(m6: Instrument) -> None:
    cal = EnergyCalibration(0.01, 0.012, 2e-7)
    grid = cal.energies_keV(2048)
    r = DetectorResponse(m6, grid)
    row = r.matrix([6.4])[0].astype(float)
    ch = np.arange(2048, dtype=float)
    mu, _ = _fit_gaussian(ch, row, float(cal.channel(6.4)), 8.0)
    assert abs(mu - float(cal.channel(6.4))) < 0.5
    with pytest.raises(DataError):
        DetectorResponse(m6, grid[::-1])


def test_pileup_sum_peak_position_and_quadratic_growth(response: DetectorResponse, m6: Instrument) -> None:
    m = response.matrix([6.4038, 7.058])  # Fe Ka, Fe Kb
    live_time_s = 1.0
    x = m6.channel_energy_keV
    sum_region = np.abs(x - 2 * 6.4038) < 0.25
    sums = []
    for rate in (2e4, 4e4, 8e4):
        expected = (rate * live_time_s) * (np.array([0.88, 0.12]) @ m.astype(float))
        piled = response.pileup(expected, rate)
        # recorded counts: each pile-up event turns two photons into one
        p = 2 * rate * m6.pileup_time_s
        assert piled.sum() == pytest.approx(expected.sum() * (1 - p / 2), rel=1e-6)
        sums.append(piled[sum_region].sum())
        peak = x[np.argmax(np.where(x > 10, piled, 0))]
        assert abs(peak - 2 * 6.4038) < 1.5 * m6.calibration.gain_keV
    # sum-peak counts at fixed live time grow as rate^2
    assert sums[1] / sums[0] == pytest.approx(4.0, rel=0.01)
    assert sums[2] / sums[1] == pytest.approx(4.0, rel=0.01)
    batch = response.pileup(np.tile(expected, (3, 1)), np.array([0.0, 1e4, 1e5]))
    np.testing.assert_allclose(batch[0], expected)
    assert batch[2, sum_region].sum() > batch[1, sum_region].sum()


def test_poisson_counts_expectations() -> None:
    shape = np.exp(-0.5 * ((np.arange(512) - 200) / 8.0) ** 2) + 0.01
    counts = poisson_counts(np.tile(shape, (2000, 1)), total_counts=800, rng=np.random.default_rng(3))
    totals = counts.sum(axis=1)
    # Poisson: mean 800, standard error of the mean sqrt(800 / 2000) = 0.63
    assert abs(totals.mean() - 800) < 4 * math.sqrt(800 / 2000)
    assert totals.var() == pytest.approx(800, rel=0.15)
    rate = shape / shape.sum() * 1000.0  # counts/s
    counts = poisson_counts(np.tile(rate, (2000, 1)), live_time_s=0.5, rng=1)
    assert abs(counts.sum(axis=1).mean() - 500) < 4 * math.sqrt(500 / 2000)
    with pytest.raises(DataError):
        poisson_counts(shape, total_counts=10, live_time_s=1.0)
    with pytest.raises(DataError):
        poisson_counts(-shape)


def test_detector_efficiency_is_window_times_si_absorption(m6: Instrument) -> None:
    e = np.array([1.5, 3.0, 6.0, 12.0, 20.0, 30.0])
    eff = m6.detector_efficiency(e)
    mu = lambda z, x: np.array([xraylib.CS_Total(z, float(v)) for v in x])  # noqa: E731
    tau_si = np.array([xraylib.CS_Photo(14, float(v)) for v in e])
    air = xraylib.GetCompoundDataNISTByName("Air, Dry (near sea level)")
    mu_air = sum(w * mu(z, e) for z, w in zip(air["Elements"], air["massFractions"], strict=True))
    expected = (
        np.exp(-mu_air * air["density"] * m6.detector_path_mm / 10)
        * np.exp(-mu(4, e) * 1.848 * 12.5e-4)
        * np.exp(-mu(14, e) * 2.33 * m6.dead_layer_um * 1e-4)
        * tau_si
        / mu(14, e)
        * (1 - np.exp(-mu(14, e) * 2.33 * 450e-4))
    )
    np.testing.assert_allclose(eff, expected, rtol=1e-6)
    # 450 um Si stops almost everything at 6 keV, and becomes transparent at high energy
    assert eff[2] > 0.9 and eff[5] < 0.2


def test_fwhm_convention_matches_pymca_fit_of_real_steel_spectrum() -> None:
    """Steel.spe (PyMca example data) with PyMca's fitted noise/Fano: FWHM formula within 10 % of the
    widths fitted here to the measured Fe Ka and Cr Ka peaks (PyMca uses 3.85 eV per e-h pair)."""
    path = REAL / "Steel.spe"
    if not path.exists():
        pytest.skip(f"real spectra not available at {REAL}")
    tokens = path.read_text().split("$DATA:")[1].split()
    counts = np.array([float(t) for t in tokens[2:]])
    inst = Instrument(
        anode=None,
        monochromatic_keV=16.0,
        noise_keV=0.127439,
        fano=0.101156,
        pair_energy_eV=3.85,
        calibration=EnergyCalibration(-0.00612446976449, 0.0119281593146),
        n_channels=counts.size,
    )
    x = inst.channel_energy_keV
    for energy in (6.4038, 5.4147):  # Fe Ka, Cr Ka (rate-weighted, xraylib)
        _, fwhm = _fit_gaussian(x, counts, energy, 0.9 * float(inst.fwhm_keV(energy)))
        assert float(inst.fwhm_keV(energy)) == pytest.approx(fwhm, rel=0.1)


def test_back_layer_share_is_beer_lambert_absorption_at_the_back() -> None:
    """P_back(E): the share of absorbed photons absorbed in the last b um of a T um crystal, by direct
    integration of the exponential depth distribution with Hubbell and Seltzer's Si attenuation (NIST
    X-ray mass attenuation tables: 10.34 cm2/g at 15 keV, 4.464 at 20 keV, log-log interpolated to
    17 keV); nil at 5 keV, rising towards b/T for photons that cross the crystal (absorbed evenly)."""
    mu_rho = math.exp(
        np.interp(math.log(17.0), [math.log(15.0), math.log(20.0)], [math.log(10.34), math.log(4.464)])
    )
    mu = mu_rho * 2.33e-4  # per um
    depth = np.linspace(0.0, 450.0, 45001)
    density = np.exp(-mu * depth)
    expected = np.trapezoid(density[depth >= 440.0], depth[depth >= 440.0]) / np.trapezoid(density, depth)
    f = back_icc_fraction(np.array([5.0, 10.0, 17.0, 40.0]), 10.0, 450.0)
    assert f[2] == pytest.approx(expected, rel=0.05)
    assert f[0] < 1e-10 and f[0] < f[1] < f[2] < f[3] < 10.0 / 450.0
    assert f[3] == pytest.approx(10.0 / 450.0, rel=0.1)
    assert np.all(back_icc_fraction(np.array([5.0, 17.0]), 0.0, 450.0) == 0.0)


def test_back_layer_shelf_is_flat_and_taken_from_the_peak() -> None:
    """A 17 keV photon absorbed in the back layer lands evenly between 0 and 17 keV: the row holds
    P_back / 17 per keV at 2-14 keV and P_back less in the peak."""
    base = Instrument.preset("bruker-m4").with_(
        icc_layer_um=0.0, escape=False, partial_collection=0.0, back_icc_layer_um=0.0
    )
    e = base.channel_energy_keV
    gain = base.calibration.gain_keV
    plain = base.detector_response().matrix(np.array([17.0]), dtype=np.float64)[0]
    back = (
        base.with_(back_icc_layer_um=10.0).detector_response().matrix(np.array([17.0]), dtype=np.float64)[0]
    )
    p = float(back_icc_fraction(17.0, 10.0, base.detector_thickness_um))
    band = (e > 2.0) & (e < 14.0)
    assert np.allclose(back[band] / gain, p / 17.0, rtol=0.02)
    peak = np.abs(e - 17.0) < 0.5
    assert back[peak].sum() == pytest.approx(plain[peak].sum() - p * (1 - 0.5 / 17.0), rel=2e-3)


def test_detector_compton_events_lie_below_the_compton_edge() -> None:
    """A 30 keV photon Compton-scattered in the crystal leaves at most the Compton edge
    2 E^2 / (m c^2 + 2 E) = 3.03 keV (Compton 1923); those events are r(E) per photo-absorbed photon,
    r growing with E as photo-absorption falls (sigma_C / tau of Si, xraylib); a thin crystal lets every
    scattered photon out (r -> sigma_C / tau); the efficiency counts them and each row keeps summing to 1."""
    edge = 2 * 30.0**2 / (510.99895 + 2 * 30.0)
    base = Instrument.preset("bruker-m4").with_(detector_compton=False)
    inst = base.with_(detector_compton=True)
    e = inst.channel_energy_keV
    row = inst.detector_response().matrix(np.array([30.0]), dtype=np.float64)[0]
    plain = base.detector_response().matrix(np.array([30.0]), dtype=np.float64)[0]
    r = float(compton_escape_ratio(30.0, inst.detector_thickness_um))
    extra = row - plain / (1 + r)
    fwhm = float(inst.fwhm_keV(edge))
    assert extra[e > edge + 2 * fwhm].sum() == pytest.approx(0.0, abs=1e-3 * r)
    assert extra[(e > 0.05) & (e < edge + 2 * fwhm)].sum() == pytest.approx(r / (1 + r), rel=0.02)
    assert row.sum() == pytest.approx(plain.sum(), rel=1e-3)
    ratios = compton_escape_ratio(np.array([10.0, 20.0, 30.0, 40.0]), 450.0)
    assert np.all(np.diff(ratios) > 0)
    thin = float(compton_escape_ratio(30.0, 1.0))
    assert thin == pytest.approx(xraylib.CS_Compt(14, 30.0) / xraylib.CS_Photo(14, 30.0), rel=0.02)
    eff = inst.detector_efficiency(np.array([30.0]))[0] / base.detector_efficiency(np.array([30.0]))[0]
    assert eff == pytest.approx(1 + r, rel=1e-9)
