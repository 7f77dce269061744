"""Readers of the text, MCA, SPE, NumPy and Bruker formats; detection from content; writers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import xraylib
from _bruker_files import write_bcf, write_ripple, write_spx

import xrfnb
from xrfnb.io.detect import detect_format
from xrfnb.io.mca import rebin_counts

CAL = xrfnb.EnergyCalibration(-0.03, 0.0148)


def _gauss_spectrum(cal, n=2048, lines_keV=(6.404, 8.048), height=1000.0, sigma_keV=0.07, base=2.0):
    e = cal.energies_keV(n)
    y = base + sum(height * np.exp(-0.5 * ((e - c) / sigma_keV) ** 2) for c in lines_keV)
    return np.round(y).astype(np.int64)


def _peak(s, lo, hi):
    e = s.energy_keV
    m = (e > lo) & (e < hi)
    return float(e[m][np.argmax(s.counts[m])])


# -- EPICS / XIA ----------------------------------------------------------------------------------
def _epics(path, counts_by_el, cals, live, real):
    n = len(counts_by_el)
    lines = [
        "VERSION:    3.1",
        f"ELEMENTS:   {n}",
        "DATE:       Nov 25, 2026 12:00:00.000",
        f"CHANNELS:   {len(counts_by_el[0])}",
        "REAL_TIME:  " + " ".join(map(str, real)),
        "LIVE_TIME:  " + " ".join(map(str, live)),
        "CAL_OFFSET: " + " ".join(str(c.offset_keV) for c in cals),
        "CAL_SLOPE:  " + " ".join(str(c.gain_keV) for c in cals),
        "CAL_QUAD:   " + " ".join(str(c.quadratic_keV) for c in cals),
        "ROIS:       1" + " 1" * (n - 1),
        "ROI_0_LEFT:  420" + " 420" * (n - 1),
        "ROI_0_RIGHT: 450" + " 450" * (n - 1),
        "ROI_0_LABEL: Fe Ka &" + " Fe Ka &" * (n - 1),
        'ENVIRONMENT: 13IDA:E:Energy.VAL="11800.00000" (Mono Energy)',
        "DATA: ",
    ]
    lines += [" ".join(str(int(c[k])) for c in counts_by_el) for k in range(len(counts_by_el[0]))]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_epics_multi_element_sum_rebins_onto_element_zero(tmp_path):
    cals = [xrfnb.EnergyCalibration(-0.03, 0.0148), xrfnb.EnergyCalibration(0.05, 0.0141)]
    # the same two lines (Fe Ka 6.404, Cu Ka 8.048 keV) seen through two differently calibrated detectors
    counts = [_gauss_spectrum(c) for c in cals]
    path = _epics(tmp_path / "two.mca", counts, cals, live=[9.0, 8.0], real=[10.0, 10.0])
    s0, s1 = (xrfnb.load(path, element=i) for i in range(2))
    assert s1.calibration == cals[1] and s1.live_time_s == 8.0
    total = xrfnb.load(path)
    assert total.calibration == cals[0]
    assert total.live_time_s == pytest.approx(8.5) and total.real_time_s == pytest.approx(10.0)
    assert total.metadata["element_live_time_s"] == [9.0, 8.0]
    assert total.metadata["rois"][0]["label"] == "Fe Ka"
    # peaks of the sum stay at the line energies (a naive channel-wise sum would split them)
    assert _peak(total, 6.0, 6.8) == pytest.approx(6.404, abs=0.015)
    assert _peak(total, 7.7, 8.4) == pytest.approx(8.048, abs=0.015)
    naive = xrfnb.Spectrum(s0.counts + s1.counts, cals[0])
    width = lambda s: np.count_nonzero(s.counts > 0.5 * s.counts.max())  # noqa: E731
    assert width(total) < width(naive)
    assert total.total_counts == pytest.approx(s0.total_counts + s1.total_counts, rel=2e-3)
    assert xrfnb.load(path, element=-1).calibration == cals[1]
    with pytest.raises(xrfnb.DataError, match="element 2 does not exist"):
        xrfnb.load(path, element=2)
    with pytest.raises(xrfnb.DataError, match="'sum'"):
        xrfnb.load(path, element="mean")


def test_rebin_counts_conserves_counts_and_is_identity_on_same_axis():
    rng = np.random.default_rng(0)
    c = rng.poisson(20, 500).astype(float)
    np.testing.assert_allclose(rebin_counts(c, CAL, CAL, 500), c, atol=1e-9)
    other = xrfnb.EnergyCalibration(-0.03 + 0.0148 * 0.5, 0.0148 * 2)  # channel j = source 2j and 2j+1
    merged = rebin_counts(c, CAL, other, 250)
    np.testing.assert_allclose(merged, c[0::2] + c[1::2], atol=1e-9)


# -- Amptek ---------------------------------------------------------------------------------------
def test_amptek_mca(tmp_path):
    counts = _gauss_spectrum(CAL, n=1024)
    ch_fe = (6.404 - CAL.offset_keV) / CAL.gain_keV
    ch_cu = (8.048 - CAL.offset_keV) / CAL.gain_keV
    text = "\n".join(
        [
            "<<PMCA SPECTRUM>>",
            "TAG - live_data",
            "GAIN - 20",
            "LIVE_TIME - 29.512",
            "REAL_TIME - 30.000",
            "<<CALIBRATION>>",
            "LABEL - keV",
            f"{ch_fe} 6.404",
            f"{ch_cu} 8.048",
            "<<DATA>>",
            *map(str, counts),
            "<<END>>",
            "<<DP5 CONFIGURATION>>",
            "MCAC=1024;",
            "<<DP5 CONFIGURATION END>>",
        ]
    )
    path = tmp_path / "amptek.mca"
    path.write_text(text)
    s = xrfnb.load(path)
    np.testing.assert_array_equal(s.counts, counts)
    assert s.live_time_s == 29.512 and s.real_time_s == 30.0
    assert s.calibration.gain_keV == pytest.approx(CAL.gain_keV, rel=1e-9)
    assert s.calibration.offset_keV == pytest.approx(CAL.offset_keV, abs=1e-9)
    path.write_text(text.split("<<END>>")[0])
    with pytest.raises(xrfnb.FormatError, match="truncated"):
        xrfnb.load(path)


# -- SPE ------------------------------------------------------------------------------------------
def test_spe_with_header_calibration_and_times(tmp_path):
    counts = _gauss_spectrum(CAL, n=512)
    body = "\n".join(" ".join(f"{v:8d}" for v in counts[i : i + 8]) for i in range(0, 512, 8))
    path = tmp_path / "ortec.Spe"
    path.write_text(
        f"$SPEC_ID:\nsample A\n$MEAS_TIM:\n95 100\n$DATA:\n0 511\n{body}\n"
        f"$ENER_FIT:\n{CAL.offset_keV} {CAL.gain_keV}\n"
    )
    s = xrfnb.load(path)
    np.testing.assert_array_equal(s.counts, counts)
    assert s.calibration == CAL and (s.live_time_s, s.real_time_s) == (95.0, 100.0)
    path.write_text(
        f"$SPEC_ID:\nx\n$DATA:\n0 511\n{body}\n$MCA_CAL:\n3\n{CAL.offset_keV} {CAL.gain_keV} 0 keV\n"
    )
    assert xrfnb.load(path).calibration == CAL
    path.write_text(f"$SPEC_ID:\nx\n$DATA:\n0 600\n{body}\n")
    with pytest.raises(xrfnb.FormatError, match=r"0\.\.600 \(601\) but holds 512 values"):
        xrfnb.load(path)


# -- plain text -----------------------------------------------------------------------------------
def test_text_single_column_with_header_comments(tmp_path):
    counts = _gauss_spectrum(CAL, n=300)
    path = tmp_path / "spec.txt"
    path.write_text(
        "# exported spectrum\n# CAL_OFFSET: -0.03\n# CAL_SLOPE: 0.0148\n# live_time = 12.5\n"
        + "\n".join(map(str, counts))
    )
    s = xrfnb.load(path)
    np.testing.assert_array_equal(s.counts, counts)
    assert s.calibration == CAL and s.live_time_s == 12.5
    assert "exported spectrum" in s.metadata["comments"]


def test_text_two_columns_energy_axis_gives_the_calibration(tmp_path):
    counts = _gauss_spectrum(CAL, n=300)
    path = tmp_path / "spec.csv"
    path.write_text("\n".join(f"{e:.6f},{c}" for e, c in zip(CAL.energies_keV(300), counts, strict=True)))
    s = xrfnb.load(path)
    assert s.calibration.gain_keV == pytest.approx(0.0148, rel=1e-5)
    assert s.calibration.offset_keV == pytest.approx(-0.03, abs=1e-5)


def test_text_uncalibrated_and_explicit_calibration(tmp_path):
    path = tmp_path / "raw.dat"
    path.write_text("\n".join(map(str, range(100))))
    s = xrfnb.load(path)
    assert s.metadata["calibrated"] is False
    np.testing.assert_array_equal(s.energy_keV, np.arange(100))
    s2 = xrfnb.load(path, calibration=CAL)
    assert s2.calibration == CAL and s2.metadata["calibrated"] is True


# -- NumPy ----------------------------------------------------------------------------------------
def test_npy_with_sidecar_spectrum_and_lazy_scan(tmp_path):
    counts = np.arange(64, dtype=np.uint32)
    np.save(tmp_path / "s.npy", counts)
    (tmp_path / "s.json").write_text(
        json.dumps({"calibration": {"offset_keV": -0.03, "gain_keV": 0.0148}, "live_time_s": 2.0})
    )
    s = xrfnb.load(tmp_path / "s.npy")
    assert s.calibration == CAL and s.live_time_s == 2.0
    cube = np.random.default_rng(0).poisson(2, (4, 5, 64)).astype(np.uint16)
    scan = xrfnb.Scan(cube, CAL, pixel_size_um=50.0, live_time_s=0.01)
    back = xrfnb.load(xrfnb.save(scan, tmp_path / "cube.npy"))
    assert isinstance(back.counts, np.memmap) and back.counts.mode == "r"
    np.testing.assert_array_equal(back.counts, cube)
    assert back.pixel_size_um == 50.0 and back.live_time_s == 0.01 and back.calibration == CAL


def test_npz_round_trip_with_per_pixel_live_time(tmp_path):
    cube = np.random.default_rng(0).poisson(2, (3, 4, 32)).astype(np.int32)
    lt = np.full((3, 4), 0.02)
    scan = xrfnb.Scan(cube, CAL, live_time_s=lt, metadata={"who": "me"})
    back = xrfnb.load(xrfnb.save(scan, tmp_path / "c.npz"))
    np.testing.assert_array_equal(back.counts, cube)
    np.testing.assert_array_equal(back.live_time_s, lt)
    assert back.metadata["who"] == "me"


# -- Bruker -----------------------------------------------------------------------------------------
def test_bruker_spx(tmp_path):
    counts = _gauss_spectrum(xrfnb.EnergyCalibration(-0.4756, 0.01), n=4096)
    path = write_spx(
        tmp_path / "point.spx", counts, offset_keV=-0.4756, gain_keV=0.01, live_time_s=9.5, real_time_s=10.0
    )
    s = xrfnb.load(path)
    np.testing.assert_array_equal(s.counts, counts)
    assert s.calibration == xrfnb.EnergyCalibration(-0.4756, 0.01)
    assert (s.live_time_s, s.real_time_s) == (9.5, 10.0)
    assert _peak(s, 6.0, 6.8) == pytest.approx(6.404, abs=0.01)
    # the same XML under another name is still recognised by content
    other = tmp_path / "point.dat"
    other.write_bytes(path.read_bytes())
    assert detect_format(other) == "spx"


def test_bruker_spx_corrupted_is_format_error(tmp_path):
    path = write_spx(
        tmp_path / "p.spx", np.ones(100, int), offset_keV=0.0, gain_keV=0.01, live_time_s=1, real_time_s=1
    )
    text = (
        path.read_text(encoding="cp1252").replace("<CalibLin>", "<Calib>").replace("</CalibLin>", "</Calib>")
    )
    path.write_text(text, encoding="cp1252")
    with pytest.raises(xrfnb.FormatError, match=r"p\.spx: not a readable Bruker \.spx"):
        xrfnb.load(path)


@pytest.mark.parametrize("record_by", ["vector", "image"])
def test_ripple_rpl_raw_lazy_scan(tmp_path, record_by):
    cube = np.random.default_rng(1).poisson(3, (5, 7, 128)).astype(np.uint16)
    header = {
        "depth-origin": -120.0,
        "depth-scale": 20.0,
        "depth-units": "eV",
        "live-time": 0.05,
        "width-scale": 40.0,
        "width-units": "um",
    }
    path = write_ripple(tmp_path / "map.rpl", cube, header, record_by=record_by)
    scan = xrfnb.load(path)
    assert isinstance(scan, xrfnb.Scan) and scan.is_lazy
    np.testing.assert_array_equal(np.asarray(scan.counts), cube)
    assert scan.calibration == xrfnb.EnergyCalibration(-0.12, 0.02)
    assert scan.live_time_s == 0.05 and scan.pixel_size_um == 40.0
    np.testing.assert_array_equal(scan.sum_spectrum().counts, cube.sum(axis=(0, 1)))
    # the .raw data file also loads (through its header)
    assert xrfnb.load(path.with_suffix(".raw")).shape == (5, 7, 128)


def test_ripple_truncated_raw_and_writer_round_trip(tmp_path):
    cube = np.random.default_rng(1).poisson(3, (4, 6, 64)).astype(np.uint16)
    path = write_ripple(tmp_path / "map.rpl", cube, {"ev-per-chan": 10.0})
    raw = path.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(xrfnb.FormatError, match="truncated file or mismatched header"):
        xrfnb.load(path)
    scan = xrfnb.Scan(cube, CAL, pixel_size_um=25.0, live_time_s=0.1)
    back = xrfnb.load(xrfnb.save(scan, tmp_path / "out.rpl"))
    np.testing.assert_array_equal(np.asarray(back.counts), cube)
    assert back.calibration.gain_keV == pytest.approx(CAL.gain_keV, rel=1e-12)
    assert back.pixel_size_um == 25.0 and back.live_time_s == 0.1


def test_bruker_bcf_hypermap(tmp_path):
    cube = np.random.default_rng(3).poisson(2.0, (5, 6, 256)).astype(np.uint16)
    cube[2, 3, 40] = 900  # one hot channel: must not wrap around in a too-small integer type
    path = write_bcf(
        tmp_path / "map.bcf",
        cube,
        offset_keV=-0.476,
        gain_keV=0.01,
        pixel_um=25.0,
        live_time_s=2.7,
        real_time_s=3.0,
    )
    scan = xrfnb.load(path)
    assert isinstance(scan, xrfnb.Scan)
    np.testing.assert_array_equal(np.asarray(scan.counts), cube)
    assert scan.calibration == xrfnb.EnergyCalibration(-0.476, 0.01)
    assert scan.pixel_size_um == 25.0
    assert scan.metadata["bcf_total_live_time_s"] == pytest.approx(2.7)
    assert scan.live_time_s == pytest.approx(2.7 / 30)


def test_bcf_damaged_container_is_format_error(tmp_path):
    cube = np.ones((2, 3, 64), np.uint16)
    good = write_bcf(
        tmp_path / "good.bcf",
        cube,
        offset_keV=0.0,
        gain_keV=0.01,
        pixel_um=10.0,
        live_time_s=1,
        real_time_s=1,
    ).read_bytes()
    path = tmp_path / "map.bcf"
    path.write_bytes(good[:0x400])
    assert detect_format(path) == "bcf"
    with pytest.raises(xrfnb.FormatError, match=r"map\.bcf.*(truncated|corrupted)"):
        xrfnb.load(path)
    # a pixel that claims a column outside the map: refused before the compiled decoder sees it
    stream_at = good.index(struct.pack("<ii", 2, 3))
    first_pixel = stream_at + 0x1A0 + 4
    bad = bytearray(good)
    bad[first_pixel : first_pixel + 4] = struct.pack("<I", 77)
    path.write_bytes(bytes(bad))
    with pytest.raises(xrfnb.FormatError, match="pixel x=77 outside the 3 columns"):
        xrfnb.load(path)


# -- detection and writers ------------------------------------------------------------------------
def test_detection_uses_content_not_extension(tmp_path):
    s = xrfnb.Spectrum(_gauss_spectrum(CAL, n=256), CAL, live_time_s=1.0)
    h5 = xrfnb.save(s, tmp_path / "a.h5")
    renamed = tmp_path / "a.mca"
    renamed.write_bytes(h5.read_bytes())
    assert detect_format(renamed) == "hdf5"
    np.testing.assert_array_equal(xrfnb.load(renamed).counts, s.counts)
    mca = xrfnb.save(s, tmp_path / "b.mca")
    txt = tmp_path / "b.txt"
    txt.write_bytes(mca.read_bytes())
    assert detect_format(txt) == "epics_mca"
    assert xrfnb.load(txt).calibration == CAL


def test_save_rejects_unknown_extension_and_scan_as_text(tmp_path):
    s = xrfnb.Spectrum(np.ones(10), CAL)
    with pytest.raises(xrfnb.FormatError, match=r"extension '\.xyz'"):
        xrfnb.save(s, tmp_path / "a.xyz")
    with pytest.raises(xrfnb.DataError, match="single spectrum"):
        xrfnb.save(xrfnb.Scan(np.ones((2, 2, 10)), CAL), tmp_path / "a.txt")
    with pytest.raises(xrfnb.DataError, match="Spectrum or a Scan"):
        xrfnb.save(np.ones(10), tmp_path / "a.h5")
    assert list(tmp_path.iterdir()) == []


def test_xraylib_reference_for_synthetic_lines():
    # the synthetic peaks above use published Ka1 energies; check them against xraylib once
    assert xraylib.LineEnergy(26, xraylib.KL3_LINE) == pytest.approx(6.404, abs=0.001)
    assert xraylib.LineEnergy(29, xraylib.KL3_LINE) == pytest.approx(8.048, abs=0.001)


def test_paths_accept_str(tmp_path):
    s = xrfnb.Spectrum(np.arange(5), CAL)
    out = xrfnb.save(s, str(tmp_path / "x.npz"))
    assert isinstance(out, Path)
    np.testing.assert_array_equal(xrfnb.load(str(out)).counts, np.arange(5))
