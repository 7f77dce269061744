"""The streaming ``.bcf`` reader (``xrfnb/io/bcf.py``): rows decoded on demand, bit for bit as rosettasciio.

Synthetic hypermaps in every pulse packing (16-bit and 12-bit pulse lists, "instructed" bunches with
extra pulses, mixed), with empty pixels left out of their rows, small and large container chunks and
pointer tables spanning several chunks, are read through :class:`xrfnb.io.bcf.BcfRows` one block of rows
at a time and compared with the cube written and with rosettasciio's decoder run over the whole stream.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from _bruker_files import bcf_header, bcf_stream, pack_instructed, write_bcf, write_bcf_streamed
from rsciio.bruker import _api as rsciio_bruker

import xrfnb
from xrfnb.io import bcf
from xrfnb.io.bruker import read_bcf

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _cube(seed: int, shape=(7, 5, 300)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cube = rng.poisson(0.3, shape).astype(np.uint16)
    cube[1, 2, 7] = 900  # a hot channel: 8-bit and 16-bit bunches
    cube[3] = 0  # an empty row
    cube[2, 1, 100:104] = rng.integers(0, 300, 4)
    return cube


def _rsciio_full(path: Path, index: int, shape, dtype) -> np.ndarray:
    reader = rsciio_bruker.BCF_reader(str(path))
    vfile = reader.get_file(f"EDSDatabase/SpectrumData{index}")
    return rsciio_bruker.unbcf_fast.parse_to_numpy(vfile, shape, np.dtype(dtype))


def _write(tmp_path, cube, **kw) -> Path:
    return write_bcf(
        tmp_path / "map.bcf",
        cube,
        offset_keV=-0.1,
        gain_keV=0.01,
        pixel_um=5.0,
        live_time_s=2.0,
        real_time_s=2.5,
        **kw,
    )


@pytest.mark.parametrize("packing", ["pulse16", "pulse12", "instructed", "mixed"])
@pytest.mark.parametrize("skip_empty", [False, True])
@pytest.mark.parametrize("block_bytes", [1, bcf.BLOCK_BYTES])
def test_bcf_rows_bit_for_bit(tmp_path, monkeypatch, packing, skip_empty, block_bytes):
    monkeypatch.setattr(bcf, "BLOCK_BYTES", block_bytes)  # 1: one row per block
    cube = _cube(len(packing) + skip_empty)
    path = _write(
        tmp_path,
        cube,
        packing=packing,
        skip_empty=skip_empty,
        chunk=0x2000 if skip_empty else 0x1000,
        extra_maps=1,
    )
    scan = xrfnb.load(path)
    assert scan.is_lazy and isinstance(scan.counts, bcf.BcfRows)
    assert scan.counts.chunks[0] == (1 if block_bytes == 1 else 7)
    got = np.asarray(scan.counts)
    assert got.dtype == (np.uint16 if packing.startswith("pulse") else np.uint32)
    np.testing.assert_array_equal(got, cube)
    assert np.array_equal(got, _rsciio_full(path, 0, cube.shape, got.dtype))
    other = read_bcf(path, index=1)
    assert other.metadata["bcf_index"] == 1 and other.metadata["bcf_indexes"] == [0, 1]
    np.testing.assert_array_equal(np.asarray(other.counts), _rsciio_full(path, 1, cube.shape, got.dtype))
    np.testing.assert_array_equal(np.asarray(other.counts), cube + 1)


def test_bcf_rows_indexing(tmp_path, monkeypatch):
    monkeypatch.setattr(bcf, "BLOCK_BYTES", 2 * 5 * 300 * 4)  # two rows of uint32 per block
    cube = _cube(5)
    scan = xrfnb.load(_write(tmp_path, cube, packing="mixed"))
    counts = scan.counts
    assert counts.shape == cube.shape and counts.ndim == 3 and len(counts) == 7
    np.testing.assert_array_equal(counts[2, 1], cube[2, 1])
    np.testing.assert_array_equal(counts[-1], cube[-1])
    np.testing.assert_array_equal(counts[1:6:2, :, 10:20], cube[1:6:2, :, 10:20])
    np.testing.assert_array_equal(counts[[6, 0, 3]], cube[[6, 0, 3]])
    np.testing.assert_array_equal(counts[..., 7], cube[..., 7])
    np.testing.assert_array_equal(counts[:, 2], cube[:, 2])
    assert counts[5:5].shape == (0, 5, 300)
    np.testing.assert_array_equal(scan[2, 1].counts, cube[2, 1])
    blocks = list(scan.iter_blocks(max_pixels=1))
    assert [sl.stop - sl.start for sl, _ in blocks] == [2, 2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), cube)
    np.testing.assert_array_equal(scan.sum_spectrum().counts, cube.sum(axis=(0, 1)))
    with pytest.raises(IndexError):
        counts[7]


def test_bcf_pointer_table_over_several_chunks(tmp_path, monkeypatch):
    """A stream of more than 1016 chunks of 4 KiB: its pointer table is a chain of chunks."""
    monkeypatch.setattr(bcf, "BLOCK_BYTES", 9 * 70 * 512 * 2)
    cube = np.random.default_rng(9).poisson(1.0, (64, 70, 512)).astype(np.uint16)
    path = _write(tmp_path, cube)
    assert path.stat().st_size > 1100 * 0x1000
    scan = xrfnb.load(path)
    np.testing.assert_array_equal(np.asarray(scan.counts), cube)
    np.testing.assert_array_equal(scan.counts[40:50, 3], cube[40:50, 3])


def test_bcf_zlib_container(tmp_path, monkeypatch):
    """A zlib-compressed container: rows read through its table of compressed blocks."""
    monkeypatch.setattr(bcf, "BLOCK_BYTES", 1)
    cube = np.random.default_rng(2).poisson(2.0, (40, 30, 256)).astype(np.uint16)  # several 32 KiB blocks
    path = _write(tmp_path, cube, packing="mixed", compressed=True)
    scan = xrfnb.load(path)
    assert scan.counts._stream.compressed
    np.testing.assert_array_equal(np.asarray(scan.counts), cube)
    np.testing.assert_array_equal(scan.counts[17:23, 4], cube[17:23, 4])
    assert np.array_equal(np.asarray(scan.counts), _rsciio_full(path, 0, cube.shape, np.uint32))


def test_bcf_written_as_a_stream(tmp_path):
    """The benchmark's writer (rows streamed to disk, pointer table after the data) reads back the same."""
    cube = _cube(11, (9, 6, 256))
    header = bcf_header(
        9,
        6,
        cube.sum(axis=(0, 1)),
        offset_keV=0.0,
        gain_keV=0.01,
        pixel_um=5.0,
        live_time_s=1.0,
        real_time_s=1.0,
    )
    rows = [bcf_stream(cube[r : r + 1], "mixed")[0x1A0:] for r in range(9)]
    path = write_bcf_streamed(tmp_path / "s.bcf", header, 9, 6, rows, chunk=0x800)
    np.testing.assert_array_equal(np.asarray(xrfnb.load(path).counts), cube)


def test_bcf_header_over_several_pointer_chunks(tmp_path):
    """A big map's header (its overview image: 5.6 MB at 1273 x 1662) needs more pointers than one chunk
    holds: its pointer table is a chain too, read by xrfnb and by rosettasciio alike."""
    rows, cols, n_ch = 400, 1000, 16
    cube = np.zeros((rows, cols, n_ch), np.uint16)
    cube[3, 5] = np.arange(n_ch)
    cube[398, 999, 2] = 7
    header = bcf_header(
        rows, cols, cube.sum(axis=(0, 1)), offset_keV=0.0, gain_keV=0.01, pixel_um=5.0, live_time_s=1.0,
        real_time_s=1.0,
    )
    usable = 0x800 - 32
    assert -(-len(header) // usable) * 4 > usable  # more header chunks than one pointer chunk lists
    empty_row = struct.pack("<i", 0)
    stream = [
        bcf_stream(cube[r : r + 1], "pulse16", skip_empty=True)[0x1A0:] if cube[r].any() else empty_row
        for r in range(rows)
    ]
    path = write_bcf_streamed(tmp_path / "big_header.bcf", header, rows, cols, stream, chunk=0x800)
    scan = xrfnb.load(path)
    assert scan.shape == (rows, cols, n_ch)
    np.testing.assert_array_equal(scan.counts[3, 5], cube[3, 5])
    np.testing.assert_array_equal(scan.counts[398, 999], cube[398, 999])
    assert np.array_equal(_rsciio_full(path, 0, cube.shape, np.uint16), cube)


def test_bcf_damaged_bunch_names_the_row(tmp_path, monkeypatch):
    """A packed bunch that claims more bytes than its record: refused when its block is read, row named."""
    monkeypatch.setattr(bcf, "BLOCK_BYTES", 1)
    cube = np.zeros((4, 3, 64), np.uint16)
    cube[2, 1, 5:9] = 3
    path = _write(tmp_path, cube, packing="instructed")
    raw = bytearray(path.read_bytes())
    at = raw.index(bcf_stream(cube, "instructed")[0x1A0:])  # the stream's rows, stored in one chunk
    body = pack_instructed(cube[2, 1])  # pixel (2, 1): a bunch of 5 empty channels, then nibbles
    assert body[:3] == bytes([0, 5, 1])
    pixel = raw.index(body, at)
    raw[pixel + 2 : pixel + 4] = bytes([200, 200])  # a bunch of 200 channels of 200 bytes
    path.write_bytes(bytes(raw))
    scan = xrfnb.load(path)  # the headers are intact: the map opens
    np.testing.assert_array_equal(scan.counts[:2], cube[:2])
    with pytest.raises(xrfnb.FormatError, match=r"map\.bcf: hypermap row 2: a packed spectrum runs past"):
        scan.counts[2]


def test_bcf_truncated_stream_and_bad_index(tmp_path):
    cube = _cube(3)
    path = _write(tmp_path, cube)
    with pytest.raises(xrfnb.DataError, match=r"index=4: the file holds hypermaps \[0\]"):
        read_bcf(path, index=4)
    raw = bytearray(path.read_bytes())
    stream = bcf_stream(cube)
    at = raw.index(stream[:0x1A0])
    raw[at + 0x1A0 : at + 0x1A4] = struct.pack("<i", 99)  # row 0 claims 99 pixels in 5 columns
    path.write_bytes(bytes(raw))
    with pytest.raises(xrfnb.FormatError, match=r"map\.bcf: hypermap row 0: the row holds 99 pixels for 5"):
        xrfnb.load(path)


def _two_detectors(tmp_path, gain1=0.01, packing="mixed"):
    """A map of a two-detector system: detector 1 counts differently and has its own live time."""
    cube0 = _cube(21)
    cube1 = np.random.default_rng(22).poisson(0.5, cube0.shape).astype(np.uint16)
    cube1[4, 3, 200] = 1500
    det1 = {"cube": cube1, "gain_keV": gain1, "live_time_s": 3.0, "real_time_s": 3.5}
    return cube0, cube1, _write(tmp_path, cube0, packing=packing, detectors=[det1])


def test_bcf_two_detectors_sum_by_default(tmp_path, monkeypatch):
    """One hypermap per detector (DetectorCount 2): loaded as their lazy sum, each bit for bit alone."""
    monkeypatch.setattr(bcf, "BLOCK_BYTES", 2 * 5 * 300 * 4)
    cube0, cube1, path = _two_detectors(tmp_path)
    scan = xrfnb.load(path)
    assert isinstance(scan.counts, bcf.BcfDetectorSum) and scan.counts.dtype == np.uint32
    np.testing.assert_array_equal(np.asarray(scan.counts), cube0.astype(np.uint32) + cube1)
    np.testing.assert_array_equal(scan.counts[2:5, 3, 7:9], (cube0.astype(np.uint32) + cube1)[2:5, 3, 7:9])
    np.testing.assert_array_equal(scan[4, 3].counts, cube0[4, 3].astype(np.uint32) + cube1[4, 3])
    np.testing.assert_array_equal(
        np.concatenate([b for _, b in scan.iter_blocks(max_pixels=1)]), cube0.astype(np.uint32) + cube1
    )
    assert scan.metadata["bcf_detector"] == "sum" and scan.metadata["bcf_detectors"] == 2
    assert scan.metadata["bcf_summed_indexes"] == [0, 1]
    assert scan.metadata["bcf_detector_live_time_s"] == [2.0, 3.0]
    assert scan.live_time_s == pytest.approx(2.5 / 35)  # the mean of the detectors' totals, per pixel
    for det, cube in ((0, cube0), (1, cube1), (-1, cube1)):
        one = xrfnb.load(path, detector=det)
        assert isinstance(one.counts, bcf.BcfRows) and one.metadata["bcf_detector"] == det % 2
        got = np.asarray(one.counts)
        np.testing.assert_array_equal(got, cube)
        assert np.array_equal(got, _rsciio_full(path, det % 2, cube.shape, got.dtype))
        assert one.live_time_s == pytest.approx((2.0, 3.0)[det] / 35)
    by_index = read_bcf(path, index=1)
    assert by_index.metadata["bcf_detector"] == 1 and by_index.metadata["bcf_index"] == 1
    assert read_bcf(path, index=1, detector=1).metadata["bcf_index"] == 1


def test_bcf_two_detectors_with_different_calibrations(tmp_path):
    """A detector on another energy axis is rebinned onto detector 0's before the sum (counts kept)."""
    from xrfnb.io.mca import rebin_counts

    cube0, cube1, path = _two_detectors(tmp_path, gain1=0.0103)
    scan = xrfnb.load(path)
    assert scan.counts.dtype == np.float32 and scan.counts.rebinned == (False, True)
    assert "rebinned onto detector 0's energy axis" in scan.metadata["sum_note"]
    cal0, cal1 = xrfnb.EnergyCalibration(-0.1, 0.01), xrfnb.EnergyCalibration(-0.1, 0.0103)
    assert scan.calibration == cal0
    expect = cube0 + np.array(
        [[rebin_counts(cube1[r, c], cal1, cal0, 300) for c in range(5)] for r in range(7)]
    )
    np.testing.assert_allclose(np.asarray(scan.counts), expect, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(scan.counts[1:3, 2, 50:60], expect[1:3, 2, 50:60], rtol=1e-5, atol=1e-3)
    assert np.asarray(xrfnb.load(path, detector=1).counts).dtype == np.uint32  # alone: as stored


def test_bcf_detector_and_index_errors_name_the_choices(tmp_path):
    cube0, _, path = _two_detectors(tmp_path)
    choices = r"map\.bcf: detector=2: the file holds detectors 0\.\.1 or 'sum'"
    with pytest.raises(xrfnb.DataError, match=choices):
        xrfnb.load(path, detector=2)
    with pytest.raises(xrfnb.DataError, match=r"map\.bcf: detector='all': give a detector number"):
        xrfnb.load(path, detector="all")
    with pytest.raises(xrfnb.DataError, match=r"index=1 is detector 1, not detector=0"):
        read_bcf(path, index=1, detector=0)
    with pytest.raises(xrfnb.DataError, match=r"index=2: the file holds hypermaps \[0, 1\]"):
        read_bcf(path, index=2)
    (tmp_path / "one").mkdir()
    single = _write(tmp_path / "one", cube0)
    assert xrfnb.load(single, detector=0).metadata["bcf_index"] == 0
    assert "bcf_detector" not in xrfnb.load(single, detector="sum").metadata
    with pytest.raises(xrfnb.DataError, match=r"map\.bcf: detector=1: the file holds one detector"):
        xrfnb.load(single, detector=1)
    h5 = xrfnb.save(xrfnb.load(single), tmp_path / "one.h5")
    with pytest.raises(xrfnb.DataError, match=r"one\.h5: detector=1 applies only to Bruker \.bcf files"):
        xrfnb.load(h5, detector=1)


def test_bcf_detector_count_without_as_many_maps(tmp_path):
    """A header declaring 3 detectors over 2 hypermaps: the maps stay readable by index, not by detector."""
    cube = _cube(6)
    path = _write(tmp_path, cube, extra_maps=1)
    raw = path.read_bytes()
    assert raw.count(b"<DetectorCount>1</DetectorCount>") == 1
    path.write_bytes(raw.replace(b"<DetectorCount>1</DetectorCount>", b"<DetectorCount>3</DetectorCount>"))
    np.testing.assert_array_equal(np.asarray(xrfnb.load(path).counts), cube)
    np.testing.assert_array_equal(np.asarray(read_bcf(path, index=1).counts), cube + 1)
    with pytest.raises(xrfnb.FormatError, match=r"declares 3 detectors but the file holds 2 hypermaps"):
        xrfnb.load(path, detector=0)


def test_bcf_select_maps_rules():
    sel = bcf.select_bcf_maps
    p = Path("x.bcf")
    assert sel(p, [1, 0], 2) == bcf.BcfSelection((0, 1), "sum", 2)
    assert sel(p, [0, 1], 2, detector="sum") == bcf.BcfSelection((0, 1), "sum", 2)
    assert sel(p, [0, 1], 2, index=0) == bcf.BcfSelection((0,), 0, 2)
    assert sel(p, [0, 1, 2], 1) == bcf.BcfSelection((0,), None, 1)  # a stack of maps of one detector
    assert sel(p, [0, 1, 2], 1, index=2, detector=0) == bcf.BcfSelection((2,), None, 1)
    assert sel(p, [0], 0) == bcf.BcfSelection((0,), None, 1)  # DetectorCount 0: one detector
    with pytest.raises(xrfnb.DataError, match="give a detector number"):
        sel(p, [0, 1], 2, detector=True)
    with pytest.raises(xrfnb.DataError, match="index='1'"):
        sel(p, [0, 1], 2, index="1")
    with pytest.raises(xrfnb.FormatError, match="holds no hypermap"):
        sel(p, [], 1)


def test_real_bcf_bit_for_bit():
    """Every real ``.bcf`` in the shared data decodes as rosettasciio's whole-stream decoder does."""
    paths = sorted(REAL.rglob("*.bcf")) if REAL.is_dir() else []
    if not paths:
        pytest.skip(f"no real .bcf file in {REAL} (the synthetic files above are compared instead)")
    for path in paths:
        scan = xrfnb.load(path)
        assert np.array_equal(
            np.asarray(scan.counts), _rsciio_full(path, 0, scan.shape, scan.counts.dtype)
        ), path.name


def test_convert_bcf_to_hdf5(tmp_path, monkeypatch, capsys):
    """``xrfnb convert map.bcf map.h5``: the chunked HDF5 holds the same counts, calibration, pixel size."""
    from xrfnb.ui.cli import main

    monkeypatch.setattr(bcf, "BLOCK_BYTES", 1)
    cube = _cube(4)
    path = _write(tmp_path, cube, packing="mixed")
    out = tmp_path / "map.h5"
    assert main(["convert", str(path), str(out)]) == 0
    back = xrfnb.load(out)
    np.testing.assert_array_equal(np.asarray(back.counts), cube)
    assert back.calibration == xrfnb.EnergyCalibration(-0.1, 0.01) and back.pixel_size_um == 5.0
    assert back.live_time_s == pytest.approx(2.0 / 35)
    assert "converting" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.bcf", "map.h5"]  # no temporary left
    assert main(["convert", str(path), str(tmp_path / "map.mca"), "-q"]) == 2
    assert "should end in .h5" in capsys.readouterr().err


# -- speed work (issue 21 item 4): decoding into reused arrays, reads without copies ----------------------
@pytest.mark.parametrize("packing", ["pulse12", "instructed", "mixed"])
@pytest.mark.parametrize("group_bytes", [1, 2 * 5 * 300 * 4, bcf.GROUP_BYTES])
def test_bcf_rows_decoded_into_a_reused_array(tmp_path, monkeypatch, packing, group_bytes):
    """``read_rows(a, b, out=)`` decodes a few rows at a time (one per group with group_bytes=1) into the
    caller's array: the same counts as the whole-range decode and as rosettasciio's, every value of
    ``out`` overwritten (skipped pixels are zeros, not what the array held)."""
    monkeypatch.setattr(bcf, "GROUP_BYTES", group_bytes)
    cube = _cube(11)
    path = _write(tmp_path, cube, packing=packing, skip_empty=True)
    counts = xrfnb.load(path).counts
    full = _rsciio_full(path, 0, cube.shape, counts.dtype)
    out = np.empty((4, *cube.shape[1:]), counts.dtype)
    for a, b in [(0, 4), (3, 7), (5, 6), (1, 4)]:
        out.fill(np.iinfo(out.dtype).max)  # what the last block left, and more
        got = counts.read_rows(a, b, out=out[: b - a])
        assert got.base is out or got is out
        np.testing.assert_array_equal(got, cube[a:b])
        np.testing.assert_array_equal(got, full[a:b])
        np.testing.assert_array_equal(counts.decode_rows(a, b), cube[a:b])
    with pytest.raises(ValueError, match="out has shape"):
        counts.read_rows(0, 2, out=out[:3])


def test_sfs_stream_reads_chunks_stored_out_of_order(tmp_path):
    """``SfsStream.read`` / ``read_array`` gather a byte range through the chunk table when the chunks lie
    anywhere in the container (runs of neighbours read at once, the others one by one), and a last chunk
    cut short by the file's end reads as zeros."""
    from types import SimpleNamespace

    chunk, usable, n = 256, 224, 40
    rng = np.random.default_rng(4)
    content = rng.integers(0, 256, n * usable, dtype=np.uint8)
    size = n * usable - 100  # the file's length: the last chunk is not full
    # a run of ten, then scattered, the last chunk last in the file (which ends 100 bytes into it)
    order = np.concatenate([np.arange(10), rng.permutation(np.arange(10, n - 1)), [n - 1]])
    slots = np.empty(n, np.int64)
    slots[order] = np.arange(n)
    blob = np.zeros(n * chunk, np.uint8)
    for k in range(n):
        at = int(slots[k]) * chunk + 32  # each chunk: a 32-byte header, then its payload
        blob[at : at + usable] = content[k * usable : (k + 1) * usable]
    path = tmp_path / "chunks.bin"
    path.write_bytes(blob[:-100].tobytes())
    item = SimpleNamespace(
        pointers=slots * chunk + 32,
        size=size,
        sfs=SimpleNamespace(usable_chunk=usable, chunksize=chunk, compression="none"),
    )
    stream = bcf.SfsStream(path, item)
    for offset, length in [(0, size), (5, 2000), (usable * 9 - 3, 10), (3000, size - 3000), (size - 1, 5)]:
        want = content[offset : min(size, offset + length)].tobytes()
        assert stream.read(offset, length) == want
        assert stream.read_array(offset, length).tobytes() == want
    with pytest.raises(xrfnb.FormatError, match="outside"):
        stream._read_raw(size - 10, 20)


def test_map_pigments_from_a_bcf_equals_the_counts_in_memory(tmp_path, monkeypatch):
    """``map_pigments`` straight from a ``.bcf`` (blocks decoded into two arrays used in turn, a few rows
    per decoder call) gives the maps of the same counts in memory."""
    monkeypatch.setattr(bcf, "GROUP_BYTES", 1)
    monkeypatch.setattr(bcf, "BLOCK_BYTES", 2 * 6 * 4096 * 4)
    rng = np.random.default_rng(8)
    template = np.exp(-0.5 * ((np.arange(4096) - np.array([[640], [1055], [860]])) / 9.0) ** 2).sum(0) + 0.05
    lam = template / template.sum() * rng.uniform(500, 3000, (9, 6, 1))
    cube = rng.poisson(lam).astype(np.uint16)
    cube[4, 2] = 0  # a dead pixel
    path = write_bcf(tmp_path / "map.bcf", cube, offset_keV=0.0, gain_keV=0.01, pixel_um=50.0,
                     live_time_s=1.0, real_time_s=1.2, packing="instructed", skip_empty=True)
    scan = xrfnb.load(path)
    assert isinstance(scan.counts, bcf.BcfRows)
    model = xrfnb.load_model("default", precision="float32")
    from_file = xrfnb.map_pigments(scan, model, chunk_pixels=12, progress=False, check_physics=False)
    in_memory = xrfnb.map_pigments(xrfnb.Scan(cube.astype(scan.counts.dtype), scan.calibration), model,
                                   chunk_pixels=12,
                                   progress=False, check_physics=False)
    for name in ("probability", "buried_probability", "ood_score"):
        np.testing.assert_array_equal(getattr(from_file, name), getattr(in_memory, name), err_msg=name)
    assert from_file.metadata["masked"] == in_memory.metadata["masked"]


def _check_walking_every_bunch(data: bytes, n_rows: int, cols: int, where: str) -> None:
    """``check_bcf_block`` as it was: every instructed bunch of every pixel walked (the reference)."""
    limit = len(data)
    payloads: list[int] = []
    marks = [0]
    off = 0
    for r in range(n_rows):
        off, _ = bcf._walk_row(data, off, limit, cols, f"{where}: hypermap row {r}", payloads)
        if off < 0:
            raise xrfnb.FormatError(f"{where}: hypermap row {r} is truncated or corrupted")
        marks.append(len(payloads) // 2)
    if off != limit:
        raise xrfnb.FormatError(f"{where}: hypermap rows changed since indexing")
    spans = np.asarray(payloads, np.intp).reshape(-1, 2)
    pixel = np.flatnonzero(spans[:, 0] < spans[:, 1])
    p, end = spans[pixel, 0], spans[pixel, 1]
    buf = np.frombuffer(data + bytes(2), np.uint8)
    need_of, step_of = bcf._bunch_tables()
    while p.size:
        code = buf[p].astype(np.intp) << 8 | buf[p + 1]
        reach = need_of[code] + p
        if reach.max() > limit + bcf._PAD:
            raise bcf._bunch_error(where, 0, marks, int(pixel[reach > limit + bcf._PAD][0]))
        p = p + step_of[code]
        more = p < end
        p, end, pixel = p[more], end[more], pixel[more]


def test_bcf_block_check_walks_only_the_pixels_that_can_overrun():
    """Walking the bunches of the last pixels only (those within the decoder's largest reach of the
    block's end) refuses exactly the blocks the walk over every bunch refuses, with the same message:
    over damaged bunch headers anywhere in a 200 KB block of instructed pixels."""
    rng = np.random.default_rng(12)
    cube = rng.poisson(2.0, (8, 40, 1024)).astype(np.uint16)
    cube[:, :, 500:520] = rng.integers(0, 3000, (8, 40, 20))  # 16-bit bunches
    rows = bcf_stream(cube, "instructed")[bcf.STREAM_HEADER_BYTES :]
    assert len(rows) > 150_000
    bcf.check_bcf_block(rows, 8, 40, "map.bcf")
    payloads: list[int] = []
    off = 0
    for _ in range(8):
        off, _ = bcf._walk_row(rows, off, len(rows), 40, "x", payloads)
    starts = np.asarray(payloads).reshape(-1, 2)[:, 0]
    outcomes = set()
    for trial in range(400):
        damaged = bytearray(rows)
        # the first bunch header of a pixel (of the last 60, within 45 KB of the end, more often): a random
        # size and channel count
        k = len(starts) - 1 - int(rng.integers(0, 60)) if trial % 4 else int(rng.integers(0, len(starts)))
        damaged[starts[k] : starts[k] + 2] = rng.integers(0, 256, 2, dtype=np.uint8).tobytes()
        damaged = bytes(damaged)
        try:
            _check_walking_every_bunch(damaged, 8, 40, "map.bcf")
            want = None
        except xrfnb.FormatError as exc:
            want = str(exc)
        try:
            bcf.check_bcf_block(damaged, 8, 40, "map.bcf")
            got = None
        except xrfnb.FormatError as exc:
            got = str(exc)
        assert got == want, (trial, k)
        outcomes.add(want is None)
    assert outcomes == {True, False}  # both refused and accepted blocks were met
