"""Readers against hostile or damaged files: nothing outside the file is read, damage is an XRFNBError.

Files are crafted with h5py (external storage, external links, virtual datasets, forged shapes) or by
flipping bytes of files xrfnb wrote; the expected values are the arrays the files were made from.
"""

from __future__ import annotations

import os
import stat
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from _bruker_files import write_ripple, write_spx

import xrfnb
from xrfnb.io import chunks as _chunks
from xrfnb.io import hdf5 as _hdf5

CAL = xrfnb.EnergyCalibration(0.0, 0.01)
SECRET = b"root:x:0:0:secret-bytes-of-another-file:/root:/bin/bash\n" * 8


@pytest.fixture
def secret(tmp_path) -> Path:
    """Stand-in for /etc/passwd: a file that is not a scan and must never be read through one."""
    path = tmp_path / "private" / "passwd"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def _spectrum_file(path: Path, counts=None) -> Path:
    xrfnb.save(xrfnb.Spectrum(np.arange(16.0) if counts is None else counts, CAL), path)
    return path


# -- item 1: nothing outside the file ----------------------------------------------------------------
def test_external_raw_storage_is_refused(tmp_path, secret):
    path = tmp_path / "ext.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("counts", shape=(1, 1, len(SECRET)), dtype="u1",
                         external=[(str(secret), 0, len(SECRET))])
    assert h5py.File(path, "r")["counts"][0, 0, :4].tobytes() == b"root"  # h5py itself follows it
    with pytest.raises(xrfnb.FormatError, match=r"ext\.h5:/counts: the dataset's data are stored in another "
                       r"file \(.*private/passwd; HDF5 external storage\): refused"):
        xrfnb.load(path)
    # also when the dataset is asked for by name, and when it is a spectrum inside an xrfnb group
    with pytest.raises(xrfnb.FormatError, match="external storage"):
        xrfnb.load(path, dataset="/counts")
    other = _spectrum_file(tmp_path / "spec.h5")
    with h5py.File(other, "a") as f:
        del f["entry/data/counts"]
        f["entry/data"].create_dataset("counts", shape=(16,), dtype="u1", external=[(str(secret), 0, 16)])
    with pytest.raises(xrfnb.FormatError, match=r"spec\.h5:/entry/data/counts: .*external storage"):
        xrfnb.load(other)


@pytest.mark.parametrize("where", ["default chain", "elsewhere", "asked for"])
def test_external_link_is_refused(tmp_path, where):
    target = _spectrum_file(tmp_path / "target.h5")
    path = tmp_path / "link.h5"
    with h5py.File(path, "w") as f:
        if where == "default chain":  # root default -> an entry that lives in the other file
            f.attrs["default"] = "entry"
            f["entry"] = h5py.ExternalLink(str(target), "/entry")
        else:
            own = f.create_group("own")
            own.attrs["NX_class"] = "NXdata"
            own.attrs["signal"] = "counts"
            own.create_dataset("counts", data=np.ones(32))
            f["aux/calib"] = h5py.ExternalLink(str(target), "/entry/data/counts")
    assert np.array_equal(h5py.File(path, "r").get("entry/data/counts" if where == "default chain"
                                                   else "aux/calib")[()], np.arange(16.0))
    pattern = (r"link\.h5:/entry is an external link to /entry in the file .*target\.h5: refused"
               if where == "default chain" else r"link\.h5:/aux/calib is an external link")
    with pytest.raises(xrfnb.FormatError, match=pattern):
        xrfnb.load(path, dataset="/aux/calib" if where == "asked for" else None)


def test_virtual_dataset_with_a_source_in_another_file_is_refused(tmp_path):
    source = _spectrum_file(tmp_path / "source.h5")
    path = tmp_path / "vds.h5"
    layout = h5py.VirtualLayout(shape=(16,), dtype="f8")
    layout[:] = h5py.VirtualSource(str(source), "/entry/data/counts", shape=(16,))
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("counts", layout)
    with pytest.raises(xrfnb.FormatError, match=r"vds\.h5:/counts: a virtual dataset mapping "
                       r"/entry/data/counts of another file \(.*source\.h5\): refused"):
        xrfnb.load(path)


def test_virtual_dataset_inside_the_file_still_loads(tmp_path):
    """A virtual dataset whose sources are in the same file reads nothing else: allowed."""
    path = tmp_path / "vds_self.h5"
    a, b = np.arange(2, 18.0), np.arange(40, 56.0)
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=a)
        f.create_dataset("b", data=b)
        layout = h5py.VirtualLayout(shape=(32,), dtype="f8")
        layout[:16] = h5py.VirtualSource(".", "/a", shape=(16,))
        layout[16:] = h5py.VirtualSource(".", "/b", shape=(16,))
        f.create_virtual_dataset("joined", layout)
    spec = xrfnb.load(path, dataset="/joined", calibration=CAL)
    np.testing.assert_array_equal(spec.counts, np.concatenate([a, b]))


def test_metadata_check_never_opens_external_data(tmp_path):
    """The crash check's child process does not read external data: a FIFO as the external file would
    block it (opening a FIFO waits for a writer), so it finishing at once shows it never opened it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path = tmp_path / "fifo.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("counts", shape=(1, 1, 64), dtype="u1", external=[(str(fifo), 0, 64)])
    path.write_bytes(path.read_bytes())  # not a file this process wrote through save()
    t0 = time.monotonic()
    _hdf5.preflight(path, timeout_s=20)
    with pytest.raises(xrfnb.FormatError, match=r"fifo\.h5:/counts: .*external storage"):
        xrfnb.load(path)
    assert time.monotonic() - t0 < 15


# -- item 3: a shape the file cannot hold ------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_shape_larger_than_the_file_can_hold_is_refused(tmp_path, layout):
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        kw = {"chunks": (1, 1, 4096), "compression": "gzip"} if layout == "chunked" else {}
        d = f.create_dataset("counts", shape=(100000, 100000, 4096), dtype="u2", **kw)
        if layout == "chunked":  # one chunk stored (writing into the contiguous one would allocate 82 TB)
            d[0, 0] = np.arange(4096)
    size = path.stat().st_size
    assert size < 100_000
    held = r"the whole file holds" if layout == "contiguous" else r"stores .* in 1 of its 10000000000 chunks"
    with pytest.raises(xrfnb.FormatError, match=r"huge\.h5:/counts: the dataset claims shape "
                       r"\(100000, 100000, 4096\) of uint16 \(81\.9 TB\) but " + held):
        xrfnb.load(path)


def test_spectrum_longer_than_the_file_is_refused(tmp_path):
    path = _spectrum_file(tmp_path / "long.h5")
    with h5py.File(path, "a") as f:
        del f["entry/data/counts"], f["entry/data/energy"]
        f["entry/data"].create_dataset("counts", shape=(10**11,), dtype="f8")
    with pytest.raises(xrfnb.FormatError, match=r"long\.h5:/entry/data/counts: the dataset claims shape "
                       r"\(100000000000,\) of float64 \(800 GB\)"):
        xrfnb.load(path)


def test_partly_written_scan_still_loads(tmp_path):
    """An acquisition stopped after two of 100 rows: 82 MB claimed, the unwritten rows read as zeros."""
    rng = np.random.default_rng(3)
    rows = rng.poisson(3.0, (2, 100, 4096)).astype(np.uint16)
    path = tmp_path / "partial.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("counts", shape=(100, 100, 4096), dtype="u2", chunks=(1, 100, 4096),
                             compression="gzip")
        d[:2] = rows
    scan = xrfnb.load(path, calibration=CAL)
    assert scan.shape == (100, 100, 4096)
    np.testing.assert_array_equal(scan.counts[:2], rows)
    assert not scan.counts[50].any()
    scan.counts.file.close()


# -- item 2: a damaged compressed chunk --------------------------------------------------------------
@pytest.fixture
def damaged_scan(tmp_path):
    """An xrfnb-written gzip scan (one chunk per row here) with bytes flipped inside row 3's chunk."""
    rng = np.random.default_rng(7)
    counts = rng.poisson(4.0, (6, 5, 256)).astype(np.uint16)
    path = xrfnb.save(xrfnb.Scan(counts, CAL), tmp_path / "damaged.h5")
    with h5py.File(path, "r") as f:
        d = f["entry/data/counts"]
        assert d.compression == "gzip" and d.chunks == (1, 5, 256)
        info = [d.id.get_chunk_info(i) for i in range(d.id.get_num_chunks())]
    chunk = next(c for c in info if c.chunk_offset == (3, 0, 0))
    raw = bytearray(path.read_bytes())
    middle = chunk.byte_offset + chunk.size // 2
    for i in range(middle, middle + 8):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path, counts


def test_damaged_chunk_read_through_h5py_names_file_dataset_and_chunk(damaged_scan):
    path, counts = damaged_scan
    scan = xrfnb.load(path)
    np.testing.assert_array_equal(scan.counts[2], counts[2])  # other rows still read
    message = (r"damaged\.h5:/entry/data/counts: the storage chunk at offset \(3, 0, 0\) \(pixel row 3, "
               r"columns 0-4\) is damaged")
    with pytest.raises(xrfnb.DataError, match=message):
        scan.counts[3]
    with pytest.raises(xrfnb.DataError, match=message):
        scan.counts[1:5, 2:4]  # the search covers a block of rows
    with pytest.raises(xrfnb.DataError, match=message):
        scan.sum_spectrum()
    scan.counts.file.close()


@pytest.mark.parametrize("inflater", ["isal", "zlib"])
def test_damaged_chunk_read_by_the_parallel_reader_names_file_dataset_and_chunk(
    damaged_scan, inflater, monkeypatch
):
    from isal import isal_zlib

    path, counts = damaged_scan
    if inflater == "zlib":  # the fallback where isal is not installed
        monkeypatch.setattr(_chunks, "inflater", lambda: zlib.decompress)
    else:
        assert _chunks.inflater() is isal_zlib.decompress
    scan = xrfnb.load(path)
    reader = _chunks.ChunkReader.maybe(scan.counts, threads=2)
    assert reader is not None
    try:
        np.testing.assert_array_equal(reader.read_rows(0, 3), counts[:3])
        np.testing.assert_array_equal(reader.read_rows(4, 6), counts[4:])
        error = "IsalError" if inflater == "isal" else "error"
        with pytest.raises(xrfnb.DataError, match=r"damaged\.h5:/entry/data/counts: the storage chunk at "
                           r"offset \(3, 0, 0\) \(pixel row 3, columns 0-4\) is damaged: the compressed data "
                           rf"cannot be decoded \({error}: "):
            reader.read_rows(2, 5)
    finally:
        reader.close()
        scan.counts.file.close()


def test_parallel_reader_equals_h5py_on_undamaged_files(tmp_path):
    """Independent reference: h5py's own decoding of the same chunks (shuffle + gzip, gzip, none)."""
    rng = np.random.default_rng(1)
    data = rng.poisson(2.0, size=(7, 9, 70)).astype(np.uint32)
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=data, chunks=(2, 4, 32), compression="gzip", shuffle=True)
        f.create_dataset("b", data=data, chunks=(3, 9, 70), compression="gzip")
        f.create_dataset("c", data=data, chunks=(1, 5, 70))
    with h5py.File(path, "r") as f:
        for name in "abc":
            reader = _chunks.ChunkReader.maybe(f[name], threads=2)
            for r0, r1 in [(0, 2), (0, 7), (3, 6) if name == "b" else (2, 7)]:
                np.testing.assert_array_equal(reader.read_rows(r0, r1), f[name][r0:r1])
            reader.close()


# -- item 6: other escapes ---------------------------------------------------------------------------
def test_spx_with_an_enormous_calibration_number(tmp_path):
    path = write_spx(tmp_path / "s.spx", np.ones(64, int), offset_keV=-0.1, gain_keV=0.01, live_time_s=1.0,
                     real_time_s=1.1)
    nines = f"<CalibLin>{'9' * 400}</CalibLin>"
    path.write_text(path.read_text().replace("<CalibLin>0.01</CalibLin>", nines))
    with pytest.raises(xrfnb.CalibrationError, match=r"s\.spx: energy calibration offset/gain \(CalibAbs/"
                       r"CalibLin\) are not finite numbers: offset -0\.1, gain <400-digit number>"):
        xrfnb.load(path)


def test_ripple_record_by_dont_care_with_several_channels(tmp_path):
    rpl = write_ripple(tmp_path / "m.rpl", np.ones((2, 3, 16), np.uint16), {"ev-per-chan": 10},
                       record_by="dont-care")
    with pytest.raises(xrfnb.FormatError, match=r"m\.rpl: ripple header says record-by 'dont-care' for 16 "
                       r"channels; it must be 'vector'"):
        xrfnb.load(rpl)
    with pytest.raises(xrfnb.FormatError, match="record-by"):
        xrfnb.load(rpl.with_suffix(".raw"))


# -- issue 14: file modes ------------------------------------------------------------------------------
@pytest.fixture
def umask():
    """Set the process umask for one test (restored after it)."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
@pytest.mark.parametrize("suffix", [".h5", ".npy", ".npz", ".txt", ".mca", ".rpl"])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mask, expected, suffix):
    umask(mask)
    obj = (xrfnb.Spectrum(np.arange(16.0), CAL) if suffix in (".txt", ".mca")
           else xrfnb.Scan(np.ones((2, 3, 16), np.uint16), CAL))
    path = xrfnb.save(obj, tmp_path / f"out{suffix}")
    written = [path] + [p for p in (path.with_suffix(".json"), path.with_suffix(".raw")) if p.exists()]
    assert len(written) == {".npy": 2, ".rpl": 2}.get(suffix, 1)
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(expected) for p in written}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temporaries


def test_replacing_a_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "s.h5"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    xrfnb.save(xrfnb.Spectrum(np.arange(16.0), CAL), path)
    assert _mode(path) == 0o640
    np.testing.assert_array_equal(xrfnb.load(path).counts, np.arange(16.0))


def test_nxdata_with_a_scalar_signal(tmp_path):
    """Found by the fuzz test: a NeXus signal of shape () with an energy axis raised IndexError."""
    path = tmp_path / "scalar.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("data")
        g.attrs.update(NX_class="NXdata", signal="counts", axes=["energy"])
        g.create_dataset("counts", data=np.float32(0))
        g.create_dataset("energy", data=np.arange(16.0))
    with pytest.raises(xrfnb.DataError, match=r"scalar\.h5:/data/counts: counts of shape \(\) are neither"):
        xrfnb.load(path)


def test_fifo_is_refused_without_waiting(tmp_path):
    """Opening a FIFO for reading waits for a writer: load refuses anything but a regular file."""
    fifo = tmp_path / "spectrum.txt"
    os.mkfifo(fifo)
    with pytest.raises(xrfnb.FormatError, match=r"spectrum\.txt: not a regular file"):
        xrfnb.load(fifo)


def test_npy_sidecar_with_an_enormous_number(tmp_path):
    """Found by the fuzz test: a 400-digit live time in the JSON side-car raised OverflowError."""
    path = xrfnb.save(xrfnb.Scan(np.ones((2, 3, 16), np.uint16), CAL, live_time_s=0.1), tmp_path / "s.npy")
    side = path.with_suffix(".json")
    side.write_text(side.read_text().replace("0.1", "9" * 400))
    with pytest.raises(xrfnb.FormatError, match=r"s\.json: live_time_s must be a number"):
        xrfnb.load(path)


# -- temporary files left by a killed run ------------------------------------------------------------
def test_temporaries_of_killed_runs_are_removed_and_no_others(tmp_path):
    """kill -9 during a write leaves `.NAME.HOST-PID-RANDOM.tmpSUFFIX`; the next write of NAME on this
    machine removes it once that process is gone, and never touches a live run's or another host's."""
    import subprocess
    import sys

    from xrfnb.io.atomic import _owner_tag, atomic_path

    host = _owner_tag().rsplit("-", 1)[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".maps.h5.{host}-{dead.pid}-0123456789ab.tmp.h5"
        running = tmp_path / f".maps.h5.{host}-{alive.pid}-0123456789ab.tmp.h5"
        elsewhere = tmp_path / f".maps.h5.otherhost-{dead.pid}-0123456789ab.tmp.h5"
        other_target = tmp_path / f".other.h5.{host}-{dead.pid}-0123456789ab.tmp.h5"
        users = tmp_path / "notes.tmp.h5"
        for p in (stale, running, elsewhere, other_target, users):
            p.write_bytes(b"partial")
        with atomic_path(tmp_path / "maps.h5") as tmp:
            assert tmp.name.startswith(f".maps.h5.{_owner_tag()}-")
            tmp.write_bytes(b"done")
        assert (tmp_path / "maps.h5").read_bytes() == b"done"
        assert not stale.exists()
        assert running.exists() and elsewhere.exists() and other_target.exists() and users.exists()
    finally:
        alive.kill()
        alive.wait()
