"""fit_stack: the stack of the called pigments that best explains a spectrum (dashboard evidence)."""

from __future__ import annotations

import numpy as np
import pytest

import xrfnb
from xrfnb import DataError
from xrfnb.fitting.stackfit import poisson_deviance


@pytest.fixture(scope="module")
def m6():
    return xrfnb.Instrument.preset("bruker-m6")


def _stack(top, top_um, below=None, below_um=40.0):
    layers = [xrfnb.Layer(top, thickness_um=top_um)]
    if below is not None:
        layers.append(xrfnb.Layer(below, thickness_um=below_um))
    return xrfnb.Stack(layers)


def test_poisson_deviance_against_its_definition():
    y = np.array([0.0, 1.0, 4.0, 10.0])
    mu = np.array([0.5, 2.0, 4.0, 7.0])
    by_hand = 2 * (0.5 + (1 * np.log(1 / 2) - (1 - 2)) + 0.0 + (10 * np.log(10 / 7) - 3))
    assert poisson_deviance(y, mu) == pytest.approx(by_hand)
    assert poisson_deviance(mu, mu) == pytest.approx(0.0, abs=1e-12)


def test_recovers_a_stack_on_its_grid_exactly(m6):
    """Noise-free counts of a stack that lies on the search grid: that stack, deviance ~0."""
    truth = _stack({"vermilion": 0.35}, 8.0, {"lead white": 0.6})
    expected = xrfnb.simulate_batch([truth], m6, counts=1e6, noise=False)[0]
    fit = xrfnb.fit_stack(expected, m6, ["vermilion"], ["lead white"])
    assert fit.surface_thickness_um == pytest.approx(8.0)
    assert fit.weight_fractions[0] == pytest.approx({"vermilion": 0.35})
    assert fit.deviance < 1e-6
    assert fit.expected.shape == (m6.n_channels,)
    assert fit.describe() == "vermilion 35 wt% (8.0 µm) over lead white 60 wt%"


def test_relative_amounts_of_a_mixture_are_recovered(m6):
    truth = _stack({"zinc white": 0.7 * 0.1, "vermilion": 0.7 * 0.9}, 20.0)  # 1 : 9 on the grid, load 0.7
    expected = xrfnb.simulate_batch([truth], m6, counts=1e6, noise=False)[0]
    fit = xrfnb.fit_stack(expected, m6, ["vermilion", "zinc white"])
    assert len(fit.stack.layers) == 1
    assert fit.weight_fractions[0]["vermilion"] == pytest.approx(0.63)
    assert fit.weight_fractions[0]["zinc white"] == pytest.approx(0.07)


def test_full_physics_spectrum_prefers_the_true_layer_order(m6):
    """A noisy spectrum from the full simulator (secondary fluorescence, pile-up, events): vermilion over
    lead white is explained better than lead white over vermilion. Pb L lines pass 8 um of vermilion
    but Hg L lines would be absorbed under lead white: the layer order is physics, not a label."""
    truth = _stack({"vermilion": 0.45}, 8.0, {"lead white": 0.6})
    spec = xrfnb.simulate(truth, m6, counts=20000.0, rng=np.random.default_rng(3))
    right = xrfnb.fit_stack(spec.counts, m6, ["vermilion"], ["lead white"])
    wrong = xrfnb.fit_stack(spec.counts, m6, ["lead white"], ["vermilion"])
    assert right.deviance < 0.8 * wrong.deviance
    # the measured counts in the fitted range are conserved by the scaling
    e = m6.channel_energy_keV
    sel = (e >= 1.0) & (e <= 0.95 * m6.tube_voltage_kV)
    assert fit_sum(right, sel) == pytest.approx(float(np.sum(spec.counts[sel])))
    # a pigment that is not there makes the fit no better than it is without it
    extra = xrfnb.fit_stack(spec.counts, m6, ["vermilion", "cobalt blue"], ["lead white"])
    assert extra.weight_fractions[0]["cobalt blue"] <= extra.weight_fractions[0]["vermilion"] / 3 + 1e-9


def fit_sum(fit, sel):
    return float(np.sum(fit.expected[sel]))


def test_many_pigments_stay_within_the_candidate_budget(m6):
    spec = xrfnb.simulate(_stack({"vermilion": 0.3, "zinc white": 0.3}, 10.0, {"lead white": 0.6}), m6,
                          counts=5000.0, rng=np.random.default_rng(4))
    fit = xrfnb.fit_stack(spec.counts, m6, ["vermilion", "zinc white", "cobalt blue", "emerald green"],
                          ["lead white", "chalk"], max_candidates=120)
    assert fit.n_candidates <= 120 + 8  # the grid, then the thickness refinement
    # fourteen called pigments (a low global threshold): the grid is sized before it is built
    names = [p.name for p in xrfnb.pigments() if not p.xrf_silent][:14]
    fit = xrfnb.fit_stack(spec.counts, m6, names[:8], names[8:])
    assert fit.n_candidates <= 400 + 8 and set(fit.weight_fractions[0]) == set(names[:8])


def test_bad_inputs_are_clear_errors(m6):
    with pytest.raises(DataError, match="shape"):
        xrfnb.fit_stack(np.ones(100), m6, ["vermilion"])
    with pytest.raises(DataError, match="at least one pigment"):
        xrfnb.fit_stack(np.ones(m6.n_channels), m6, [])
    with pytest.raises(DataError, match="non-negative"):
        xrfnb.fit_stack(-np.ones(m6.n_channels), m6, ["vermilion"])
    with pytest.raises(xrfnb.XRFNBError):
        xrfnb.fit_stack(np.ones(m6.n_channels), m6, ["unobtainium"])
