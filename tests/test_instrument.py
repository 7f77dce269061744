"""Instrument presets, user instruments, validation and derived quantities."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import xraylib

import xrfnb
from xrfnb import EnergyCalibration, InstrumentError, XRFNBError
from xrfnb.physics.instrument import Instrument, instruments
from xrfnb.physics.materials import Absorber


def test_presets_are_listed_and_load() -> None:
    names = instruments()
    assert {"bruker-m6", "lab-mo", "synchrotron"} <= set(names)
    assert xrfnb.instruments() == names
    for name in names:
        inst = Instrument.preset(name)
        assert inst.name == name
        assert inst.description
        e, photons = inst.excitation()
        assert e.shape == photons.shape and np.all(photons >= 0) and photons.sum() > 0
        assert e.max() <= inst.max_energy_keV + 1e-9


def test_bruker_m6_preset_matches_specification() -> None:
    m6 = Instrument.preset("Bruker-M6")
    assert m6.anode == "Rh" and m6.tube_voltage_kV == 50.0
    assert m6.tube_window == Absorber("Be", 100.0)
    assert m6.detector_window == Absorber("Be", 12.5)
    assert m6.detector_thickness_um == 450.0
    assert m6.atmosphere == "air" and m6.optics == "polycapillary"
    assert m6.n_channels == 4096
    # the real M6 file's header (../shared/data/real/bruker_m6_jetstream_p059.spx)
    assert m6.calibration.offset_keV == pytest.approx(-0.9555)
    assert m6.calibration.gain_keV == pytest.approx(0.009999)
    assert float(m6.fwhm_keV(5.8988)) == pytest.approx(0.142, abs=1e-3)
    assert (m6.incidence_deg, m6.takeoff_deg, m6.scattering_angle_deg) == (90.0, 60.0, pytest.approx(150.0))


def test_fwhm_formula_noise_plus_fano() -> None:
    inst = Instrument(noise_keV=0.08, fano=0.12, pair_energy_eV=3.64)
    e = np.array([1.0, 5.0, 20.0])
    expected = np.sqrt(0.08**2 + (2.3548200450309493**2) * 0.12 * 3.64e-3 * e)
    np.testing.assert_allclose(inst.fwhm_keV(e), expected, rtol=1e-12)


def test_synchrotron_is_monochromatic() -> None:
    syn = Instrument.preset("synchrotron")
    assert syn.anode is None and syn.monochromatic_keV == 18.0
    e, photons = syn.excitation()
    assert e.tolist() == [18.0]
    he = xraylib.CS_Total(2, 18.0) * 1.665e-4 * syn.beam_path_mm / 10
    assert photons[0] == pytest.approx(syn.flux_photons_s * math.exp(-he), rel=1e-9)
    syn.check_energy(17.0)
    with pytest.raises(InstrumentError, match="above"):
        syn.check_energy(20.0)


def test_with_changes_and_validates() -> None:
    m6 = Instrument.preset("bruker-m6")
    wider = m6.with_(fwhm_scale=1.2)
    e = np.array([2.0, 6.0, 15.0])
    np.testing.assert_allclose(wider.fwhm_keV(e), 1.2 * m6.fwhm_keV(e), rtol=1e-12)
    assert float(m6.with_(fwhm_mnka_eV=160).fwhm_keV(5.8988)) == pytest.approx(0.160, abs=1e-6)
    shifted = m6.with_(offset_keV=-0.9, gain_keV=0.0101)
    assert shifted.calibration == EnergyCalibration(-0.9, 0.0101)
    lower = m6.with_(tube_voltage_kV=40.0, detector_path_mm=5.0)
    assert lower.excitation()[0].max() <= 40.0
    assert lower.detector_efficiency(2.0) > m6.detector_efficiency(2.0)  # less air to cross
    assert m6.tube_voltage_kV == 50.0  # the original is unchanged
    with pytest.raises(InstrumentError):
        m6.with_(tube_voltage_kV=-5.0)
    with pytest.raises(InstrumentError):
        m6.with_(no_such_setting=1)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"anode": "Xx"}, "anode"),
        ({"tube_window": ("Unobtainium", 10.0)}, "unknown material"),
        ({"tube_filters": [("Al", 0.0)]}, "thickness"),
        ({"detector_window": {"material": "Be", "thickness_um": -3.0}}, "thickness"),
        ({"detector_thickness_um": 0.0}, "thickness"),
        ({"noise_keV": 5.0}, "noise"),
        ({"fano": 0.0}, "Fano"),
        ({"noise_keV": 0.0, "fano": 0.02}, "FWHM"),
        ({"monochromatic_keV": 60.0}, "above the tube voltage"),
        ({"incidence_deg": 95.0}, "incidence_deg"),
        ({"atmosphere": "argon"}, "atmosphere"),
        ({"tube_window": ("Si3N4", 1.0)}, "density"),
        ({"n_channels": 4}, "n_channels"),
        ({"calibration": EnergyCalibration(0.0, 0.01, -1e-4)}, "monotonic"),
    ],
)
def test_bad_instruments_raise_instrument_error(changes: dict, match: str) -> None:
    with pytest.raises(InstrumentError, match=match):
        Instrument.preset("bruker-m6").with_(**changes)


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(XRFNBError, match="bruker-m6"):
        Instrument.preset("bruker-m7")


def test_user_instrument_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "scanner.toml"
    path.write_text(
        """
[my-scanner]
base = "bruker-m6"
anode = "Cr"
tube_voltage_kV = 30.0
tube_filters = [{ material = "Al", thickness_um = 25.0 }]
atmosphere = "helium"
fwhm_mnka_eV = 130.0
calibration = { offset_keV = -0.5, gain_keV = 0.005 }
""",
        encoding="utf-8",
    )
    inst = Instrument.from_toml(path)
    assert inst.name == "my-scanner" and inst.anode == "Cr"
    assert inst.tube_filters == (Absorber("Al", 25.0),)
    assert inst.detector_thickness_um == 450.0  # from the base preset
    assert float(inst.fwhm_keV(5.8988)) == pytest.approx(0.130, abs=1e-6)
    assert inst.calibration.gain_keV == 0.005
    names, _ = inst.tube_spectrum().line_names, None
    assert any(n.startswith("Cr K") for n in names)
    # round trip through a plain dictionary
    assert Instrument.from_dict(inst.to_dict()) == inst
    bad = tmp_path / "bad.toml"
    bad.write_text("anode = 'Rh'\ntube_voltge_kV = 30\n", encoding="utf-8")
    with pytest.raises(InstrumentError, match="tube_voltge_kV"):
        Instrument.from_toml(bad)
    with pytest.raises(InstrumentError, match="cannot read"):
        Instrument.from_toml(tmp_path / "missing.toml")


def test_instrument_is_frozen_and_hashable() -> None:
    m6 = Instrument.preset("bruker-m6")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m6.tube_voltage_kV = 40.0  # type: ignore[misc]
    assert hash(m6) == hash(Instrument.preset("bruker-m6"))
    _, p = m6.excitation()
    with pytest.raises(ValueError):
        p[0] = 0.0


def test_polycapillary_transmission_falls_at_high_energy() -> None:
    m6 = Instrument.preset("bruker-m6")
    t = m6.optics_transmission(np.array([8.0, 10.0, 20.0, 30.0, 40.0]))
    assert np.all(np.diff(t) < 0)
    # half of the reflected part at the cut-off (less the small low-energy loss)
    half = (1 - m6.polycapillary_floor) / 2 + m6.polycapillary_floor
    assert m6.optics_transmission(m6.polycapillary_cutoff_keV) == pytest.approx(half, rel=0.02)
    np.testing.assert_allclose(m6.with_(optics="none").optics_transmission(np.array([5.0, 40.0])), 1.0)


def test_vacuum_and_helium_paths_transmit_more_than_air() -> None:
    m6 = Instrument.preset("bruker-m6")
    e = np.array([1.5, 2.3, 3.0])  # Al, S, Ar-region fluorescence
    air = m6.detector_efficiency(e)
    he = m6.with_(atmosphere="helium").detector_efficiency(e)
    vac = m6.with_(atmosphere="vacuum").detector_efficiency(e)
    assert np.all(vac >= he) and np.all(he > air)
    nist = xraylib.GetCompoundDataNISTByName("Air, Dry (near sea level)")
    mu_air = np.array(
        [
            sum(
                w * xraylib.CS_Total(z, float(x))
                for z, w in zip(nist["Elements"], nist["massFractions"], strict=True)
            )
            for x in e
        ]
    )
    np.testing.assert_allclose(
        air / vac, np.exp(-mu_air * nist["density"] * m6.detector_path_mm / 10), rtol=1e-6
    )


def test_detector_solid_angle() -> None:
    inst = Instrument(detector_area_mm2=math.pi * 25.0, detector_path_mm=5.0)  # r = 5 mm at 5 mm
    assert inst.detector_solid_angle_sr == pytest.approx(2 * math.pi * (1 - 1 / math.sqrt(2)))


REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def test_from_pymca_reads_the_steel_configuration() -> None:
    path = REAL / "Steel.cfg"
    if not path.exists():
        pytest.skip(f"real data not available at {REAL}")
    inst = Instrument.from_pymca(path, n_channels=2048)
    # values as written in Steel.cfg (PyMca example data): 16 keV, Al 0.11 cm beam filter, 5 cm air,
    # Be 0.002 cm window, Si 0.035 cm, 45/45 degrees, noise 0.127439 keV, Fano 0.101156
    assert inst.anode is None and inst.monochromatic_keV == 16.0
    assert inst.tube_filters == (Absorber("Al1", 1100.0, 2.72),)
    assert inst.atmosphere == "air" and inst.detector_path_mm == pytest.approx(50.0)
    assert inst.detector_window == Absorber("Be1", 20.0, 1.848)
    assert inst.detector_thickness_um == pytest.approx(350.0)
    assert (inst.incidence_deg, inst.takeoff_deg) == (45.0, 45.0)
    assert inst.noise_keV == pytest.approx(0.127439) and inst.fano == pytest.approx(0.101156)
    assert inst.calibration.gain_keV == pytest.approx(0.0119281593146)
    assert inst.flux_photons_s == pytest.approx(2.024e8)
    # PyMca's FWHM convention: sqrt(noise^2 + 2.3548^2 * 0.00385 * fano * E)
    expected = math.sqrt(0.127439**2 + 2.3548**2 * 0.00385 * 0.101156 * 6.4)
    assert float(inst.fwhm_keV(6.4)) == pytest.approx(expected, rel=1e-4)
    # 1.1 mm Al attenuates the 16 keV beam as exp(-mu rho t)
    _, photons = inst.excitation()
    al = xraylib.CS_Total(13, 16.0) * 2.72 * 0.11
    assert photons[0] == pytest.approx(2.024e8 * math.exp(-al), rel=1e-6)


def test_from_pymca_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "ge.cfg"
    cfg.write_text(
        "[attenuators]\nDetector = 1, Ge1, 5.32, 0.5, 1.0\n[fit]\nenergy = 20.0\nenergyflag = 1\n"
        "energyweight = 1.0\n[detector]\nnoise = 0.1\nfano = 0.11\nzero = 0.0\ngain = 0.01\n",
        encoding="utf-8",
    )
    with pytest.raises(InstrumentError, match="silicon"):
        Instrument.from_pymca(cfg)
    cfg.write_text("[fit]\nenergy = 20.0, 25.0\nenergyflag = 1, 1\n", encoding="utf-8")
    with pytest.raises(InstrumentError, match="tube"):
        Instrument.from_pymca(cfg)
    with pytest.raises(InstrumentError, match="cannot read"):
        Instrument.from_pymca(tmp_path / "missing.cfg")


def test_mixture_materials() -> None:
    # PyMca's Kapton: C 62.88 %, N 6.67 %, O 30.46 % by mass, 1.42 g/cm3
    mix = Absorber("C1:0.628772, N1:0.066659, O1:0.304569", 25.0, 1.42)
    e = np.array([2.0, 5.0])
    mu = [
        sum(w * xraylib.CS_Total(z, x) for z, w in ((6, 0.628772), (7, 0.066659), (8, 0.304569))) for x in e
    ]
    np.testing.assert_allclose(mix.transmission(e), np.exp(-np.array(mu) * 1.42 * 25e-4), rtol=1e-6)
    with pytest.raises(InstrumentError, match="mixture"):
        Absorber("C1:abc", 10.0, 1.0)
    with pytest.raises(InstrumentError, match="density"):
        Absorber("C1:0.5, O1:0.5", 10.0)


@pytest.mark.parametrize("preset", ["bruker-m6", "bruker-m4", "lab-mo", "synchrotron"])
def test_to_toml_round_trip(tmp_path: Path, preset: str) -> None:
    inst = Instrument.preset(preset).with_(
        description='a "quoted"\nmulti-line note', tube_filters=[("C1:0.6, O1:0.4", 12.0, 1.3)]
    )
    path = tmp_path / "inst.toml"
    inst.to_toml(path)
    assert Instrument.from_toml(path) == inst


def test_describe_summarises_the_instrument() -> None:
    text = Instrument.preset("bruker-m6").describe()
    assert "Rh tube 50 kV" in text and "142 eV at Mn Ka" in text and "4096 x 9.999 eV" in text
    assert "scattering angle 150 deg" in text
    assert "<pre>" in Instrument.preset("synchrotron")._repr_html_()


def test_chamber_walls_and_back_layer_settings() -> None:
    """chamber_walls_sr takes a mapping (TOML inline table) or pairs, is stored sorted by Z, survives
    to_dict/from_dict and is checked; back_icc_layer_um lies within the crystal."""
    m4 = Instrument.preset("bruker-m4")
    assert [el for el, _ in m4.chamber_walls_sr] == ["Cr", "Fe", "Co", "Ni"]
    assert m4.back_icc_layer_um > 0 and m4.partial_collection == 0.0
    assert "Ni walls" in m4.describe()
    inst = Instrument.preset("lab-mo").with_(chamber_walls_sr=[("Ni", 0.02), ("Cu", 0.01)])
    assert inst.chamber_walls_sr == (("Ni", 0.02), ("Cu", 0.01))
    assert Instrument.from_dict(inst.to_dict()) == inst
    assert inst.to_dict()["chamber_walls_sr"] == {"Ni": 0.02, "Cu": 0.01}
    for bad, match in (
        ({"Xx": 0.1}, "unknown element"),
        ({"Ni": -0.1}, "2 pi"),
        ({"Ni": 7.0}, "2 pi"),
        ([("Ni", 0.1), ("Ni", 0.2)], "twice"),
        ("Ni", "element symbols"),
    ):
        with pytest.raises(InstrumentError, match=match):
            Instrument.preset("lab-mo").with_(chamber_walls_sr=bad)
    with pytest.raises(InstrumentError, match="back_icc_layer_um"):
        Instrument.preset("lab-mo").with_(back_icc_layer_um=500.0)
    for preset in ("bruker-m6", "lab-mo", "synchrotron"):  # existing presets keep their physics
        assert Instrument.preset(preset).chamber_walls_sr == ()
        assert Instrument.preset(preset).back_icc_layer_um == 0.0
        assert not Instrument.preset(preset).detector_compton
