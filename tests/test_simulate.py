"""simulate(), simulate_batch() and line_intensities() with real instruments."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import xraylib

import xrfnb
from xrfnb import InstrumentError, Layer, SimulationError, Stack
from xrfnb.physics.fp import compton_energy_keV
from xrfnb.physics.simulate import (
    StackArrays,
    _chamber_yield,
    chamber_lines,
    expected_spectrum,
    simulate_batch,
    simulation_setup,
    stack_arrays,
)


@pytest.fixture(scope="module")
def m6() -> xrfnb.Instrument:
    return xrfnb.Instrument.preset("bruker-m6")


@pytest.fixture(scope="module")
def painting() -> Stack:
    return Stack([Layer({"vermilion": 0.4}, thickness_um=15),
                  Layer({"lead white": 0.7, "red ochre": 0.1}, thickness_um=40)], ground="chalk")


def test_line_table(m6, painting) -> None:
    table = xrfnb.line_intensities(painting, m6)
    assert len(table) > 20
    assert set(table.element) >= {"Hg", "Pb", "Fe", "S"}
    # Hg is only in layer 0, Pb and Fe only in layer 1
    assert set(table.layer[table.mask(element="Hg")]) == {0}
    assert set(table.layer[table.mask(element="Pb")]) == {1}
    np.testing.assert_allclose(table.intensity, table.primary + table.secondary)
    assert np.all(np.diff(table.energy_keV) >= 0)
    # energies of named families agree with xraylib (group means) within 30 eV
    for el, fam in (("Hg", "La"), ("Pb", "Lb"), ("Fe", "Ka")):
        t = table.select(element=el, family=fam)
        mean_e = np.sum(t.energy_keV * t.intensity) / t.intensity.sum()
        assert mean_e == pytest.approx(xrfnb.line_energy_keV(el, fam), abs=0.03 if fam != "Lb" else 0.15)
    row = next(table.rows())
    assert row.intensity > 0 and isinstance(row.element, str)
    assert 0 < table.detector_efficiency.min() and table.detector_efficiency.max() <= 1


def test_overpaint_reduces_buried_lines(m6) -> None:
    lead = Layer({"lead white": 0.8}, thickness_um=30)
    bare = xrfnb.line_intensities(Stack([lead]), m6).total("Pb", "La")
    covered = [xrfnb.line_intensities(Stack([Layer({"titanium white": 0.5}, thickness_um=t), lead]), m6)
               .total("Pb", "La") for t in (5, 10, 20, 40)]
    assert bare > covered[0] > covered[1] > covered[2] > covered[3] > 0


def test_simulate_spectrum_peaks_where_lines_are(m6, painting) -> None:
    spec = xrfnb.simulate(painting, m6, counts=200_000, rng=3)
    assert isinstance(spec, xrfnb.Spectrum)
    assert spec.n_channels == m6.n_channels
    assert spec.calibration == m6.calibration
    assert spec.total_counts == pytest.approx(200_000, rel=0.01)
    assert spec.metadata["simulated"] is True
    e = spec.energy_keV
    for el, fam in (("Hg", "La"), ("Pb", "Lb")):
        e0 = xrfnb.line_energy_keV(el, fam)
        win = np.abs(e - e0) < 0.1
        assert e[win][np.argmax(spec.counts[win])] == pytest.approx(e0, abs=0.03)


def test_rayleigh_and_compton_peaks_of_the_anode_line(m6) -> None:
    from xrfnb.physics import fp as _fp
    from xrfnb.physics.simulate import simulation_setup, tables_for

    stack = Stack([Layer({"C57H98O6": 1.0}, binder=None, thickness_um=2000, density_g_cm3=1.0)])
    setup = simulation_setup(m6)
    arr = stack_arrays([stack])
    T = tables_for(arr.elements, setup)
    ray, comp = _fp.scatter(arr.weight_fraction, arr.mass_thickness_g_cm2, T)
    ray_spec = ((ray * setup.eff_rayleigh) @ setup.rayleigh_rows)[0]
    comp_spec = ((comp * setup.eff_compton) @ setup.compton_rows)[0]
    e = m6.channel_energy_keV
    rh_ka = xrfnb.line_energy_keV("Rh", "Ka")
    # beam normal to the painting, detector 60 deg above it (the M6 header): the photon turns by
    # psi1 + psi2 = 150 deg (PyMca's and fisx's convention, setGeometry(alphaIn, alphaOut))
    assert (m6.incidence_deg, m6.takeoff_deg) == (90.0, 60.0)
    theta = np.radians(150.0)
    # Compton shift: E' = E / (1 + E/mc^2 (1 - cos theta)), written out independently
    e_c = rh_ka / (1 + rh_ka / 510.99895 * (1 - np.cos(theta)))
    assert compton_energy_keV(rh_ka, theta) == pytest.approx(e_c)
    win = np.abs(e - rh_ka) < 0.3
    assert e[win][np.argmax(ray_spec[win])] == pytest.approx(rh_ka, abs=0.03)
    win_c = np.abs(e - e_c) < 0.3
    assert e[win_c][np.argmax(comp_spec[win_c])] == pytest.approx(e_c, abs=0.05)
    # organic matter scatters mostly incoherently: the Compton peak dominates the Rayleigh peak
    assert comp_spec[win_c].sum() > 2 * ray_spec[win].sum()

    # the Compton peak is broader than the Rayleigh peak (Doppler broadening): width at half maximum
    def fwhm(y, centre):
        m = np.abs(e - centre) < 0.8
        x, y = e[m], y[m] - y[m].min()
        above = x[y >= 0.5 * y.max()]
        return above.max() - above.min()

    assert fwhm(comp_spec, e_c) > 1.25 * fwhm(ray_spec, rh_ka)
    # and both are in the full expected spectrum (the air's argon lines are tested on their own)
    full = expected_spectrum(stack, m6, argon=False)
    np.testing.assert_allclose(full, (ray_spec + comp_spec) * setup.exc.total_photons * setup.solid_angle_sr,
                               rtol=1e-6, atol=1e-9 * full.max())


def test_batch_matches_single_expected(m6, painting) -> None:
    other = Stack([Layer({"smalt": 0.5}, thickness_um=25)], ground="gypsum")
    batch = xrfnb.simulate_batch([painting, other], m6, noise=False, live_time_s=1.0)
    for i, st in enumerate((painting, other)):
        single = expected_spectrum(st, m6, secondary=False)
        np.testing.assert_allclose(batch[i], single, rtol=2e-3, atol=1e-3 * single.max())


@pytest.mark.parametrize("method", ["events", "poisson"])
def test_batch_noise_is_poisson_around_the_expectation(m6, painting, method) -> None:
    n = 400
    stacks = [painting] * n
    counts = xrfnb.simulate_batch(stacks, m6, counts=2000, rng=7, method=method)
    assert counts.shape == (n, m6.n_channels)
    assert np.all(counts == np.round(counts)) and counts.min() >= 0
    totals = counts.sum(axis=1)
    assert totals.mean() == pytest.approx(2000, rel=0.01)
    assert totals.var() == pytest.approx(2000, rel=0.25)  # Poisson: variance = mean
    expected = xrfnb.simulate_batch([painting], m6, counts=2000, noise=False)[0]
    mean = counts.mean(axis=0)
    # pooled over 50-channel bins the mean spectrum matches the expectation within 5 sigma
    b_mean = mean.reshape(-1, 64).sum(axis=1)
    b_exp = expected.reshape(-1, 64).sum(axis=1)
    sigma = np.sqrt(b_exp / n) + 1e-9
    assert np.all(np.abs(b_mean - b_exp) < 5 * sigma + 1e-3 * b_exp.max())


def test_batch_is_reproducible_and_thread_independent(m6, painting) -> None:
    stacks = [painting] * 1500
    a = xrfnb.simulate_batch(stacks, m6, counts=500, rng=11, threads=1)
    b = xrfnb.simulate_batch(stacks, m6, counts=500, rng=11, threads=2)
    np.testing.assert_array_equal(a, b)
    c = xrfnb.simulate_batch(stacks, m6, counts=500, rng=12, threads=2)
    assert not np.array_equal(a, c)


def test_stack_arrays_input(m6, painting) -> None:
    arr = stack_arrays([painting])
    again = StackArrays(arr.elements, arr.weight_fraction, arr.mass_thickness_g_cm2)
    x = xrfnb.simulate_batch(again, m6, noise=False)
    y = xrfnb.simulate_batch([painting], m6, noise=False)
    np.testing.assert_allclose(x, y)
    bad = arr.weight_fraction.copy()
    bad[0, 0] *= 0.5
    with pytest.raises(SimulationError, match="off 1 by"):
        StackArrays(arr.elements, bad, arr.mass_thickness_g_cm2)


def test_live_time_scales_counts(m6) -> None:
    st = Stack([Layer({"chrome yellow": 0.6}, thickness_um=10)])
    short = xrfnb.simulate(st, m6, live_time_s=0.01, noise=False, pileup=False)
    long = xrfnb.simulate(st, m6, live_time_s=0.1, noise=False, pileup=False)
    np.testing.assert_allclose(long.counts, 10 * short.counts, rtol=1e-9)
    assert long.live_time_s == pytest.approx(0.1)


def test_bad_input(m6, painting) -> None:
    with pytest.raises(SimulationError):
        xrfnb.simulate("lead white", m6)  # type: ignore[arg-type]
    with pytest.raises(SimulationError, match="counts"):
        xrfnb.simulate(painting, m6, counts=-5)
    with pytest.raises(SimulationError, match="live_time_s"):
        xrfnb.simulate(painting, m6, live_time_s=0)
    with pytest.raises(SimulationError, match="method"):
        xrfnb.simulate_batch([painting], m6, method="magic")


@dataclasses.dataclass(frozen=True)
class _HalfBlindInstrument(xrfnb.Instrument):
    """An instrument whose efficiency table stops at 8 keV (NaN above): a user-defined detector."""

    def detector_efficiency(self, energy_keV):
        eff = super().detector_efficiency(energy_keV)
        return np.where(np.asarray(energy_keV) > 8.0, np.nan, eff)


def test_missing_detector_efficiency_is_a_clear_error(m6, painting) -> None:
    inst = _HalfBlindInstrument(**{f.name: getattr(m6, f.name) for f in dataclasses.fields(m6)})
    with pytest.raises(InstrumentError, match="no valid detector efficiency at"):
        xrfnb.line_intensities(painting, inst)


def test_monochromatic_source_excites_only_edges_below_it() -> None:
    sync = xrfnb.Instrument.preset("synchrotron")
    e0 = sync.monochromatic_keV
    st = Stack([Layer({"lead white": 0.5, "zinc white": 0.3}, thickness_um=10)])
    table = xrfnb.line_intensities(st, sync)
    for el in set(table.element):
        z = xraylib.SymbolToAtomicNumber(el)
        rows = table.select(element=el)
        for fam in set(rows.family):
            shell = {"K": xraylib.K_SHELL, "L": xraylib.L3_SHELL, "M": xraylib.M5_SHELL}[fam[0]]
            assert xraylib.EdgeEnergy(z, shell) < e0


def test_batch_hands_out_the_line_counts_behind_its_spectra(m6, painting) -> None:
    """The per-layer line intensities the training labels are built from add up to the spectrum."""
    from xrfnb.physics.simulate import simulation_setup, tables_for

    arr = stack_arrays([painting, painting])
    keep: dict = {}
    counts = np.array([1000.0, 20000.0])
    spec = xrfnb.simulate_batch(arr, m6, counts=counts, noise=False, scatter=False, argon=False,
                                dtype=np.float64, keep=keep)
    line_counts = keep["primary"] * keep["line_detected"][None, None, :] * keep["scale"][:, None, None]
    # without scatter (and the air's argon) every count of the spectrum is a sample line count, and both
    # are the requested totals
    np.testing.assert_allclose(spec.sum(axis=1), counts, rtol=1e-6)
    np.testing.assert_allclose(line_counts.sum(axis=(1, 2)), counts, rtol=1e-6)
    # each line comes from the layers that hold its element: Hg from the top layer, Pb from the second
    T = tables_for(arr.elements, simulation_setup(m6))
    el = np.array([xraylib.AtomicNumberToSymbol(int(z)) for z in T.elements])[T.line_element]
    # keep names the lines too: element symbols and xraylib energies of the simulator's lines
    np.testing.assert_array_equal(keep["line_element"], el)
    np.testing.assert_array_equal(keep["line_energy_keV"], T.line_energy_keV)
    hg, pb = el == "Hg", el == "Pb"
    assert line_counts[:, 0, hg].sum() > 0 and line_counts[:, 1:, hg].sum() == 0
    assert line_counts[:, 1, pb].sum() > 0 and line_counts[:, 0, pb].sum() == 0
    # the noisy spectra drawn alongside are the same spectra simulate_batch draws
    a = xrfnb.simulate_batch(arr, m6, counts=counts, rng=3, keep={})
    np.testing.assert_array_equal(a, xrfnb.simulate_batch(arr, m6, counts=counts, rng=3))


def test_batch_pile_up_matches_the_single_spectrum_model(m6) -> None:
    """Batch pile-up (event pairs, and the expected-spectrum path) against xrfnb.simulate's pile-up
    (Detector.pileup on the single-stack expectation): same sum peaks, same recorded totals."""
    stack = Stack([Layer({"lead white": 0.7}, thickness_um=40)], ground="chalk")
    rate = 4.0e5  # p = 2 R tau = 0.4 with the 500 ns of this test's detector: strong, easy-to-see sum peaks
    inst = m6.with_(pileup_time_s=5e-7)
    ref = xrfnb.simulate(stack, inst, counts=4000, noise=False, secondary=False, pileup=False).counts
    ref_pile = inst.detector_response().pileup(ref, rate)
    exp = xrfnb.simulate_batch([stack], inst, counts=4000, noise=False, count_rate_cps=rate)[0]
    assert exp.sum() == pytest.approx(4000, rel=5e-3)
    energy = inst.channel_energy_keV
    # Pb L-alpha + Pb L-alpha sum peak at 2 x 10.55 keV: absent without pile-up, present with it
    win = np.abs(energy - 21.10) < 0.15
    plain = xrfnb.simulate_batch([stack], inst, counts=4000, noise=False)[0]
    assert exp[win].sum() > 20 * max(plain[win].sum(), 1e-3)
    np.testing.assert_allclose(exp, ref_pile / ref_pile.sum() * exp.sum(), rtol=3e-3, atol=1e-4 * exp.max())
    # the event draw: mean of many noisy spectra matches the expectation, pooled over 64-channel bins
    n = 300
    counts = xrfnb.simulate_batch([stack] * n, inst, counts=4000, rng=5, method="events", count_rate_cps=rate)
    assert counts.sum(axis=1).mean() == pytest.approx(4000, rel=0.01)
    b_mean = counts.mean(axis=0).reshape(-1, 64).sum(axis=1)
    b_exp = exp.reshape(-1, 64).sum(axis=1)
    sigma = np.sqrt(b_exp / n) + 1e-9
    assert np.all(np.abs(b_mean - b_exp) < 5 * sigma + 2e-3 * b_exp.max())
    with pytest.raises(SimulationError, match="count_rate_cps"):
        xrfnb.simulate_batch([stack], inst, counts=4000, count_rate_cps=-1.0)


# --- the instrument's own wall lines (Instrument.chamber_walls_sr) --------------------------------------

PMMA_BLANK = Stack([], substrate=Layer({"C5H8O2": 1.0}, binder=None, thickness_um=10_000.0,
                                       density_g_cm3=1.18))


def test_no_walls_no_chamber_lines(m6) -> None:
    """Presets without walls simulate exactly what they did before the walls existed."""
    assert m6.chamber_walls_sr == ()
    assert chamber_lines(PMMA_BLANK, m6) == {}
    a = xrfnb.simulate(PMMA_BLANK, m6, noise=False).counts
    b = xrfnb.simulate(PMMA_BLANK, m6, noise=False, chamber=False).counts
    np.testing.assert_array_equal(a, b)


def test_chamber_lines_are_linear_in_the_walls_and_agree_in_batches() -> None:
    """Wall lines scale with each wall's solid angle; single spectra, batches (expected and event draws)
    and chamber_lines() give the same amount."""
    base = xrfnb.Instrument.preset("bruker-m4").with_(chamber_walls_sr={})
    one = chamber_lines(PMMA_BLANK, base.with_(chamber_walls_sr={"Ni": 0.01}))
    two = chamber_lines(PMMA_BLANK, base.with_(chamber_walls_sr={"Ni": 0.02, "Fe": 0.01}))
    assert set(two) == {"Fe Ka", "Fe Kb", "Ni Ka", "Ni Kb"}
    assert two["Ni Ka"] == pytest.approx(2 * one["Ni Ka"], rel=1e-9)
    inst = base.with_(chamber_walls_sr={"Ni": 0.05})
    lines = chamber_lines(PMMA_BLANK, inst)
    total = sum(lines.values())
    single = xrfnb.simulate(PMMA_BLANK, inst, noise=False, pileup=False).counts.sum() - xrfnb.simulate(
        PMMA_BLANK, inst, noise=False, pileup=False, chamber=False).counts.sum()
    batch = simulate_batch([PMMA_BLANK], inst, noise=False, secondary=True)[0].sum() - simulate_batch(
        [PMMA_BLANK], inst, noise=False, secondary=True, chamber=False)[0].sum()
    assert single == pytest.approx(total, rel=0.02)  # less what falls outside the channels
    assert batch == pytest.approx(single, rel=1e-3)
    events = simulate_batch([PMMA_BLANK] * 200, inst, live_time_s=0.01, method="events", rng=3)
    expected = simulate_batch([PMMA_BLANK], inst, live_time_s=0.01, noise=False)[0]
    e = inst.channel_energy_keV
    ni = (e > 7.35) & (e < 7.6)
    assert events[:, ni].sum(axis=1).mean() == pytest.approx(expected[ni].sum(), rel=0.05)


@pytest.mark.parametrize(("beam_keV", "excited"), [(8.2, {"Fe"}), (8.5, {"Fe", "Ni"})])
def test_walls_are_excited_only_above_their_k_edge(beam_keV, excited) -> None:
    """A monochromatic beam scattered by the blank excites a wall only above its K edge (Ni 8.333 keV,
    Fe 7.112 keV, xraylib)."""
    inst = xrfnb.Instrument.preset("synchrotron").with_(monochromatic_keV=beam_keV, atmosphere="vacuum",
                                                          chamber_walls_sr={"Fe": 0.01, "Ni": 0.01})
    lines = chamber_lines(PMMA_BLANK, inst)
    assert {k.split()[0] for k, v in lines.items() if v > 0} == excited


def test_wall_yield_is_the_thick_target_primary_fluorescence() -> None:
    """Per photon the sample sends out, a wall of Omega sr gives Omega * Omega_det * eff * y(E) detected
    line photons, y the primary fluorescence per sr of a thick pure target at equal incidence and exit
    angles: the same number the FP engine gives for a thick pure Ni sample at 45/45 deg."""
    inst = xrfnb.Instrument.preset("synchrotron").with_(monochromatic_keV=17.4, atmosphere="vacuum",
                                                          incidence_deg=45.0, takeoff_deg=45.0)
    ni = Stack([Layer({"Ni": 1.0}, binder=None, thickness_um=5000.0)])
    table = xrfnb.line_intensities(ni, inst, secondary=False)
    setup = simulation_setup(inst)
    fp_ka = table.total("Ni", "Ka") / (setup.exc.total_photons * setup.solid_angle_sr)  # incl. efficiency
    walls = inst.with_(chamber_walls_sr={"Ni": 0.1})
    _, y = _chamber_yield(walls, np.array([17.4]))
    # _chamber_yield: per photon per sr from the sample, with the wall's 0.1 sr; Ka = Ka1 + Ka2 here
    assert y[0, 0] / 0.1 == pytest.approx(fp_ka, rel=0.02)
