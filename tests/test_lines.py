"""The line vocabulary (xrfnb.core.lines) against independent references: published line energies, the
spectroscopists' names of IUPAC lines, which line groups of an element are drawn and looked for."""

from __future__ import annotations

import pytest

from xrfnb import XRFNBError
from xrfnb.core.lines import (
    LINE_GROUPS,
    M_LINE_MIN_KEV,
    NAMED_LINES,
    element_lines,
    families_shown,
    line_energy_keV,
    line_group,
    line_members,
    line_table_family,
    parse_line,
)

#: X-ray Data Booklet (LBNL, 3rd ed. 2009), Table 1-2, photon energies of K, L and M emission lines in keV
#: (J. A. Bearden, Rev. Mod. Phys. 39 (1967) 78)
BOOKLET_KEV = {
    ("Ca", "Ka1"): 3.69168,
    ("Ti", "Ka1"): 4.51084,
    ("Cr", "Ka1"): 5.41472,
    ("Mn", "Ka1"): 5.89875,
    ("Fe", "Ka1"): 6.40384,
    ("Fe", "Ka2"): 6.39084,
    ("Fe", "Kb1"): 7.05798,
    ("Cu", "Ka1"): 8.04778,
    ("Cu", "Ka2"): 8.02783,
    ("Cu", "Kb1"): 8.90529,
    ("Zn", "Ka1"): 8.63886,
    ("As", "Ka1"): 10.54372,
    ("Sr", "Ka1"): 14.1650,
    ("Cd", "Ka1"): 23.1736,
    ("Sn", "La1"): 3.44398,
    ("Ba", "La1"): 4.46626,
    ("Au", "La1"): 9.7133,
    ("Au", "Ma1"): 2.1229,
    ("Hg", "La1"): 9.9888,
    ("Hg", "Lb1"): 11.8226,
    ("Pb", "La1"): 10.5515,
    ("Pb", "La2"): 10.4495,
    ("Pb", "Lb1"): 12.6137,
    ("Pb", "Lg1"): 14.7644,
    ("Pb", "Ma1"): 2.3455,
}


@pytest.mark.parametrize(("element", "line"), sorted(BOOKLET_KEV))
def test_single_line_energies_match_the_x_ray_data_booklet(element: str, line: str) -> None:
    # xraylib's energies agree with Bearden's to a few eV (M lines of heavy elements differ most)
    assert line_energy_keV(element, line) == pytest.approx(BOOKLET_KEV[element, line], abs=3e-3)


def test_group_energies_lie_between_their_members_nearer_the_stronger() -> None:
    ka = line_energy_keV("Fe", "Ka")
    assert BOOKLET_KEV["Fe", "Ka2"] < ka < BOOKLET_KEV["Fe", "Ka1"]
    # Ka1 is about twice as strong as Ka2: the mean sits two thirds of the way to Ka1
    frac = (ka - BOOKLET_KEV["Fe", "Ka2"]) / (BOOKLET_KEV["Fe", "Ka1"] - BOOKLET_KEV["Fe", "Ka2"])
    assert frac == pytest.approx(2 / 3, abs=0.05)
    la = line_energy_keV("Pb", "La")
    assert BOOKLET_KEV["Pb", "La2"] < la < BOOKLET_KEV["Pb", "La1"]
    # a one-member group is that line; "Fe Ka", "Fe-Ka" and "FeKa" name the same group
    assert line_energy_keV("Pb", "Lb") == line_energy_keV("Pb", "Lb1") == line_energy_keV("Pb", "L2M4")
    assert parse_line("Fe Ka") == parse_line("Fe-Ka") == parse_line("FeKa") == ("Fe", ("KL3", "KL2"))


def test_unknown_lines_and_elements_are_errors() -> None:
    with pytest.raises(XRFNBError, match="no La line"):
        line_energy_keV("Na", "La")  # xraylib has no La line for sodium
    with pytest.raises(XRFNBError, match="unknown X-ray line"):
        line_energy_keV("Fe", "Kz")
    with pytest.raises(XRFNBError, match="unknown element"):
        line_energy_keV("Xx", "Ka")
    with pytest.raises(XRFNBError, match="unknown line group"):
        element_lines("Fe", lines=("Ka1",))


def test_element_lines_follow_the_requested_order_and_range() -> None:
    assert [m.label for m in element_lines("Pb", 1.0, 15.0)] == ["Pb La", "Pb Lb", "Pb Lg", "Pb Ma"]
    # the order of ``lines``, not of energy
    assert [m.line for m in element_lines("Pb", 1.0, 15.0, lines=("Ma", "La"))] == ["Ma", "La"]
    assert [m.label for m in element_lines("Fe", 1.0, 20.0)] == ["Fe Ka", "Fe Kb"]
    assert [m.label for m in element_lines("Fe", 0.0, 1.0)] == ["Fe La", "Fe Lb"]  # 0.70 and 0.72 keV
    # bounds are inclusive
    ka = line_energy_keV("Cu", "Ka")
    assert [m.line for m in element_lines("Cu", ka, ka)] == ["Ka"]
    marker = element_lines("Cu", lines=("Kb",))[0]
    assert marker.family == "K" and marker.energy_keV == pytest.approx(line_energy_keV("Cu", "Kb"))


def test_m_lines_below_the_cut_are_never_drawn() -> None:
    # Gd Ma (1.19 keV) is below M_LINE_MIN_KEV: a light element's M shell does not fluoresce in practice
    assert line_energy_keV("Gd", "Ma") < M_LINE_MIN_KEV
    assert "Ma" not in [m.line for m in element_lines("Gd")]
    # Hf Ma (1.64 keV) and W Ma (1.77 keV) are above it and drawn
    for element in ("Hf", "W"):
        assert line_energy_keV(element, "Ma") > M_LINE_MIN_KEV
        assert "Ma" in [m.line for m in element_lines(element)]
    assert families_shown("Fe") == ("K",) and families_shown("Cd") == ("K", "L")
    assert families_shown("Pb") == ("K", "L", "M")


#: Siegbahn group of IUPAC lines, as the X-ray Data Booklet names them (Ka1 = KL3, Lb2 = L3N5, ...)
WELL_KNOWN = {
    "KL3": "Ka", "KL2": "Ka", "KM3": "Kb", "KM2": "Kb", "KN3": "Kb",
    "L3M5": "La", "L3M4": "La", "L2M4": "Lb", "L3N5": "Lb", "L1M3": "Lb", "L1M2": "Lb",
    "L2N4": "Lg", "L1N3": "Lg", "L1N2": "Lg", "L3M1": "Ll", "L2M1": "Ln",
    "M5N7": "Ma", "M5N6": "Ma", "M4N6": "Mb", "M3N5": "Mg", "M5N3": "Mz", "M4N2": "Mz",
}


@pytest.mark.parametrize("iupac", sorted(WELL_KNOWN))
def test_line_group_of_well_known_lines(iupac: str) -> None:
    assert line_group(iupac) == WELL_KNOWN[iupac]


def test_line_group_agrees_with_the_named_groups_and_siegbahn_names() -> None:
    for group, members in LINE_GROUPS.items():
        for iupac in members:
            assert line_group(iupac) == group[:2], (group, iupac)  # "Lb2" (Lb2,15) lines are Lb lines
    for name in ("Ka1", "Ka2", "Kb1", "Kb3", "La1", "La2", "Lb1", "Lb3", "Lb4", "Lg1", "Lg3", "Ln", "Ma1"):
        (iupac,) = line_members(name)
        assert line_group(iupac) == name[:2], name
    # merged lines take the group of their first member
    assert line_group("KM3+KM2") == "Kb" and line_group("M5N7+M5N6") == "Ma"


def test_line_table_family_keeps_minor_lines_apart() -> None:
    # named lines and every K line: their group
    for iupac in NAMED_LINES:
        assert line_table_family(iupac) == line_group(iupac)
    assert line_table_family("KM5") == line_group("KM5") == "Kb"
    assert line_table_family("KL3+KL2") == "Ka"
    # minor lines without a Siegbahn name of their own: the shell letter (the fit's view groups them)
    assert (line_table_family("L3O1"), line_group("L3O1")) == ("L", "Lb")
    assert (line_table_family("M4N3"), line_group("M4N3")) == ("M", "Mz")
    assert (line_table_family("M2N4"), line_group("M2N4")) == ("M", "Mg")
