"""Calls checked by physics (issue 19, item 2): the network's called set against its merge, split, drop and
swap alternatives, by paint-stack fits and BIC, for one spectrum and once per call pattern of a map.

Every spectrum is simulated (xrfnb.simulate: full physics, secondary fluorescence, pile-up, Poisson noise)
from library pigments on the Bruker M6 preset; the seeds 19_020_0xx are used nowhere else. The assertions
follow from the paint that was simulated: its element ratios are those of one pigment or of two, and a
pigment that is not there must not be needed.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

import xrfnb
from xrfnb.fitting.stackfit import poisson_deviance
from xrfnb.maps import mapping
from xrfnb.model import physics_check
from xrfnb.model.model import load_model
from xrfnb.model.physics_check import (
    DEFAULT_MARGIN,
    CallPatterns,
    PhysicsCheck,
    bin_spectrum,
    candidate_sets,
    check_calls,
    count_level,
    fitted_range_keV,
    refine_stack_fit,
)

LEAD, CR_OXIDE, CHROMATE = "lead pigments (Pb)", "chromium oxide greens (Cr)", "lead chromates (Pb, Cr)"
ZINC, COBALT, COBALT_GREEN = "zinc white", "cobalt pigments (Co)", "cobalt green"


@pytest.fixture(scope="module")
def m6():
    return xrfnb.Instrument.preset("bruker-m6")


@pytest.fixture(scope="module")
def model():
    return load_model("default", precision="float32")


@pytest.fixture(scope="module")
def elements(model):
    return model.class_elements


def _spectrum(m6, paint, seed, counts=3000.0, thickness_um=30.0):
    stack = xrfnb.Stack([xrfnb.Layer(paint, thickness_um=thickness_um)])
    return xrfnb.simulate(stack, m6, counts=counts, rng=np.random.default_rng(seed))


def _check(m6, elements, spec, called):
    return check_calls(spec.counts, m6, called, dict.fromkeys(called, "surface"), elements)


def _sets(res: PhysicsCheck, which: str = "alternatives") -> list[frozenset[str]]:
    return [frozenset(x.classes) for x in getattr(res, which)]


# -- the alternatives themselves (no fit) ---------------------------------------------------------------
def test_every_alternative_keeps_the_called_elements(elements):
    """Merge, split, drop and swap never lose an element the called set explains, nor add one."""
    for called in ([LEAD, CR_OXIDE, CHROMATE], [ZINC, COBALT], [CHROMATE], [COBALT_GREEN, ZINC],
                   ["iron pigments (Fe)", "umbers (Fe, Mn)"], ["vermilion", LEAD]):
        union = set().union(*(elements[c] for c in called))
        cands = candidate_sets(called, {}, elements)
        assert cands[0].move == "called" and set(cands[0].classes) == set(called)
        for cand in cands:
            assert set().union(*(elements[c] for c in cand.classes)) == union, cand
    moves = {c.move: c.classes for c in candidate_sets([ZINC, COBALT], {}, elements)}
    assert moves["merge"] == (COBALT_GREEN,)
    split = [c for c in candidate_sets([CHROMATE], {"lead chromates (Pb, Cr)": "buried"}, elements)
             if c.move == "split"]
    assert [set(c.classes) for c in split] == [{LEAD, CR_OXIDE}]
    assert split[0].layer == {LEAD: "buried", CR_OXIDE: "buried"}  # the parts stay where the class was
    assert [c.move for c in candidate_sets(["vermilion", LEAD], {}, elements)] == ["called"]


def test_count_level_is_log2_of_the_counts():
    assert count_level(np.array([1, 2, 3, 1023, 1024, 3000, 4096])).tolist() == [0, 1, 1, 9, 10, 11, 12]


# -- one spectrum ------------------------------------------------------------------------------------------
def test_chrome_yellow_alone_called_as_three_classes_is_merged(m6, elements):
    """PbCrO4 alone, called lead + chromium oxide + chrome yellow (issue 19): one pigment carries both
    elements at the ratio measured, so two extra classes buy no better fit and BIC takes the merge."""
    spec = _spectrum(m6, {"chrome yellow": 0.5}, 19_020_001)
    res = _check(m6, elements, spec, [LEAD, CR_OXIDE, CHROMATE])
    assert res.best_classes == (CHROMATE,)
    assert res.changed and res.best.move in ("merge", "drop, then drop", "drop, then merge")
    called = next(x for x in res.explanations if frozenset(x.classes) == {LEAD, CR_OXIDE, CHROMATE})
    # nested: the three-class fit is no worse (the refinement is continuous), but not by 2 x ln N
    assert called.delta_deviance <= 1.0
    assert called.delta_bic > 2 * math.log(res.n_counts) - 8.0
    assert "chrome yellow" in res.best.evidence and "Cr + Pb" in res.best.evidence
    assert res.best.fit is not None and res.best.fit.deviance == pytest.approx(res.best.deviance)


def test_lead_white_and_viridian_at_their_own_ratio_keep_both(m6, elements):
    """30 wt% lead white + 30 wt% viridian: Pb/Cr 1.2 by weight, PbCrO4 has 4.0. Called either way (both
    classes, or chrome yellow as the network did on independent physics), the check answers both
    classes, and chrome yellow cannot fit the Cr/Pb lines (ruled out, listed nowhere)."""
    spec = _spectrum(m6, {"lead white": 0.3, "viridian": 0.3}, 19_020_002)
    for called in ([LEAD, CR_OXIDE], [CHROMATE]):
        res = _check(m6, elements, spec, called)
        assert set(res.best_classes) == {LEAD, CR_OXIDE}, res.summary()
        assert frozenset({CHROMATE}) not in _sets(res)
        chromate = next(x for x in res.explanations if x.classes == (CHROMATE,))
        assert chromate.delta_bic > 10 * DEFAULT_MARGIN
    assert res.changed and res.best.move == "split"


def test_lead_white_and_viridian_at_the_chromate_ratio_are_never_silently_swapped(m6, elements):
    """Lead white + viridian mixed to PbCrO4's Pb/Cr ratio (0.46 x 0.80 / (0.135 x 0.684) = 4.0): the
    spectrum can hardly tell the two readings apart, so whichever is best, both are listed."""
    spec = _spectrum(m6, {"lead white": 0.46, "viridian": 0.135}, 19_020_003)
    res = _check(m6, elements, spec, [LEAD, CR_OXIDE])
    sets = _sets(res)
    assert frozenset({LEAD, CR_OXIDE}) in sets and frozenset({CHROMATE}) in sets, res.summary()
    if res.changed:  # swapped to chrome yellow: the network's reading stays in view with its numbers
        assert "lead white + viridian" in res.best.evidence


def test_drop_a_class_whose_elements_the_other_carries(m6, elements):
    """Cobalt green alone called cobalt green + zinc white: cobalt green carries Zn, at its own Zn/Co, so
    zinc white buys no better fit than chance and costs ln N in BIC: the drop is the lowest BIC at 3,000
    counts (ln N = 8) and at 40,000 (ln N = 10.6). It overrules the network's call only where ln N minus
    the deviance the superfluous zinc white buys by chance (0, or chi-squared with 1 degree of freedom)
    exceeds the switch of 10: never at 3,000 counts; at 40,000 only where zinc white buys less than 0.6,
    about three times in four, so there the rule is asserted, not one outcome, and with the switch at 0
    the drop is the call. Zinc white + a cobalt pigment (XRF cannot tell cobalt green from such a mixture:
    the library's note) fits within a few deviance units of cobalt green alone but pays ln N + 2 ln M (a
    third pigment, one of the M cobalt pigments) more, so it never has a lower BIC than the drop. With a
    real excess of zinc white (Zn/Co four times cobalt green's) dropping it is ruled out; cobalt green +
    zinc white and zinc white + cobalt blue then carry Zn and Co at any ratio and (Al being barely seen)
    fit alike, so the called set stays listed whichever is best."""
    low = _check(m6, elements, _spectrum(m6, {"cobalt green": 0.5}, 19_020_004), [COBALT_GREEN, ZINC])
    drop = next(x for x in low.explanations if x.move == "drop")
    assert not low.changed and drop in low.alternatives
    assert drop.delta_bic == pytest.approx(min(x.delta_bic for x in low.explanations))
    assert -physics_check.SWITCH_MARGIN <= drop.delta_bic < -2.0 and abs(drop.delta_deviance) < 3.0
    assert "not by enough to overrule" in low.best.evidence
    high = _spectrum(m6, {"cobalt green": 0.5}, 19_020_009, counts=40_000.0)
    n_cobalt = len(xrfnb.pigments().groups()[COBALT])  # cobalt blue, smalt, cobalt violet
    for switch in (physics_check.SWITCH_MARGIN, 0.0):
        res = check_calls(high.counts, m6, [COBALT_GREEN, ZINC],
                          dict.fromkeys([COBALT_GREEN, ZINC], "surface"), elements, switch=switch)
        by = {frozenset(x.classes): x for x in res.explanations}
        drop, called = by[frozenset({COBALT_GREEN})], by[frozenset({COBALT_GREEN, ZINC})]
        mixture = by[frozenset({ZINC, COBALT})]
        assert drop.bic == min(x.bic for x in res.explanations), res.summary()
        assert abs(called.deviance - drop.deviance) < DEFAULT_MARGIN
        assert mixture.bic - drop.bic > math.log(res.n_counts) + 2 * math.log(n_cobalt) - DEFAULT_MARGIN
        overrules = called.bic - drop.bic > switch
        assert res.changed == overrules and res.best is (drop if overrules else called), res.summary()
    assert res.changed and res.best_classes == (COBALT_GREEN,) and res.best.move == "drop"
    both = _check(m6, elements, _spectrum(m6, {"cobalt green": 0.15, "zinc white": 0.45}, 19_020_005),
                  [COBALT_GREEN, ZINC])
    assert ZINC in both.best_classes and frozenset({COBALT_GREEN, ZINC}) in _sets(both), both.summary()
    dropped = next(x for x in both.explanations if x.classes == (COBALT_GREEN,))
    assert dropped.delta_deviance > 10 * DEFAULT_MARGIN and frozenset({COBALT_GREEN}) not in _sets(both)


def test_refinement_fits_the_sum_peaks_of_a_bright_spectrum(m6):
    """Cobalt green, 50 wt% in 30 um, 40,000 counts at the count rate xrfnb.simulate gives it (1 s live
    time, about 180 kcps: a recorded event is a pile-up sum with p = 2 R tau = 0.036). The Zn Ka + Zn Ka sum
    peak lies at 2 x 8.639 keV (published Zn Ka1). Refined with pile-up, the fit's counts there are the
    simulator's own expectation, its deviance is within 20 of the truth's and it finds the paint (weight
    fraction and thickness); without, the sum peak is missing, the deviance thousands higher and the
    surface layer runs to the 500 um bound to make up continuum."""
    stack = xrfnb.Stack([xrfnb.Layer({"cobalt green": 0.5}, thickness_um=30.0)])
    spec = xrfnb.simulate(stack, m6, counts=40_000.0, rng=np.random.default_rng(19_020_009))
    truth = xrfnb.simulate(stack, m6, counts=40_000.0, noise=False)
    y, inst = bin_spectrum(spec.counts, m6, 4)
    erange = fitted_range_keV(inst)
    e = inst.calibration.energies_keV(y.size)
    sel = (e >= erange[0]) & (e <= erange[1])
    t = bin_spectrum(truth.counts, m6, 4)[0]
    t = t * (y[sel].sum() / t[sel].sum())
    d_truth = float(poisson_deviance(y[sel], t[sel]))
    start = xrfnb.fit_stack(y, inst, ["cobalt green"], energy_range_keV=erange, max_candidates=120)
    piled = refine_stack_fit(y, inst, start, energy_range_keV=erange)
    plain = refine_stack_fit(y, inst, start, energy_range_keV=erange, pileup=False)
    peak = np.abs(e - 2 * 8.639) < 0.15
    assert piled.expected[peak].sum() == pytest.approx(t[peak].sum(), rel=0.1)
    assert plain.expected[peak].sum() < 0.1 * t[peak].sum()
    assert piled.deviance < d_truth + 20.0 and plain.deviance > d_truth + 1000.0
    assert piled.weight_fractions[0]["cobalt green"] == pytest.approx(0.5, rel=0.1)
    assert piled.surface_thickness_um == pytest.approx(30.0, rel=0.2)


def test_no_alternative_no_change(m6, elements):
    """Vermilion with lead white: no class holds Hg and Pb, neither carries the other's element."""
    spec = _spectrum(m6, {"vermilion": 0.3, "lead white": 0.3}, 19_020_006)
    res = _check(m6, elements, spec, ["vermilion", LEAD])
    assert res.explanations == () and res.note == physics_check.NO_ALTERNATIVE and not res.changed
    assert res.best_classes == ("vermilion", LEAD) and res.alternatives == ()
    assert check_calls(spec.counts, m6, [], {}, elements).note == "no class called"
    unknown = check_calls(spec.counts, m6, ["mystery"], {}, {**elements, "mystery": ("Hg",)})
    assert not unknown.checked and "mystery" in unknown.note


def test_more_classes_than_a_training_stack_holds_are_not_fitted(m6, elements):
    """A called set larger than any training stack (3 layers x 3 pigments) is left unchecked at once, with
    the reason, instead of minutes of stack fits; the largest such set is still checked."""
    spec = _spectrum(m6, {"vermilion": 0.3, "lead white": 0.3}, 19_020_006)
    many = [c for c in elements if elements[c]][: physics_check.MAX_CHECKED_CLASSES + 1]
    assert len(many) == physics_check.MAX_CHECKED_CLASSES + 1 == 10
    t0 = time.perf_counter()
    res = _check(m6, elements, spec, many)
    assert time.perf_counter() - t0 < 1.0
    assert not res.checked and not res.changed and res.best_classes == tuple(many)
    assert "10 classes called, more than the 9" in res.note


# -- identify: present follows the check, the network's call stays ---------------------------------------
def test_identify_follows_the_check_and_keeps_the_network_call(model, m6):
    spec = _spectrum(m6, {"chrome yellow": 0.5}, 19_020_007)
    raw = model.identify(spec, check_physics=False)
    assert raw.physics_check is None and raw.alternatives == () and raw.present == raw.network_present
    ident = model.identify(spec)
    assert ident.network_present == raw.present
    np.testing.assert_array_equal(ident.probability, raw.probability)
    check = ident.physics_check
    assert check is not None and check.called == raw.present
    if check.checked:
        assert set(ident.present) == set(check.best_classes)
        assert ident.alternatives[0] is check.best and ident.alternatives == check.alternatives
        assert set(ident.layer) == set(ident.present)
        assert "physics check" in ident.summary()
        # the physics of the paint: one pigment with Pb and Cr at chrome yellow's ratio
        assert CHROMATE in {c for x in ident.alternatives for c in x.classes}
    else:
        assert ident.present == raw.present


# -- whole maps: one check per call pattern ----------------------------------------------------------------
def _scan(m6):
    """12 x 16 pixels: chrome yellow at ~1,400 and ~5,000 counts, lead white + viridian at ~3,000
    (three count levels), every pixel its own Poisson draw."""
    rng = np.random.default_rng(19_020_008)
    paints = [({"chrome yellow": 0.5}, 1400.0), ({"chrome yellow": 0.5}, 5000.0),
              ({"lead white": 0.3, "viridian": 0.3}, 3000.0)]
    stacks = [xrfnb.Stack([xrfnb.Layer(p, thickness_um=30.0)]) for p, _ in paints]
    mean = xrfnb.simulate_batch(stacks, m6, noise=False, dtype=np.float64)
    mean = mean / mean.sum(axis=1, keepdims=True) * np.array([c for _, c in paints])[:, None]
    region = np.repeat(np.arange(3), 4)[:, None] * np.ones((1, 16), int)  # 4 rows each
    counts = rng.poisson(mean[region]).astype(np.uint16)
    return xrfnb.Scan(counts, m6.calibration, metadata={"instrument": "bruker-m6"}), region


def test_map_checks_each_call_pattern_once(model, m6, monkeypatch, tmp_path):
    scan, region = _scan(m6)
    calls = []

    def counting(counts, instrument, called, layer, class_elements, **kw):
        calls.append((tuple(called), np.array(counts)))
        return check_calls(counts, instrument, called, layer, class_elements, **kw)

    monkeypatch.setattr(physics_check, "check_calls", counting)
    maps = xrfnb.map_pigments(scan, model, progress=False, out=tmp_path / "maps.h5", check_physics=48)
    meta = maps.metadata["physics_check"]
    pattern = np.asarray(maps.pattern[()])
    # the patterns are the distinct (called set, count level) of the pixels, as the network called them
    present = maps.binary()
    flat = np.asarray(scan.counts).reshape(-1, scan.shape[2])
    grid_counts = model.binned(flat, scan.calibration).sum(axis=1)  # the counts the model sees, 1-41 keV
    levels = count_level(grid_counts).reshape(scan.shape[:2])
    seen = {}
    for r in range(scan.shape[0]):
        for c in range(scan.shape[1]):
            called = tuple(k for k, name in enumerate(model.classes) if present[r, c, k])
            p = maps.pattern_at(r, c)
            if not called or maps.ood()[r, c]:
                assert p is None and pattern[r, c] == -1
                continue
            assert p.classes == tuple(model.classes[k] for k in called) and p.count_level == levels[r, c]
            seen.setdefault((called, int(levels[r, c])), set()).add(p.index)
    assert all(len(ids) == 1 for ids in seen.values()) and len(seen) == len(maps.patterns) == meta["patterns"]
    assert sum(p.n_pixels for p in maps.patterns) == int((pattern >= 0).sum())
    assert {int(lv) for (_, lv) in seen} >= {10, 12}  # chrome yellow at two count levels: two patterns
    # one check per pattern with enough pixels, on the mean spectrum of its pixels
    due = [p for p in maps.patterns if p.n_pixels >= mapping.PHYSICS_MIN_PIXELS]
    assert len(calls) == len(due) and meta["checked"] >= 2
    assert len({(called, round(float(s.sum()))) for called, s in calls}) == len(calls)
    for p in due:
        assert (p.check is not None and p.check.called == p.classes) or p.note == physics_check.NO_ALTERNATIVE
        where = pattern.reshape(-1) == p.index
        mean = flat[where][:32].astype(float).mean(axis=0)
        assert sum(called == p.classes and np.allclose(s, mean) for called, s in calls) == 1
        assert p.mean_counts == pytest.approx(float(grid_counts[where].mean()), rel=1e-5)
    for p in maps.patterns:
        if p not in due:
            assert p.check is None and "fewer than" in p.note
    # where the network saw Pb and Cr: chrome yellow's pixels end with chrome yellow best or listed, lead
    # white + viridian's (Pb/Cr 1.2, chrome yellow 4.0) with both and without chrome yellow
    for p in due:
        if p.check is None or not {"Pb", "Cr"} <= set(p.check.elements):
            continue
        mostly = np.bincount(region.reshape(-1)[pattern.reshape(-1) == p.index]).argmax()
        if mostly < 2:
            assert any(CHROMATE in x.classes for x in p.alternatives), p.describe()
        else:  # both, without chrome yellow, are the best or listed; chrome yellow is never chosen alone
            assert any({LEAD, CR_OXIDE} <= set(x.classes) and CHROMATE not in x.classes
                       for x in p.alternatives), p.describe()
            assert p.best_classes != (CHROMATE,), p.describe()
    # the region view and the checked presence maps
    in_region = maps.patterns_in(region == 0)
    assert sum(n for _, n in in_region) == int((pattern[region == 0] >= 0).sum())
    checked = maps.checked_binary()
    for p in maps.patterns:
        where = pattern == p.index
        want = np.isin(model.classes, p.best_classes) if p.changed else None
        if want is not None:
            assert np.all(checked[where] == want)
    # written to the file and read back
    back = xrfnb.PigmentMaps.from_hdf5(tmp_path / "maps.h5")
    np.testing.assert_array_equal(back.pattern, pattern)
    assert [p.to_dict() for p in back.patterns] == [p.to_dict() for p in maps.patterns]
    assert [x.evidence for x in back.patterns[0].alternatives] == \
        [x.evidence for x in maps.patterns[0].alternatives]


def test_patterns_beyond_the_budget_are_checked_on_demand(model, m6, tmp_path):
    """With one fit allowed while mapping, the most frequent pattern with alternatives is checked and the
    next waits, with its mean spectrum; checked on demand (also from the file) it gets the same answer
    as a check while mapping."""
    scan, _ = _scan(m6)
    maps = xrfnb.map_pigments(scan, model, progress=False, out=tmp_path / "one.h5", check_physics=1)
    assert maps.metadata["physics_check"]["checked"] == 1
    waiting = [p for p in maps.patterns if "on demand" in p.note]
    assert waiting, [p.note for p in maps.patterns]
    p = waiting[0]
    assert p.mean_spectrum is not None and p.mean_spectrum.shape == (scan.shape[2],)
    done = maps.check_pattern(p.index)
    assert done.check is not None and maps.patterns[p.index] is done
    direct = check_calls(p.mean_spectrum, xrfnb.Instrument.preset("bruker-m6"), p.classes, p.layer,
                         model.class_elements)
    assert [x.classes for x in done.alternatives] == [x.classes for x in direct.alternatives]
    back = xrfnb.PigmentMaps.from_hdf5(tmp_path / "one.h5")
    np.testing.assert_array_equal(back.patterns[p.index].mean_spectrum, p.mean_spectrum)
    again = back.check_pattern(p.index)
    assert [x.evidence for x in again.alternatives] == [x.evidence for x in done.alternatives]


def test_map_without_the_check_is_unchanged(model, m6):
    scan, _ = _scan(m6)
    plain = xrfnb.map_pigments(scan, model, progress=False, check_physics=False)
    assert plain.pattern is None and plain.patterns == () and "physics_check" not in plain.metadata
    assert plain.pattern_at(0, 0) is None and plain.patterns_in(np.ones(plain.shape, bool)) == []
    np.testing.assert_array_equal(plain.checked_binary(), plain.binary())


def test_call_patterns_gather_blocks_without_a_model():
    """The tally by itself: two blocks, three pixels of one pattern across them, a masked and an OOD one."""
    tally = CallPatterns(("a", "b"), np.array([0.5, 0.5]), 1.0, 4, max_pixels=2)
    counts = np.array([[100, 100, 100, 100], [300, 300, 300, 300], [1, 1, 1, 1]], float)
    prob = np.array([[0.9, 0.1], [0.9, 0.2], [0.9, 0.9]], np.float32)
    ids1 = tally.add(counts, prob, np.zeros_like(prob), np.array([0.1, 0.1, 5.0]), np.array([1, 1, 1], bool))
    ids2 = tally.add(counts[:1] * 1.2, prob[:1], prob[:1], np.array([0.1]), np.array([True]))
    assert ids1.tolist() == [0, 1, -1] and ids2.tolist() == [0]  # 400 and 480 counts share level 8
    seen = []

    def fake(mean, instrument, classes, layer, class_elements, **kw):
        seen.append((classes, layer, mean))
        return PhysicsCheck(tuple(classes), (), note="fake")

    pats = tally.check(None, {"a": ("Pb",), "b": ("Cr",)}, min_pixels=1, check=fake)
    assert [p.n_pixels for p in pats] == [2, 1] and [p.count_level for p in pats] == [8, 10]
    np.testing.assert_allclose(seen[0][2], [110.0] * 4)  # mean of the first two (max_pixels)
    assert seen[0][1] == {"a": "surface"}  # buried in 1 of 2 pixels: not most of them
    assert pats[0].mean_counts == pytest.approx(440.0)
