"""Whole-scan pigment maps: streaming, masking, dask, I/O and resume.

The model here is a small deterministic test double (``LinearTestModel``) with the same interface as
:class:`xrfnb.PigmentModel`: each class answers to the fraction of counts in a window around a real
fluorescence line of its key element (xraylib energies), so the maps are predictable from the physics of
the synthetic scan and the streaming, masking, dask and I/O logic is tested for real.
"""

from __future__ import annotations

import dataclasses
import json
import time

import h5py
import numpy as np
import pytest

import xrfnb
from xrfnb import EnergyCalibration, Scan
from xrfnb.maps.mapping import map_pigments
from xrfnb.maps.pigmentmaps import MASK_DEAD, MASK_INVALID, MASK_SATURATED, PigmentMaps

CAL = EnergyCalibration(0.0, 0.01)  # 10 eV per channel
N_CH = 2048
#: class -> (element, line) whose window drives it
CLASS_LINES = {"lead white": ("Pb", "La"), "vermilion": ("Hg", "La"), "zinc white": ("Zn", "Ka")}
COLORS = ("#f0f0e8", "#e34234", "#1040c0")


@dataclasses.dataclass(frozen=True)
class _Batch:
    probability: np.ndarray
    buried_probability: np.ndarray
    ood_score: np.ndarray
    classes: tuple[str, ...]


class LinearTestModel:
    """Deterministic stand-in for PigmentModel (same attributes and identify_batch signature).

    probability = fraction of counts within +/- 80 eV of the class's line, scaled and clipped to [0, 1];
    buried = probability x fraction of counts of the line's higher-energy partner window (arbitrary but
    deterministic); ood = fraction of counts outside all windows.
    """

    name = "linear-test-double"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.classes = tuple(CLASS_LINES)
        self.colors = COLORS
        self.thresholds = np.array([0.5, 0.5, 0.5], dtype=np.float32)
        self.ood_threshold = 0.9
        self.delay_s = delay_s
        self.energies_keV = np.array([xrfnb.line_energy_keV(el, ln) for el, ln in CLASS_LINES.values()])
        self.calls = 0

    def identify_batch(self, counts, calibration, live_time_s=None):
        counts = np.asarray(counts, dtype=np.float64)
        assert counts.ndim == 2
        assert np.isfinite(counts).all() and (counts >= 0).all(), "masked pixels must never reach the model"
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        e = calibration.energies_keV(counts.shape[1])
        total = counts.sum(axis=1, keepdims=True)
        frac = np.stack([counts[:, np.abs(e - el) < 0.08].sum(axis=1) for el in self.energies_keV], axis=1)
        frac = frac / np.maximum(total, 1)
        prob = np.clip(frac * 3.0, 0, 1).astype(np.float32)
        buried = (prob * np.clip(frac[:, ::-1] * 2.0, 0, 1)).astype(np.float32)
        ood = (1.0 - frac.sum(axis=1)).astype(np.float32)
        return _Batch(prob, buried, ood, self.classes)


def _gauss(e, center, fwhm=0.15):
    sigma = fwhm / 2.3548
    return np.exp(-0.5 * ((e - center) / sigma) ** 2)


def make_counts(rows=24, cols=20, seed=0, dtype=np.uint16):
    """A scan with lead white on the left half, vermilion on the right, zinc white in the top third."""
    rng = np.random.default_rng(seed)
    e = CAL.energies_keV(N_CH)
    bg = 0.02 * np.exp(-e / 8.0)
    lines = {c: _gauss(e, xrfnb.line_energy_keV(el, ln)) for c, (el, ln) in CLASS_LINES.items()}
    truth = np.zeros((rows, cols, 3), dtype=bool)
    truth[:, : cols // 2, 0] = True
    truth[:, cols // 2 :, 1] = True
    truth[: rows // 3, :, 2] = True
    lam = np.empty((rows, cols, N_CH))
    for r in range(rows):
        for c in range(cols):
            s = bg.copy()
            for k, name in enumerate(CLASS_LINES):
                if truth[r, c, k]:
                    s = s + lines[name]
            lam[r, c] = 2000 * s / s.sum()
    return rng.poisson(lam).astype(dtype), truth


@pytest.fixture(scope="module")
def counts_truth():
    return make_counts()


@pytest.fixture(scope="module")
def model():
    return LinearTestModel()


def _write_h5(path, counts, chunks=(4, 5, N_CH)):
    with h5py.File(path, "w") as f:
        f.create_dataset("counts", data=counts, chunks=chunks, compression="gzip", compression_opts=1)
    return path


def _h5_scan(path, **kw):
    f = h5py.File(path, "r")
    return Scan(f["counts"], CAL, metadata={"source": str(path)}, **kw)


def test_maps_follow_the_physics_of_the_scan(counts_truth, model):
    counts, truth = counts_truth
    maps = map_pigments(Scan(counts, CAL), model, progress=False)
    assert maps.classes == model.classes
    assert maps.probability.shape == (*counts.shape[:2], 3)
    assert maps.probability.dtype == np.float32
    assert not maps.mask.any()
    np.testing.assert_array_equal(maps.binary(), truth)
    # area fractions are the fractions of the painted regions
    s = maps.summary()
    assert s["lead white"] == pytest.approx(truth[..., 0].mean())
    assert s["zinc white"] == pytest.approx(truth[..., 2].mean())
    assert s.n_masked == 0
    assert set(s) == set(model.classes)


def test_streaming_equals_one_batch_per_pixel(tmp_path, counts_truth, model):
    counts, _ = counts_truth
    ref = model.identify_batch(counts.reshape(-1, N_CH), CAL)
    scan = _h5_scan(_write_h5(tmp_path / "scan.h5", counts))
    maps = map_pigments(scan, model, chunk_pixels=40, batch_pixels=7, progress=False)
    np.testing.assert_allclose(maps.probability.reshape(-1, 3), ref.probability, atol=1e-6)
    np.testing.assert_allclose(maps.buried_probability.reshape(-1, 3), ref.buried_probability, atol=1e-6)
    np.testing.assert_allclose(maps.ood_score.reshape(-1), ref.ood_score, atol=1e-6)
    assert scan.counts.file.mode == "r"


def test_bad_pixels_are_masked_and_counted(counts_truth, model):
    counts, truth = counts_truth
    bad = counts.astype(np.float32)
    bad[0, 0] = 0  # dead
    bad[1, 1] = 0
    bad[2, 2, 100] = np.nan
    bad[3, 3, 5] = -4
    bad[4, 4, 7] = np.inf
    bad[5, 5, 300] = 1e6  # saturated with an explicit saturation level
    maps = map_pigments(Scan(bad, CAL), model, progress=False, saturation_counts=65535)
    reason = maps.mask_reason
    assert reason[0, 0] == reason[1, 1] == MASK_DEAD
    assert reason[2, 2] == reason[3, 3] == reason[4, 4] == MASK_INVALID
    assert reason[5, 5] == MASK_SATURATED
    assert maps.mask.sum() == 6
    assert np.isnan(maps.probability[maps.mask]).all()
    assert not maps.binary()[maps.mask].any()
    s = maps.summary()
    assert s.masked_by_reason == {"dead": 2, "saturated": 1, "invalid": 3}
    assert s.n_masked == 6
    valid = ~maps.mask
    assert s["lead white"] == pytest.approx(truth[..., 0][valid].mean())
    assert maps.metadata["masked"] == {"dead": 2, "saturated": 1, "invalid": 3}
    # masked pixels are grey in the composite
    rgb = maps.composite_rgb()
    assert tuple(rgb[0, 0]) == (128, 128, 128)


def test_integer_scan_clipped_at_dtype_max_is_saturated(counts_truth, model):
    counts = counts_truth[0].copy()
    counts[7, 3, 1000] = np.iinfo(np.uint16).max
    maps = map_pigments(Scan(counts, CAL), model, progress=False)
    assert maps.mask_reason[7, 3] == MASK_SATURATED
    assert maps.mask.sum() == 1


def test_all_pixels_masked_gives_empty_maps(model):
    maps = map_pigments(Scan(np.zeros((3, 4, 64), np.uint16), CAL), model, progress=False)
    assert maps.mask.all()
    s = maps.summary()
    assert s.masked_by_reason["dead"] == 12
    assert all(v == 0 for v in s.values())


def test_composite_uses_display_colours(counts_truth, model):
    counts, _ = counts_truth
    maps = map_pigments(Scan(counts, CAL), model, progress=False)
    rgb = maps.composite_rgb()
    assert rgb.shape == (*counts.shape[:2], 3) and rgb.dtype == np.uint8
    # bottom-right: vermilion only -> exactly its colour
    assert tuple(rgb[-1, -1]) == (0xE3, 0x42, 0x34)
    # top-left: lead white and zinc white -> between the two colours, channel by channel
    lo = np.minimum([0xF0, 0xF0, 0xE8], [0x10, 0x40, 0xC0])
    hi = np.maximum([0xF0, 0xF0, 0xE8], [0x10, 0x40, 0xC0])
    assert np.all(rgb[0, 0] >= lo) and np.all(rgb[0, 0] <= hi)
    # nothing present anywhere with threshold 1.1 -> black
    assert not maps.composite_rgb(thresholds=1.1).any()


def test_thresholds_by_name_and_scalar(counts_truth, model):
    maps = map_pigments(Scan(counts_truth[0], CAL), model, progress=False)
    assert not maps.binary({"Vermilion": 1.5})[..., 1].any()
    assert maps.binary({"Vermilion": 1.5})[..., 0].any()
    assert maps.binary(0.0)[~maps.mask].all()
    with pytest.raises(xrfnb.DataError, match="unknown pigment class"):
        maps.binary({"smalt": 0.3})


def test_hdf5_round_trip_is_exact_and_atomic(tmp_path, counts_truth, model):
    counts = counts_truth[0].astype(np.float32)
    counts[0, 0] = np.nan
    maps = map_pigments(Scan(counts, CAL, pixel_size_um=50.0), model, progress=False)
    path = maps.to_hdf5(tmp_path / "maps.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.h5"]  # no temporary left behind
    back = PigmentMaps.from_hdf5(path)
    assert back.classes == maps.classes and back.colors == maps.colors
    np.testing.assert_array_equal(back.probability, maps.probability)
    np.testing.assert_array_equal(back.buried_probability, maps.buried_probability)
    np.testing.assert_array_equal(back.ood_score, maps.ood_score)
    np.testing.assert_array_equal(back.mask, maps.mask)
    np.testing.assert_array_equal(back.mask_reason, maps.mask_reason)
    np.testing.assert_array_equal(back.thresholds, maps.thresholds)
    assert back.summary() == maps.summary()
    lazy = PigmentMaps.from_hdf5(path, lazy=True)
    assert lazy.is_lazy
    np.testing.assert_array_equal(lazy.binary(), maps.binary())
    np.testing.assert_array_equal(lazy.composite_rgb(), maps.composite_rgb())


def test_failed_write_leaves_previous_file_intact(tmp_path, counts_truth, model, monkeypatch):
    maps = map_pigments(Scan(counts_truth[0], CAL), model, progress=False)
    path = maps.to_hdf5(tmp_path / "maps.h5")
    before = path.read_bytes()

    import xrfnb.maps.pigmentmaps as pigmentmaps

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pigmentmaps, "write_element_maps", boom)
    broken = dataclasses.replace(maps, element_maps=object())
    with pytest.raises(RuntimeError, match="disk full"):
        broken.to_hdf5(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.h5"]


def test_from_hdf5_rejects_other_files(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(xrfnb.FormatError, match="not an xrfnb pigment-maps file"):
        PigmentMaps.from_hdf5(other)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\nnot really")
    with pytest.raises(xrfnb.FormatError, match="not a readable HDF5 file"):
        PigmentMaps.from_hdf5(garbage)


def test_tiff_one_float32_imagej_file_per_class(tmp_path, counts_truth, model):
    tifffile = pytest.importorskip("tifffile")
    maps = map_pigments(Scan(counts_truth[0], CAL, pixel_size_um=25.0), model, progress=False)
    paths = maps.to_tiff(tmp_path / "tiff")
    names = sorted(p.name for p in paths)
    assert names == sorted(["lead_white.tif", "vermilion.tif", "zinc_white.tif", "ood_score.tif", "mask.tif"])
    for i, cls in enumerate(maps.classes):
        with tifffile.TiffFile(tmp_path / "tiff" / f"{cls.replace(' ', '_')}.tif") as tf:
            assert tf.is_imagej
            assert tf.imagej_metadata is not None
            page = tf.pages[0]
            assert page.dtype == np.float32 and page.bitspersample == 32
            np.testing.assert_array_equal(page.asarray(), maps.probability[..., i])
            x_res = page.tags["XResolution"].value
            assert x_res[0] / x_res[1] == pytest.approx(1 / 25.0)
            assert tf.imagej_metadata.get("unit") == "um"


def test_out_writes_partial_then_final_file(tmp_path, counts_truth, model):
    counts, truth = counts_truth
    scan = _h5_scan(_write_h5(tmp_path / "scan.h5", counts))
    out = tmp_path / "maps.h5"
    maps = map_pigments(scan, model, chunk_pixels=40, progress=False, out=out)
    assert maps.is_lazy
    assert not (tmp_path / "maps.h5.partial").exists()
    np.testing.assert_array_equal(maps.binary(), truth)
    mem = map_pigments(scan, model, chunk_pixels=40, progress=False)
    np.testing.assert_array_equal(PigmentMaps.from_hdf5(out).probability, mem.probability)


def test_resume_skips_completed_blocks(tmp_path, counts_truth):
    counts, _ = counts_truth
    scan = _h5_scan(_write_h5(tmp_path / "scan.h5", counts))
    out = tmp_path / "maps.h5"

    class Interrupting(LinearTestModel):
        def identify_batch(self, counts, calibration, live_time_s=None):
            if self.calls >= 3:
                raise KeyboardInterrupt
            return super().identify_batch(counts, calibration, live_time_s)

    # 24 rows x 20 cols, chunk rows 4 -> blocks of 4 rows (80 px); 1 model call per block
    with pytest.raises(KeyboardInterrupt):
        map_pigments(scan, Interrupting(), chunk_pixels=80, batch_pixels=80, progress=False, out=out)
    assert not out.exists()
    partial = tmp_path / "maps.h5.partial"
    assert len(list(partial.glob("rows_*.npz"))) == 3
    counting = LinearTestModel()
    maps = map_pigments(
        scan, counting, chunk_pixels=80, batch_pixels=80, progress=False, out=out, resume=True
    )
    assert counting.calls == 3  # the 3 remaining blocks only
    assert out.exists() and not partial.exists()
    ref = map_pigments(Scan(counts, CAL), LinearTestModel(), progress=False)
    np.testing.assert_allclose(maps.probability[()], ref.probability, atol=1e-6)


def test_resume_refuses_partial_from_another_input(tmp_path, counts_truth):
    counts, _ = counts_truth
    scan = _h5_scan(_write_h5(tmp_path / "scan.h5", counts))
    out = tmp_path / "maps.h5"
    partial = tmp_path / "maps.h5.partial"
    partial.mkdir()
    (partial / "manifest.json").write_text(
        json.dumps({"format": "xrfnb-pigment-maps-partial", "shape": [1, 1]})
    )
    with pytest.raises(xrfnb.DataError, match="cannot resume"):
        map_pigments(scan, LinearTestModel(), progress=False, out=out, resume=True)
    # without --resume the stale partial results are discarded
    map_pigments(scan, LinearTestModel(), progress=False, out=out)
    assert out.exists() and not partial.exists()


def test_refuses_to_overwrite_the_input(tmp_path, counts_truth, model):
    path = _write_h5(tmp_path / "scan.h5", counts_truth[0])
    before = path.read_bytes()
    with pytest.raises(xrfnb.FormatError, match="refusing to overwrite the input"):
        map_pigments(_h5_scan(path), model, progress=False, out=path)
    with h5py.File(path, "r") as f:  # no "source" in the metadata: the open dataset still tells
        with pytest.raises(xrfnb.FormatError, match="refusing to overwrite the input"):
            map_pigments(Scan(f["counts"], CAL), model, progress=False, out=tmp_path / "." / "scan.h5")
    assert path.read_bytes() == before


def test_per_pixel_live_time_reaches_the_model(counts_truth):
    counts, _ = counts_truth
    seen = []

    class Recording(LinearTestModel):
        def identify_batch(self, counts, calibration, live_time_s=None):
            seen.append(np.array(live_time_s))
            return super().identify_batch(counts, calibration, live_time_s)

    lt = np.arange(counts.shape[0] * counts.shape[1], dtype=float).reshape(counts.shape[:2]) / 100
    map_pigments(Scan(counts, CAL, live_time_s=lt), Recording(), batch_pixels=33, progress=False)
    np.testing.assert_array_equal(np.concatenate(seen), lt.reshape(-1))


def test_dask_local_cluster_equals_streaming(tmp_path, counts_truth, model):
    da = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    counts, _ = counts_truth
    bad = counts.astype(np.float32)
    bad[3, 4] = 0
    bad[5, 6, 10] = np.nan
    lt = np.full(counts.shape[:2], 0.05)
    ref = map_pigments(Scan(bad, CAL, live_time_s=lt), model, progress=False)
    # channel axis deliberately split: map_pigments must rechunk it into one piece
    lazy = Scan(da.from_array(bad, chunks=(7, 9, 512)), CAL, live_time_s=lt)
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        maps = map_pigments(lazy, model, progress=False)
    np.testing.assert_allclose(maps.probability, ref.probability, atol=1e-6)
    np.testing.assert_allclose(maps.buried_probability, ref.buried_probability, atol=1e-6)
    np.testing.assert_allclose(maps.ood_score, ref.ood_score, atol=1e-6)
    np.testing.assert_array_equal(maps.mask_reason, ref.mask_reason)
    assert maps.summary() == ref.summary()


def test_dask_local_scheduler(counts_truth, model):
    da = pytest.importorskip("dask.array")
    counts, _ = counts_truth
    ref = map_pigments(Scan(counts, CAL), model, progress=False)
    maps = map_pigments(Scan(da.from_array(counts, chunks=(10, 10, N_CH)), CAL), model, progress=False)
    np.testing.assert_allclose(maps.probability, ref.probability, atol=1e-6)
    np.testing.assert_array_equal(maps.mask, ref.mask)


def _check_reports(calls, total):
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    done = [d for d, t in calls]
    assert all(t == total for _, t in calls) and done == sorted(done)


def test_progress_callable_streaming_reports_every_block(tmp_path, counts_truth, model):
    counts, _ = counts_truth
    rows, cols = counts.shape[:2]
    calls: list[tuple[int, int]] = []
    scan = _h5_scan(_write_h5(tmp_path / "scan.h5", counts))
    maps = map_pigments(scan, model, chunk_pixels=4 * cols, progress=lambda d, t: calls.append((d, t)))
    _check_reports(calls, rows * cols)
    # one report at the start, then one per block of 4 rows (the chunk height)
    assert [d for d, _ in calls] == [min(r, rows) * cols for r in range(0, rows + 4, 4)][: len(calls)]
    assert len(calls) == 1 + -(-rows // 4)
    ref = map_pigments(Scan(counts, CAL), model, progress=False)
    np.testing.assert_array_equal(maps.probability, ref.probability)


def test_progress_callable_can_stop_a_run_that_then_resumes(tmp_path, counts_truth, model):
    counts, _ = counts_truth
    rows, cols = counts.shape[:2]
    src = _write_h5(tmp_path / "scan.h5", counts)
    out = tmp_path / "maps.h5"

    class Stop(Exception):
        pass

    def stop_after_two_blocks(done, total):
        if done >= 8 * cols:
            raise Stop

    with pytest.raises(Stop):
        map_pigments(_h5_scan(src), model, chunk_pixels=4 * cols, out=out, progress=stop_after_two_blocks)
    assert not out.exists()
    calls: list[tuple[int, int]] = []
    maps = map_pigments(_h5_scan(src), model, chunk_pixels=4 * cols, out=out, resume=True,
                        progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (8 * cols, rows * cols)  # the two finished blocks were kept
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1] == (rows * cols, rows * cols)
    ref = map_pigments(Scan(counts, CAL), model, progress=False)
    np.testing.assert_array_equal(np.asarray(maps.probability[()]), ref.probability)


def test_progress_callable_on_dask_local_and_distributed(counts_truth, model):
    da = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    counts, _ = counts_truth
    total = counts.shape[0] * counts.shape[1]
    lazy = Scan(da.from_array(counts, chunks=(6, 10, N_CH)), CAL)
    ref = map_pigments(Scan(counts, CAL), model, progress=False)
    calls: list[tuple[int, int]] = []
    maps = map_pigments(lazy, model, progress=lambda d, t: calls.append((d, t)))
    _check_reports(calls, total)
    assert len(calls) > 3
    np.testing.assert_allclose(maps.probability, ref.probability, atol=1e-6)
    calls.clear()
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        maps = map_pigments(lazy, model, progress=lambda d, t: calls.append((d, t)))
    _check_reports(calls, total)
    # one report per finished block of 6 x 10 pixels
    assert sorted({d for d, _ in calls} - {0, total}) == list(range(60, total, 60))
    np.testing.assert_allclose(maps.probability, ref.probability, atol=1e-6)


def test_gzip_chunks_are_inflated_by_isal():
    from isal import isal_zlib

    from xrfnb.io.chunks import inflater as _inflater

    assert _inflater() is isal_zlib.decompress


def test_single_spectrum_gives_one_pixel_map(counts_truth, model):
    spectrum = xrfnb.Spectrum(counts_truth[0][0, 0], CAL)
    maps = map_pigments(spectrum, model, progress=False)
    assert maps.shape == (1, 1)
    assert maps.binary()[0, 0].tolist() == counts_truth[1][0, 0].tolist()


def test_bad_arguments_are_clear_errors(counts_truth, model):
    scan = Scan(counts_truth[0], CAL)
    with pytest.raises(xrfnb.DataError, match="chunk_pixels"):
        map_pigments(scan, model, chunk_pixels=0, progress=False)
    with pytest.raises(xrfnb.ModelError, match=r"has no .classes.: pass a PigmentModel"):
        map_pigments(scan, object(), progress=False)
    with pytest.raises(xrfnb.DataError, match="needs a Scan"):
        map_pigments(np.zeros((2, 2, 8)), model, progress=False)
    with pytest.raises(xrfnb.FormatError, match="does not exist"):
        map_pigments(scan, model, progress=False, out="/nonexistent-folder/maps.h5")


def test_wrong_model_output_shape_is_model_error(counts_truth):
    class Broken(LinearTestModel):
        def identify_batch(self, counts, calibration, live_time_s=None):
            r = super().identify_batch(counts, calibration, live_time_s)
            return dataclasses.replace(r, probability=r.probability[:, :2])

    with pytest.raises(xrfnb.ModelError, match="model returned probability"):
        map_pigments(Scan(counts_truth[0], CAL), Broken(), progress=False)


def _untrained_pigment_model():
    """A real PigmentModel (untrained weights, fixed seed): exercises the real rebinning and network."""
    torch = pytest.importorskip("torch")
    from xrfnb.model.model import PigmentModel
    from xrfnb.model.nn import PigmentNet

    torch.manual_seed(0)
    classes = list(CLASS_LINES)
    meta = {
        "name": "untrained-test",
        "classes": classes,
        "colors": list(COLORS),
        "class_pigments": {c: [c] for c in classes},
        "class_elements": {c: [el] for c, (el, _) in CLASS_LINES.items()},
        "energy_grid": {"n_bins": 64, "e_min_keV": 1.0, "e_max_keV": 20.0, "noise_keV": 0.08},
        "thresholds": [0.5, 0.5, 0.5],
        "ood": {"threshold": 1.0},
    }
    return PigmentModel(PigmentNet(64, len(classes), conv_channels=4, hidden=(16,)), meta, {})


def test_real_pigment_model_streaming_and_dask_agree(tmp_path, counts_truth):
    da = pytest.importorskip("dask.array")
    model = _untrained_pigment_model()
    counts = counts_truth[0].copy()
    counts[2, 3] = 0
    ref = model.identify_batch(counts.reshape(-1, N_CH), CAL)
    scan = _h5_scan(_write_h5(tmp_path / "scan.h5", counts))
    maps = map_pigments(scan, model, chunk_pixels=100, batch_pixels=64, progress=False, out=tmp_path / "m.h5")
    prob = maps.probability[()].reshape(-1, 3)
    valid = np.ones(counts.shape[:2], bool)
    valid[2, 3] = False
    np.testing.assert_allclose(prob[valid.reshape(-1)], ref.probability[valid.reshape(-1)], atol=1e-5)
    assert maps.mask_reason[2, 3] == MASK_DEAD
    lazy = map_pigments(Scan(da.from_array(counts, chunks=(8, 10, 512)), CAL), model, progress=False)
    np.testing.assert_allclose(lazy.probability, maps.probability[()], atol=1e-5)
    np.testing.assert_allclose(lazy.ood_score, maps.ood_score[()], atol=1e-5)


@pytest.mark.parametrize(
    "opts",
    [
        {"compression": "gzip", "compression_opts": 4, "shuffle": True},
        {"compression": "gzip", "compression_opts": 1},
        {"shuffle": True},
        {},
        {"compression": "lzf"},  # not handled by the parallel reader: h5py fallback
        {"compression": "gzip", "fletcher32": True},  # idem
    ],
)
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int32])
def test_parallel_chunk_reader_equals_h5py(tmp_path, opts, dtype):
    from xrfnb.io.chunks import ChunkReader as _ChunkReader

    rng = np.random.default_rng(1)
    data = rng.poisson(2.0, size=(11, 13, 70)).astype(dtype)
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("counts", data=data, chunks=(3, 5, 32), **opts)
        e = f.create_dataset("sparse", shape=(11, 13, 70), dtype=dtype, chunks=(3, 5, 32), fillvalue=7)
        e[0:3, 0:5, 0:32] = data[0:3, 0:5, 0:32]  # other chunks never written -> fill value
    with h5py.File(path, "r") as f:
        for name in ("counts", "sparse"):
            dset = f[name]
            reader = _ChunkReader.maybe(dset, threads=2)
            handled = not (
                {"lzf", "fletcher32"} & {opts.get("compression"), *(k for k in opts if opts[k] is True)}
            )
            assert (reader is not None) == (handled or name == "sparse")
            if reader is None:
                continue
            for r0, r1 in [(0, 3), (3, 9), (9, 11), (0, 11)]:
                np.testing.assert_array_equal(reader.read_rows(r0, r1), dset[r0:r1])
            reader.close()


def _element_scan(rows=4, cols=3, seed=2):
    """Realistic line families (xraylib energies): Pb L + Fe K everywhere, Zn K in the first row."""
    cal = EnergyCalibration(0.0, 0.01)
    e = cal.energies_keV(4096)
    rng = np.random.default_rng(seed)

    def family(el, lines):
        return sum(h * _gauss(e, xrfnb.line_energy_keV(el, ln), 0.14) for ln, h in lines)

    base = 0.02 * np.exp(-(((e - 12) / 8) ** 2)) * (e > 1) + 0.3 * _gauss(e, 20.2, 0.2)
    pb = family("Pb", [("La", 1.0), ("Lb", 0.8), ("Lg", 0.12), ("Ma", 0.3)])
    fe = family("Fe", [("Ka", 1.0), ("Kb", 0.13)])
    zn = family("Zn", [("Ka", 1.0), ("Kb", 0.14)])
    lam = np.empty((rows, cols, e.size))
    for r in range(rows):
        s = base + pb + 0.5 * fe + (zn if r == 0 else 0)
        lam[r] = 20000 * s / s.sum()
    return Scan(rng.poisson(lam).astype(np.uint16), cal)


def test_element_maps_are_stored_alongside(tmp_path, model):
    maps = map_pigments(_element_scan(), model, element_maps=True, progress=False)
    em = maps.element_maps
    assert em is not None, maps.metadata.get("element_maps_error")
    assert {"Pb", "Fe", "Zn"} <= set(em.elements)
    assert em["Zn"][0].min() > em["Zn"][1:].max()  # zinc only in the first row
    back = PigmentMaps.from_hdf5(maps.to_hdf5(tmp_path / "m.h5")).element_maps
    assert back.elements == em.elements and back.families == em.families
    for name in ("intensity", "sigma", "detection_limit", "chi2", "residual"):
        np.testing.assert_array_equal(getattr(back, name), getattr(em, name))


def test_element_maps_are_written_as_tiffs_too(tmp_path, model):
    tifffile = pytest.importorskip("tifffile")
    maps = map_pigments(_element_scan(), model, element_maps=True, progress=False)
    em = maps.element_maps
    assert em is not None, maps.metadata.get("element_maps_error")
    written = maps.to_tiff(tmp_path / "tif")
    element_files = sorted(p for p in written if p.parent.name == "elements")
    expected = sorted(f"{e}_{f}.tif" for e, f in zip(em.elements, em.families, strict=True))
    assert [p.name for p in element_files] == expected
    zn = tifffile.imread(tmp_path / "tif" / "elements" / f"Zn_{em.families[em.elements.index('Zn')]}.tif")
    np.testing.assert_array_equal(zn, em["Zn"])
    assert zn[0].min() > zn[1:].max()  # the zinc row, straight from the file a user opens in ImageJ


def test_failed_element_fit_keeps_the_pigment_maps(model, counts_truth, monkeypatch):
    import xrfnb.maps.mapping as mapping

    def no_elements(*a, **k):
        raise xrfnb.FitError("no element was detected in the (sum) spectrum")

    monkeypatch.setattr(mapping, "_element_maps", no_elements)
    maps = map_pigments(Scan(counts_truth[0], CAL), model, element_maps=True, progress=False)
    assert maps.element_maps is None
    assert "no element was detected" in maps.metadata["element_maps_error"]
    np.testing.assert_array_equal(maps.binary(), counts_truth[1])


def test_use_dask_on_an_hdf5_scan_reads_by_path(tmp_path, counts_truth, model):
    import pickle

    distributed = pytest.importorskip("distributed")
    from xrfnb.maps.daskpath import dask_scan

    counts, _ = counts_truth
    scan = _h5_scan(_write_h5(tmp_path / "scan.h5", counts))
    lazy = dask_scan(scan, rows_per_chunk=8)
    assert lazy.counts.chunks[0] == (8, 8, 8)
    # the graph pickles (an open h5py dataset would not), so cluster workers can run it
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(lazy.counts)).compute(), counts)
    ref = map_pigments(scan, model, progress=False)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as c,
        distributed.Client(c),
    ):
        maps = map_pigments(scan, model, progress=False, use_dask=True, out=tmp_path / "maps.h5")
    np.testing.assert_allclose(maps.probability, ref.probability, atol=1e-6)
    np.testing.assert_allclose(
        PigmentMaps.from_hdf5(tmp_path / "maps.h5").probability, ref.probability, atol=1e-6
    )


def test_summary_says_first_how_many_pixels_are_out_of_distribution():
    """Issue 14: OOD pixels' calls are unreliable; they are counted apart, not in the area fractions.
    Reference: the fractions counted by hand on a 2 x 3 map (one pixel masked, two flagged OOD)."""
    nan = np.nan
    # classes: A present on the two OOD pixels only; B present on two of the three in-distribution pixels
    prob = np.array(
        [[[0.9, 0.1], [0.8, 0.7], [0.1, 0.9]], [[0.2, 0.6], [nan, nan], [0.95, 0.05]]], dtype=np.float32
    )
    buried = prob * np.float32(0.6)  # > p / 2: every present call is a buried one
    ood = np.array([[5.0, 0.1, 0.2], [0.3, nan, 7.0]], dtype=np.float32)
    mask = np.isnan(ood)
    maps = PigmentMaps(("A", "B"), prob, buried, ood, np.array([0.5, 0.5]), 1.0, mask, ("#ff0000", "#0000ff"))
    s = maps.summary()
    assert (s.n_pixels, s.n_masked, s.n_valid, s.n_ood) == (6, 1, 5, 2)
    assert s.ood_fraction == pytest.approx(2 / 5)
    # in distribution: (0,1) A+B, (0,2) B, (1,0) B -> A 1/3, B 3/3
    assert s.area_fraction == pytest.approx({"A": 1 / 3, "B": 1.0})
    assert s.buried_fraction == pytest.approx({"A": 1 / 3, "B": 1.0})
    assert s.ood_area_fraction == pytest.approx({"A": 1.0, "B": 0.0})  # (0,0) and (1,2): A only
    text = s.to_text().splitlines()
    assert text[0].startswith("WARNING: 2 of 5 identified pixels (40.0 %) are out of distribution")
    assert "unreliable" in text[0] and "on OOD px %" in text[1]
    assert text[2].split()[0] == "B" and text[2].split()[-1] == "0.00"
    # no OOD pixel: no warning, no extra column
    calm = dataclasses.replace(maps, ood_score=np.where(mask, np.nan, 0.0).astype(np.float32))
    assert calm.summary().n_ood == 0 and not calm.summary().to_text().startswith("WARNING")
    assert "OOD px" not in calm.summary().to_text()


def test_element_maps_step_reports_progress(model, capsys):
    map_pigments(_element_scan(), model, element_maps=True, progress=True)
    err = capsys.readouterr().err
    start = err.index("element maps: summing the scan's spectra, detecting its elements")
    assert start < err.index("fit_elements") < err.index("fitted in")


def test_calls_at_one_pixel_follow_the_one_rule():
    """PigmentMaps.calls_at: per class the probability, threshold, present and buried (strictly more
    likely buried than at the surface: a tie is surface), most probable first, a masked pixel's NaN last."""
    classes = ("a", "b", "c", "d")
    prob = np.array([[[0.9, 0.6, 0.3, np.nan], [0.8, 0.8, 0.8, 0.8]]], np.float32)
    bur = np.array([[[0.3, 0.3, 0.25, np.nan], [0.41, 0.0, 0.0, 0.0]]], np.float32)
    maps = PigmentMaps(
        classes=classes,
        probability=prob,
        buried_probability=bur,
        ood_score=np.zeros((1, 2), np.float32),
        thresholds=np.array([0.5, 0.5, 0.5, 0.5]),
        ood_threshold=1.0,
        mask=np.zeros((1, 2), bool),
        colors=("#000000", "#111111", "#222222", "#333333"),
    )
    calls = maps.calls_at(0, 0)
    assert [c.class_name for c in calls] == ["a", "b", "c", "d"]
    by_name = {c.class_name: c for c in calls}
    assert by_name["a"].call == "surface"  # 0.3 < 0.9 / 2
    assert by_name["b"].call == "surface"  # 0.3 == 0.6 / 2: a tie is surface
    assert by_name["c"].call == "" and not by_name["c"].present  # below its threshold
    assert by_name["d"].call == "" and np.isnan(by_name["d"].probability)
    assert by_name["a"].probability == pytest.approx(0.9) and by_name["a"].threshold == 0.5
    # the same calls as the whole-map rule
    binary, buried = maps.binary(), maps.buried()
    for k, name in enumerate(classes):
        assert by_name[name].present == binary[0, 0, k] and by_name[name].buried == buried[0, 0, k]
    # thresholds as for binary(): by name
    assert {c.class_name: c.call for c in maps.calls_at(0, 1, {"a": 0.85})}["a"] == ""
    assert maps.calls_at(0, 1)[0].call == "buried"  # 0.41 > 0.8 / 2
    with pytest.raises(xrfnb.DataError, match="outside"):
        maps.calls_at(1, 0)


@pytest.mark.parametrize("bad", ["dead", "saturated", "invalid", "many dead"])
def test_blocks_with_few_masked_pixels_pass_them_to_the_model(counts_truth, monkeypatch, bad):
    """A block with a few dead or saturated pixels is identified as slices of the block (the masked
    pixels through the model too, their results dropped, no copy of the valid ones); the maps are those
    of identifying the valid pixels alone, to float32 rounding; the counts the call patterns get from
    the model are those of the valid pixels. Invalid pixels, or many masked ones, keep the selection."""
    from xrfnb.maps import blocks

    counts, _ = counts_truth
    counts = counts.astype(np.float32 if bad == "invalid" else np.uint16).copy()
    counts[1, 2] = 0 if bad != "saturated" else counts[1, 2]
    if bad == "saturated":
        counts[1, 2, 50] = 65535
    elif bad == "invalid":
        counts[3, 4, 7] = np.nan
    elif bad == "many dead":
        counts[:3] = 0
    model = xrfnb.load_model("default", precision="float32")
    cal = EnergyCalibration(-0.9555, 0.009999)  # the model's default axis, 4096 channels
    scan = Scan(np.concatenate([counts] * 2, axis=2)[..., :4096].copy(), cal)
    calls: list[int] = []
    real = model.identify_batch

    def spy(x, calibration=None, live_time_s=None):
        calls.append(x.shape[0])
        return real(x, calibration, live_time_s)

    monkeypatch.setattr(model, "identify_batch", spy)
    fast = map_pigments(scan, model, chunk_pixels=10_000, batch_pixels=16, progress=False)
    n_fast = sum(calls)
    monkeypatch.setattr(blocks, "_MAX_MASKED_SHARE", -1.0)  # always the selection of valid pixels
    calls.clear()
    ref = map_pigments(scan, model, chunk_pixels=10_000, batch_pixels=16, progress=False)
    n_valid = int((~ref.mask).sum())
    assert sum(calls) == n_valid
    assert n_fast == (n_valid if bad in ("invalid", "many dead") else scan.shape[0] * scan.shape[1])
    np.testing.assert_array_equal(fast.mask_reason, ref.mask_reason)
    for name in ("probability", "buried_probability", "ood_score"):
        a, b = getattr(fast, name), getattr(ref, name)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(fast.pattern, ref.pattern)
