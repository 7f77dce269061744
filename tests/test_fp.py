"""FP physics core against closed forms computed here directly from xraylib and published values."""

from __future__ import annotations

import numpy as np
import pytest
import xraylib

from xrfnb.physics import fp as _fp
from xrfnb.physics.simulate import stack_arrays
from xrfnb.physics.stack import Layer, Stack

PSI_IN, PSI_OUT = 45.0, 60.0
S1, S2 = np.sin(np.radians(PSI_IN)), np.sin(np.radians(PSI_OUT))


def _compute(stack: Stack, energies: list[float], weights: list[float] | None = None,
             psi_in: float = PSI_IN, psi_out: float = PSI_OUT, secondary: bool = False):
    arr = stack_arrays([stack])
    w = np.ones(len(energies)) if weights is None else np.asarray(weights, float)
    exc = _fp.rebin_excitation(np.asarray(energies, float), w)
    zs = tuple(xraylib.SymbolToAtomicNumber(e) for e in arr.elements)
    T = _fp.build_tables(zs, exc, psi_in, psi_out)
    out = _fp.primary(arr.weight_fraction, arr.mass_thickness_g_cm2, T)[0]
    if secondary:
        out = out + _fp.secondary_within_layers(arr.weight_fraction, arr.mass_thickness_g_cm2, T)[0]
    return out, T, arr


def _lines(T: _fp.Tables, arr, element: str, members: tuple[str, ...]) -> np.ndarray:
    zi = arr.elements.index(element)
    return np.array([T.line_element[i] == zi and any(m in T.line_name[i].split("+") for m in members)
                     for i in range(T.n_lines)], dtype=bool)


def test_line_energies_agree_with_published_values() -> None:
    # Bearden & Burr / X-ray Data Booklet (LBNL 2009): Fe Ka1 6.40384, Pb La1 10.5515, Hg Lb1 11.8230 keV
    exc = _fp.rebin_excitation(np.array([30.0]), np.array([1.0]))
    published = {(26, "KL3"): 6.40384, (82, "L3M5"): 10.5515, (80, "L2M4"): 11.8230, (29, "KL3"): 8.04778}
    for (z, line), e_pub in published.items():
        el = _fp.element_lines(z, exc)
        idx = [i for i, n in enumerate(el.names) if line in n.split("+")]
        assert idx, f"{line} of Z={z} missing"
        assert el.energy_keV[idx[0]] == pytest.approx(e_pub, abs=2e-3)
        assert el.energy_keV[idx[0]] == pytest.approx(xraylib.LineEnergy(z, getattr(xraylib, f"{line}_LINE")),
                                                      abs=1e-9)


def test_infinitely_thick_single_element_matches_sherman_closed_form() -> None:
    # I = w tau(E0) / (4 pi sin psi1 (mu(E0)/sin psi1 + mu(El)/sin psi2)), all data straight from xraylib
    e0 = 17.4
    stack = Stack([], substrate=Layer({"Fe2O3": 1.0}, binder=None, thickness_um=1, density_g_cm3=5.2))
    out, T, _ = _compute(stack, [e0])
    w_fe = xraylib.CompoundParser("Fe2O3")["massFractions"][1]
    mu0 = xraylib.CS_Total_CP("Fe2O3", e0)
    for line in ("KL3", "KM3+KM2"):
        i = T.line_name.index(line)
        macros = [getattr(xraylib, f"{m}_LINE") for m in line.split("+")]
        tau = sum(xraylib.CS_FluorLine_Kissel_Cascade(26, m, e0) for m in macros)
        mul = xraylib.CS_Total_CP("Fe2O3", T.line_energy_keV[i])
        expected = w_fe * tau / (4 * np.pi * S1 * (mu0 / S1 + mul / S2))
        assert out[0, i] == pytest.approx(expected, rel=1e-6)


def test_thin_film_linearity_and_thick_limit() -> None:
    def fe_ka(t_um: float) -> float:
        st = Stack([Layer({"Fe2O3": 0.3, "CaCO3": 0.7}, binder=None, thickness_um=t_um, density_g_cm3=2.5)])
        out, T, arr = _compute(st, [12.0, 20.0, 35.0], [1.0, 0.5, 0.2])
        return float(out[0, _lines(T, arr, "Fe", ("KL3", "KL2"))].sum())

    # thin film: intensity proportional to mass thickness (self-absorption < 0.2 % at 0.02 um)
    assert fe_ka(0.04) / fe_ka(0.02) == pytest.approx(2.0, rel=2e-3)
    # thick: saturates; 2 mm equals the infinite substrate
    st_inf = Stack([], substrate=Layer({"Fe2O3": 0.3, "CaCO3": 0.7}, binder=None, thickness_um=1,
                                       density_g_cm3=2.5))
    out, T, arr = _compute(st_inf, [12.0, 20.0, 35.0], [1.0, 0.5, 0.2])
    inf_val = float(out[0, _lines(T, arr, "Fe", ("KL3", "KL2"))].sum())
    assert fe_ka(2000.0) == pytest.approx(inf_val, rel=1e-6)
    assert fe_ka(20.0) < 0.9 * inf_val


@pytest.mark.parametrize("over_um", [2.0, 10.0, 30.0])
def test_buried_layer_attenuation_follows_beer_lambert(over_um: float) -> None:
    e0 = 20.0
    buried = Layer({"PbCO3": 0.8, "C57H98O6": 0.2}, binder=None, thickness_um=15, density_g_cm3=4.0)
    over = Layer({"TiO2": 0.4, "C57H98O6": 0.6}, binder=None, thickness_um=over_um, density_g_cm3=1.6)
    bare, T1, a1 = _compute(Stack([buried]), [e0])
    cov, T2, a2 = _compute(Stack([over, buried]), [e0])
    rho_t = over.density_g_cm3 * over_um * 1e-4
    for line in ("L3M5", "L2M4"):
        i1 = _lines(T1, a1, "Pb", (line,))
        i2 = _lines(T2, a2, "Pb", (line,))
        e_line = float(T1.line_energy_keV[i1][0])
        mu_e0 = sum(f * xraylib.CS_Total_CP(c, e0) for c, f in over.pigments.items())
        mu_el = sum(f * xraylib.CS_Total_CP(c, e_line) for c, f in over.pigments.items())
        expected = np.exp(-rho_t * (mu_e0 / S1 + mu_el / S2))
        ratio = cov[1, i2].sum() / bare[0, i1].sum()
        assert ratio == pytest.approx(expected, rel=0.01)
        assert expected < 0.999


def test_ka_kb_and_la_lb_ratios_agree_with_xraylib() -> None:
    # thin film (no absorption): line ratios are those of xraylib's production cross-sections
    e0 = 25.0
    st = Stack([Layer({"Cu": 0.5, "Pb": 0.5}, binder=None, thickness_um=0.001)])
    out, T, arr = _compute(st, [e0])
    ka = out[0, _lines(T, arr, "Cu", ("KL2", "KL3"))].sum()
    kb = out[0, _lines(T, arr, "Cu", ("KM2", "KM3", "KN2", "KN3"))].sum()
    ref = (sum(xraylib.RadRate(29, m) for m in (xraylib.KL2_LINE, xraylib.KL3_LINE))
           / sum(xraylib.RadRate(29, m) for m in (xraylib.KM2_LINE, xraylib.KM3_LINE)))
    assert ka / kb == pytest.approx(ref, rel=0.02)
    la = out[0, _lines(T, arr, "Pb", ("L3M5", "L3M4"))].sum()
    lb1 = out[0, _lines(T, arr, "Pb", ("L2M4",))].sum()
    fluor = xraylib.CS_FluorLine_Kissel_Cascade
    ref_l = (sum(fluor(82, m, e0) for m in (xraylib.L3M5_LINE, xraylib.L3M4_LINE))
             / fluor(82, xraylib.L2M4_LINE, e0))
    assert la / lb1 == pytest.approx(ref_l, rel=1e-3)
    # published order of magnitude: Pb La/Lb1 ~ 1.5-2.5 at 25 keV (Coster-Kronig feeds L3)
    assert 1.2 < la / lb1 < 3.0


def test_secondary_depth_integral_closed_form_and_thin_limit() -> None:
    # Shiraiwa-Fujino infinite-thickness closed form
    for a, b, c in [(50.0, 80.0, 30.0), (20.0, 2000.0, 10.0), (300.0, 40.0, 150.0)]:
        closed = (np.log1p(a / c) / a + np.log1p(b / c) / b) / (a + b)
        assert _fp.secondary_depth_integral(a, b, c, np.inf) == pytest.approx(closed, rel=2e-4)
        assert _fp.secondary_depth_integral(a, b, c, 100.0) == pytest.approx(closed, rel=2e-4)
    # thin film: D ~ T^2 [ln(1/(cT)) + 3/2 - gamma] (double integral of -ln|z - z'|)
    a, b, c, t = 50.0, 80.0, 30.0, 1e-6
    thin = t**2 * (np.log(1 / (c * t)) + 1.5 - np.euler_gamma)
    assert _fp.secondary_depth_integral(a, b, c, t) == pytest.approx(thin, rel=2e-3)


def test_secondary_enhancement_in_steel_agrees_with_monte_carlo() -> None:
    # SRM 1155 steel, 16 keV, 45/45 deg: enhancement (P+S)/P of XMI-MSIM Monte Carlo, Schoonjans et al.,
    # Spectrochim. Acta B 70 (2012) 10-23, table I (as quoted in fisx's test suite): Cr KL3 1.626,
    # Fe KL3 1.063. Our within-layer secondary fluorescence must reproduce them (bulk = one layer).
    steel = {"C": 0.0445, "N": 0.04, "Si": 0.5093, "P": 0.02, "S": 0.0175, "V": 0.05, "Cr": 18.37,
             "Mn": 1.619, "Fe": 64.314, "Co": 0.109, "Ni": 12.35, "Cu": 0.175, "As": 0.01067, "Mo": 2.26,
             "W": 0.11, "Pb": 0.001}
    total = sum(steel.values())
    layer = Layer({k: v / total for k, v in steel.items()}, binder=None, thickness_um=1, density_g_cm3=7.9)
    stack = Stack([], substrate=layer)
    prim, T, arr = _compute(stack, [16.0], psi_in=45.0, psi_out=45.0)
    both, _, _ = _compute(stack, [16.0], psi_in=45.0, psi_out=45.0, secondary=True)
    for element, ref in (("Cr", 1.626), ("Fe", 1.063)):
        i = _lines(T, arr, element, ("KL3",))
        assert both[0, i].sum() / prim[0, i].sum() == pytest.approx(ref, rel=0.03)


def test_secondary_fluorescence_vanishes_for_thin_films() -> None:
    def enh(t_um: float) -> float:
        st = Stack([Layer({"Fe": 0.5, "Cr": 0.5}, binder=None, thickness_um=t_um)])
        p, T, arr = _compute(st, [15.0])
        s, _, _ = _compute(st, [15.0], secondary=True)
        i = _lines(T, arr, "Cr", ("KL3",))
        return float(s[0, i].sum() / p[0, i].sum())

    thin, thick = enh(0.01), enh(200.0)
    assert 1.0 < thin < 1.01
    assert thick > 1.2


def test_rebin_excitation_rejects_bad_spectra() -> None:
    from xrfnb import SimulationError

    with pytest.raises(SimulationError, match="above the tube voltage"):
        _fp.rebin_excitation(np.array([10.0, 60.0]), np.array([1.0, 1.0]), tube_voltage_kV=50.0)
    with pytest.raises(SimulationError):
        _fp.rebin_excitation(np.array([10.0, -1.0]), np.array([1.0, 1.0]))
    with pytest.raises(SimulationError):
        _fp.rebin_excitation(np.array([10.0]), np.array([0.0]))
    fine = np.linspace(1, 50, 2000)
    exc = _fp.rebin_excitation(fine, np.ones_like(fine), max_bins=40)
    assert exc.energy_keV.size <= 40
    assert exc.weight.sum() == pytest.approx(1.0)
    assert np.sum(exc.weight * exc.energy_keV) == pytest.approx(np.mean(fine), rel=1e-9)


def test_bin_averaged_cross_sections_handle_edges() -> None:
    # Coarse bins straddling the Pb L3 edge must give the same thin-film intensity as the fine grid.
    fine = np.linspace(5.0, 40.0, 1400)
    photons = np.exp(-((fine - 20) / 10) ** 2)
    st = Stack([Layer({"Pb": 1.0}, binder=None, thickness_um=0.001)])
    arr = stack_arrays([st])
    out = []
    for n in (1400, 24):
        exc = _fp.rebin_excitation(fine, photons, max_bins=n, max_render_bins=1400)
        T = _fp.build_tables((82,), exc, 45.0, 45.0)
        out.append(_fp.primary(arr.weight_fraction, arr.mass_thickness_g_cm2, T)[0, 0])
    np.testing.assert_allclose(out[1], out[0], rtol=2e-3)


def test_splitting_a_layer_conserves_secondary_fluorescence() -> None:
    # one 20 um layer == two 10 um layers of the same material: the within-layer secondary of the whole
    # must equal within + between of the halves (checks the inter-layer term against the intra-layer one)
    comp = {"Fe": 0.4, "Cr": 0.3, "Ni": 0.3}
    one = Stack([Layer(comp, binder=None, thickness_um=20, density_g_cm3=7.9)])
    two = Stack([Layer(comp, binder=None, thickness_um=10, density_g_cm3=7.9)] * 2)
    results = []
    for st in (one, two):
        arr = stack_arrays([st])
        exc = _fp.rebin_excitation(np.array([12.0, 20.0]), np.array([1.0, 0.5]))
        zs = tuple(xraylib.SymbolToAtomicNumber(e) for e in arr.elements)
        T = _fp.build_tables(zs, exc, PSI_IN, PSI_OUT)
        W, mt = arr.weight_fraction, arr.mass_thickness_g_cm2
        p = _fp.primary(W, mt, T)[0].sum(axis=0)
        within = _fp.secondary_within_layers(W, mt, T)[0].sum(axis=0)
        between = _fp.secondary_between_layers(W, mt, T)[0].sum(axis=0)
        results.append((p, within, between, T))
    (p1, w1, b1, T), (p2, w2, b2, _) = results
    np.testing.assert_allclose(p2, p1, rtol=1e-5)
    assert np.all(b1 == 0)
    cr = _lines(T, stack_arrays([one]), "Cr", ("KL3",))
    assert b2[cr].sum() > 0.05 * w2[cr].sum()  # the between-halves part is substantial
    np.testing.assert_allclose((w2 + b2)[w1 > 0], w1[w1 > 0], rtol=2e-3)
