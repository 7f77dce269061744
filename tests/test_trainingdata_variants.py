"""Training data with composition variants and atomic-parameter randomisation (issue #19 item 1).

Composition variants: every range in ``xrfnb/data/pigments.toml`` has a source, drawn compositions stay
within the stated ranges and sum to one, the draw is fixed by the seed, and a variant keeps its pigment's
class (an ochre's Mn does not make an umber). Atomic randomisation: each training instrument variant
simulates under its own draw, from seeds the evaluation sets never use; the evaluation envelope and a
caller's own perturbation are left alone. With both options off the generator draws what it drew before.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest

import xrfnb.model.trainingdata as td
from xrfnb import ModelError
from xrfnb.model.train import load_config
from xrfnb.model.trainingdata import (
    N_LAYERS,
    DataConfig,
    StackBatch,
    TrainingData,
    draw_variant,
    pigment_table,
    sample_stacks,
)
from xrfnb.physics.perturb import (
    EVALUATION_SEED_LIMIT,
    TRAINING_SEED_BASE,
    AtomicPerturbation,
    atomic_perturbation,
    current_perturbation,
    training_perturbation,
)
from xrfnb.physics.pigments import composition_from_formula, pigments

ROOT = Path(__file__).resolve().parents[1]
#: the issue's list: natural earths, lead white, cadmium red, smalt
WITH_VARIANTS = (
    "yellow ochre",
    "red ochre",
    "burnt sienna",
    "raw umber",
    "burnt umber",
    "green earth",
    "lead white",
    "cadmium red",
    "smalt",
)
ONE_M6 = {"instruments": ("bruker-m6",), "instrument_weights": (1.0,)}


# -- the table ------------------------------------------------------------------------------------------
def test_every_variant_range_has_a_source_and_keeps_the_key_elements():
    lib = pigments()
    have = {p.name for p in lib if p.variants is not None}
    assert set(WITH_VARIANTS) <= have
    earth_elements = set()
    for name in have:
        p = lib[name]
        v = p.variants
        assert v.components and v.balance
        for c in v.components:
            assert len(c.source) > 20, (name, c.formula)
            assert 0 <= c.wt_range[0] <= c.wt_range[1] <= 1
        assert math.fsum(c.wt_range[0] for c in v.components) <= 1
        for el in p.elements:
            assert v.element_range(el)[0] > 0, (name, el)
        if name in WITH_VARIANTS[:6]:
            earth_elements |= set(v.elements)
    assert {"K", "Al", "Si", "Ca", "Ti", "Mn"} <= earth_elements
    # variants add no element to the training element list (every table and spectrum would change)
    elements = set(pigment_table().elements)
    assert all(set(lib[n].variants.elements) <= elements for n in have)


def test_stated_ranges_in_element_terms():
    """The element ranges that follow from the table agree with the sources' figures."""
    lib = pigments()
    se = lib["cadmium red"].variants.element_range("Se")
    assert se == pytest.approx((0.15, 0.30), abs=0.005)  # ColourLex: 15-30 % Se
    pb = lib["lead white"].variants.element_range("Pb")
    assert pb == pytest.approx(
        (composition_from_formula("PbCO3")["Pb"], composition_from_formula("(PbCO3)2Pb(OH)2")["Pb"]),
        rel=1e-12,
    )
    co = lib["smalt"].variants.element_range("Co")
    co_in_coo = composition_from_formula("CoO")["Co"]
    assert co == pytest.approx((0.02 * co_in_coo, 0.18 * co_in_coo), rel=1e-9)  # 2-18 % CoO
    mn = lib["raw umber"].variants.element_range("Mn")
    mn_in_mno2 = composition_from_formula("MnO2")["Mn"]
    assert mn == pytest.approx((0.09 * mn_in_mno2, 0.19 * mn_in_mno2), rel=1e-9)  # 9-19 % MnO2


@pytest.mark.parametrize("name", WITH_VARIANTS)
def test_drawn_variants_stay_within_the_ranges_and_sum_to_one(name):
    lib = pigments()
    v = lib[name].variants
    rng = np.random.default_rng(7)
    tab = pigment_table()
    p = tab.index(name)
    for _ in range(300):
        w = v.draw_weights(rng)
        assert math.fsum(w) <= 1.0
        for wi, c in zip(w, v.components, strict=True):
            assert c.wt_range[0] <= wi <= c.wt_range[1]
        comp = v.composition(w)
        assert math.fsum(comp.values()) == pytest.approx(1.0, abs=1e-12)
        arr = draw_variant(rng, p)  # the training path, over the table's elements
        assert arr.sum() == pytest.approx(1.0, abs=1e-12) and np.all(arr >= 0)
        for el in v.elements:
            lo, hi = v.element_range(el)
            assert lo - 1e-12 <= comp.get(el, 0.0) <= hi + 1e-12, (name, el)
            assert lo - 1e-12 <= arr[tab.elements.index(el)] <= hi + 1e-12, (name, el)


# -- sampling -------------------------------------------------------------------------------------------
def test_options_off_draw_the_stacks_they_drew_before():
    """Golden values from the generator before variants existed (commit d544172, seed 20261207)."""
    for cfg in (DataConfig(), DataConfig(composition_variant_prob=0.0)):
        tab = pigment_table()
        rng = np.random.default_rng(20261207)
        sb = sample_stacks(12, rng, cfg)
        assert sb.key_wt is None
        names = [
            [sorted(tab.names[p] for p in np.flatnonzero(sb.pigment_wt[b, j])) for j in range(4)]
            for b in range(4)
        ]
        assert names == [
            [["cobalt violet dark", "emerald green"], ["cadmium yellow"], ["carbon black"], ["chalk"]],
            [
                ["carbon black", "green earth", "ultramarine"],
                ["carmine lake", "egyptian blue"],
                ["green earth"],
                ["chalk"],
            ],
            [["barium white"], ["zinc white"], [], ["lead white"]],
            [["manganese violet", "ultramarine"], ["barium white", "zinc yellow"], [], ["chalk"]],
        ]
        np.testing.assert_allclose(
            sb.mt[:2] * 1e4,
            [[35.078279, 138.414591, 13.530036, 556.07177], [4.610887, 8.445849, 75.242127, 521.99672]],
            atol=1e-6,
        )
        assert sb.W[:, :, tab.elements.index("Fe")].sum() == pytest.approx(0.3033987168, abs=1e-9)
        assert sb.W[:, :, tab.elements.index("Pb")].sum() == pytest.approx(1.4137698996, abs=1e-9)
        assert rng.random() == pytest.approx(0.7543875031631162, rel=1e-15)  # no extra draws


def _variant_stacks(seed: int, n: int = 150) -> StackBatch:
    return sample_stacks(n, np.random.default_rng(seed), DataConfig(composition_variant_prob=1.0))


def test_variant_stacks_are_deterministic_per_seed_and_valid():
    a, b, c = _variant_stacks(3), _variant_stacks(3), _variant_stacks(4)
    for x, y in ((a.W, b.W), (a.key_wt, b.key_wt), (a.mt, b.mt), (a.pigment_wt, b.pigment_wt)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.W, c.W)
    used = a.mt > 0
    np.testing.assert_allclose(a.W.sum(axis=2)[used], 1.0, atol=1e-9)
    assert np.all(a.key_wt >= 0)
    # a pigment's key-element content never exceeds the layer's
    tab = pigment_table()
    for p, key in enumerate(tab.key_elements):
        for k, e in enumerate(key):
            assert np.all(a.key_wt[:, :, p, k] <= a.W[:, :, e] + 1e-12)
    # with probability 1 every drawn pigment that has variants is a variant: its key-element content per
    # unit of pigment differs from the formula's, by up to tens of per cent (earths, smalt)
    dev = []
    for p in tab.variants:
        sel = a.pigment_wt[:, :, p] > 0
        key0 = tab.key_elements[p][0]
        dev.extend(a.key_wt[:, :, p, 0][sel] / a.pigment_wt[:, :, p][sel] / tab.composition[p, key0] - 1)
    dev = np.abs(np.array(dev))
    assert dev.size >= 10 and np.all(dev > 1e-9) and dev.max() > 0.2


def test_formula_key_content_gives_the_labels_of_the_formula_path():
    """``key_wt`` built from the formulas must give exactly the labels of the formula path (key_wt None)."""
    cfg = DataConfig(**ONE_M6, n_instrument_variants=1, variants_per_batch=1)
    data = TrainingData(cfg, n_bins=64)
    sb = sample_stacks(80, np.random.default_rng(5), cfg)
    tab = pigment_table()
    key_wt = np.zeros((*sb.pigment_wt.shape, tab.max_key))
    for p, key in enumerate(tab.key_elements):
        for k, e in enumerate(key):
            key_wt[:, :, p, k] = sb.pigment_wt[:, :, p] * tab.composition[p, e]
    with_key = StackBatch(sb.W, sb.mt, sb.pigment_wt, sb.n_paint, key_wt)
    inst = data._make_variant("bruker-m6", np.random.default_rng(0), False)
    counts = np.full(80, 5000.0)
    _, plain = data._simulate_group(sb, inst, counts, np.random.default_rng(1))
    _, keyed = data._simulate_group(with_key, inst, counts, np.random.default_rng(1))
    np.testing.assert_array_equal(keyed, plain)
    assert plain.any()


def _one_layer(pigment: str, comp: np.ndarray, w: float = 0.6) -> StackBatch:
    tab = pigment_table()
    p = tab.index(pigment)
    W = np.zeros((1, N_LAYERS, len(tab.elements)))
    pw = np.zeros((1, N_LAYERS, len(tab.names)))
    mt = np.zeros((1, N_LAYERS))
    layer = w * comp + (1 - w) * tab.binder_composition[0]
    W[0, 0] = layer
    pw[0, 0, p] = w
    mt[0, 0] = 30e-4 / (w / tab.density[p] + (1 - w) / tab.binder_density[0])
    key_wt = np.zeros((1, N_LAYERS, len(tab.names), tab.max_key))
    key_wt[0, 0, p, : len(tab.key_elements[p])] = w * comp[list(tab.key_elements[p])]
    return StackBatch(W, mt, pw, np.array([1]), key_wt)


def test_a_variant_keeps_its_class():
    """An ochre at the top of its Mn range shows Mn lines but stays an iron pigment (not an umber); a
    smalt with As stays a cobalt pigment (not an arsenic sulfide)."""
    tab = pigment_table()
    cfg = DataConfig(**ONE_M6, n_instrument_variants=1, variants_per_batch=1)
    data = TrainingData(cfg, n_bins=64)
    inst = data._make_variant("bruker-m6", np.random.default_rng(0), False)
    lib = pigments()
    cases = (
        ("yellow ochre", "MnO", "iron pigments (Fe)", "umbers (Fe, Mn)"),
        ("smalt", "As2O3", "cobalt pigments (Co)", "arsenic sulfides (As)"),
    )
    for name, extra, own, other in cases:
        v = lib[name].variants
        w = [c.wt_range[1] if c.formula == extra else c.wt_range[0] for c in v.components]
        comp_d = v.composition(w)
        comp = np.array([comp_d.get(e, 0.0) for e in tab.elements])
        sb = _one_layer(name, comp)
        _, labels = data._simulate_group(sb, inst, np.array([1e6]), np.random.default_rng(2))
        assert labels[0, tab.classes.index(own)] == 1, name
        assert labels[0, tab.classes.index(other)] == 0, name
        assert labels[0].sum() == 1, name


def test_training_labels_come_only_from_drawn_classes():
    cfg = DataConfig(**ONE_M6, n_instrument_variants=2, variants_per_batch=2, composition_variant_prob=1.0)
    data = TrainingData(cfg, n_bins=128)
    _, labels, _, stacks = data.batch_raw(96, np.random.default_rng(9), counts=20000.0)
    tab = pigment_table()
    drawn = np.zeros_like(labels, dtype=bool)
    for p in range(len(tab.names)):
        c = tab.pigment_class[p]
        if c >= 0:
            drawn[:, c] |= stacks.pigment_wt[:, :, p].any(axis=1)
    assert labels.any()
    assert not np.any((labels > 0) & ~drawn)


# -- atomic parameters ----------------------------------------------------------------------------------
def _recording(monkeypatch) -> list[AtomicPerturbation | None]:
    seen: list[AtomicPerturbation | None] = []
    original = td.simulate_batch

    def record(*args, **kwargs):
        seen.append(current_perturbation())
        return original(*args, **kwargs)

    monkeypatch.setattr(td, "simulate_batch", record)
    return seen


def test_training_variants_simulate_under_their_own_atomic_draw(monkeypatch):
    seen = _recording(monkeypatch)
    cfg = DataConfig(**ONE_M6, n_instrument_variants=2, variants_per_batch=2, atomic_perturbation=True)
    data = TrainingData(cfg, n_bins=64)
    for i in range(3):
        data.batch(4, np.random.default_rng(i))
    assert seen and all(p is not None for p in seen)
    assert {p.seed for p in seen} == {TRAINING_SEED_BASE, TRAINING_SEED_BASE + 1}  # one per variant
    assert all(p == training_perturbation(p.seed - TRAINING_SEED_BASE) for p in seen)
    seen.clear()
    data.batch(4, np.random.default_rng(0), wider=True)  # the evaluation envelope: xraylib's values
    assert seen and all(p is None for p in seen)
    seen.clear()
    outer = AtomicPerturbation(seed=9100)
    with atomic_perturbation(outer):  # eval_perturbed's own draw wins
        data.batch(4, np.random.default_rng(0))
    assert seen and all(p is outer for p in seen)
    seen.clear()
    TrainingData(dataclasses.replace(cfg, atomic_perturbation=False), n_bins=64).batch(
        6, np.random.default_rng(0)
    )
    assert seen and all(p is None for p in seen)


def test_a_zero_spread_draw_reproduces_the_unperturbed_spectra():
    cfg = DataConfig(**ONE_M6, n_instrument_variants=1, variants_per_batch=1, pileup=False)
    off = TrainingData(cfg, n_bins=64).batch_raw(8, np.random.default_rng(3), counts=1e9)
    zero = TrainingData(
        dataclasses.replace(cfg, atomic_perturbation=True, atomic_spread_scale=0.0), n_bins=64
    ).batch_raw(8, np.random.default_rng(3), counts=1e9)
    on = TrainingData(dataclasses.replace(cfg, atomic_perturbation=True), n_bins=64).batch_raw(
        8, np.random.default_rng(3), counts=1e9
    )
    np.testing.assert_array_equal(zero[1], off[1])
    np.testing.assert_allclose(zero[2][0][1], off[2][0][1], rtol=1e-6, atol=2)  # Poisson at 1e9 counts
    rel = np.abs(on[2][0][1] - off[2][0][1]).sum() / off[2][0][1].sum()
    assert rel > 5e-3  # the default spreads move the line intensities


def test_training_seeds_never_meet_the_evaluation_seeds():
    """eval_perturbed.py draws AtomicPerturbation(seed=9100 + draw), eval_physics_check.py seed 9100: all
    below EVALUATION_SEED_LIMIT; training uses TRAINING_SEED_BASE + variant index and nothing else."""
    text = (ROOT / "benchmarks" / "eval_perturbed.py").read_text()
    found = re.findall(r"AtomicPerturbation\(seed=(\d+) \+ draw\)", text)
    assert found == ["9100"], "eval_perturbed.py changed how it seeds its atomic draws: check the ranges"
    assert "range(args.draws)" in text
    check = (ROOT / "benchmarks" / "eval_physics_check.py").read_text()
    (fixed,) = re.findall(r"PERTURBED_ATOMIC_SEED = (\d+)", check)
    assert re.findall(r"AtomicPerturbation\(seed=(\w+)", check) == ["PERTURBED_ATOMIC_SEED"]
    eval_seeds = {int(fixed)} | {int(found[0]) + d for d in range(100_000)}
    assert max(eval_seeds) < EVALUATION_SEED_LIMIT < TRAINING_SEED_BASE
    train = [training_perturbation(i) for i in range(200)]
    assert {p.seed for p in train}.isdisjoint(eval_seeds)
    assert min(p.seed for p in train) == TRAINING_SEED_BASE
    for bad in (-1, TRAINING_SEED_BASE):
        with pytest.raises(Exception, match="index"):
            training_perturbation(bad)
    # and the factors themselves differ from every evaluation draw
    lines = ((26, "KL3"), (82, "L3M5"), (29, "KL3"), (30, "KM3"))
    ev = {
        tuple(AtomicPerturbation(seed=s).factor(z, n) for z, n in lines)
        for s in [int(fixed), *range(9100, 9110)]
    }
    tr = {tuple(p.factor(z, n) for z, n in lines) for p in train}
    assert ev.isdisjoint(tr)


# -- configuration --------------------------------------------------------------------------------------
def test_options_are_checked_and_the_shipped_configs_turn_them_on():
    with pytest.raises(ModelError, match="composition_variant_prob"):
        DataConfig(composition_variant_prob=1.5)
    with pytest.raises(ModelError, match="atomic_spread_scale"):
        DataConfig(atomic_spread_scale=-1.0)
    for path in (None, ROOT / "xrfnb" / "data" / "train_finetune.toml"):
        data = load_config(path).data
        assert data.atomic_perturbation and 0 < data.composition_variant_prob < 1
    env = TrainingData(load_config(None).data, n_bins=64).envelope()
    assert env["composition_variant_prob"] > 0 and env["atomic_perturbation_spread_scale"] == 1.0
    assert "composition_variant_prob" not in TrainingData(DataConfig(), n_bins=64).envelope()
