"""xrfnb HDF5 layout: lossless round trip, lazy chunkwise reading, read-only inputs, atomic writes."""

from __future__ import annotations

import gc
import hashlib
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import xrfnb
from xrfnb.io.atomic import atomic_path
from xrfnb.io.hdf5 import read_scan, write_scan

CAL = xrfnb.EnergyCalibration(-0.0421, 0.01003, 2.1e-8)


def _scan(rows=12, cols=9, channels=256, seed=0, dtype=np.uint16, live=True, pixel=True) -> xrfnb.Scan:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, (rows, cols, channels)).astype(dtype)
    lt = rng.uniform(0.009, 0.011, (rows, cols)) if live else None
    return xrfnb.Scan(
        counts,
        CAL,
        pixel_size_um=125.0 if pixel else None,
        live_time_s=lt,
        metadata={"instrument": "bruker-m6", "painting": "test", "nested": {"a": [1, 2]}},
    )


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


def test_scan_round_trip_is_lossless_and_lazy(tmp_path):
    scan = _scan()
    path = xrfnb.save(scan, tmp_path / "scan.h5")
    back = xrfnb.load(path)
    assert isinstance(back, xrfnb.Scan)
    assert isinstance(back.counts, h5py.Dataset) and back.is_lazy
    assert back.counts.file.mode == "r"
    np.testing.assert_array_equal(back.counts[()], scan.counts)
    assert back.counts.dtype == scan.counts.dtype
    assert back.calibration == scan.calibration
    assert back.pixel_size_um == 125.0
    np.testing.assert_array_equal(back.live_time_s, scan.live_time_s)
    assert back.metadata["instrument"] == "bruker-m6" and back.metadata["nested"] == {"a": [1, 2]}
    # a pixel read from the file is the same spectrum with its own live time
    px = back[3, 4]
    np.testing.assert_array_equal(px.counts, scan.counts[3, 4])
    assert px.live_time_s == scan.live_time_s[3, 4]


def test_spectrum_round_trip_is_lossless(tmp_path):
    counts = np.random.default_rng(1).poisson(50, 2048).astype(np.int32)
    s = xrfnb.Spectrum(counts, CAL, live_time_s=9.87, real_time_s=10.5, metadata={"sample": "lead white"})
    back = xrfnb.load(xrfnb.save(s, tmp_path / "s.hdf5"))
    assert isinstance(back, xrfnb.Spectrum)
    np.testing.assert_array_equal(back.counts, counts)
    assert back.counts.dtype == counts.dtype
    assert (back.calibration, back.live_time_s, back.real_time_s) == (CAL, 9.87, 10.5)
    assert back.metadata["sample"] == "lead white"


def test_layout_is_nexus_nxdata_chunked_and_compressed(tmp_path):
    scan = _scan(rows=2, cols=600, channels=4096, dtype=np.uint16, live=False)
    path = xrfnb.save(scan, tmp_path / "big.h5")
    with h5py.File(path, "r") as f:
        assert f.attrs["default"] == "entry" and f["entry"].attrs["default"] == "data"
        g = f["entry/data"]
        assert g.attrs["NX_class"] == "NXdata" and g.attrs["signal"] == "counts"
        assert list(g.attrs["axes"]) == ["y", "x", "energy"]
        d = g["counts"]
        assert d.compression == "gzip" and d.shuffle
        assert d.chunks[0] == 1 and d.chunks[2] == 4096  # a chunk never spans two rows
        assert d.chunks[1] * 4096 * 2 <= 1 << 20  # about 1 MiB per chunk
        np.testing.assert_allclose(g["energy"][()], CAL.energies_keV(4096))
        assert g["energy"].attrs["units"] == "keV"
        np.testing.assert_allclose(g["x"][()], (np.arange(600) + 0.5) * 125.0)
        assert g.attrs["calibration_gain_keV"] == CAL.gain_keV


def test_one_pixel_row_reads_without_any_other_chunk(tmp_path):
    """Destroy every stored chunk except those of row 5: row 5 and its pixels still read exactly."""
    scan = _scan(rows=8, cols=6, channels=128, live=False)
    path = xrfnb.save(scan, tmp_path / "scan.h5")
    with h5py.File(path, "r") as f:
        d = f["entry/data/counts"]
        info = [d.id.get_chunk_info(i) for i in range(d.id.get_num_chunks())]
    assert len(info) == 8  # one chunk per row here
    raw = bytearray(path.read_bytes())
    for ch in info:
        if ch.chunk_offset[0] != 5:
            raw[ch.byte_offset : ch.byte_offset + ch.size] = b"\xff" * ch.size
    path.write_bytes(bytes(raw))
    back = xrfnb.load(path)
    np.testing.assert_array_equal(back.counts[5], scan.counts[5])
    np.testing.assert_array_equal(back[5, 2].counts, scan.counts[5, 2])
    # destroyed chunks are unreadable, and the error names the chunk
    with pytest.raises(xrfnb.DataError, match=r"scan\.h5:/entry/data/counts: the storage chunk at offset "
                       r"\(4, 0, 0\) \(pixel row 4, columns 0-5\) is damaged"):
        back.counts[4]


class _CountingDataset:
    """Wraps an h5py dataset, recording every read (rows requested, bytes returned)."""

    def __init__(self, dset: h5py.Dataset):
        self._d = dset
        self.shape, self.dtype, self.chunks = dset.shape, dset.dtype, dset.chunks
        self.reads: list[tuple[int, int]] = []
        self.max_bytes = 0

    def __getitem__(self, index):
        out = self._d[index]
        sl = index if isinstance(index, slice) else index[0]
        start = sl.start if isinstance(sl, slice) else sl
        stop = sl.stop if isinstance(sl, slice) else sl + 1
        self.reads.append((start, stop))
        self.max_bytes = max(self.max_bytes, out.nbytes)
        return out


def test_sum_and_max_pixel_spectra_read_each_chunk_row_once_within_budget(tmp_path):
    scan = _scan(rows=40, cols=25, channels=512, dtype=np.uint16, live=False)
    path = xrfnb.save(scan, tmp_path / "scan.h5")
    with h5py.File(path, "r") as f:
        proxy = _CountingDataset(f["entry/data/counts"])
        lazy = xrfnb.Scan(proxy, CAL)
        budget_pixels = 4 * 25  # four rows per block
        total = lazy.sum_spectrum(max_pixels=budget_pixels)
        sum_reads = list(proxy.reads)
        peak = lazy.max_pixel_spectrum(max_pixels=budget_pixels)
    full = scan.counts
    np.testing.assert_array_equal(total.counts, full.sum(axis=(0, 1)))
    np.testing.assert_array_equal(peak.counts, full.max(axis=(0, 1)))
    # every row read exactly once per reduction, in blocks of at most the budget
    rows_read = sorted(r for a, b in sum_reads for r in range(a, b))
    assert rows_read == list(range(40))
    assert len(sum_reads) == 10
    assert proxy.max_bytes <= budget_pixels * 512 * 2
    assert proxy.max_bytes < full.nbytes / 5


def test_reading_never_modifies_the_file(tmp_path):
    path = xrfnb.save(_scan(), tmp_path / "scan.h5")
    before = _digest(path)
    scan = xrfnb.load(path)
    scan.sum_spectrum()
    scan[0, 0]
    with pytest.raises((OSError, ValueError, TypeError)):
        scan.counts[0, 0, 0] = 7  # read-only handle
    scan.counts.file.close()
    del scan
    gc.collect()
    assert _digest(path) == before


def test_file_closes_when_scan_is_released(tmp_path):
    path = xrfnb.save(_scan(), tmp_path / "scan.h5")
    scan = xrfnb.load(path)
    spectrum = scan[1, 1]
    with pytest.raises(OSError):  # HDF5 refuses a writable open while the read-only handle is alive
        h5py.File(path, "r+")
    del scan, spectrum
    gc.collect()
    with h5py.File(path, "r+"):
        pass
    # the file can now be replaced by a new save
    xrfnb.save(_scan(seed=3), path)
    np.testing.assert_array_equal(xrfnb.load(path).counts[()], _scan(seed=3).counts)


def test_saving_over_the_file_being_read_is_safe(tmp_path):
    path = xrfnb.save(_scan(), tmp_path / "scan.h5")
    lazy = xrfnb.load(path)
    xrfnb.save(lazy, path)  # reads block by block from the old file, renames the new one into place
    np.testing.assert_array_equal(xrfnb.load(path).counts[()], _scan().counts)


def test_failed_save_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = xrfnb.save(_scan(), tmp_path / "scan.h5")
    before = _digest(path)
    import xrfnb.io.hdf5 as h5mod

    def boom(group, scan, **kw):
        group.create_dataset("partial", data=np.zeros(10))
        raise RuntimeError("disk full")

    monkeypatch.setattr(h5mod, "write_scan", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        xrfnb.save(_scan(seed=9), path)
    with pytest.raises(RuntimeError):
        xrfnb.save(_scan(seed=9), tmp_path / "new.h5")
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.h5"]


def test_atomic_path_helper(tmp_path):
    target = tmp_path / "maps.h5"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not target.exists()
        tmp.write_text("ok")
    assert target.read_text() == "ok"
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ValueError
    assert target.read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["maps.h5"]


def test_extra_groups_and_dataset_selection(tmp_path):
    scan = _scan(live=False)
    path = tmp_path / "project.h5"
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        write_scan(f.create_group("scan"), scan)
        write_scan(f.create_group("reference"), _scan(seed=5))
        gt = f.create_group("ground_truth")
        gt.create_dataset("labels", data=np.zeros((12, 9), dtype=np.int8))
    with pytest.raises(xrfnb.FormatError, match="several") as exc:
        xrfnb.load(path)
    assert "/scan" in str(exc.value) and "/reference" in str(exc.value) and "project.h5" in str(exc.value)
    a = xrfnb.load(path, dataset="/scan")
    np.testing.assert_array_equal(a.counts[()], scan.counts)
    with h5py.File(path, "r") as f:
        b = read_scan(f["reference"])
        np.testing.assert_array_equal(b.counts[()], _scan(seed=5).counts)
    with pytest.raises(xrfnb.FormatError, match="no '/nope'"):
        xrfnb.load(path, dataset="/nope")


def test_foreign_nexus_nxdata_with_energy_axis_in_eV(tmp_path):
    path = tmp_path / "foreign.nxs"
    counts = np.random.default_rng(2).poisson(4, (3, 5, 200)).astype(np.int32)
    energy_eV = 1000 * CAL.energies_keV(200)
    with h5py.File(path, "w") as f:
        g = f.create_group("entry/xrf")
        g.attrs["NX_class"] = "NXdata"
        g.attrs["signal"] = "spectra"
        g.attrs["axes"] = [".", ".", "E"]
        g["spectra"] = counts
        g["E"] = energy_eV
        g["E"].attrs["units"] = "eV"
    scan = xrfnb.load(path)
    np.testing.assert_array_equal(scan.counts[()], counts)
    np.testing.assert_allclose(scan.energy_keV, energy_eV / 1000, atol=1e-9)


def test_plain_dataset_and_explicit_calibration(tmp_path):
    path = tmp_path / "plain.h5"
    counts = np.arange(100, dtype=np.float32)
    with h5py.File(path, "w") as f:
        f["measurement/spectrum"] = counts
        f["measurement/labels"] = np.array([b"a", b"b"])
    s = xrfnb.load(path)
    assert s.metadata["calibrated"] is False
    cal = xrfnb.EnergyCalibration(0.0, 0.02)
    s2 = xrfnb.load(path, dataset="measurement/spectrum", calibration=cal)
    assert s2.calibration == cal and s2.metadata["calibrated"] is True
    np.testing.assert_array_equal(s2.counts, counts)


def test_mismatched_energy_axis_is_a_data_error(tmp_path):
    path = xrfnb.save(_scan(live=False), tmp_path / "scan.h5")
    with h5py.File(path, "r+") as f:
        del f["entry/data/energy"]
        f["entry/data/energy"] = np.zeros(17)
    with pytest.raises(xrfnb.DataError, match=r"energy axis has shape \(17,\) but counts have 256 channels"):
        xrfnb.load(path)


def test_lazy_dask_scan_saves_block_by_block(tmp_path):
    da = pytest.importorskip("dask.array")
    scan = _scan(live=False)
    lazy = xrfnb.Scan(da.from_array(scan.counts, chunks=(3, 9, 256)), CAL, metadata={"k": 1})
    back = xrfnb.load(xrfnb.save(lazy, tmp_path / "d.h5"))
    np.testing.assert_array_equal(back.counts[()], scan.counts)
