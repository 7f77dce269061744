"""Expert baseline: pigment groups from hand-built element maps where the expert answer is unambiguous."""

from __future__ import annotations

import numpy as np
import pytest

import xrfnb
from xrfnb import FitError
from xrfnb.fitting.elements import ElementMaps

FAMILY = {"Pb": "L", "Hg": "L", "Ba": "L", "Cd": "L", "Sn": "L", "Sb": "L"}


def make_maps(intensity: dict[str, np.ndarray | float], dl: float | dict[str, float] = 10.0) -> ElementMaps:
    """ElementMaps from per-element intensity maps (or scalars = one pixel), detection limit ``dl`` counts."""
    els = tuple(intensity)
    arrays = [np.atleast_2d(np.asarray(intensity[e], dtype=np.float32)) for e in els]
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    inten = np.stack([np.broadcast_to(a, shape) for a in arrays], axis=-1)
    dls = np.stack(
        [np.full(shape, dl[e] if isinstance(dl, dict) else dl, dtype=np.float32) for e in els], axis=-1
    )
    return ElementMaps(
        elements=els,
        families=tuple(FAMILY.get(e, "K") for e in els),
        intensity=inten,
        sigma=dls / 3,
        detection_limit=dls,
        chi2=np.ones(shape, dtype=np.float32),
        residual=np.zeros(16),
    )


@pytest.fixture(scope="module")
def lib() -> xrfnb.PigmentLibrary:
    return xrfnb.pigments()


def groups(result, r=0, c=0) -> set[str]:
    return set(result.groups_at(r, c))


def test_chrome_yellow(lib) -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": 5000.0, "Cr": 800.0, "Cu": 3.0}))
    assert groups(res) == {lib["chrome yellow"].group}
    assert set(res.alternatives[lib["chrome yellow"].group]) == {"chrome yellow", "chrome orange"}
    # neither lead white nor viridian is claimed: chrome yellow explains both elements
    assert not res["lead white"][0, 0]
    assert not res["viridian"][0, 0]
    assert res.unexplained_at(0, 0) == ()


def test_vermilion_alone(lib) -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Hg": 3000.0, "Pb": 2.0, "Fe": 1.0}))
    assert groups(res) == {"vermilion"}
    assert res.alternatives["vermilion"] == ("vermilion",)


def test_lead_alone_lists_alternatives(lib) -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": 3000.0, "Cr": 5.0, "Sn": 2.0}))
    g = lib["lead white"].group
    assert groups(res) == {g}
    assert set(res.alternatives[g]) == {"lead white", "red lead", "massicot"}
    assert "red lead" in res.explain(0, 0)


def test_emerald_green_not_copper_group(lib) -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Cu": 2000.0, "As": 1500.0}))
    assert groups(res) == {lib["emerald green"].group}
    assert not res["azurite"][0, 0]
    assert not res["orpiment"][0, 0]


def test_nothing_above_detection_limit() -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": 9.0, "Cu": 5.0, "Hg": 0.0, "Fe": 10.0}))
    assert not res.present.any()
    assert not res.detected.any()
    assert not res.unexplained.any()
    assert (res.score <= 1).all()


def test_score_and_present_agree_and_are_scale_free() -> None:
    rng = np.random.default_rng(1)
    maps = {e: rng.uniform(0, 400, (6, 7)) for e in ("Pb", "Cr", "Cu", "As", "Fe", "Mn", "Ca", "Hg")}
    res = xrfnb.assign_pigments_by_elements(make_maps(maps))
    np.testing.assert_array_equal(res.present, res.score > 1)
    assert res.present.any() and not res.present.all()
    scaled = xrfnb.assign_pigments_by_elements(make_maps({e: 7.5 * v for e, v in maps.items()}, dl=75.0))
    np.testing.assert_array_equal(scaled.present, res.present)
    np.testing.assert_allclose(scaled.score, res.score, rtol=1e-5)


# ---------------------------------------------------------------- parsimony
def test_lead_white_mixed_with_chrome_yellow_needs_excess_lead(lib) -> None:
    """Rows 0-1: pure chrome yellow (Pb/Cr = 6); row 2: plus lead white (Pb/Cr = 18); row 3: lead white."""
    rng = np.random.default_rng(0)
    cr = np.array([[1000.0] * 4, [1000.0] * 4, [1000.0] * 4, [0.0] * 4])
    pb = np.array([[6000.0] * 4, [6000.0] * 4, [18000.0] * 4, [9000.0] * 4])
    cr, pb = rng.poisson(cr).astype(float), rng.poisson(pb).astype(float)
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": pb, "Cr": cr}))
    chrome = res[lib["chrome yellow"].group]
    lead = res[lib["lead white"].group]
    np.testing.assert_array_equal(chrome, [[True] * 4] * 3 + [[False] * 4])
    np.testing.assert_array_equal(lead, [[False] * 4] * 2 + [[True] * 4] * 2)
    assert not res["viridian"].any()  # no Cr beyond what chrome yellow accounts for
    assert res.unexplained_at(2, 0) == ()


def test_viridian_with_chrome_yellow_needs_excess_chromium(lib) -> None:
    pb = np.array([[6000.0, 6000.0, 6000.0, 6000.0]])
    cr = np.array([[1000.0, 1010.0, 990.0, 4000.0]])
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": pb, "Cr": cr}))
    np.testing.assert_array_equal(res["viridian"], [[False, False, False, True]])
    np.testing.assert_array_equal(res["chrome yellow"], [[True] * 4])
    assert not res["lead white"].any()


def test_two_specific_pigments_sharing_lead(lib) -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": 8000.0, "Cr": 900.0, "Sn": 400.0}))
    assert groups(res) == {lib["chrome yellow"].group, lib["lead-tin yellow"].group}


def test_umber_explains_iron_only_when_manganese_is_substantial(lib) -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Fe": 3000.0, "Mn": 600.0}))
    assert groups(res) == {lib["raw umber"].group}
    # Mn at 0.5 % of Fe is an impurity of an ochre, not an umber
    res = xrfnb.assign_pigments_by_elements(make_maps({"Fe": 3000.0, "Mn": 15.0}))
    assert groups(res) == {lib["yellow ochre"].group}
    assert set(res.alternatives[lib["yellow ochre"].group]) >= {"prussian blue", "yellow ochre", "mars red"}
    assert res.unexplained_at(0, 0) == ()


def test_ground_elements_do_not_make_a_pigment_more_specific(lib) -> None:
    # Cu + Ca: a copper pigment on a chalk ground is as likely as Egyptian blue: both are reported
    res = xrfnb.assign_pigments_by_elements(make_maps({"Cu": 2000.0, "Ca": 3000.0}))
    assert groups(res) == {lib["azurite"].group, "egyptian blue"}
    # whereas Cu + As (As is specific) explains the copper group away
    res = xrfnb.assign_pigments_by_elements(make_maps({"Cu": 2000.0, "As": 3000.0}))
    assert groups(res) == {lib["emerald green"].group}
    # and with Ca and no Cu, the calcium whites are indicated
    res = xrfnb.assign_pigments_by_elements(make_maps({"Cu": 0.0, "Ca": 3000.0}))
    assert groups(res) == {lib["chalk"].group}


# ---------------------------------------------------------------- trace elements
def test_trace_calcium_under_lead_white_is_not_a_pigment(lib) -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": 20000.0, "Ca": 60.0}))
    assert groups(res) == {lib["lead white"].group}
    assert not res.detected[0, 0, res.elements.index("Ca")]
    # a specific element at the same relative level is evidence (Hg is not a ground element) ...
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": 20000.0, "Hg": 60.0}), minor_fraction=0.0)
    assert groups(res) == {lib["lead white"].group, "vermilion"}
    # ... by default above 0.5 % of the strongest element, below which fit cross-talk is likelier
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": 20000.0, "Hg": 60.0}))
    assert groups(res) == {lib["lead white"].group}
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": 20000.0, "Hg": 200.0}))
    assert groups(res) == {lib["lead white"].group, "vermilion"}
    # and the relative threshold is a parameter
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": 20000.0, "Ca": 60.0}), trace_fraction=0.001)
    assert lib["chalk"].group in groups(res)


def test_iron_dirt_across_the_map_is_not_ochre(lib) -> None:
    fe = np.full((5, 5), 40.0)  # dirt: above the 10-count detection limit everywhere
    fe[2, 2] = 4000.0  # one ochre pixel
    pb = np.full((5, 5), 30.0)
    res = xrfnb.assign_pigments_by_elements(make_maps({"Fe": fe, "Pb": pb}))
    iron = res[lib["yellow ochre"].group]
    assert iron[2, 2] and iron.sum() == 1


def test_unexplained_elements(lib) -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": 5000.0, "Ni": 300.0, "Ar": 200.0, "Sn": 2.0}))
    assert res.unexplained_at(0, 0) == ("Ni",)  # Ar comes from the air path
    res = xrfnb.assign_pigments_by_elements(make_maps({"Sn": 500.0}))
    assert res.groups_at(0, 0) == ()
    assert res.unexplained_at(0, 0) == ("Sn",)
    # Co with As and Ni: smalt's impurities are explained by the cobalt group
    res = xrfnb.assign_pigments_by_elements(make_maps({"Co": 900.0, "Ni": 100.0}))
    assert groups(res) == {lib["smalt"].group}
    assert res.unexplained_at(0, 0) == ()


def test_missing_elements_make_groups_unassessable(lib) -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": 5000.0}))
    assert res.unassessable["vermilion"] == ("Hg",)
    assert lib["chrome yellow"].group in res.unassessable
    assert lib["lead white"].group not in res.unassessable


def test_silent_pigments_are_never_classes(lib) -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": 5000.0}))
    assert "carbon black" in res.silent and "madder lake" in res.silent
    assert all(g != lib["carbon black"].group for g in res.classes)
    assert len(res.colors) == len(res.classes) == res.score.shape[2]


def test_mask_and_nan_pixels() -> None:
    pb = np.array([[5000.0, np.nan, 5000.0]])
    res = xrfnb.assign_pigments_by_elements(make_maps({"Pb": pb}), mask=np.array([[False, False, True]]))
    assert res.present[0, 0].any()
    assert not res.present[0, 1:].any() and not res.detected[0, 1:].any()


def test_user_pigment_becomes_a_class(lib, tmp_path) -> None:
    path = tmp_path / "mo.toml"
    path.write_text(
        '[[pigment]]\nname = "molybdate orange"\nformula = "Pb7Cr4MoSO32"\ndensity_g_cm3 = 6.2\n'
        'elements = ["Pb", "Cr", "Mo"]\n'
    )
    res = xrfnb.assign_pigments_by_elements(
        make_maps({"Pb": 8000.0, "Cr": 900.0, "Mo": 200.0}), pigments=lib.with_file(path)
    )
    assert groups(res) == {"molybdate orange"}


def test_bad_input() -> None:
    with pytest.raises(FitError, match="ElementMaps"):
        xrfnb.assign_pigments_by_elements(np.zeros((2, 2, 3)))
    maps = make_maps({"Pb": 10.0})
    with pytest.raises(FitError, match="trace_fraction"):
        xrfnb.assign_pigments_by_elements(maps, trace_fraction=-0.1)
    with pytest.raises(FitError, match="mask"):
        xrfnb.assign_pigments_by_elements(maps, mask=np.zeros((3, 3), bool))
    with pytest.raises(FitError, match="PigmentLibrary"):
        xrfnb.assign_pigments_by_elements(maps, pigments=["lead white"])


def test_mixture_alternatives_are_reported(lib) -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Zn": 500.0, "Ba": 300.0}))
    assert groups(res) == {"lithopone"}
    assert ("zinc white", "barium white") in res.mixture_alternatives["lithopone"]
    assert "mixture of zinc white + barium white" in res.explain(0, 0)
    chrome = lib["chrome yellow"].group
    assert (lib["lead white"].group, lib["viridian"].group) in res.mixture_alternatives[chrome]
    assert "vermilion" not in res.mixture_alternatives


def test_select_aligns_to_other_classes(lib) -> None:
    res = xrfnb.assign_pigments_by_elements(make_maps({"Hg": 3000.0, "Pb": 4000.0}))
    score, present = res.select(["XRF-silent", "vermilion", lib["lead white"].group])
    assert present[0, 0].tolist() == [False, True, True]
    assert score[0, 0, 0] == 0.0 and score[0, 0, 1] == res.score[0, 0, res.index("vermilion")] > 1


def test_reference_ratios_reveal_excess_on_a_single_spectrum(lib) -> None:
    maps = make_maps({"Pb": 18000.0, "Cr": 1000.0})
    chrome, lead = lib["chrome yellow"].group, lib["lead white"].group
    assert groups(xrfnb.assign_pigments_by_elements(maps)) == {chrome}
    ref = {"chrome yellow": {"Pb": 6.0, "Cr": 1.0}}
    assert groups(xrfnb.assign_pigments_by_elements(maps, reference_ratios=ref)) == {chrome, lead}
    # a ratio matching the spectrum leaves no excess
    ref = {chrome: {"Pb": 17.0, "Cr": 1.0}}
    assert groups(xrfnb.assign_pigments_by_elements(maps, reference_ratios=ref)) == {chrome}
    with pytest.raises(FitError, match="positive intensity"):
        xrfnb.assign_pigments_by_elements(maps, reference_ratios={"chrome yellow": {"Pb": 6.0}})
    with pytest.raises(FitError, match="neither"):
        xrfnb.assign_pigments_by_elements(maps, reference_ratios={"carbon black": {"C": 1.0}})


# ---------------------------------------------------------------- end to end: simulator -> fit -> baseline
@pytest.fixture(scope="module")
def m6():
    return xrfnb.Instrument.preset("bruker-m6")


@pytest.mark.parametrize(
    ("layers", "expected", "explained_away"),
    [
        ([{"chrome yellow": 1.0}], ["chrome yellow"], ["lead white", "viridian"]),
        ([{"lead white": 0.8, "emerald green": 0.2}], ["emerald green"], ["azurite", "orpiment"]),
        ([{"vermilion": 1.0}, {"lead white": 1.0}], ["vermilion", "lead white"], []),
        ([{"yellow ochre": 1.0}], ["prussian blue"], ["raw umber"]),
    ],
)
def test_simulated_spectra_through_the_element_fit(lib, m6, layers, expected, explained_away) -> None:
    """Expert route on simulated spectra: 30 um paint (or two 15 um layers) on chalk, 1e5 counts."""
    stack = xrfnb.Stack(
        layers=[xrfnb.Layer(pigments=p, thickness_um=15 if len(layers) > 1 else 30) for p in layers],
        ground="chalk",
    )
    spectrum = xrfnb.simulate(stack, m6, counts=1e5, rng=3)
    maps = xrfnb.fit_elements(spectrum, m6)
    res = xrfnb.assign_pigments_by_elements(maps)
    found = groups(res)
    for name in expected:
        assert lib[name].group in found, res.explain()
    for name in explained_away:
        assert lib[name].group not in found, res.explain()
