"""EMSA/MAS (``.msa``) spectra: NIST's Bruker exports in ../shared/data/real and crafted bad files.

The expected calibration, times and detector fields are read from each file's header here with a plain
split of its ``#KEYWORD : value`` lines, not with xrfnb's reader; line energies come from xraylib.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xraylib

import xrfnb
from xrfnb import CalibrationError, DataError, FormatError
from xrfnb.io.detect import detect_format

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
PURE = REAL / "bruker_m4_rh50kv" / "pure_elements"
needs_real = pytest.mark.skipif(not PURE.is_dir(), reason=f"NIST EMSA spectra not found in {PURE}")


def _header(path: Path) -> dict[str, str]:
    """``{KEYWORD: value}`` of the header lines, keyword without '#' or unit (independent of xrfnb)."""
    out = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("#SPECTRUM"):
            break
        key, _, value = line.lstrip("#").partition(":")
        out[key.split("-")[0].strip()] = value.strip()
    return out


def _ka_keV(z: int) -> float:
    """Ka1/Ka2 blend: the two lines weighted by their radiative rates (xraylib)."""
    e1, e2 = xraylib.LineEnergy(z, xraylib.KL3_LINE), xraylib.LineEnergy(z, xraylib.KL2_LINE)
    r1, r2 = xraylib.RadRate(z, xraylib.KL3_LINE), xraylib.RadRate(z, xraylib.KL2_LINE)
    return (r1 * e1 + r2 * e2) / (r1 + r2)


def _centroid_keV(spectrum: xrfnb.Spectrum, near_keV: float) -> float:
    """Centroid of the channels above half maximum of the peak nearest ``near_keV``."""
    e, c = spectrum.energy_keV, np.asarray(spectrum.counts, dtype=float)
    window = np.flatnonzero(np.abs(e - near_keV) < 0.15)
    top = window[np.argmax(c[window])]
    lo, hi = top, top
    while c[lo - 1] > c[top] / 2:
        lo -= 1
    while c[hi + 1] > c[top] / 2:
        hi += 1
    sl = slice(lo, hi + 1)
    return float(np.sum(e[sl] * c[sl]) / np.sum(c[sl]))


@needs_real
@pytest.mark.parametrize("path", sorted(PURE.glob("*.msa")), ids=lambda p: p.name)
def test_calibration_and_times_are_the_header_values(path):
    head = _header(path)
    s = xrfnb.load(path)
    assert detect_format(path) == "msa"
    assert isinstance(s, xrfnb.Spectrum)
    assert s.n_channels == int(float(head["NPOINTS"])) == 4096
    assert head["XUNITS"] == "keV"
    assert s.calibration.gain_keV == pytest.approx(float(head["XPERCHAN"]), rel=1e-12)
    assert s.calibration.offset_keV == pytest.approx(float(head["OFFSET"]), rel=1e-12)
    assert s.live_time_s == pytest.approx(float(head["LIVETIME"]))
    assert s.real_time_s == pytest.approx(float(head["REALTIME"]))
    assert s.metadata["format"] == "msa" and s.metadata["calibrated"] is True
    det = s.metadata["emsa_detector"]
    assert det["active_layer_um"] == pytest.approx(float(head["TACTLYR"]) * 1e4)  # the header says cm
    assert det["dead_layer_um"] == pytest.approx(float(head["TDEADLYR"]) * 1e4)
    assert det["fwhm_mnka_eV"] == pytest.approx(float(head["MNFWHM"]) * 1e3)  # ##MNFWHM -keV
    assert det["detector_name"] == head["RTDET"] == "XFlash 430"
    assert s.metadata["emsa_header"]["LIVETIME  -s"] == head["LIVETIME"]


@needs_real
@pytest.mark.parametrize("element", ["Ti", "Cr", "Fe", "Ni", "Cu", "Zr"])
def test_k_alpha_peaks_land_at_the_published_energies(element):
    """The pure-element spectra's Ka peak within one channel (10 eV) of xraylib's Ka1/Ka2 blend."""
    z = xraylib.SymbolToAtomicNumber(element)
    s = xrfnb.load(PURE / f"{element}_50kv_50_ma_Rh_vac_D1.msa")
    ka1 = xraylib.LineEnergy(z, xraylib.KL3_LINE)  # Ti 4.511, Fe 6.404, Cu 8.048, Zr 15.775 keV
    assert abs(_centroid_keV(s, ka1) - _ka_keV(z)) < s.calibration.gain_keV
    if element in ("Ti", "Fe", "Cu"):  # Ka1 and Ka2 closer than a channel or two: the blend is at Ka1
        assert abs(_centroid_keV(s, ka1) - ka1) < 2 * s.calibration.gain_keV


@needs_real
def test_negative_zero_peak_residue_is_listed_and_zeroed():
    """NIST's Zr export holds -208 to -316 counts just above the zero peak (0.28-0.35 keV)."""
    path = PURE / "Zr_50kv_50_ma_Rh_vac_D1.msa"
    data = path.read_text().split("#SPECTRUM")[1].split("#ENDOFDATA")[0]
    values = [float(v) for v in data.replace(",", " ").split()[1:]]
    negative = [i for i, v in enumerate(values) if v < 0]
    s = xrfnb.load(path)
    listed = s.metadata["emsa_negative_counts"]
    assert listed["channels"] == negative and min(listed["values"]) == min(values) == -316
    assert np.all(s.counts[negative] == 0) and np.all(s.energy_keV[negative] < 1.0)
    other = np.setdiff1d(np.arange(4096), negative)
    assert np.array_equal(s.counts[other], np.asarray(values)[other])


@needs_real
def test_loaded_spectrum_round_trips_through_hdf5(tmp_path):
    s = xrfnb.load(PURE / "Fe_50kv_50_ma_Rh_vac_D1.msa")
    back = xrfnb.load(xrfnb.save(s, tmp_path / "fe.h5"))
    assert np.array_equal(back.counts, s.counts) and back.calibration == s.calibration
    assert back.metadata["emsa_detector"] == s.metadata["emsa_detector"]


# -- crafted files ----------------------------------------------------------------------------------
def _msa(counts, *, head: dict[str, str] | None = None, per_line: int = 4, xy: bool = False,
         drop: tuple[str, ...] = (), end: str = "#ENDOFDATA   : \n") -> str:
    fields = {"FORMAT": "EMSA/MAS Spectral Data File", "VERSION": "1.0", "TITLE": "crafted",
              "NPOINTS": str(len(counts)), "NCOLUMNS": "1" if xy else str(per_line),
              "XUNITS": "keV", "YUNITS": "counts", "DATATYPE": "XY" if xy else "Y",
              "XPERCHAN": "0.01", "OFFSET": "-0.1", "LIVETIME  -s": "10.5", "REALTIME  -s": "12.0",
              "BEAMKV   -kV": "50.0", "ELEVANGLE-dg": "35.0", "TBEWIND -cm": "0.0008"}
    fields.update(head or {})
    lines = [f"#{k:<12}: {v}" for k, v in fields.items() if k not in drop]
    lines.append("#SPECTRUM    : Spectral Data Starts Here")
    if xy:
        e = -0.1 + 0.01 * np.arange(len(counts))
        lines += [f"{x:.4f}, {c}" for x, c in zip(e, counts, strict=True)]
    else:
        lines += [", ".join(str(c) for c in counts[i:i + per_line]) + ","
                  for i in range(0, len(counts), per_line)]
    return "\n".join(lines) + "\n" + end


COUNTS = [int(v) for v in np.random.default_rng(17).poisson(30, 256)]


@pytest.mark.parametrize("suffix", [".msa", ".emsa", ".txt", ".dat"])
def test_emsa_files_are_sniffed_by_content(tmp_path, suffix):
    p = tmp_path / f"s{suffix}"
    p.write_text(_msa(COUNTS).replace("#FORMAT      : EMSA/MAS Spectral Data File",
                                      "#format : emsa/mas spectral data file"))
    assert detect_format(p) == "msa"
    s = xrfnb.load(p)
    assert s.counts.tolist() == COUNTS
    assert s.calibration.offset_keV == pytest.approx(-0.1) and s.calibration.gain_keV == pytest.approx(0.01)
    assert (s.live_time_s, s.real_time_s) == (10.5, 12.0)
    det = s.metadata["emsa_detector"]
    assert det == {"beam_kV": 50.0, "elevation_angle_deg": 35.0, "be_window_um": pytest.approx(8.0)}


def test_xunits_ev_and_missing_xunits(tmp_path):
    p = tmp_path / "ev.msa"
    p.write_text(_msa(COUNTS, head={"XUNITS": "eV", "XPERCHAN": "10.0", "OFFSET": "-100"}))
    cal = xrfnb.load(p).calibration
    assert cal.gain_keV == pytest.approx(0.01) and cal.offset_keV == pytest.approx(-0.1)
    p.write_text(_msa(COUNTS, head={"XPERCHAN": "10.0", "OFFSET": "-100"}, drop=("XUNITS",)))
    s = xrfnb.load(p)
    assert s.calibration.gain_keV == pytest.approx(0.01) and "no XUNITS" in s.metadata["calibration_source"]
    p.write_text(_msa(COUNTS, head={"XUNITS": "nm"}))
    with pytest.raises(CalibrationError, match=r"ev\.msa: XUNITS 'nm'"):
        xrfnb.load(p)


def test_times_in_other_units_and_xy_files(tmp_path):
    p = tmp_path / "xy.msa"
    p.write_text(_msa(COUNTS, xy=True, head={"LIVETIME  -ms": "2500"}, drop=("LIVETIME  -s",)))
    s = xrfnb.load(p)
    assert s.counts.tolist() == COUNTS and s.live_time_s == pytest.approx(2.5)
    p.write_text(_msa(COUNTS, xy=True, head={"OFFSET": "0.5"}))
    with pytest.raises(CalibrationError, match="X column differs from XPERCHAN/OFFSET"):
        xrfnb.load(p)


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        (_msa(COUNTS, end="").split("#SPECTRUM")[0], FormatError, "no #SPECTRUM line"),
        (_msa(COUNTS[:-3], head={"NPOINTS": "256"}), FormatError, "says 256 channels .* 253 values"),
        (_msa(COUNTS, head={"NPOINTS": "128"}), FormatError, "128 channels but the data section holds more"),
        (_msa(COUNTS, head={"NPOINTS": "4096.5"}), FormatError, "NPOINTS 4096.5 must be a whole number"),
        (_msa(COUNTS, head={"NPOINTS": "lots"}), FormatError, "NPOINTS is not a number"),
        (_msa(COUNTS).replace(", 3", ", x3", 1), FormatError, r"line \d+: 'x3\d*' in the data is not a"),
        (_msa(COUNTS, head={"DATATYPE": "XYZ"}), FormatError, "DATATYPE 'XYZ' is not supported"),
        (_msa(COUNTS, drop=("DATATYPE",)), FormatError, "lacks the required #DATATYPE"),
        (_msa(COUNTS, per_line=8, head={"NCOLUMNS": "4"}), FormatError, "NCOLUMNS says 4 .* multi-column"),
        (_msa(COUNTS, head={"NCOLUMNS": "9"}), FormatError, "NCOLUMNS 9 must be 1 to 5"),
        (_msa(COUNTS, head={"XPERCHAN": "-0.01"}), CalibrationError, "XPERCHAN/OFFSET"),
        (_msa(COUNTS, head={"LIVETIME  -s": "1e999"}), FormatError, "LIVETIME is not finite"),
        (_msa(COUNTS).replace("#TITLE", "TITLE"), FormatError, "not a '#KEYWORD : value' header line"),
        (_msa([*COUNTS[:200], -5, *COUNTS[201:]]), DataError, "negative counts"),  # at 1.9 keV
    ],
    ids=["no-spectrum", "truncated", "extra-data", "fractional-npoints", "text-npoints", "non-numeric",
         "datatype", "no-datatype", "multi-column", "ncolumns", "decreasing-axis", "infinite-time",
         "damaged-header", "negative"],
)
def test_bad_files_are_clear_errors_naming_the_file(tmp_path, text, error, match):
    p = tmp_path / "bad.msa"
    p.write_text(text)
    with pytest.raises(error, match=match) as info:
        xrfnb.load(p)
    assert str(p) in str(info.value)


def test_a_txt_without_the_emsa_header_is_still_a_text_spectrum(tmp_path):
    p = tmp_path / "plain.txt"
    p.write_text("# FORMAT of this file: counts\n" + "\n".join(map(str, COUNTS)) + "\n")
    assert detect_format(p) == "text"
