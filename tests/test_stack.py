"""Layer and Stack: composition semantics, densities and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xraylib

import xrfnb
from xrfnb import Layer, PigmentError, SimulationError, Stack


def test_formula_layer_composition_matches_xraylib() -> None:
    layer = Layer({"HgS": 1.0}, binder=None, thickness_um=10, density_g_cm3=8.1)
    parsed = xraylib.CompoundParser("HgS")
    expected = {xraylib.AtomicNumberToSymbol(z): w for z, w in
                zip(parsed["Elements"], parsed["massFractions"], strict=True)}
    assert set(layer.composition) == {"Hg", "S"}
    for el, w in expected.items():
        assert layer.composition[el] == pytest.approx(w, rel=1e-9)
    # Hg 200.59, S 32.06 g/mol (IUPAC standard atomic weights)
    assert layer.composition["Hg"] == pytest.approx(200.59 / (200.59 + 32.06), rel=1e-3)
    assert layer.mass_thickness_g_cm2 == pytest.approx(8.1 * 10e-4)


def test_binder_fills_the_remainder_and_density_is_volume_additive() -> None:
    lib = xrfnb.pigments()
    lead_white = lib["lead white"]
    oil = lib.binder("linseed oil")
    layer = Layer({"lead white": 0.8}, binder="linseed oil", thickness_um=30)
    assert layer.binder_fraction == pytest.approx(0.2)
    expected_rho = 1.0 / (0.8 / lead_white.density_g_cm3 + 0.2 / oil.density_g_cm3)
    assert layer.density_g_cm3 == pytest.approx(expected_rho)
    # lead white in oil lies between the oil (~0.93) and the pigment (~6.7)
    assert oil.density_g_cm3 < layer.density_g_cm3 < lead_white.density_g_cm3
    assert sum(layer.composition.values()) == pytest.approx(1.0)
    pb = lead_white.composition["Pb"]
    assert layer.composition["Pb"] == pytest.approx(0.8 * pb)


def test_elemental_composition_for_alloys() -> None:
    steel = Layer({"Fe": 0.7, "Cr": 0.18, "Ni": 0.12}, binder=None, thickness_um=100)
    # volume-additive element densities from xraylib
    rho = 1 / sum(w / xraylib.ElementDensity(xraylib.SymbolToAtomicNumber(e))
                  for e, w in {"Fe": 0.7, "Cr": 0.18, "Ni": 0.12}.items())
    assert steel.density_g_cm3 == pytest.approx(rho)
    assert 7.0 < steel.density_g_cm3 < 8.5


def test_fractions_not_summing_to_one_say_by_how_much() -> None:
    with pytest.raises(SimulationError, match=r"exceeding 1 by 0\.1"):
        Layer({"lead white": 0.5, "vermilion": 0.6}, thickness_um=10)
    with pytest.raises(SimulationError, match=r"off 1 by -0\.2"):
        Layer({"Fe": 0.5, "Cr": 0.3}, binder=None, thickness_um=10)
    with pytest.raises(SimulationError, match=r"off 1 by \+0\.05"):
        Layer({"lead white": 0.85}, binder="linseed oil", binder_fraction=0.2, thickness_um=10)


def test_bad_layers() -> None:
    with pytest.raises(SimulationError, match="thickness must be > 0"):
        Layer({"lead white": 1.0}, thickness_um=-5)
    with pytest.raises(SimulationError, match="thickness must be > 0"):
        Layer({"lead white": 1.0}, thickness_um=float("nan"))
    with pytest.raises(SimulationError, match=">= 0"):
        Layer({"lead white": -0.1}, thickness_um=5)
    with pytest.raises(SimulationError, match="no density known"):
        Layer({"Fe2O3": 1.0}, binder=None, thickness_um=5)


def test_unknown_pigment_suggests_close_names() -> None:
    with pytest.raises(PigmentError, match="vermilion"):
        Layer({"vermillion": 0.5}, thickness_um=10)
    with pytest.raises(PigmentError, match="unknown binder"):
        Layer({"lead white": 0.5}, binder="motor oil", thickness_um=10)


def test_stack_layers_ground_and_substrate() -> None:
    top = Layer({"vermilion": 0.5}, thickness_um=10)
    stack = Stack([top], ground="chalk", substrate={"C": 0.5, "O": 0.5})
    assert len(stack) == 3
    assert stack.layer_label(0) == "layer 0"
    assert stack.layer_label(1) == "ground"
    assert stack.layer_label(2) == "substrate"
    mt = stack.mass_thickness_g_cm2
    assert math.isinf(mt[2])
    assert mt[0] == pytest.approx(top.density_g_cm3 * 10e-4)
    assert mt[1] == pytest.approx(stack.ground.density_g_cm3 * 300e-4)
    assert "Ca" in stack.all_layers[1].composition
    assert stack.elements[0] == "Hg"
    with pytest.raises(SimulationError):
        Stack([])
    with pytest.raises(SimulationError):
        Stack(["lead white"])  # type: ignore[list-item]


def test_with_thickness_keeps_composition() -> None:
    layer = Layer({"lead white": 0.7}, thickness_um=10)
    thick = layer.with_thickness(40)
    assert thick.thickness_um == 40
    assert thick.density_g_cm3 == pytest.approx(layer.density_g_cm3)
    np.testing.assert_allclose(sorted(thick.composition.values()), sorted(layer.composition.values()))
