"""Bad input gives an XRFNBError subclass whose message names the file and what is wrong."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import xrfnb

CAL = xrfnb.EnergyCalibration(0.0, 0.01)


def _epics(n_channels=16, rows=None, elements=1, cols=None):
    rows = n_channels if rows is None else rows
    cols = elements if cols is None else cols
    head = f"VERSION: 3.1\nELEMENTS: {elements}\nCHANNELS: {n_channels}\nCAL_OFFSET: {' 0' * elements}\n"
    head += f"CAL_SLOPE: {' 0.01' * elements}\nLIVE_TIME: {' 1' * elements}\nDATA:\n"
    return head + "\n".join(" ".join(["3"] * cols) for _ in range(rows)) + "\n"


CASES = {
    # name: (file name, content (bytes or str), error class, regex the message must match)
    "empty": ("empty.mca", b"", xrfnb.FormatError, "empty"),
    "empty_h5": ("empty.h5", b"", xrfnb.FormatError, "empty"),
    "binary_garbage": (
        "garbage.mca",
        bytes(range(256)) * 8,
        xrfnb.FormatError,
        "binary content of unknown format",
    ),
    "unknown_text": (
        "notes.txt",
        "Dear conservator,\nhere is the spectrum.\n",
        xrfnb.FormatError,
        "unknown format",
    ),
    "unknown_xml": ("x.xml", "<?xml version='1.0'?><svg/>", xrfnb.FormatError, "not a Bruker .spx"),
    "zip_not_npz": ("a.zip", b"PK\x03\x04" + b"\x00" * 40, xrfnb.FormatError, "ZIP archive"),
    "truncated_epics": (
        "t.mca",
        _epics(16, rows=9),
        xrfnb.FormatError,
        "CHANNELS 16 but the DATA block has 9 rows",
    ),
    "epics_no_data": (
        "t.mca",
        "VERSION: 3.1\nELEMENTS: 1\nCHANNELS: 4\n",
        xrfnb.FormatError,
        "no 'DATA:' line",
    ),
    "epics_columns": (
        "t.mca",
        _epics(8, elements=2, cols=1),
        xrfnb.FormatError,
        "1 column.* ELEMENTS says 2",
    ),
    "epics_bad_cal": (
        "t.mca",
        _epics(8).replace("CAL_SLOPE:  0.01", "CAL_SLOPE: -0.01"),
        xrfnb.CalibrationError,
        "gain must be > 0",
    ),
    "epics_cal_text": (
        "t.mca",
        _epics(8).replace("CAL_SLOPE:  0.01", "CAL_SLOPE: abc"),
        xrfnb.FormatError,
        "CAL_SLOPE is not a number",
    ),
    "negative_counts": ("neg.txt", "1\n2\n-5\n4\n", xrfnb.DataError, r"negative counts \(-5"),
    "nan_counts": ("nan.txt", "1\n2\nnan\n4\n", xrfnb.DataError, "non-finite counts"),
    "one_channel": ("one.txt", "7\n", xrfnb.DataError, "at least 2 channels"),
    "mixed_columns": ("m.txt", "1 2\n3\n", xrfnb.FormatError, "line 2 has 1 column"),
    "spe_short": ("s.spe", "$SPEC_ID:\nx\n$DATA:\n0 9\n1 2 3\n", xrfnb.FormatError, r"holds 3 values"),
    "spe_no_data": ("s.spe", "$SPEC_ID:\nx\n$DATA:\n", xrfnb.FormatError, "empty"),
    "amptek_no_data": ("a.mca", "<<PMCA SPECTRUM>>\nLIVE_TIME - 1\n", xrfnb.FormatError, "no <<DATA>>"),
    "rpl_missing_raw": (
        "m.rpl",
        "width 2\nheight 2\ndepth 8\noffset 0\ndata-length 2\ndata-type unsigned\n"
        "byte-order little-endian\nrecord-by vector\n",
        xrfnb.FormatError,
        "m.raw is missing",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_gives_named_error(tmp_path, case):
    name, content, error, pattern = CASES[case]
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    with pytest.raises(error, match=pattern) as exc:
        xrfnb.load(path)
    assert name in str(exc.value)
    assert isinstance(exc.value, xrfnb.XRFNBError)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(xrfnb.FormatError, match="no such file"):
        xrfnb.load(tmp_path / "nope.h5")
    with pytest.raises(xrfnb.FormatError, match="is a folder"):
        xrfnb.load(tmp_path)


def test_truncated_hdf5(tmp_path):
    path = xrfnb.save(xrfnb.Scan(np.ones((4, 4, 64), np.uint16), CAL), tmp_path / "scan.h5")
    data = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(xrfnb.FormatError, match=r"cut\.h5: not a readable HDF5 file"):
        xrfnb.load(cut)


def test_hdf5_wrong_shape_and_dtype(tmp_path):
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.ones((5, 5))
        f["text"] = np.array([b"abc", b"def"])
        f["cube"] = np.ones((2, 2, 8), dtype=np.float32)
        f["cube"][0, 0, 0] = np.nan
    with pytest.raises(xrfnb.DataError, match=r"odd\.h5:/image: counts of shape \(5, 5\)"):
        xrfnb.load(path, dataset="image")
    with pytest.raises(xrfnb.DataError, match="numeric"):
        xrfnb.load(path, dataset="text")
    scan = xrfnb.load(path, dataset="cube")  # lazy: NaN is found when the pixel is read
    with pytest.raises(xrfnb.DataError, match="non-finite"):
        scan[0, 0]


def test_npy_wrong_shape_nan_and_bad_sidecar(tmp_path):
    np.save(tmp_path / "flat.npy", np.ones((10, 64)))
    with pytest.raises(xrfnb.DataError, match=r"flat\.npy: array of shape \(10, 64\)"):
        xrfnb.load(tmp_path / "flat.npy")
    np.save(tmp_path / "nan.npy", np.array([1.0, np.nan, 2.0]))
    with pytest.raises(xrfnb.DataError, match=r"nan\.npy.*non-finite"):
        xrfnb.load(tmp_path / "nan.npy")
    np.save(tmp_path / "s.npy", np.ones(8))
    (tmp_path / "s.json").write_text("{calibration: oops")
    with pytest.raises(xrfnb.FormatError, match=r"s\.json: the JSON side-car is not valid JSON"):
        xrfnb.load(tmp_path / "s.npy")
    (tmp_path / "s.json").write_text(json.dumps({"calibration": {"offset_keV": 0, "gain_keV": 0}}))
    with pytest.raises(xrfnb.CalibrationError, match=r"s\.json.*gain must be > 0"):
        xrfnb.load(tmp_path / "s.npy")
    np.savez(tmp_path / "z.npz", spectra=np.ones(4))
    with pytest.raises(xrfnb.FormatError, match="no 'counts' array"):
        xrfnb.load(tmp_path / "z.npz")


def test_object_arrays_are_refused_not_unpickled(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(xrfnb.FormatError, match=r"obj\.npy"):
        xrfnb.load(tmp_path / "obj.npy")


def test_misused_options(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("1\n2\n3\n")
    with pytest.raises(xrfnb.DataError, match="only to multi-element"):
        xrfnb.load(path, element=2)
    with pytest.raises(xrfnb.DataError, match="only to HDF5"):
        xrfnb.load(path, dataset="/entry")


def test_hdf5_that_crashes_the_hdf5_library_is_a_format_error(tmp_path, monkeypatch):
    """A file whose metadata kills the reading process (as some corrupted HDF5 files do to libhdf5) is
    refused with a FormatError, and this process survives: the metadata is walked in a child first."""
    from xrfnb.io import hdf5 as _hdf5

    path = tmp_path / "crash.h5"
    xrfnb.save(xrfnb.Spectrum(np.ones(16), xrfnb.EnergyCalibration(0.0, 0.01)), path)
    path.write_bytes(path.read_bytes())  # a copy: not a file this process wrote through save()
    # stand-in for the crashing library: the child process dies from SIGSEGV
    monkeypatch.setattr(_hdf5, "_PREFLIGHT_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(xrfnb.FormatError, match=r"crash\.h5: the HDF5 library crashed \(SIGSEGV\)"):
        xrfnb.load(path)


def test_hdf5_preflight_passes_good_files_and_can_be_disabled(tmp_path, monkeypatch):
    from xrfnb.io import hdf5 as _hdf5

    path = tmp_path / "good.h5"
    xrfnb.save(xrfnb.Spectrum(np.arange(16.0), xrfnb.EnergyCalibration(0.0, 0.01)), path)
    path.write_bytes(path.read_bytes())
    assert xrfnb.load(path).counts.sum() == 120  # checked in a child process, then read here
    monkeypatch.setenv("XRFNB_HDF5_PREFLIGHT", "0")
    monkeypatch.setattr(_hdf5, "_PREFLIGHT_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    path.write_bytes(path.read_bytes() + b"")
    assert xrfnb.load(path).n_channels == 16  # check off: trusted data is opened directly
