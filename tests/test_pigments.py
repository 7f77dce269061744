"""Pigment library: compositions against independent references, palette coverage, groups, user files."""

from __future__ import annotations

import itertools
import math

import pytest
import xraylib

import xrfnb
from xrfnb import PigmentError
from xrfnb.physics.pigments import SILENT_GROUP, composition_from_formula

# IUPAC 2021 standard atomic weights (abridged), typed in independently of xraylib's table.
IUPAC_WEIGHT = {"H": 1.008, "C": 12.011, "O": 15.999, "S": 32.06, "Cr": 51.996, "Hg": 200.59, "Pb": 207.2}


def hand_fractions(atoms: dict[str, float]) -> dict[str, float]:
    mass = {el: n * IUPAC_WEIGHT[el] for el, n in atoms.items()}
    total = sum(mass.values())
    return {el: m / total for el, m in mass.items()}


@pytest.fixture(scope="module")
def lib() -> xrfnb.PigmentLibrary:
    return xrfnb.pigments()


# ---------------------------------------------------------------- compositions
@pytest.mark.parametrize(
    ("formula", "atoms"),
    [
        ("PbCO3", {"Pb": 1, "C": 1, "O": 3}),
        ("(PbCO3)2Pb(OH)2", {"Pb": 3, "C": 2, "O": 8, "H": 2}),
        ("HgS", {"Hg": 1, "S": 1}),
        ("PbCrO4", {"Pb": 1, "Cr": 1, "O": 4}),
    ],
)
def test_composition_matches_hand_computation(formula: str, atoms: dict[str, float]) -> None:
    comp = composition_from_formula(formula)
    expected = hand_fractions(atoms)
    assert set(comp) == set(expected)
    for el, w in expected.items():
        assert comp[el] == pytest.approx(w, rel=2e-3), el


def test_pbco3_lead_fraction_published() -> None:
    # PbCO3 (cerussite) is 77.54 % Pb by weight (CRC handbook molar mass 267.2 g/mol).
    assert composition_from_formula("PbCO3")["Pb"] == pytest.approx(207.2 / 267.2, rel=1e-3)


def test_library_compositions_come_from_formula(lib) -> None:
    for p in lib:
        parsed = xraylib.CompoundParser(p.formula)
        symbols = [xraylib.AtomicNumberToSymbol(z) for z in parsed["Elements"]]
        assert sorted(p.composition) == sorted(symbols), p.name
        for sym, w in zip(symbols, parsed["massFractions"], strict=True):
            assert p.composition[sym] == pytest.approx(w, rel=1e-9), (p.name, sym)
        assert math.fsum(p.composition.values()) == pytest.approx(1.0, abs=1e-9), p.name


def test_lead_white_composition(lib) -> None:
    expected = hand_fractions({"Pb": 3, "C": 2, "O": 8, "H": 2})
    assert lib["lead white"].weight_fraction("Pb") == pytest.approx(expected["Pb"], rel=2e-3)
    assert lib["lead white"].weight_fraction("Zn") == 0.0


@pytest.mark.parametrize(
    ("pigment", "nist_name"),
    [
        ("chalk", "Calcium Carbonate"),
        ("barium white", "Barium Sulfate"),
        ("titanium white", "Titanium Dioxide"),
        ("massicot", "Lead Oxide"),
        ("mars red", "Ferric Oxide"),
    ],
)
def test_density_matches_nist_compound_table(lib, pigment: str, nist_name: str) -> None:
    nist = xraylib.GetCompoundDataNISTByName(nist_name)
    assert lib[pigment].density_g_cm3 == pytest.approx(nist["density"], rel=0.05)


def test_every_row_is_sane(lib) -> None:
    assert len(lib) >= 35
    for p in lib:
        assert p.name == p.name.lower()
        assert 1.0 <= p.density_g_cm3 <= 10.0, p.name
        assert p.color.startswith("#") and len(p.color) == 7
        assert p.period and p.notes, p.name
        for el in p.elements:
            assert xraylib.SymbolToAtomicNumber(el) >= 11, (p.name, el)
            assert p.composition[el] > 0, (p.name, el)
        assert p.xrf_silent == (len(p.elements) == 0), p.name
        hash(p)


REQUIRED = [
    "lead white",
    "zinc white",
    "vermilion",
    "chrome yellow",
    "chrome orange",
    "cadmium yellow",
    "naples yellow",
    "yellow ochre",
    "red ochre",
    "raw umber",
    "burnt umber",
    "prussian blue",
    "ultramarine",
    "cobalt blue",
    "cerulean blue",
    "emerald green",
    "viridian",
    "chromium oxide green",
    "cobalt violet",
    "bone black",
    "barium white",
    "chalk",
    "gypsum",
    "lithopone",
    "strontium yellow",
    "zinc yellow",
    "red lead",
    "lead-tin yellow",
    "smalt",
    "azurite",
    "malachite",
    "verdigris",
    "orpiment",
    "realgar",
    "green earth",
    "titanium white",
    "carbon black",
    "madder lake",
    "cadmium red",
    "cobalt yellow",
    "manganese violet",
    "mars red",
    "mars yellow",
    "massicot",
    "lead-tin yellow type ii",
    "egyptian blue",
]


@pytest.mark.parametrize("name", REQUIRED)
def test_required_palette_present(lib, name: str) -> None:
    assert name in lib


# ---------------------------------------------------------------- lookup
def test_lookup_case_insensitive_and_aliases(lib) -> None:
    assert lib["Lead White"] is lib["lead white"]
    assert lib["FLAKE WHITE"].name == "lead white"
    assert lib["Cinnabar"].name == "vermilion"
    assert lib["Schweinfurt green"].name == "emerald green"
    assert lib.get("no such pigment") is None


def test_unknown_pigment_suggests_close_matches(lib) -> None:
    with pytest.raises(PigmentError, match="did you mean 'vermilion'"):
        lib["vermillion"]


def test_binders(lib) -> None:
    for name in ("linseed oil", "egg tempera", "gum arabic", "animal glue"):
        b = lib.binder(name)
        assert math.fsum(b.composition.values()) == pytest.approx(1.0, abs=1e-9)
        assert 0.8 < b.density_g_cm3 < 1.6
    # linseed oil: triglyceride, about 77-78 % C by weight
    assert lib.binder("Linseed Oil").composition["C"] == pytest.approx(0.78, abs=0.02)
    assert lib.binder("oil").name == "linseed oil"
    with pytest.raises(PigmentError, match="unknown binder"):
        lib.binder("acrylic")


def test_default_library_is_cached() -> None:
    assert xrfnb.pigments() is xrfnb.pigments()


# ---------------------------------------------------------------- ambiguity groups
def test_groups_equal_key_element_partition(lib) -> None:
    for a, b in itertools.combinations(lib, 2):
        same_set = set(a.elements) == set(b.elements)
        assert (a.group == b.group) == same_set, (a.name, b.name)


@pytest.mark.parametrize(
    "names",
    [
        ("lead white", "red lead", "massicot"),
        ("azurite", "malachite", "verdigris"),
        ("viridian", "chromium oxide green"),
        ("orpiment", "realgar"),
        ("yellow ochre", "red ochre", "mars red", "mars yellow"),
        ("prussian blue", "yellow ochre"),
        ("chrome yellow", "chrome orange"),
        ("chalk", "gypsum"),
        ("emerald green", "scheele's green"),
        ("carbon black", "madder lake", "indigo"),
    ],
)
def test_indistinguishable_pigments_share_a_group(lib, names) -> None:
    groups = {lib[n].group for n in names}
    assert len(groups) == 1, groups


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("lead white", "chrome yellow"),
        ("azurite", "emerald green"),
        ("viridian", "chrome yellow"),
        ("yellow ochre", "raw umber"),
        ("cobalt blue", "cerulean blue"),
        ("cadmium yellow", "cadmium red"),
        ("zinc white", "lithopone"),
    ],
)
def test_distinguishable_pigments_have_different_groups(lib, a: str, b: str) -> None:
    assert lib[a].group != lib[b].group


def test_vermilion_alone(lib) -> None:
    assert lib.groups()[lib["vermilion"].group] == ("vermilion",)
    assert lib["vermilion"].group == "vermilion"


def test_silent_group(lib) -> None:
    silent = lib.groups()[SILENT_GROUP]
    assert {"carbon black", "madder lake", "indigo"} <= set(silent)
    assert all(lib[n].xrf_silent for n in silent)
    assert "Al" in lib["madder lake"].composition  # alum substrate, not a key element
    assert lib.group_elements()[lib["lead white"].group] == ("Pb",)
    assert lib.group_colors()["vermilion"] == lib["vermilion"].color
    assert {p.name for p in lib.with_element("Cr")} >= {"chrome yellow", "viridian", "zinc yellow"}


# ---------------------------------------------------------------- user files
USER_TOML = """
[[pigment]]
name = "Mercury Red Test"
aliases = ["test red"]
formula = "HgS"
density_g_cm3 = 8.0
elements = ["Hg"]
color = "#cc2200"

[[pigment]]
name = "iron test"
composition = { Fe = 0.6994, O = 0.3006 }
density_g_cm3 = 5.2
elements = ["Fe"]

[[pigment]]
name = "molybdate orange"
formula = "Pb7Cr4MoSO32"
density_g_cm3 = 6.2
elements = ["Pb", "Cr", "Mo"]
period = "1930s - present"

[[binder]]
name = "poppy oil"
formula = "C57H100O6"
density_g_cm3 = 0.92
"""


def test_user_toml(lib, tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(USER_TOML)
    ext = lib.with_file(path)
    assert len(ext) == len(lib) + 3
    assert len(lib) == len(xrfnb.pigments())  # the original is unchanged
    red = ext["test red"]
    assert red.name == "mercury red test"
    assert red.group == "vermilion"  # same key elements as vermilion: joins its group
    assert ext.groups()["vermilion"] == ("vermilion", "mercury red test")
    iron = ext["iron test"]
    assert iron.group == lib["mars red"].group
    assert iron.composition["Fe"] == pytest.approx(0.6994, rel=1e-4)
    # the synthesised formula reproduces the composition through xraylib
    assert composition_from_formula(iron.formula)["Fe"] == pytest.approx(0.6994, rel=1e-4)
    assert ext["molybdate orange"].group == "molybdate orange"
    assert ext.binder("poppy oil").density_g_cm3 == 0.92
    assert xrfnb.pigments(extra=path)["molybdate orange"].elements == ("Pb", "Cr", "Mo")


def test_user_csv(lib, tmp_path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text(
        "name,aliases,formula,composition,density_g_cm3,elements,xrf_silent,color,notes\n"
        "cobalt test,cot;co test,CoAl2O4,,4.0,Co,false,#2244aa,a test\n"
        "lake test,,C14H8O4,,1.5,,true,,organic\n"
        "oxide test,,,Cr:0.6842;O:0.3158,5.2,Cr,no,,\n"
    )
    ext = lib.with_file(path)
    assert ext["cot"].group == lib["cobalt blue"].group
    assert ext["lake test"].xrf_silent and ext["lake test"].group == SILENT_GROUP
    assert ext["oxide test"].group == lib["viridian"].group
    assert ext["oxide test"].composition["Cr"] == pytest.approx(0.6842, rel=1e-4)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("bad el,,PbO,,9.5,Xq,false", "unknown element 'Xq'"),
        ("bad formula,,PbQ2,,9.5,Pb,false", "cannot parse formula"),
        ("no density,,PbO,,,Pb,false", "missing field 'density_g_cm3'"),
        ("no formula,,,,9.5,Pb,false", "missing field 'formula'"),
        ("bad sum,,,Fe:0.5;O:0.2,5,Fe,false", "sum to 0.7000"),
        ("not in formula,,PbO,,9.5,Cr,false", "key element 'Cr' is not in the formula"),
        ("light key,,C,,1.8,C,false", "Z < 11"),
        ("no elements,,PbO,,9.5,,false", "elements"),
        ("negative,,PbO,,-2,Pb,false", "plausible"),
        ("lead white,,PbO,,9.5,Pb,maybe", "xrf_silent"),
        ("flake white,,PbO,,9.5,Pb,false", "already used"),
    ],
)
def test_bad_csv_rows_raise_with_file_and_row(lib, tmp_path, row: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "name,aliases,formula,composition,density_g_cm3,elements,xrf_silent\n"
        "ok,,ZnO,,5.6,Zn,false\n" + row + "\n"
    )
    with pytest.raises(PigmentError, match=message) as err:
        lib.with_file(path)
    assert "bad.csv" in str(err.value)
    assert "row 2" in str(err.value)


def test_bad_group_raises(lib, tmp_path) -> None:
    path = tmp_path / "group.toml"
    path.write_text(
        '[[pigment]]\nname = "x"\nformula = "PbO"\ndensity_g_cm3 = 9\nelements = ["Pb"]\ngroup = "mine"\n'
    )
    with pytest.raises(PigmentError, match="must share a group") as err:
        lib.with_file(path)
    assert "group.toml, pigment row 1" in str(err.value)
    path.write_text(
        '[[pigment]]\nname = "x"\nformula = "MoO3"\ndensity_g_cm3 = 4.7\nelements = ["Mo"]\n'
        'group = "lead pigments (Pb)"\n'
    )
    with pytest.raises(PigmentError, match="mixes key-element sets"):
        lib.with_file(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty CSV"),
        ("[[pigment]]\nname = \n", "invalid TOML"),
        (
            "[[pigment]]\nname = 'x'\nformula = 'ZnO'\ndensity_g_cm3 = 5\nelements = ['Zn']\nfoo = 1\n",
            "unknown field",
        ),
        ("name,formula\n", "no pigment rows"),
    ],
)
def test_bad_files(lib, tmp_path, content: str, message: str) -> None:
    suffix = ".toml" if content.startswith("[[") else ".csv"
    path = tmp_path / f"f{suffix}"
    path.write_text(content)
    with pytest.raises(PigmentError, match=message):
        lib.with_file(path)


def test_missing_file(lib, tmp_path) -> None:
    with pytest.raises(PigmentError, match="cannot read pigment file"):
        lib.with_file(tmp_path / "absent.toml")


def test_representative_of_a_class(lib) -> None:
    """A model class (an ambiguity group) is stood for by its first member in table order; a class named
    by a pigment (or an alias) by that pigment; anything else by nothing."""
    for group, members in lib.groups().items():
        assert lib.representative(group) == members[0]
    assert lib.representative("vermilion") == "vermilion"
    assert lib.representative("Flake White") == lib["lead white"].name
    assert lib.representative("no such pigment") is None


# ---------------------------------------------------------------- composition variants
_VARIANT_ROW = """
[[pigment]]
name = "test earth"
formula = "(FeOOH)3Al2Si2O5(OH)4"
density_g_cm3 = 3.0
elements = ["Fe"]
variant_balance = "Al2Si2O5(OH)4"
{extra}
[[pigment.variant]]
formula = "{formula}"
wt = {wt}
{source}
"""


def _variant_file(
    tmp_path, *, formula="FeOOH", wt="[0.2, 0.7]", source='source = "a data sheet, p. 3"', extra=""
):
    path = tmp_path / "variants.toml"
    path.write_text(_VARIANT_ROW.format(formula=formula, wt=wt, source=source, extra=extra), encoding="utf-8")
    return path


def test_user_variants_are_read_and_checked(lib, tmp_path) -> None:
    ext = lib.with_file(_variant_file(tmp_path))
    v = ext["test earth"].variants
    assert v.balance == "Al2Si2O5(OH)4" and v.components[0].wt_range == (0.2, 0.7)
    fe = composition_from_formula("FeOOH")["Fe"]
    assert v.element_range("Fe") == pytest.approx((0.2 * fe, 0.7 * fe))
    assert v.composition([0.5]) == pytest.approx(
        {
            el: 0.5 * composition_from_formula("FeOOH").get(el, 0.0)
            + 0.5 * composition_from_formula("Al2Si2O5(OH)4").get(el, 0.0)
            for el in ("H", "O", "Al", "Si", "Fe")
        }
    )
    assert lib["vermilion"].variants is None
    bad = [
        ({"source": ""}, "needs a 'source'"),
        ({"wt": "[0.5, 0.2]"}, "0 <= low <= high <= 1"),
        ({"wt": "[0.2, 1.5]"}, "0 <= low <= high <= 1"),
        ({"wt": "0.3"}, r"\[low, high\]"),
        ({"formula": "Xq2O"}, "variant 1"),
        ({"formula": "SiO2", "wt": "[0.0, 1.0]"}, "lose the key element 'Fe'"),
        ({"extra": 'variant_balance = "SiO2"'}, "invalid TOML|Duplicate|duplicate"),
    ]
    for kwargs, message in bad:
        with pytest.raises(PigmentError, match=message):
            lib.with_file(_variant_file(tmp_path, **kwargs))


def test_csv_rows_cannot_carry_variants(lib, tmp_path) -> None:
    path = tmp_path / "v.csv"
    path.write_text(
        "name,formula,density_g_cm3,elements,variant_balance\nx earth,Fe2O3,5,Fe,SiO2\n", encoding="utf-8"
    )
    with pytest.raises(PigmentError, match="TOML only"):
        lib.with_file(path)


def test_shipped_variants_keep_the_nominal_formula(lib) -> None:
    """Variants are an addition: each pigment's formula (its nominal composition, which the shipped model
    was trained on) is unchanged, and a variant with the nominal's own constituent mix reproduces it where
    the nominal is itself a mixture of the table's constituents."""
    assert lib["lead white"].formula == "(PbCO3)2Pb(OH)2"
    assert lib["cadmium red"].formula == "CdS0.5Se0.5"
    v = lib["lead white"].variants
    assert v.composition([0.0]) == pytest.approx(dict(lib["lead white"].composition))
    cd = lib["cadmium red"].variants
    # CdS0.5Se0.5 is equimolar CdS + CdSe: the CdSe weight fraction of that mix
    m_cds = xraylib.CompoundParser("CdS")["molarMass"]
    m_cdse = xraylib.CompoundParser("CdSe")["molarMass"]
    w = m_cdse / (m_cds + m_cdse)
    assert cd.composition([w]) == pytest.approx(dict(lib["cadmium red"].composition), abs=1e-9)
