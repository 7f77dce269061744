"""Instrument.from_file: an instrument from a Bruker XRF header, checked against the files' own XML.

The expected values are read here with xml.etree straight from each real ``.spx`` (NIST's M4 acrylic
blanks behind Rh and Mo tubes, six primary filters; the M6 Jetstream file), not with xrfnb's parser.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import xraylib
from _bruker_files import write_bcf

import xrfnb
from xrfnb import Instrument, InstrumentError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
BLANKS = REAL / "bruker_m4_rh50kv" / "acrylic_blanks"
SPX = [*sorted(BLANKS.glob("*.spx")), REAL / "bruker_m6_jetstream_p059.spx"] if BLANKS.is_dir() else []
needs_real = pytest.mark.skipif(not BLANKS.is_dir(), reason=f"real Bruker .spx files not found in {BLANKS}")


def _xml(path: Path) -> dict[str, ET.Element]:
    spectrum = ET.fromstring(path.read_bytes()).find("ClassInstance[@Type='TRTSpectrum']")
    parts = {n.get("Type"): n for n in spectrum.find("TRTHeaderedClass").findall("ClassInstance")}
    parts["spectrum"] = spectrum.find("ClassInstance[@Type='TRTSpectrumHeader']")
    return parts


def _f(node: ET.Element, tag: str) -> float:
    return float(node.findtext(tag))


@needs_real
@pytest.mark.parametrize("path", SPX, ids=lambda p: p.name)
def test_header_values_become_the_instrument(path):
    x = _xml(path)
    xrf, det, spec = x["TRTXrfHeader"], x["TRTDetectorHeader"], x["spectrum"]
    inst = Instrument.from_file(path)
    assert inst.anode == xraylib.AtomicNumberToSymbol(int(xrf.findtext("Anode")))
    assert inst.tube_voltage_kV == _f(xrf, "Voltage")
    assert inst.tube_current_mA == pytest.approx(_f(xrf, "Current") / 1000)  # Esprit writes uA
    assert inst.electron_incidence_deg == _f(xrf, "TubeIncidentAngle")
    assert inst.anode_takeoff_deg == _f(xrf, "TubeTakeOffAngle")
    window_z = int(xrf.findtext("TubeWindow/AtomicNumber"))
    assert inst.tube_window.material == xraylib.AtomicNumberToSymbol(window_z)
    assert inst.tube_window.thickness_um == _f(xrf, "TubeWindow/Thickness")
    zs = (xrf.findtext("ExcitationFilter/AtomicNumber") or "").split(",")
    ts = (xrf.findtext("ExcitationFilter/Thickness") or "").split(",")
    expected = [(xraylib.AtomicNumberToSymbol(int(z)), float(t)) for z, t in zip(zs, ts, strict=True) if z]
    assert [(a.material, a.thickness_um) for a in inst.tube_filters] == expected
    assert inst.optics == ("polycapillary" if xrf.findtext("Optic") == "Lens" else "none")
    assert (inst.incidence_deg, inst.takeoff_deg) == (_f(xrf, "ExcitationAngle"), _f(xrf, "DetectionAngle"))
    assert inst.beam_path_mm == _f(xrf, "ExcitationPathLength")
    assert inst.detector_path_mm == _f(xrf, "DetectionPathLength")
    assert inst.atmosphere == xrf.findtext("Atmosphere").lower()
    assert inst.atmosphere_pressure_mbar == _f(xrf, "ChamberPressure")
    # Esprit's SolidAngleDetection is a fraction of the full sphere (see tests/test_physics_real.py)
    omega = 4 * math.pi * _f(xrf, "SolidAngleDetection")
    assert inst.detector_solid_angle_sr == pytest.approx(omega, rel=1e-6)
    assert inst.detector_thickness_um == pytest.approx(1000 * _f(det, "DetectorThickness"))  # mm in the file
    assert inst.dead_layer_um == _f(det, "SiDeadLayerThickness")
    layer = det.find("WindowLayers")[0]
    assert inst.detector_window.material == xraylib.AtomicNumberToSymbol(int(layer.get("Atom")))
    assert inst.detector_window.thickness_um == float(layer.get("Thickness"))
    assert inst.calibration.offset_keV == _f(spec, "CalibAbs")
    assert inst.calibration.gain_keV == _f(spec, "CalibLin")
    assert inst.n_channels == int(spec.findtext("ChannelCount"))
    # Esprit's resolution: sigma^2 = SigmaAbs + SigmaLin * E (keV); 142-145 eV at Mn Ka for these XFlash 430
    fwhm = 2 * math.sqrt(2 * math.log(2)) * math.sqrt(_f(spec, "SigmaAbs") + _f(spec, "SigmaLin") * 5.8988)
    assert float(inst.fwhm_keV(5.8988)) == pytest.approx(fwhm, rel=1e-9)
    assert 0.140 < fwhm < 0.146
    for field in ("source_solid_angle_sr", "polycapillary_cutoff_keV", "detector_area_mm2", "pileup_time_s"):
        assert getattr(inst, field) == getattr(Instrument.preset("bruker-m6"), field)
        assert f"{field}: preset bruker-m6" in inst.description
    assert "tube_voltage_kV: header TRTXrfHeader/Voltage" in inst.description
    assert "DetLayers in the header is not modelled" in inst.description


@needs_real
@pytest.mark.parametrize(
    ("name", "filter_name"),
    [("Mo_50kv_100mA_acryl_0", "Empty"), ("Mo_50kv_100mA_acryl_f1_0", "Al12.5"),
     ("Mo_50kv_100mA_acryl_f3_0", "Al630"), ("Mo_50kv_100mA_acryl_f5_0", "Al100/Ti50/Cu25"),
     ("Rh_50kv_100mA_acryl_f4_0", "AlTi_100/25")],
)
def test_mo_and_rh_blanks_and_their_filter_names(name, filter_name):
    path = BLANKS / f"20170510_D1_{name}.spx"
    assert _xml(path)["TRTXrfHeader"].findtext("ExcitationFilter/FilterId") == filter_name
    inst = Instrument.from_file(path)
    assert inst.anode == name[:2]
    assert inst.optics == ("none" if name.startswith("Mo") else "polycapillary")  # Mo: a collimator
    assert f"ExcitationFilter {filter_name!r}" in inst.description
    if filter_name == "Empty":
        assert inst.tube_filters == ()
    meta = xrfnb.load(path).metadata["bruker_header"]  # what load() keeps of the header
    assert meta["filter_name"] == filter_name
    assert meta["tube_current_uA"] == _f(_xml(path)["TRTXrfHeader"], "Current")


@needs_real
def test_a_field_missing_from_the_header_comes_from_the_preset_and_says_so(tmp_path):
    text = (BLANKS / "20170510_D1_Rh_50kv_100mA_acryl_f2_0.spx").read_bytes().decode("cp1252")
    text = re.sub(r"<DetectionPathLength>[^<]*</DetectionPathLength>", "", text)
    text = re.sub(r"<SigmaLin>[^<]*</SigmaLin>", "", text)
    path = tmp_path / "partial.spx"
    path.write_bytes(text.encode("cp1252"))
    for preset in ("bruker-m6", "lab-mo"):
        base = Instrument.preset(preset)
        inst = Instrument.from_file(path, preset=preset, name="partial")
        assert inst.name == "partial"
        assert inst.detector_path_mm == base.detector_path_mm
        assert f"detector_path_mm: preset {preset}" in inst.description
        assert (inst.noise_keV, inst.fano) == (base.noise_keV, base.fano)  # SigmaAbs alone is not enough
        assert f"fano: preset {preset}" in inst.description
        assert inst.beam_path_mm == 10.0 and "beam_path_mm: header" in inst.description


def test_bcf_header_with_few_fields(tmp_path):
    """The test ``.bcf`` states voltage, current, anode, excitation angle and detector; nothing else."""
    path = write_bcf(tmp_path / "map.bcf", np.ones((2, 2, 64), np.uint16), offset_keV=-0.1, gain_keV=0.02,
                     pixel_um=20.0, live_time_s=1.0, real_time_s=1.2, voltage_kV=40.0)
    inst = Instrument.from_file(path)
    m6 = Instrument.preset("bruker-m6")
    assert (inst.anode, inst.tube_voltage_kV, inst.incidence_deg) == ("Rh", 40.0, 51.0)
    assert inst.tube_current_mA == 0.6
    assert inst.detector_thickness_um == 450.0 and inst.dead_layer_um == 0.029
    assert inst.calibration == xrfnb.EnergyCalibration(-0.1, 0.02) and inst.n_channels == 64
    assert (inst.takeoff_deg, inst.atmosphere) == (m6.takeoff_deg, m6.atmosphere)
    assert inst.tube_filters == m6.tube_filters
    assert "takeoff_deg: preset bruker-m6" in inst.description
    # its SigmaLin 1.4e-5 keV would mean a Fano factor of 0.004: refused, the preset's resolution kept
    assert inst.fano == m6.fano and "outside what a Si detector has" in inst.description
    assert xrfnb.load(path).metadata["bruker_header"]["tube_voltage_kV"] == 40.0


def test_files_without_an_xrf_header_are_refused(tmp_path):
    text = tmp_path / "s.txt"
    text.write_text("1\n2\n3\n")
    with pytest.raises(InstrumentError, match=r"reads Bruker \.spx/\.bcf XRF headers; this is a text file"):
        Instrument.from_file(text)
    sem = tmp_path / "sem.spx"
    sem.write_text('<?xml version="1.0"?><TRTSpectrum><ClassInstance Type="TRTSpectrum"><TRTHeaderedClass/>'
                   "</ClassInstance></TRTSpectrum>")
    with pytest.raises(InstrumentError, match="no XRF instrument header"):
        Instrument.from_file(sem)
    with pytest.raises(InstrumentError, match="no such file"):
        Instrument.from_file(tmp_path / "missing.spx")


@needs_real
def test_partial_filters_are_refused(tmp_path):
    text = (BLANKS / "20170510_D1_Rh_50kv_100mA_acryl_f4_0.spx").read_bytes().decode("cp1252")
    path = tmp_path / "half.spx"
    path.write_bytes(text.replace("<RelativeArea>1,1</RelativeArea>", "<RelativeArea>1,0.5</RelativeArea>")
                     .encode("cp1252"))
    with pytest.raises(InstrumentError, match=r"covers 0\.5 of the beam"):
        Instrument.from_file(path)


def test_chamber_pressure_scales_the_gas_absorption():
    """Air at 20 mbar on the 20 mm detector path: exp(-mu/rho rho(p) L), ideal gas (xraylib for mu/rho)."""
    base = Instrument.preset("bruker-m6").with_(detector_path_mm=20.0, atmosphere="vacuum")
    thin = base.with_(atmosphere="air", atmosphere_pressure_mbar=20.1)
    e = np.array([1.74, 3.0, 6.4])
    comp = xraylib.GetCompoundDataNISTByName("Air, Dry (near sea level)")
    mu = np.array([sum(w * xraylib.CS_Total(z, float(x)) for z, w in
                       zip(comp["Elements"], comp["massFractions"], strict=True)) for x in e])
    expected = np.exp(-mu * 0.001205 * 20.1 / 1013.25 * 2.0)
    assert thin.detector_efficiency(e) / base.detector_efficiency(e) == pytest.approx(expected, rel=1e-9)
    assert "air at 20.1 mbar" in thin.describe()
    assert Instrument.preset("bruker-m6").atmosphere_pressure_mbar == 1013.25
    with pytest.raises(InstrumentError, match="atmosphere_pressure_mbar must be >= 0"):
        base.with_(atmosphere_pressure_mbar=-1.0)
