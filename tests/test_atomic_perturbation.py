"""Atomic parameters perturbed within their uncertainty (xrfnb.physics.perturb).

Primary fluorescence is linear in a line's production cross-section (Sherman's equation), so under a
perturbation every line's primary intensity must change by exactly that line's factor, and nothing else
in the spectrum may change (scatter, attenuation). Outside the block the simulator must give xraylib's
values again, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import xraylib

import xrfnb
from xrfnb.physics.fp import _ALL_LINES
from xrfnb.physics.perturb import AtomicPerturbation, atomic_perturbation, current_perturbation, line_shell


@pytest.fixture(scope="module")
def m6() -> xrfnb.Instrument:
    return xrfnb.Instrument.preset("bruker-m6")


def _stack() -> xrfnb.Stack:
    paint = {"lead white": 0.3, "vermilion": 0.2, "cobalt blue": 0.2}
    return xrfnb.Stack([xrfnb.Layer(paint, thickness_um=15)], ground="chalk")


def test_primary_lines_scale_by_their_factor_and_nothing_leaks(m6):
    p = AtomicPerturbation(seed=11)
    before = xrfnb.line_intensities(_stack(), m6, secondary=False)
    with atomic_perturbation(p):
        assert current_perturbation() is p
        during = xrfnb.line_intensities(_stack(), m6, secondary=False)
    after = xrfnb.line_intensities(_stack(), m6, secondary=False)
    assert current_perturbation() is None
    assert during.line == before.line and during.element == before.element
    expected = np.array([p.factor(xraylib.SymbolToAtomicNumber(e), n)
                         for e, n in zip(before.element, before.line, strict=True)])
    np.testing.assert_allclose(during.primary / before.primary, expected, rtol=1e-6)
    np.testing.assert_array_equal(after.primary, before.primary)
    assert np.ptp(expected) > 0.05  # the perturbation is not a no-op


def test_scatter_is_untouched_and_a_zero_perturbation_changes_nothing(m6):
    stack = _stack()
    ref = xrfnb.simulate(stack, m6, noise=False, pileup=False)
    with atomic_perturbation(AtomicPerturbation(seed=3, k_shell_rel=0, k_shell_light_rel=0, k_line_rel=0,
                                                l_shell_rel=0, l_line_rel=0, m_shell_rel=0, m_line_rel=0)):
        zero = xrfnb.simulate(stack, m6, noise=False, pileup=False)
    np.testing.assert_allclose(zero.counts, ref.counts, rtol=1e-12)
    # the Rh Ka Rayleigh peak (20.2 keV) is scatter only: no line of the stack lies there
    e = m6.channel_energy_keV
    window = (e > 20.0) & (e < 20.4)
    with atomic_perturbation(AtomicPerturbation(seed=4)):
        moved = xrfnb.simulate(stack, m6, noise=False, pileup=False)
    np.testing.assert_allclose(moved.counts[window], ref.counts[window], rtol=1e-9)
    pb_la = (e > 10.4) & (e < 10.7)
    assert abs(moved.counts[pb_la].sum() / ref.counts[pb_la].sum() - 1) > 1e-3


def _ka1_over_ka2(seed: int) -> float:
    p = AtomicPerturbation(seed=seed)
    return p.factor(26, "KL3") / p.factor(26, "KL2")


def test_factors_follow_the_stated_spreads():
    """Over many seeds the log factors of a shell have the declared standard deviation (shell and line
    parts add in quadrature), and one seed gives one factor per line whatever the call order."""
    seeds = range(400)
    ka = np.log([AtomicPerturbation(seed=s).factor(26, "KL3") for s in seeds])
    la = np.log([AtomicPerturbation(seed=s).factor(82, "L3M5") for s in seeds])
    ma = np.log([AtomicPerturbation(seed=s).factor(82, "M5N7+M5N6") for s in seeds])
    s_ka, s_la, s_ma = math.hypot(0.04, 0.03), math.hypot(0.10, 0.07), math.hypot(0.20, 0.10)
    for logs, s in ((ka, s_ka), (la, s_la), (ma, s_ma)):
        assert abs(logs.mean()) < 4 * s / math.sqrt(len(logs))
        assert logs.std() == pytest.approx(s, rel=0.12)
    # Ka1 and Ka2 share the shell part: their ratio carries the line part only
    ratio = np.log([_ka1_over_ka2(s)
                    for s in seeds])
    assert ratio.std() == pytest.approx(math.sqrt(2) * 0.03, rel=0.12)
    p = AtomicPerturbation(seed=7)
    assert p.factor(29, "KL3") == AtomicPerturbation(seed=7).factor(29, "KL3")


def test_line_shells_and_bad_input():
    assert line_shell("KL3") == "K" and line_shell("L3M5+L3M4") == "L3" and line_shell("M5N7") == "M5"
    assert line_shell("KO") == "K" and line_shell("L3O45") == "L3"
    for name, _, shell in _ALL_LINES:  # every line the simulator computes, against xraylib's macro names
        assert line_shell(name) == shell, name
    with pytest.raises(xrfnb.XRFNBError, match="IUPAC"):
        line_shell("Ka")
    with pytest.raises(xrfnb.XRFNBError, match="l_shell_rel"):
        AtomicPerturbation(seed=1, l_shell_rel=-0.1)
    with pytest.raises(xrfnb.XRFNBError, match="AtomicPerturbation or None"):
        with atomic_perturbation(0.1):  # type: ignore[arg-type]
            pass


def test_training_draws_scale_the_default_spreads():
    from xrfnb.physics.perturb import TRAINING_SEED_BASE, training_perturbation

    p = training_perturbation(5, 1.5)
    assert p.seed == TRAINING_SEED_BASE + 5
    assert (p.k_shell_rel, p.l_shell_rel, p.m_line_rel) == pytest.approx((0.06, 0.15, 0.15))
    assert training_perturbation(5) == AtomicPerturbation(seed=TRAINING_SEED_BASE + 5)
    zero = training_perturbation(5, 0.0)
    assert zero.factor(82, "L3M5") == 1.0 and zero.key != training_perturbation(6, 0.0).key
    with pytest.raises(xrfnb.XRFNBError, match="m_shell_rel"):
        training_perturbation(0, 6.0)  # M shells 20 % x 6 > 100 %
    with pytest.raises(xrfnb.XRFNBError, match="spread_scale"):
        training_perturbation(0, float("nan"))
