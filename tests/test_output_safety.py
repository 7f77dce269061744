"""What ``map_pigments(..., out=...)`` may write and delete, and how it fails (issue 15, items 3, 4 and 6).

* it never deletes what it did not write: an input inside ``OUT.partial/`` is refused, a foreign folder of
  that name is refused, and foreign files in xrfnb's own working folder survive;
* a full disk is one clear :class:`~xrfnb.FormatError` (up front where the size is known, else when a
  write fails), with the completed blocks kept for ``resume=True``; libhdf5 never sees a failed write
  (it crashes the interpreter after one: the subprocess test runs the writer against a real full disk);
* a damaged block file is computed again on resume, with a warning naming it;
* an output that is a folder, and maps too large for memory, are refused before anything is created.

The model is the deterministic test double of ``test_mapping.py``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import xrfnb
import xrfnb.maps.mapping as mapping
import xrfnb.maps.sinks as sinks
import xrfnb.maps.storage as storage
from xrfnb import Scan
from xrfnb.maps.mapping import map_pigments
from xrfnb.maps.pigmentmaps import PigmentMaps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_mapping import CAL, LinearTestModel, _h5_scan, _write_h5, make_counts

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def counts():
    return make_counts()[0]  # 24 rows x 20 cols x 2048 channels


def _stat(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def _reference(counts) -> PigmentMaps:
    return map_pigments(Scan(counts, CAL), LinearTestModel(), progress=False)


def _assert_same_maps(a: PigmentMaps, b: PigmentMaps) -> None:
    for name in ("probability", "buried_probability", "ood_score", "mask"):
        got, want = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        np.testing.assert_array_equal(got, want, err_msg=name)


# -- item 3: never delete what xrfnb did not create -----------------------------------------------------
@pytest.mark.parametrize("resume", [False, True])
def test_input_inside_the_working_folder_is_refused_and_kept(tmp_path, counts, resume):
    """The issue's recipe: mkdir t/out.h5.partial; cp scan.h5 t/out.h5.partial/; identify -o t/out.h5."""
    work = tmp_path / "out.h5.partial"
    work.mkdir()
    src = _write_h5(work / "scan.h5", counts)
    before = _stat(src)
    with pytest.raises(xrfnb.FormatError, match="lies inside"):
        map_pigments(_h5_scan(src), LinearTestModel(), progress=False, out=tmp_path / "out.h5", resume=resume)
    assert _stat(src) == before
    assert sorted(p.name for p in work.iterdir()) == ["scan.h5"]
    assert not (tmp_path / "out.h5").exists()


def test_a_foreign_folder_named_like_the_working_folder_is_refused(tmp_path, counts):
    work = tmp_path / "maps.h5.partial"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    (work / "rows_0000000_0000001.npz").write_bytes(b"not xrfnb's: there is no xrfnb manifest")
    for resume in (False, True):
        with pytest.raises(xrfnb.FormatError, match="not an xrfnb working folder"):
            map_pigments(Scan(counts, CAL), LinearTestModel(), progress=False, out=tmp_path / "maps.h5",
                         resume=resume)
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt", "rows_0000000_0000001.npz"]
    assert (work / "notes.txt").read_text() == "mine"


def test_only_xrfnb_files_are_removed_from_its_working_folder(tmp_path, counts):
    out = tmp_path / "maps.h5"
    work = tmp_path / "maps.h5.partial"

    def stop_after_three(done, total):
        if done >= 3 * 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        map_pigments(Scan(counts, CAL), LinearTestModel(), chunk_pixels=20, progress=stop_after_three,
                     out=out)
    assert (work / "manifest.json").is_file() and len(list(work.glob("rows_*.npz"))) == 3
    (work / "keep.txt").write_text("a user's file")
    (work / "sub").mkdir()
    # a fresh run (no resume) clears xrfnb's blocks, and at the end removes its files but not the others
    maps = map_pigments(Scan(counts, CAL), LinearTestModel(), chunk_pixels=20, progress=False, out=out)
    _assert_same_maps(maps, _reference(counts))
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt", "sub"]


def test_a_run_killed_before_its_manifest_leaves_a_folder_it_can_reuse(tmp_path, counts):
    work = tmp_path / "maps.h5.partial"
    work.mkdir()
    (work / ".manifest.json.tmp").write_text("{")  # the only file a kill can leave before the manifest
    map_pigments(Scan(counts, CAL), LinearTestModel(), progress=False, out=tmp_path / "maps.h5")
    assert not work.exists()


# -- item 6: damaged block files, outputs that are folders, maps larger than memory -----------------------
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_block_is_computed_again_on_resume(tmp_path, counts, caplog, damage):
    out = tmp_path / "maps.h5"
    work = tmp_path / "maps.h5.partial"

    def stop_after_five(done, total):
        if done >= 5 * 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        map_pigments(Scan(counts, CAL), LinearTestModel(), chunk_pixels=20, progress=stop_after_five,
                     out=out)
    blocks = sorted(work.glob("rows_*.npz"))
    assert len(blocks) == 5
    bad = blocks[2]
    data = bad.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": b"\x00" * len(data), "empty": b""}
    bad.write_bytes(damaged[damage])
    model = LinearTestModel()
    with caplog.at_level(logging.WARNING, logger="xrfnb"):
        maps = map_pigments(Scan(counts, CAL), model, chunk_pixels=20, progress=False, out=out, resume=True)
    assert model.calls == 24 - 5 + 1  # the damaged block and the 19 never computed
    assert any(bad.name in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    _assert_same_maps(maps, _reference(counts))
    assert not work.exists()


def test_an_output_that_is_a_folder_is_refused_before_anything_is_created(tmp_path, counts):
    (tmp_path / "dir.h5").mkdir()
    with pytest.raises(xrfnb.FormatError, match="is a folder"):
        map_pigments(Scan(counts, CAL), LinearTestModel(), progress=False, out=tmp_path / "dir.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.h5"]
    assert not any((tmp_path / "dir.h5").iterdir())


def test_maps_too_large_for_memory_are_refused_with_the_size_and_the_way_out(tmp_path):
    # a scan claiming 100,000 x 100,000 pixels x 4096 channels, held by a zero-stride view (no memory)
    claimed = Scan(np.broadcast_to(np.zeros(1, np.uint16), (100_000, 100_000, 4096)), CAL)
    k = len(LinearTestModel().classes)
    # what the in-memory maps hold: 2 K + 1 float32 planes and 2 bytes of mask per pixel
    need_gb = 1e10 * ((2 * k + 1) * 4 + 2) / 1e9
    for use_dask in (False, True):
        with pytest.raises(xrfnb.DataError, match="out=") as info:
            map_pigments(claimed, LinearTestModel(), progress=False, use_dask=use_dask)
        assert "100000 x 100000 pixels" in str(info.value)
        if not use_dask:
            assert f"{need_gb:.1f} GB" in str(info.value)
    # with out= the maps go to disk, and a disk too small for them is refused up front
    free = shutil.disk_usage(tmp_path).free
    if free < 1e10 * (8 * k + 5):
        with pytest.raises(xrfnb.FormatError, match="no space left on"):
            map_pigments(claimed, LinearTestModel(), progress=False, out=tmp_path / "huge.h5")
        assert list(tmp_path.iterdir()) == []


def test_the_memory_check_lets_ordinary_maps_through(counts):
    assert mapping._available_memory_bytes() > 10e6
    maps = map_pigments(Scan(counts, CAL), LinearTestModel(), progress=False)
    assert maps.shape == (24, 20)


# -- item 4: a full disk ------------------------------------------------------------------------------------
def _written_bytes(counts, tmp_path) -> int:
    """Peak bytes a run with out= puts on disk: its block files (at the end) plus the maps file."""
    out = tmp_path / "ref" / "maps.h5"
    out.parent.mkdir()
    work = tmp_path / "ref" / "maps.h5.partial"
    seen = []

    def watch(done, total):
        if work.is_dir():
            seen.append(sum(p.stat().st_size for p in work.iterdir()))

    map_pigments(Scan(counts, CAL), LinearTestModel(), chunk_pixels=20, progress=watch, out=out)
    return max(seen) + out.stat().st_size


def test_too_little_free_space_is_refused_up_front(tmp_path, counts, monkeypatch):
    real = _written_bytes(counts, tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: usage._replace(free=real // 2))
    scan_dir = tmp_path / "run"
    scan_dir.mkdir()
    with pytest.raises(xrfnb.FormatError, match=r"no space left on .* \(about [\d.]+ MB needed") as info:
        map_pigments(Scan(counts, CAL), LinearTestModel(), chunk_pixels=20, progress=False,
                     out=scan_dir / "m.h5")
    assert list(scan_dir.iterdir()) == []  # nothing created
    needed_mb = float(str(info.value).split("about ")[1].split(" MB")[0])
    assert real / 1e6 <= needed_mb <= 3 * real / 1e6 + 0.5  # an upper estimate, not a wild one


class _FullDisk:
    """An unbuffered file on a disk that fills up after ``capacity`` bytes (writes then fail ENOSPC)."""

    def __init__(self, path, capacity):
        self._fh = open(path, "w+b", buffering=0)
        self._left = capacity

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if n > self._left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= n
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)


@pytest.mark.parametrize("where", ["block", "maps file"])
def test_a_disk_that_fills_during_the_run_keeps_the_blocks_for_resume(tmp_path, counts, monkeypatch, where):
    src = _write_h5(tmp_path / "scan.h5", counts, chunks=(1, 20, counts.shape[2]))  # blocks of one row
    before = _stat(src)
    out = tmp_path / "maps.h5"
    work = tmp_path / "maps.h5.partial"
    model = LinearTestModel()
    if where == "block":  # the 6th block file cannot be written
        real_savez = np.savez
        calls = []

        def savez(fh, **arrays):
            calls.append(1)
            if len(calls) == 6:
                fh.write(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_savez(fh, **arrays)

        monkeypatch.setattr(sinks.np, "savez", savez)
    else:  # every block is written, the disk fills while the maps file is assembled
        monkeypatch.setattr(storage, "_open_for_hdf5", lambda p: _FullDisk(p, 20_000))
    with pytest.raises(xrfnb.FormatError, match="no space left on") as info:
        map_pigments(_h5_scan(src), model, chunk_pixels=20, progress=False, out=out)
    message = str(info.value)
    assert "\n" not in message and "--resume" in message and str(work) in message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".maps.h5")]  # no temporary maps file
    assert not list(work.glob(".*.tmp"))  # no temporary block file
    n_done = len(list(work.glob("rows_*.npz")))
    assert n_done == (5 if where == "block" else 24)
    monkeypatch.undo()
    model = LinearTestModel()
    maps = map_pigments(_h5_scan(src), model, chunk_pixels=20, progress=False, out=out, resume=True)
    assert model.calls == 24 - n_done
    _assert_same_maps(maps, _reference(counts))
    assert _stat(src) == before and not work.exists()


_FULL_DISK_CHILD = textwrap.dedent(
    """
    import errno, os, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import xrfnb, xrfnb.maps.storage as storage
    from test_output_safety import _FullDisk
    storage._open_for_hdf5 = lambda p: _FullDisk(p, {capacity})
    rng = np.random.default_rng(0)
    p = rng.random((64, 64, 31), dtype=np.float32)
    maps = xrfnb.PigmentMaps(classes=[f"c{{i}}" for i in range(31)], probability=p, buried_probability=p / 2,
        ood_score=p[..., 0], thresholds=np.full(31, 0.5), ood_threshold=1.0, mask=np.zeros((64, 64), bool),
        colors=["#000000"] * 31)
    try:
        maps.to_hdf5({out!r})
    except xrfnb.XRFNBError as exc:
        print("refused:", exc)
    """
)


@pytest.mark.parametrize("capacity", [0, 3_000, 200_000])
def test_libhdf5_never_sees_the_failed_write_so_nothing_crashes(tmp_path, capacity):
    """Before: libhdf5 failed the write, closing raised "Can't decrement id ref count" and freeing the
    datasets segfaulted the interpreter (exit 139). Run in a child so a crash cannot take pytest down."""
    out = tmp_path / "maps.h5"
    code = _FULL_DISK_CHILD.format(tests=str(TESTS_DIR), capacity=capacity, out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.startswith("refused: no space left on"), proc.stdout
    assert proc.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_a_crafted_maps_file_cannot_read_other_files(tmp_path):
    """PigmentMaps.from_hdf5 (and `xrfnb info` on it) refuse maps whose data are stored in another file."""
    import h5py

    import xrfnb.ui.cli as cli
    from xrfnb.maps.pigmentmaps import PigmentMaps

    secret = tmp_path / "private" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    path = tmp_path / "maps.h5"
    with h5py.File(path, "w") as f:  # looks like xrfnb maps; the probabilities are the secret's bytes
        f.attrs["format"] = "xrfnb-pigment-maps"
        f.attrs["classes"] = '["lead white"]'
        f.attrs["colors"] = '["#ffffff"]'
        f.attrs["ood_threshold"] = 1.0
        f.create_dataset("thresholds", data=np.array([0.5], dtype=np.float32))
        f.create_dataset("probability", shape=(4, 8, 1), dtype="u1", external=[(str(secret), 0, 32)])
    with pytest.raises(xrfnb.FormatError, match=r"maps\.h5:/probability: .*another file.*external storage"):
        PigmentMaps.from_hdf5(path)
    assert cli.main(["info", str(path)]) == 2
