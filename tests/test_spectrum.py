"""Spectrum and Scan data model: validation, pixel access, block-wise reductions against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

import xrfnb
from xrfnb import DataError, EnergyCalibration, Scan, Spectrum

CAL = EnergyCalibration(-0.02, 0.01)


def test_spectrum_basics():
    counts = np.array([0, 3, 5, 2], dtype=np.int64)
    s = Spectrum(counts, CAL, live_time_s=1.5, real_time_s=2, metadata={"source": "x.mca"})
    np.testing.assert_allclose(s.energy_keV, [-0.02, -0.01, 0.0, 0.01])
    assert s.n_channels == 4 and s.total_counts == 10.0
    assert s.real_time_s == 2.0 and isinstance(s.real_time_s, float)
    with pytest.raises(ValueError):
        s.counts[0] = 9  # counts are read-only
    s2 = s.with_calibration(EnergyCalibration(0.0, 0.02))
    assert s2.energy_keV[-1] == pytest.approx(0.06) and s2.live_time_s == 1.5


@pytest.mark.parametrize(
    ("counts", "kwargs", "pattern"),
    [
        (np.ones((2, 5)), {}, "must be 1-D"),
        (np.ones(1), {}, "at least 2 channels"),
        (np.array([1.0, np.nan, 2.0]), {}, r"non-finite counts .* at index \(1,\)"),
        (np.array([1.0, np.inf]), {}, "non-finite"),
        (np.array([1, -2, 3]), {}, r"negative counts \(-2\) at index \(1,\)"),
        (np.array(["a", "b"]), {}, "numeric"),
        (np.ones(4), {"live_time_s": -1.0}, "live_time_s must be a finite non-negative"),
        (np.ones(4), {"real_time_s": float("nan")}, "real_time_s"),
    ],
)
def test_spectrum_rejects_bad_data(counts, kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        Spectrum(counts, CAL, metadata={"source": "bad.mca"}, **kwargs)


def test_spectrum_error_names_its_source():
    with pytest.raises(DataError, match=r"^painting\.h5: negative"):
        Spectrum(np.array([1, -1]), CAL, metadata={"source": "painting.h5"})


def test_spectrum_rejects_non_calibration():
    with pytest.raises(DataError, match="EnergyCalibration"):
        Spectrum(np.ones(4), (0.0, 0.01))


def _cube(rows=7, cols=5, ch=64, seed=0):
    return np.random.default_rng(seed).poisson(4.0, (rows, cols, ch)).astype(np.uint16)


def test_scan_pixel_access_and_live_time():
    cube = _cube()
    lt = np.arange(35, dtype=float).reshape(7, 5) / 100
    scan = Scan(cube, CAL, pixel_size_um=50, live_time_s=lt, metadata={"source": "s.h5"})
    assert scan.shape == (7, 5, 64) and scan.n_channels == 64 and not scan.is_lazy
    px = scan[2, 3]
    np.testing.assert_array_equal(px.counts, cube[2, 3])
    assert px.live_time_s == lt[2, 3] and px.metadata["pixel"] == (2, 3)
    np.testing.assert_array_equal(scan[-1, -1].counts, cube[6, 4])
    with pytest.raises(DataError, match=r"pixel \(7, 0\) is outside the 7 x 5 scan"):
        scan[7, 0]
    with pytest.raises(DataError, match=r"scan\[row, col\]"):
        scan[1]
    assert Scan(cube, CAL, live_time_s=0.1).pixel_live_time_s(3, 3) == 0.1
    assert Scan(cube, CAL).pixel_live_time_s(0, 0) is None


@pytest.mark.parametrize(
    ("counts", "kwargs", "pattern"),
    [
        (np.ones((4, 64)), {}, r"shape \(rows, cols, channels\)"),
        (np.ones((0, 3, 64)), {}, "empty axis"),
        (np.ones((2, 3, 1)), {}, "fewer than 2 channels"),
        (np.array([[["a", "b"]]]), {}, "numeric"),
        (np.ones((2, 3, 8)), {"live_time_s": np.ones((3, 2))}, r"live_time_s has shape \(3, 2\)"),
        (np.ones((2, 3, 8)), {"live_time_s": -0.1}, "finite and non-negative"),
    ],
)
def test_scan_rejects_bad_data(counts, kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        Scan(counts, CAL, **kwargs)


@pytest.mark.parametrize("max_pixels", [1, 7, 12, 1000])
def test_reductions_match_numpy_for_any_block_size(max_pixels):
    cube = _cube(rows=9, cols=4)
    lt = np.full((9, 4), 0.05)
    scan = Scan(cube, CAL, live_time_s=lt)
    total = scan.sum_spectrum(max_pixels=max_pixels)
    np.testing.assert_array_equal(total.counts, cube.sum(axis=(0, 1)))
    assert total.live_time_s == pytest.approx(0.05 * 36)
    np.testing.assert_array_equal(
        scan.max_pixel_spectrum(max_pixels=max_pixels).counts, cube.max(axis=(0, 1))
    )
    np.testing.assert_array_equal(scan.total_counts_image(max_pixels=max_pixels), cube.sum(axis=2))
    blocks = list(scan.iter_blocks(max_pixels))
    assert sum(b.shape[0] for _, b in blocks) == 9
    assert all(b.shape[0] * 4 <= max(max_pixels, 4) for _, b in blocks)


def test_dask_scan_is_lazy_and_reduces_blockwise():
    da = pytest.importorskip("dask.array")
    cube = _cube(rows=12, cols=6)
    lazy = da.from_array(cube, chunks=(3, 6, 64))
    scan = Scan(lazy, CAL)
    assert scan.is_lazy and scan.block_rows(max_pixels=20) == 3  # aligned to the 3-row chunks
    np.testing.assert_array_equal(scan.sum_spectrum(max_pixels=20).counts, cube.sum(axis=(0, 1)))
    np.testing.assert_array_equal(scan.max_pixel_spectrum().counts, cube.max(axis=(0, 1)))
    np.testing.assert_array_equal(scan[4, 5].counts, cube[4, 5])


def test_nan_in_a_lazy_scan_is_reported_when_read():
    cube = _cube().astype(float)
    cube[3, 1, 10] = np.nan
    scan = Scan(cube, CAL, metadata={"source": "broken.h5"})
    with pytest.raises(DataError, match=r"broken\.h5.*non-finite"):
        scan.sum_spectrum()
    with pytest.raises(DataError, match="non-finite"):
        scan[3, 1]


def test_scan_repr_and_energy_axis():
    scan = Scan(_cube(), CAL)
    assert "7 x 5 pixels x 64 channels" in repr(scan)
    np.testing.assert_allclose(scan.energy_keV, CAL.energies_keV(64))
    assert isinstance(scan.sum_spectrum(), xrfnb.Spectrum)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"pixel_size_um": "wide"}, "pixel_size_um must be a number"),
        ({"pixel_size_um": 0.0}, "pixel_size_um must be finite and > 0"),
        ({"live_time_s": "1 s"}, "live_time_s must be a number"),
    ],
)
def test_scan_rejects_non_numeric_metadata_values(kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        Scan(np.ones((2, 2, 8)), CAL, **kwargs)


def test_spectrum_rejects_non_numeric_times():
    with pytest.raises(DataError, match="live_time_s must be a number"):
        Spectrum(np.ones(8), CAL, live_time_s="120¶")
